"""Device lifecycle: add, rotate or revoke one device of an existing fleet directory.

``fedmq-broker provision`` makes a whole fleet at once (a new CA, a password for every device).
These operations change one device and leave everything else byte for byte as it was: the CA,
the server certificate, every other device's ``passwd`` line, certificate and config.

Why files and SIGHUP (not Mosquitto's dynamic-security plugin): the provisioned
``mosquitto.conf`` already reads ``passwd``, ``acl`` (and under mutual TLS ``crl.pem``), and
Mosquitto 2.0 re-reads all three on SIGHUP without dropping anyone else; the fleet directory
stays the one source of truth (reviewable, backed up, no broker admin account and no state file
owned by the broker). Measured with Mosquitto 2.0.11 (tests/test_lifecycle.py):

* password mode: on SIGHUP Mosquitto re-checks every connected client against the new password
  file; a device whose line was removed (revoke) or changed (rotate) is disconnected at once,
  and refused ("not authorised") when it connects again. The rest stay connected.
* mutual TLS (``use_identity_as_username``: the password is not checked at all): the CRL is
  reloaded on SIGHUP, so a revoked or rotated-out certificate fails its next TLS handshake, but
  a connection already open is NOT closed. ``revoke`` therefore also appends ``user <id>`` /
  ``topic deny #`` to the ACL, which Mosquitto checks on every publish and every delivery: the
  live session can neither send nor receive anything from the reload on. A ``crlfile`` line
  that was not in the config at start-up is not picked up by SIGHUP (a restart is needed once).
* a client Mosquitto disconnects during a reload gets no last will: the device's retained status
  stays "online" and the aggregator would keep asking it every round (with the default quorum,
  every round is abandoned at its deadline). So, just before the SIGHUP, :func:`mark_offline`
  connects as the device with its old credentials (still valid until the reload; this takes
  its session over, closing the device's connection) and publishes its retained "offline" status.

The fleet's devices and their state are kept in ``fleet.json`` (no secrets, mode 0600).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fedmq.broker.contract.topics import check_name
from fedmq.broker.errors import ConfigError, FedmqError
from fedmq.broker.ops import certs
from fedmq.broker.ops.provision import (
    ProvisionSpec,
    client_toml,
    hash_password,
    queued_messages_for,
    read_signing_public,
)
from fedmq.broker.storage import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "fleet.json"
MANIFEST_VERSION = 1
ACTIVE, REVOKED = "active", "revoked"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Device:
    """One device of the fleet as the manifest records it."""

    state: str = ACTIVE
    added_at: str | None = None  # None: the device predates the manifest
    rotated_at: str | None = None
    revoked_at: str | None = None
    cert_serial: str | None = None  # hex serial of its current client certificate
    #: certificates no longer valid (rotated out or revoked): {"serial": hex, "at": iso}; the CRL lists them
    retired: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Manifest:
    """``fleet.json``: what ``add`` needs to write a device's config, and every device's state."""

    fleet: str
    prefix: str
    host: str
    port: int
    max_packet_size: int
    mutual_tls: bool
    aggregator: str = "aggregator"
    broker_root: str | None = None
    devices: dict[str, Device] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> "Manifest":
        try:
            d = json.loads(raw)
            if d.get("version") != MANIFEST_VERSION:
                raise ConfigError(f"{where}: manifest version {d.get('version')!r}, this fedmq reads "
                                  f"{MANIFEST_VERSION}")
            devices = {check_name(k): Device(**v) for k, v in d.pop("devices").items()}
            return cls(devices=devices, **d)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"{where} is not a fedmq fleet manifest: {e}") from None

    def spec(self, out_dir: Path) -> ProvisionSpec:
        """The provision settings a new device's config is written from."""
        return ProvisionSpec(self.fleet, [], out_dir, self.host, self.port, self.prefix, self.aggregator,
                             self.broker_root, self.max_packet_size, mutual_tls=self.mutual_tls)

    def active(self) -> list[str]:
        return sorted(k for k, v in self.devices.items() if v.state == ACTIVE)

    def retired(self) -> list[certs.Revoked]:
        return [certs.Revoked(int(r["serial"], 16), dt.datetime.fromisoformat(r["at"]))
                for d in self.devices.values() for r in d.retired]


@dataclass
class Change:
    """What one operation did (the CLI prints it)."""

    action: str
    agent: str
    password: str | None = None  # the new password (add, rotate), as written to the agent's config (never printed)
    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restart_needed: bool = False  # a reload is not enough (a crlfile line was added to mosquitto.conf)
    #: the device's credentials before the change (rotate, revoke): valid until the reload, for mark_offline
    previous: Credentials | None = field(default=None, repr=False)
    #: whether the device's live session should be marked offline (and closed) right before the reload
    mark_offline: bool = False


@dataclass
class Credentials:
    """One device's secrets as its running process holds them."""

    password: str
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return "Credentials(***)"


class Fleet:
    """A fleet directory written by ``fedmq-broker provision`` and the files an operation touches."""

    def __init__(self, root: Path, ca_key: Path | None = None) -> None:
        self.root = Path(root).resolve()
        if not (self.root / "broker" / "passwd").is_file():
            raise ConfigError(f"{self.root} is not a fleet directory (no broker/passwd): pass the --out "
                              "directory of `fedmq-broker provision`")
        self.broker = self.root / "broker"
        self.passwd, self.acl, self.conf = self.broker / "passwd", self.broker / "acl", self.broker / "mosquitto.conf"
        self.crl, self.ca_cert = self.broker / "crl.pem", self.broker / "ca.crt"
        self.manifest_path = self.root / MANIFEST
        self.ca_key_path = Path(ca_key) if ca_key else self.root / "ca" / "ca.key"

    def agent_dir(self, agent: str) -> Path:
        return self.root / "agents" / agent

    def ca(self) -> certs.KeyPair:
        """The fleet's CA (key from ``--ca-key`` or ca/ca.key), checked against broker/ca.crt."""
        try:
            pair = certs.KeyPair(self.ca_key_path.read_bytes(), self.ca_cert.read_bytes())
        except FileNotFoundError as e:
            raise ConfigError(f"{e.filename} not found: this operation signs with the fleet's CA "
                              "(pass --ca-key if the key is kept elsewhere)") from None
        try:
            certs.check_ca_pair(pair)
        except ValueError as e:
            raise ConfigError(f"{self.ca_key_path}: {e}") from None
        return pair

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One lifecycle operation at a time on this directory (two concurrent edits of passwd lose one)."""
        fd = os.open(self.root / ".lifecycle.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- the manifest ---------------------------------------------------------------------------
    def load(self) -> Manifest:
        """``fleet.json``, or (for a fleet provisioned before it existed) one rebuilt from the files."""
        try:
            return Manifest.from_json(self.manifest_path.read_bytes(), self.manifest_path)
        except FileNotFoundError:
            return self._rebuild()

    def save(self, m: Manifest) -> Path:
        return atomic_write(self.manifest_path, m.to_json(), mode=0o600)

    def _rebuild(self) -> Manifest:
        from fedmq.broker.commands.config import load_toml

        b = load_toml(self.root / "aggregator" / "aggregator.toml").get("broker", {})
        conf = self.conf.read_text()
        root = re.search(r"^password_file (.+)/passwd$", conf, re.M)
        users = [u for u, _ in _passwd_entries(self.passwd.read_text()) if u is not None]
        agg = str(b.get("username", "aggregator"))
        devices = {}
        for u in users:
            if u == agg:
                continue
            crt = self.agent_dir(u) / "client.crt"
            devices[u] = Device(cert_serial=f"{certs.serial_of(crt.read_bytes()):x}" if crt.is_file() else None)
        try:
            m = Manifest(str(b["fleet"]), str(b.get("prefix", "fedmq")), str(b["host"]), int(b["port"]),
                         int(b.get("max_payload", 2_000_000 - 4096)) + 4096,
                         "require_certificate true" in conf, agg,
                         None if root is None or root.group(1) == str(self.broker) else root.group(1), devices)
        except KeyError as e:
            raise ConfigError(f"{self.root}/aggregator/aggregator.toml has no [broker] {e.args[0]}: cannot tell "
                              f"the fleet's settings (and there is no {MANIFEST})") from None
        log.info("no %s in %s: rebuilt it from the fleet's files (%d devices)", MANIFEST, self.root, len(devices))
        return m


# --- passwd, ACL, CRL, mosquitto.conf: each edit keeps every other line as it was -------------------

def _passwd_entries(text: str) -> list[tuple[str | None, str]]:
    """``(user, line)`` for every line (with its newline); ``user`` is None for blank or comment lines."""
    out: list[tuple[str | None, str]] = []
    for line in text.splitlines(keepends=True):
        s = line.strip()
        out.append((s.split(":", 1)[0] if s and not s.startswith("#") and ":" in s else None, line))
    return out


def _replace_keeping_owner(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Atomic replace that keeps the file's owner and group (Mosquitto, running as user ``mosquitto``,
    must still read a passwd or acl it was given; a root-owned 0600 copy would lock every device out)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    atomic_write(path, data, mode=mode)
    if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.chown(path, st.st_uid, st.st_gid)
        except PermissionError:
            log.warning("%s: could not restore its owner %d:%d; check that the broker can read it",
                        path, st.st_uid, st.st_gid)
    return path


def set_passwd_line(path: Path, agent: str, line: str | None) -> None:
    """Replace (``line``), add, or remove (``None``) the agent's entry; every other byte stays."""
    entries = _passwd_entries(path.read_text())
    kept = [ln for u, ln in entries if u != agent]
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    if line is not None:
        kept.append(line + "\n")
    _replace_keeping_owner(path, "".join(kept).encode())


def _deny_block(agent: str) -> str:
    return (f"\n# revoked by `fedmq-broker revoke` ({now_iso()}): cuts off a session still open (mutual TLS)\n"
            f"user {agent}\ntopic deny #\n")


def _write_crl(fleet: Fleet, m: Manifest, change: Change) -> None:
    atomic_write(fleet.crl, certs.make_crl(fleet.ca(), m.retired()), mode=0o644)
    change.written.append(fleet.crl)
    conf = fleet.conf.read_text()
    if not re.search(r"^crlfile ", conf, re.M):  # a fleet provisioned before provision wrote a CRL
        root = m.broker_root or str(fleet.broker)
        new = re.sub(r"^(require_certificate true\n(?:use_identity_as_username true\n)?)",
                     rf"\1crlfile {root}/crl.pem\n", conf, flags=re.M)
        _replace_keeping_owner(fleet.conf, new.encode())
        change.written.append(fleet.conf)
        change.restart_needed = True
        change.notes.append("added `crlfile` to mosquitto.conf: Mosquitto reads a new crlfile line only at "
                            "start-up, restart the broker once (later changes to crl.pem need only a reload)")


def _raise_queue_limit(fleet: Fleet, m: Manifest, change: Change) -> None:
    """Keep provision's sizing of the aggregator's queue (50 messages per agent) as the fleet grows."""
    conf = fleet.conf.read_text()
    cur = re.search(r"^max_queued_messages (\d+)$", conf, re.M)
    want = queued_messages_for(len(m.active()))
    if cur and int(cur.group(1)) < want:
        conf = conf[:cur.start(1)] + str(want) + conf[cur.end(1):]
        _replace_keeping_owner(fleet.conf, conf.encode())
        change.written.append(fleet.conf)
        change.notes.append(f"max_queued_messages {cur.group(1)} -> {want} in mosquitto.conf")


def _set_toml_password(path: Path, password: str) -> bytes:
    """The agent's config with only its ``password = ...`` line changed (the operator's edits stay)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: restore the device's files, or revoke it and add it under a new id"
                          ) from None
    pat = re.compile(r'^password = "[^"\\\n]*"[ \t]*$', re.M)
    if len(pat.findall(text)) != 1:
        raise ConfigError(f"{path}: expected exactly one line `password = \"...\"` to replace; set the new "
                          "password by hand or restore the provisioned file")
    return pat.sub(lambda _: f'password = "{password}"', text).encode()


def _write_leaf(fleet: Fleet, d: Path, agent: str, change: Change) -> str:
    leaf = certs.issue(fleet.ca(), agent)
    change.written += [atomic_write(d / "client.key", leaf.key_pem, mode=0o600),
                       atomic_write(d / "client.crt", leaf.cert_pem, mode=0o644)]
    return f"{certs.serial_of(leaf.cert_pem):x}"


def _credentials(d: Path) -> Credentials | None:
    """What the device's process uses now (None if its files are incomplete)."""
    from fedmq.broker.commands.config import load_toml

    try:
        pw = load_toml(d / "agent.toml").get("broker", {}).get("password")
        return Credentials(str(pw), (d / "client.crt").read_bytes(), (d / "client.key").read_bytes())
    except (OSError, ConfigError):
        return None


def _known(m: Manifest, agent: str, action: str) -> Device:
    check_name(agent)
    dev = m.devices.get(agent)
    if agent == m.aggregator:
        raise ConfigError(f"{agent!r} is the aggregator, not a device: `{action}` works on devices only")
    if dev is None:
        raise ConfigError(f"no device {agent!r} in this fleet (devices: {', '.join(m.active()) or 'none'})")
    if dev.state != ACTIVE:
        raise ConfigError(f"device {agent!r} was revoked on {dev.revoked_at}: a revoked id is never reused; "
                          "add the device under a new id")
    return dev


# --- the operations -----------------------------------------------------------------------------

def add_device(root: Path, agent: str, *, ca_key: Path | None = None) -> Change:
    """A new device: password (appended to passwd), client cert signed by the fleet's CA, agent.toml."""
    fleet = Fleet(root, ca_key)
    with fleet.locked():
        m = fleet.load()
        check_name(agent)
        if agent == m.aggregator:
            raise ConfigError(f"{agent!r} is the aggregator's name: choose another device id")
        if agent in m.devices:
            state = m.devices[agent].state
            raise ConfigError(f"device {agent!r} already exists ({state}): use `rotate` for new credentials"
                              if state == ACTIVE else f"device {agent!r} was revoked: a revoked id is never "
                              "reused, choose a new one")
        if any(u == agent for u, _ in _passwd_entries(fleet.passwd.read_text())):
            raise ConfigError(f"{fleet.passwd} already has a line for {agent!r} (not in {MANIFEST}): remove it first")
        d = fleet.agent_dir(agent)
        if d.exists():
            raise ConfigError(f"{d} already exists: remove it or choose another id")
        fleet.ca()  # fail before writing anything
        password = secrets.token_urlsafe(24)
        change = Change("add", agent, password)
        d.mkdir(parents=True, mode=0o700)
        os.chmod(d, 0o700)
        serial = _write_leaf(fleet, d, agent, change)
        change.written.append(atomic_write(d / "ca.crt", fleet.ca_cert.read_bytes(), mode=0o644))
        change.written.append(atomic_write(d / "agent.toml", client_toml(m.spec(fleet.root), agent, password,
                                                                         d, "agent", read_signing_public(fleet.root)
                                                                         ).encode(), mode=0o600))
        set_passwd_line(fleet.passwd, agent, f"{agent}:{hash_password(password)}")
        change.written.append(fleet.passwd)
        m.devices[agent] = Device(added_at=now_iso(), cert_serial=serial)
        _raise_queue_limit(fleet, m, change)
        change.written.append(fleet.save(m))
        log.info("added device %s", agent)
        return change


def rotate_device(root: Path, agent: str, *, ca_key: Path | None = None) -> Change:
    """New password and client certificate for one device; the old ones are refused after the reload."""
    fleet = Fleet(root, ca_key)
    with fleet.locked():
        m = fleet.load()
        dev = _known(m, agent, "rotate")
        d = fleet.agent_dir(agent)
        password = secrets.token_urlsafe(24)
        change = Change("rotate", agent, password, previous=_credentials(d),
                        mark_offline=not m.mutual_tls)  # mTLS: the old session may run until it reconnects
        toml = _set_toml_password(d / "agent.toml", password)  # fail before writing anything
        fleet.ca()
        old = dev.cert_serial
        dev.cert_serial = _write_leaf(fleet, d, agent, change)
        change.written.append(atomic_write(d / "agent.toml", toml, mode=0o600))
        set_passwd_line(fleet.passwd, agent, f"{agent}:{hash_password(password)}")
        change.written.append(fleet.passwd)
        dev.rotated_at = now_iso()
        if old:
            dev.retired.append({"serial": old, "at": dev.rotated_at})
        if m.mutual_tls:
            _write_crl(fleet, m, change)
            change.notes.append("mutual TLS: a session open with the old certificate stays open until it "
                                "reconnects (then its handshake fails)")
        change.written.append(fleet.save(m))
        log.info("rotated device %s", agent)
        return change


def revoke_device(root: Path, agent: str, *, ca_key: Path | None = None) -> Change:
    """Refuse one device from the next reload on: passwd line removed, ACL deny, its certificate in the CRL
    (mutual TLS); its key and config are deleted and its certificate kept in ``revoked/<id>/``."""
    fleet = Fleet(root, ca_key)
    with fleet.locked():
        m = fleet.load()
        dev = _known(m, agent, "revoke")
        if m.mutual_tls:
            fleet.ca()  # the CRL is signed: fail before writing anything
        d = fleet.agent_dir(agent)
        change = Change("revoke", agent, previous=_credentials(d) if d.exists() else None, mark_offline=True)
        set_passwd_line(fleet.passwd, agent, None)
        change.written.append(fleet.passwd)
        with fleet.acl.open("rb") as f:
            acl = f.read()
        _replace_keeping_owner(fleet.acl, acl + _deny_block(agent).encode())
        change.written.append(fleet.acl)
        dev.state, dev.revoked_at = REVOKED, now_iso()
        if dev.cert_serial:
            dev.retired.append({"serial": dev.cert_serial, "at": dev.revoked_at})
            dev.cert_serial = None
        if m.mutual_tls:
            _write_crl(fleet, m, change)
        if d.exists():
            keep = fleet.root / "revoked" / agent
            keep.parent.mkdir(mode=0o700, exist_ok=True)
            for name in ("client.key", "agent.toml"):  # dead secrets: nobody should deploy them again
                if (d / name).exists():
                    (d / name).unlink()
                    change.removed.append(d / name)
            shutil.move(str(d), str(keep))
            change.notes.append(f"{d} moved to {keep} (its key and config deleted)")
        change.written.append(fleet.save(m))
        log.info("revoked device %s", agent)
        return change


def devices(root: Path) -> Manifest:
    """The fleet's manifest (read only)."""
    return Fleet(root).load()


# --- telling the running broker -------------------------------------------------------------------

def _is_mosquitto(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("mosquitto")
    except OSError:
        return False


def broker_pid(*, pid: int | None = None, pidfile: Path | None = None) -> int:
    """The pid to SIGHUP (from ``pid`` or a pid file), checked to be a running mosquitto (a stale pid file
    must not make us signal some other process). Called before an operation, so a bad target changes nothing."""
    if pidfile is not None:
        try:
            pid = int(Path(pidfile).read_text().split()[0])
        except (OSError, ValueError, IndexError) as e:
            raise ConfigError(f"cannot read a pid from {pidfile}: {e}") from None
    if pid is None:
        raise ValueError("broker_pid needs a pid or a pid file")
    if os.path.isdir("/proc") and not _is_mosquitto(pid):
        raise ConfigError(f"process {pid} is not a running mosquitto: not signalling it (a stale pid file?)")
    return pid


def reload_broker(*, pid: int | None = None, pidfile: Path | None = None, command: str | None = None) -> str:
    """SIGHUP the broker (by pid or pid file, see :func:`broker_pid`) or run ``command`` (e.g.
    ``systemctl reload mosquitto``, ``docker kill -s HUP mosquitto``; run without a shell).
    Returns what was done; raises FedmqError if it could not be done."""
    if command:
        argv = shlex.split(command)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FedmqError(f"reload command {command!r} failed: {e}") from None
        if r.returncode != 0:
            raise FedmqError(f"reload command {command!r} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        return f"ran {command!r}"
    pid = broker_pid(pid=pid, pidfile=pidfile)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise FedmqError(f"no process {pid}") from None
    except PermissionError:
        raise FedmqError(f"not allowed to signal process {pid} (run as the broker's user or root)") from None
    return f"sent SIGHUP to mosquitto (pid {pid})"


class MarkOfflineError(FedmqError):
    """The broker could not be reached as the device to mark it offline (nothing was reloaded)."""

    reason = "mark_offline"


def mark_offline(root: Path, change: Change, host: str, port: int, reload: Callable[[], str],
                 timeout: float = 10.0) -> str:
    """Publish the device's retained "offline" status as the device, then ``reload`` (see the module doc).

    Connecting with the device's client id takes its session over (the live connection is closed); the
    device reconnects no sooner than its backoff (at least 0.25 s), by when the reload has refused its old
    credentials. If it got back in first anyway, the status is published again once. Raises
    MarkOfflineError (before reloading) if the broker cannot be reached as the device.
    """
    from fedmq.broker import __version__
    from fedmq.broker.contract import codec
    from fedmq.broker.contract.messages import Status
    from fedmq.broker.contract.topics import Topics
    from fedmq.broker.transport.client import MqttClient, MqttConfig, TlsConfig

    fleet = Fleet(root)
    m = fleet.load()
    creds = change.previous
    if creds is None:
        raise MarkOfflineError(f"no credentials of {change.agent} to mark it offline with")
    topic = Topics(m.fleet, m.prefix).status(change.agent)
    with tempfile.TemporaryDirectory(prefix="fedmq-lifecycle-") as tmp:
        t = Path(tmp)
        atomic_write(t / "client.crt", creds.cert_pem, mode=0o600)
        atomic_write(t / "client.key", creds.key_pem, mode=0o600)
        cfg = MqttConfig(host, port, client_id=change.agent, username=change.agent, password=creds.password,
                         tls=TlsConfig(str(fleet.ca_cert), str(t / "client.crt"), str(t / "client.key")),
                         reconnect_min_s=600, reconnect_max_s=600)  # never race the device back in
        status = codec.encode(Status(change.agent, "offline", time.time(), version=__version__))
        c: MqttClient | None = None
        try:
            for _ in range(2):
                c = MqttClient(cfg)
                try:
                    c.connect(timeout=timeout)
                    c.publish(topic, status, retain=True, timeout=timeout)
                except FedmqError as e:
                    raise MarkOfflineError(f"could not mark {change.agent} offline as itself on {host}:{port}: {e}"
                                           ) from None
                if c.connected:  # still ours: the device did not take the session back
                    break
                log.warning("%s reconnected while being marked offline: marking it again", change.agent)
                c.close()
            done = reload()
        finally:
            if c is not None:
                c.close()
    return f"{change.agent}'s retained status set to offline; {done}"


def manifest_summary(m: Manifest) -> list[dict[str, Any]]:
    """One row per device (for ``fedmq-broker devices``)."""
    return [{"id": k, **asdict(v)} for k, v in sorted(m.devices.items())]
