"""``fedmq-broker provision``: every file a fleet needs, generated in one go.

For a fleet and its agents it writes, under the output directory::

    broker/mosquitto.conf  passwd  acl  ca.crt  server.crt  server.key
    ca/ca.key  ca/ca.crt                      (keep the CA key offline)
    aggregator/aggregator.toml  client.crt  client.key  ca.crt
    agents/<id>/agent.toml  client.crt  client.key  ca.crt
    fleet.json                                (the devices and their state; see broker/ops/lifecycle.py)
    broker/crl.pem                            (with --mutual-tls: revoked client certs, empty at first)

Passwords are random (``secrets``) and hashed for Mosquitto's password file in its own format
(PBKDF2-SHA512, ``$7$<iterations>$<salt b64>$<hash b64>``, what ``mosquitto_passwd`` writes).
Secrets (keys, passwords, configs holding them) are written with mode 0600, in directories of
mode 0700 (ca/, aggregator/, agents/<id>/). ``fedmq-broker add|rotate|revoke`` change one device
later without touching the rest (broker/ops/lifecycle.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.broker.contract.topics import Topics, check_name
from fedmq.broker.ops import certs
from fedmq.broker.ops.mosquitto_conf import (  # noqa: F401 - the sizing rules are re-exported
    BrokerConf,
    Listener,
    inflight_messages_for,
    queued_messages_for,
    render_acl,
)

PBKDF2_ITERATIONS = 101  # Mosquitto 2.0's default for $7$ hashes


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto password-file hash (``$7$``: PBKDF2-HMAC-SHA512, 12-byte salt)."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


SIGNING_PUB = "signing.pub"  # the fleet's public model-signing key (agents' [agent] trusted_keys)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: str | bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class ProvisionSpec:
    fleet: str
    agents: list[str]
    out_dir: Path
    host: str = "localhost"  # name agents use to reach the broker (in the server cert and configs)
    port: int = 8883
    prefix: str = "fedmq"
    aggregator: str = "aggregator"
    broker_root: str | None = None  # where broker/ files live on the broker host (default: out_dir/broker)
    max_packet_size: int = 2_000_000
    extra_names: list[str] = field(default_factory=list)
    mutual_tls: bool = False
    #: Mosquitto persistence: off by default (a crashed broker would restore a stale global; see
    #: docs/protocol.md "Broker restarts")
    persistence: bool = False
    max_queued_messages: int = 0  # 0 = queued_messages_for(len(agents))
    max_inflight_messages: int = 0  # 0 = inflight_messages_for(len(agents))


@dataclass
class Provisioned:
    out_dir: Path
    topics: Topics
    passwords: dict[str, str]
    broker_dir: Path

    @property
    def ca_file(self) -> Path:
        return self.broker_dir / "ca.crt"

    def client_dir(self, user: str) -> Path:
        return self.out_dir / ("aggregator" if user == "aggregator" else f"agents/{user}")


def provision(spec: ProvisionSpec) -> Provisioned:
    topics = Topics(spec.fleet, spec.prefix)
    users = [check_name(spec.aggregator, "aggregator name")] + [check_name(a) for a in spec.agents]
    if len(set(users)) != len(users):
        raise ValueError("agent ids must be unique and differ from the aggregator's name")
    out = Path(spec.out_dir).resolve()
    bdir = out / "broker"
    root = spec.broker_root or str(bdir)
    ca = certs.make_ca(f"fedmq {spec.fleet} CA")
    names = sorted({spec.host, "localhost", "127.0.0.1", *spec.extra_names})
    server = certs.issue(ca, spec.host, server_names=names)
    _private_dir(out / "ca")
    _write(out / "ca/ca.key", ca.key_pem, secret=True)
    _write(out / "ca/ca.crt", ca.cert_pem)
    _write(bdir / "ca.crt", ca.cert_pem)
    _write(bdir / "server.crt", server.cert_pem)
    _write(bdir / "server.key", server.key_pem, secret=True)
    passwords = {u: secrets.token_urlsafe(24) for u in users}
    _write(bdir / "passwd", "".join(f"{u}:{hash_password(p)}\n" for u, p in passwords.items()), secret=True)
    _write(bdir / "acl", render_acl(topics, spec.aggregator))
    if spec.mutual_tls:  # in the config from the start: Mosquitto reloads a crlfile on SIGHUP, never adds one
        _write(bdir / "crl.pem", certs.make_crl(ca, []))
    conf = BrokerConf(
        [Listener(spec.port, "0.0.0.0", f"{root}/ca.crt", f"{root}/server.crt", f"{root}/server.key",
                  require_certificate=spec.mutual_tls, crlfile=f"{root}/crl.pem" if spec.mutual_tls else None)],
        password_file=f"{root}/passwd", acl_file=f"{root}/acl", data_dir="/var/lib/mosquitto"
        if spec.broker_root is None else "/mosquitto/data", max_packet_size=spec.max_packet_size,
        max_queued_messages=spec.max_queued_messages or queued_messages_for(len(spec.agents)),
        max_inflight_messages=spec.max_inflight_messages or inflight_messages_for(len(spec.agents)),
        persistence=spec.persistence,
    )
    _write(bdir / "mosquitto.conf", conf.render())
    from fedmq.broker.contract import signing

    pem, public = signing.generate()  # the fleet's model-signing key: private with the aggregator only
    _private_dir(out / "aggregator")
    _write(out / "aggregator" / "signing.key", pem, secret=True)
    _write(out / "aggregator" / SIGNING_PUB, public + "\n")
    serials: dict[str, str] = {}
    for u in users:
        d = out / ("aggregator" if u == spec.aggregator else f"agents/{u}")
        _private_dir(d)
        leaf = certs.issue(ca, u)
        serials[u] = f"{certs.serial_of(leaf.cert_pem):x}"
        _write(d / "client.crt", leaf.cert_pem)
        _write(d / "client.key", leaf.key_pem, secret=True)
        _write(d / "ca.crt", ca.cert_pem)
        role = "aggregator" if u == spec.aggregator else "agent"
        _write(d / f"{role}.toml", client_toml(spec, u, passwords[u], d, role, public), secret=True)
    _write_manifest(spec, out, serials)
    return Provisioned(out, topics, passwords, bdir)


def _write_manifest(spec: ProvisionSpec, out: Path, serials: dict[str, str]) -> None:
    from fedmq.broker.ops import lifecycle  # lifecycle builds on this module (hash_password, client_toml)

    now = lifecycle.now_iso()
    m = lifecycle.Manifest(spec.fleet, spec.prefix, spec.host, spec.port, spec.max_packet_size, spec.mutual_tls,
                           spec.aggregator, spec.broker_root,
                           {a: lifecycle.Device(added_at=now, cert_serial=serials[a]) for a in spec.agents})
    lifecycle.Fleet(out).save(m)


def read_signing_public(root: Path) -> str:
    """The fleet's public signing key (``aggregator/signing.pub``), or "" for a fleet provisioned before it."""
    p = Path(root) / "aggregator" / SIGNING_PUB
    return p.read_text().strip() if p.is_file() else ""


def client_toml(spec: ProvisionSpec, user: str, password: str, d: Path, role: str, signing_public: str = "") -> str:
    """The config of one client, as provision and ``add`` write it: ``[broker]``, plus the agent's id and the
    fleet's trusted signing key, or the aggregator's signing key file."""
    if role == "agent":
        keys = f"trusted_keys = [{_toml_str(signing_public)}]\n" if signing_public else ""
        ident = f'[agent]\nid = {_toml_str(user)}\n{keys}\n'
    else:
        ident = f"[service]\nsigning_key = {_toml_str(str(d / 'signing.key'))}\n\n" if signing_public else ""
    return (
        f"# fedmq {role} config generated by `fedmq-broker provision` (keep private: holds a password)\n"
        f"{ident}"
        "[broker]\n"
        f"host = {_toml_str(spec.host)}\n"
        f"port = {spec.port}\n"
        f"fleet = {_toml_str(spec.fleet)}\n"
        f"prefix = {_toml_str(spec.prefix)}\n"
        f"username = {_toml_str(user)}\n"
        f"password = {_toml_str(password)}\n"
        f"ca_file = {_toml_str(str(d / 'ca.crt'))}\n"
        f"cert_file = {_toml_str(str(d / 'client.crt'))}\n"
        f"key_file = {_toml_str(str(d / 'client.key'))}\n"
        f"max_payload = {max(1024, spec.max_packet_size - 4096)}\n"
    )
