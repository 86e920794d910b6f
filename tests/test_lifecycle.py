"""`fedmq-broker add|rotate|revoke`: one device changes, on a running Mosquitto, and nothing else does.

The broker is the real Mosquitto started with the fleet's own provisioned mosquitto.conf (only the
listener's port, the data and log paths are changed); devices are plain paho clients using their
agent.toml credentials. Reloads are real SIGHUPs: each test waits for Mosquitto's "Reloading
config." log line (a condition, not a sleep) before it checks what the reload did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import needs_mosquitto, wait_until
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker.cli import main as cli_main
from fedmq.broker.commands.config import load_toml
from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops import lifecycle
from fedmq.broker.ops.launcher import LocalBroker
from fedmq.broker.ops.provision import ProvisionSpec, provision

NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87 (CONNACK, PUBACK)
DEVICES = ["agent-001", "agent-002", "agent-003"]


class FleetBroker(LocalBroker):
    """Mosquitto with the fleet's provisioned mosquitto.conf, moved to a free loopback port."""

    def __init__(self, fleet_dir: Path, workdir: Path) -> None:
        workdir.mkdir()
        super().__init__(workdir=str(workdir))
        self.fleet_dir = fleet_dir

    def config_text(self) -> str:
        conf = (self.fleet_dir / "broker" / "mosquitto.conf").read_text()
        conf, n = re.subn(r"^listener 8883 0\.0\.0\.0$", f"listener {self.port} {self.host}", conf, flags=re.M)
        assert n == 1, conf
        (self.workdir / "data").mkdir(exist_ok=True)
        conf = conf.replace("persistence_location /var/lib/mosquitto/", f"persistence_location {self.workdir}/data/")
        conf = conf.replace("log_dest stderr", f"log_dest file {self.log_path}")
        return conf + ("user root\n" if os.geteuid() == 0 else "")

    def reloads(self) -> int:
        return self.log().count("Reloading config.")


@dataclass
class Device:
    """A paho MQTT 5 client with one identity's credentials, recording what happens to its connection."""

    user: str
    client: mqtt.Client
    connack: int | None = None  # reason code of CONNACK (0: accepted)
    disconnects: list[str] = field(default_factory=list)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, int] = field(default_factory=dict)  # mid -> reason code
    done: threading.Event = field(default_factory=threading.Event)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, 10, what=f"PUBACK for {self.user}")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def credentials(fleet_dir: Path, user: str) -> tuple[str, Path]:
    d = fleet_dir / ("aggregator" if user == "aggregator" else f"agents/{user}")
    cfg = load_toml(d / ("aggregator.toml" if user == "aggregator" else "agent.toml"))["broker"]
    return cfg["password"], d


def connect(fleet_dir: Path, broker: FleetBroker, user: str, password: str | None = None,
            cert_dir: Path | None = None) -> Device:
    """Connect as ``user`` (password and cert from its config unless given); returns once the broker answered:
    ``connack`` is set, or the connection was dropped before any CONNACK (a refused TLS handshake)."""
    if password is None or cert_dir is None:
        pw, d = credentials(fleet_dir, user)
        password, cert_dir = (pw if password is None else password), cert_dir or d
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    c.tls_set(str(fleet_dir / "broker" / "ca.crt"), str(cert_dir / "client.crt"), str(cert_dir / "client.key"))
    c.username_pw_set(user, password)
    c.reconnect_delay_set(3600, 3600)  # a dropped device must stay dropped: we watch, not retry
    dev = Device(user, c)

    def on_connect(_c, _u, _f, rc, _p):
        dev.connack = rc.value
        dev.done.set()

    def on_disconnect(_c, _u, _f, rc, _p):
        dev.disconnects.append(str(rc))
        dev.done.set()

    c.on_connect, c.on_disconnect = on_connect, on_disconnect
    c.on_message = lambda _c, _u, m: dev.received.append((m.topic, m.payload))
    c.on_publish = lambda _c, _u, mid, rc, _p: dev.pubacks.__setitem__(mid, rc.value)
    try:
        c.connect("localhost", broker.port, keepalive=60)
    except (ssl.SSLError, OSError) as e:  # TLS 1.2: a refused client certificate can fail the handshake here
        dev.disconnects.append(f"handshake: {e}")
        return dev
    c.loop_start()
    assert dev.done.wait(10), f"{user}: no answer from the broker"
    return dev


@dataclass
class DeviceCopy:
    password: str
    dir: Path


def device_copy(fleet_dir: Path, user: str) -> DeviceCopy:
    """What the device itself holds (its password and key pair), kept aside before the fleet's copy changes."""
    pw, d = credentials(fleet_dir, user)
    keep = fleet_dir.parent / f"device-{user}-{uuid.uuid4().hex[:6]}"
    keep.mkdir()
    for name in ("client.crt", "client.key"):
        (keep / name).write_bytes((d / name).read_bytes())
    return DeviceCopy(pw, keep)


def offline_seen(agg: Device, topics: Topics, agent: str) -> bool:
    from fedmq.broker.contract import codec
    from fedmq.broker.contract.messages import Status

    for t, p in agg.received:
        if t == topics.status(agent) and p:
            m = codec.decode(p)
            if isinstance(m, Status) and m.agent == agent and m.state == "offline":
                return True
    return False


def reload_and_wait(broker: FleetBroker, before: int) -> None:
    wait_until(lambda: broker.reloads() > before, 10, what="Mosquitto's 'Reloading config.'")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmq.broker.cli", *args], capture_output=True, text=True,
                          timeout=60)


def check_hash(line: str, password: str) -> bool:
    """An independent check of a passwd line: Mosquitto's $7$ = PBKDF2-HMAC-SHA512 over the salt."""
    _, seven, it, salt, digest = line.split(":", 1)[1].strip().split("$")
    return seven == "7" and base64.b64decode(digest) == hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(it))


def passwd_lines(fleet_dir: Path) -> dict[str, str]:
    return {ln.split(":", 1)[0]: ln for ln in (fleet_dir / "broker/passwd").read_text().splitlines()}


def snapshot(fleet_dir: Path, users: list[str]) -> dict[str, bytes]:
    """Bytes of the CA, the server's files and the given identities' secrets."""
    files = ["ca/ca.key", "ca/ca.crt", "broker/ca.crt", "broker/server.crt", "broker/server.key",
             "aggregator/aggregator.toml", "aggregator/client.crt", "aggregator/client.key"]
    for u in users:
        files += [f"agents/{u}/agent.toml", f"agents/{u}/client.crt", f"agents/{u}/client.key", f"agents/{u}/ca.crt"]
    out = {f: (fleet_dir / f).read_bytes() for f in files}
    lines = passwd_lines(fleet_dir)
    out.update({f"passwd:{u}": lines[u].encode() for u in ["aggregator", *users]})
    return out


def check_modes(fleet_dir: Path) -> None:
    for p in [fleet_dir / "broker/passwd", fleet_dir / "broker/server.key", fleet_dir / "ca/ca.key",
              fleet_dir / "fleet.json", *fleet_dir.glob("agents/*/client.key"), *fleet_dir.glob("agents/*/agent.toml")]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    for d in [fleet_dir / "ca", *fleet_dir.glob("agents/*"), *fleet_dir.glob("revoked/*")]:
        assert d.stat().st_mode & 0o777 == 0o700, d


@pytest.fixture
def fleet(tmp_path, request):
    """Provision 3 devices (password mode or mutual TLS, by the test's param) and start their broker."""
    made: list[FleetBroker] = []

    def make(mutual_tls: bool) -> tuple[Path, Topics, FleetBroker]:
        name = "lc-" + uuid.uuid4().hex[:8]
        prov = provision(ProvisionSpec(name, DEVICES, tmp_path / "fleet", host="localhost", mutual_tls=mutual_tls))
        b = FleetBroker(prov.out_dir, tmp_path / "broker")
        made.append(b)
        b.start()
        return prov.out_dir, prov.topics, b

    yield make
    for b in made:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(b.log()[-6000:])
        b.cleanup()


@needs_mosquitto
@pytest.mark.network
def test_add_rotate_revoke_on_a_running_broker(fleet):
    fd, topics, broker = fleet(mutual_tls=False)
    agg = connect(fd, broker, "aggregator")
    assert agg.connack == 0
    agg.client.subscribe([(topics.all_statuses(), 1), (topics.all_updates(), 1)])
    live = {u: connect(fd, broker, u) for u in DEVICES}
    assert all(d.connack == 0 for d in live.values())
    before = snapshot(fd, ["agent-001"])

    # add: a real `fedmq-broker` process; it SIGHUPs the broker itself
    assert connect(fd, broker, "agent-004", password="x", cert_dir=fd / "agents/agent-001").connack == NOT_AUTHORIZED
    n = broker.reloads()
    r = run_cli("add", "--fleet-dir", str(fd), "--agent", "agent-004", "--pid", str(broker.proc.pid))
    assert r.returncode == 0, r.stderr
    assert "sent SIGHUP" in r.stdout
    reload_and_wait(broker, n)
    pw4, _ = credentials(fd, "agent-004")
    assert check_hash(passwd_lines(fd)["agent-004"], pw4)
    live["agent-004"] = connect(fd, broker, "agent-004")
    assert live["agent-004"].connack == 0
    assert all(not d.disconnects for d in [agg, *live.values()]), "a reload dropped a device"

    # rotate agent-002 and reload (nothing else): the reload itself closes the session holding the old
    # password, and the old password is refused from then on
    old2, _ = credentials(fd, "agent-002")
    n = broker.reloads()
    ch = lifecycle.rotate_device(fd, "agent-002")
    assert ch.mark_offline and ch.previous is not None and ch.previous.password == old2
    lifecycle.reload_broker(pid=broker.proc.pid)
    reload_and_wait(broker, n)
    new2, _ = credentials(fd, "agent-002")
    assert new2 == ch.password != old2 and check_hash(passwd_lines(fd)["agent-002"], new2)
    wait_until(lambda: live["agent-002"].disconnects, 10, what="agent-002's old session closed")
    assert connect(fd, broker, "agent-002", password=old2).connack == NOT_AUTHORIZED
    live["agent-002"] = connect(fd, broker, "agent-002")
    assert live["agent-002"].connack == 0

    # revoke agent-003 (through the CLI entry point in this process, with a pid file); the device keeps its copy
    # of the credentials (revoke deletes the fleet directory's)
    device3 = device_copy(fd, "agent-003")
    pidfile = broker.workdir / "mosquitto.pid"
    pidfile.write_text(f"{broker.proc.pid}\n")
    n = broker.reloads()
    assert cli_main(["revoke", "--fleet-dir", str(fd), "--agent", "agent-003", "--pidfile", str(pidfile),
                     "--broker", f"localhost:{broker.port}"]) == 0
    reload_and_wait(broker, n)
    wait_until(lambda: live["agent-003"].disconnects, 10, what="agent-003's session closed")
    # a reload leaves no last will: the tool published the device's retained "offline" status as the device
    wait_until(lambda: offline_seen(agg, topics, "agent-003"), 10, what="agent-003's offline status")
    assert connect(fd, broker, "agent-003", password=device3.password, cert_dir=device3.dir).connack == NOT_AUTHORIZED
    assert "agent-003" not in passwd_lines(fd)
    assert not (fd / "agents/agent-003").exists() and (fd / "revoked/agent-003/client.crt").exists()
    assert not (fd / "revoked/agent-003/client.key").exists()

    # the rest of the fleet never noticed and the aggregator still hears every one of them (positive control)
    stayed = ["agent-001", "agent-002", "agent-004"]
    assert all(not live[u].disconnects for u in stayed) and not agg.disconnects
    for u in stayed:
        assert live[u].publish(topics.status(u), f"alive {u}".encode()) == 0
    wait_until(lambda: {p for _, p in agg.received} >= {f"alive {u}".encode() for u in stayed}, 10,
               what="the aggregator receives the remaining devices")

    assert snapshot(fd, ["agent-001"]) == before, "the CA or another device's secrets changed"
    check_modes(fd)
    m = json.loads((fd / "fleet.json").read_text())
    assert {k: v["state"] for k, v in m["devices"].items()} == {
        "agent-001": "active", "agent-002": "active", "agent-003": "revoked", "agent-004": "active"}
    for d in [agg, *live.values()]:
        d.close()


def crl_serials(fleet_dir: Path) -> set[int]:
    crl = x509.load_pem_x509_crl((fleet_dir / "broker/crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((fleet_dir / "broker/ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    return {r.serial_number for r in crl}


def cert_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@needs_mosquitto
@pytest.mark.network
def test_mutual_tls_rotate_and_revoke_with_the_crl(fleet):
    """Under mutual TLS the broker ignores passwords: the CRL refuses a certificate at its next handshake, and
    revoke's ACL deny silences a session that is still open (Mosquitto does not close it on SIGHUP)."""
    fd, topics, broker = fleet(mutual_tls=True)
    assert "crlfile " in (fd / "broker/mosquitto.conf").read_text() and crl_serials(fd) == set()
    agg = connect(fd, broker, "aggregator")
    agg.client.subscribe([(topics.all_statuses(), 1)])
    live = {u: connect(fd, broker, u) for u in DEVICES}
    assert all(d.connack == 0 for d in [agg, *live.values()])
    wait_until(lambda: agg.client.is_connected(), 5)
    before = snapshot(fd, ["agent-001"])
    old2, old3 = device_copy(fd, "agent-002"), device_copy(fd, "agent-003")

    n = broker.reloads()
    lifecycle.rotate_device(fd, "agent-002")
    lifecycle.revoke_device(fd, "agent-003")
    lifecycle.reload_broker(pid=broker.proc.pid)
    reload_and_wait(broker, n)
    assert crl_serials(fd) == {cert_serial(old2.dir / "client.crt"), cert_serial(old3.dir / "client.crt")}

    # next connect: the old certificates fail the handshake, the rotated one is accepted (positive control)
    for u, cp in (("agent-002", old2), ("agent-003", old3)):
        refused = broker.log().count("certificate verify failed")
        old = connect(fd, broker, u, password=cp.password, cert_dir=cp.dir)
        assert old.connack is None and old.disconnects, "a revoked certificate was accepted"
        wait_until(lambda: broker.log().count("certificate verify failed") > refused, 10, what="the broker's reason")
    new2 = connect(fd, broker, "agent-002")
    assert new2.connack == 0

    # agent-003's session opened before the revoke is still up but the ACL deny refuses its publish; the
    # marker agent-001 publishes after it arrives, agent-003's message never does
    assert live["agent-003"].client.is_connected()
    assert live["agent-003"].publish(topics.status("agent-003"), b"from revoked") == NOT_AUTHORIZED
    assert live["agent-001"].publish(topics.status("agent-001"), b"marker") == 0
    wait_until(lambda: any(p == b"marker" for _, p in agg.received), 10, what="the marker")
    assert all(p != b"from revoked" for _, p in agg.received)
    assert not live["agent-001"].disconnects and not agg.disconnects

    # revoke through the CLI, which marks the device offline as itself: that also closes its session
    n = broker.reloads()
    assert cli_main(["revoke", "--fleet-dir", str(fd), "--agent", "agent-002", "--pid", str(broker.proc.pid),
                     "--broker", f"localhost:{broker.port}"]) == 0
    reload_and_wait(broker, n)
    wait_until(lambda: new2.disconnects, 10, what="the revoked agent-002's session closed")
    wait_until(lambda: offline_seen(agg, topics, "agent-002"), 10, what="agent-002's offline status")
    assert live["agent-001"].publish(topics.status("agent-001"), b"still here") == 0
    wait_until(lambda: any(p == b"still here" for _, p in agg.received), 10, what="agent-001 after the revoke")
    assert not live["agent-001"].disconnects and not agg.disconnects

    assert snapshot(fd, ["agent-001"]) == before
    check_modes(fd)
    for d in [agg, new2, *live.values()]:
        d.close()


# --- no broker needed ------------------------------------------------------------------------------

@pytest.fixture
def small_fleet(tmp_path) -> Path:
    return provision(ProvisionSpec("lc-unit", ["agent-001", "agent-002"], tmp_path / "fleet")).out_dir


@pytest.mark.parametrize("argv, says", [
    (["add", "--agent", "agent-001"], "already exists"),
    (["add", "--agent", "aggregator"], "aggregator"),
    (["add", "--agent", "Bad_Id"], "Bad_Id"),
    (["revoke", "--agent", "agent-009"], "no device 'agent-009'"),
    (["rotate", "--agent", "aggregator"], "aggregator"),
])
def test_refusals_exit_2_and_change_nothing(small_fleet, argv, says, capsys):
    files = {p: p.read_bytes() for p in small_fleet.rglob("*") if p.is_file()}
    assert cli_main([argv[0], "--fleet-dir", str(small_fleet), *argv[1:]]) == 2
    assert says in capsys.readouterr().err
    assert {p: p.read_bytes() for p in small_fleet.rglob("*") if p.is_file() and p.name != ".lifecycle.lock"} == files


def test_rotate_without_the_devices_files_exits_2(small_fleet, capsys):
    (small_fleet / "agents/agent-001/agent.toml").unlink()
    assert cli_main(["rotate", "--fleet-dir", str(small_fleet), "--agent", "agent-001"]) == 2
    assert "agent.toml not found" in capsys.readouterr().err


def test_revoked_id_is_never_reused(small_fleet, capsys):
    assert cli_main(["revoke", "--fleet-dir", str(small_fleet), "--agent", "agent-002"]) == 0
    for cmd in ("add", "rotate", "revoke"):
        assert cli_main([cmd, "--fleet-dir", str(small_fleet), "--agent", "agent-002"]) == 2
        assert "revoked" in capsys.readouterr().err
    assert cli_main(["add", "--fleet-dir", str(small_fleet), "--agent", "agent-003"]) == 0  # positive control


def test_not_a_fleet_dir_and_a_wrong_ca_key(tmp_path, small_fleet, capsys):
    assert cli_main(["add", "--fleet-dir", str(tmp_path), "--agent", "agent-003"]) == 2
    assert "not a fleet directory" in capsys.readouterr().err
    other = provision(ProvisionSpec("other", ["x-1"], tmp_path / "other")).out_dir
    passwd = (small_fleet / "broker/passwd").read_bytes()
    assert cli_main(["add", "--fleet-dir", str(small_fleet), "--agent", "agent-003",
                     "--ca-key", str(other / "ca/ca.key")]) == 2
    assert "does not belong" in capsys.readouterr().err
    assert (small_fleet / "broker/passwd").read_bytes() == passwd and not (small_fleet / "agents/agent-003").exists()
    assert cli_main(["add", "--fleet-dir", str(small_fleet), "--agent", "agent-003",
                     "--ca-key", str(small_fleet / "ca/ca.key")]) == 0


def test_a_stale_pid_is_refused_before_any_change(small_fleet, capsys):
    passwd = (small_fleet / "broker/passwd").read_bytes()
    assert cli_main(["revoke", "--fleet-dir", str(small_fleet), "--agent", "agent-001", "--pid", str(os.getpid())]) == 2
    assert "not a running mosquitto" in capsys.readouterr().err
    assert (small_fleet / "broker/passwd").read_bytes() == passwd


def test_rotate_keeps_the_operators_edits(small_fleet):
    toml = small_fleet / "agents/agent-001/agent.toml"
    toml.write_text(toml.read_text() + '\n[data]\nsource = "csv:/data/x.csv"\n')
    old = toml.read_text()
    ch = lifecycle.rotate_device(small_fleet, "agent-001")
    new = toml.read_text()
    diff = [(a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b]
    assert len(old.splitlines()) == len(new.splitlines()) and len(diff) == 1
    assert diff[0][1] == f'password = "{ch.password}"' and 'source = "csv:/data/x.csv"' in new
    assert toml.stat().st_mode & 0o777 == 0o600


def test_a_fleet_without_manifest_is_rebuilt_from_its_files(small_fleet):
    (small_fleet / "fleet.json").unlink()
    lifecycle.add_device(small_fleet, "agent-003")
    m = lifecycle.devices(small_fleet)
    assert sorted(m.devices) == ["agent-001", "agent-002", "agent-003"] and m.port == 8883 and m.fleet == "lc-unit"
    assert m.devices["agent-001"].cert_serial == f"{cert_serial(small_fleet / 'agents/agent-001/client.crt'):x}"
    assert load_toml(small_fleet / "agents/agent-003/agent.toml")["broker"]["fleet"] == "lc-unit"


def test_passwd_owner_is_kept(small_fleet):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    p = small_fleet / "broker/passwd"
    os.chown(p, 65534, 65534)
    lifecycle.add_device(small_fleet, "agent-003")
    st = p.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)


def test_growing_fleet_raises_the_aggregators_queue(tmp_path):
    fd = provision(ProvisionSpec("big", [f"a-{i:03d}" for i in range(200)], tmp_path / "f")).out_dir
    assert "max_queued_messages 10000\n" in (fd / "broker/mosquitto.conf").read_text()
    lifecycle.add_device(fd, "a-200")
    assert "max_queued_messages 10050\n" in (fd / "broker/mosquitto.conf").read_text()


def test_every_subcommand_has_help():
    for cmd in ("add", "rotate", "revoke", "devices", "provision", "run"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage: fedmq-broker " + cmd in r.stdout, r.stderr


# --- the federation keeps training through a revoke and an add -------------------------------------

def run_config(fd: Path, broker: FleetBroker, user: str, tmp: Path, extra: str) -> Path:
    """The provisioned config of ``user`` (its credentials untouched) pointed at the test broker, plus ``extra``."""
    name = "aggregator.toml" if user == "aggregator" else "agent.toml"
    text = (fd / ("aggregator" if user == "aggregator" else f"agents/{user}") / name).read_text()
    text = text.replace("port = 8883", f"port = {broker.port}")
    import tomllib

    from fedmq.broker.commands.config import write_toml

    tables = tomllib.loads(text)  # merged, not appended: the provisioned file has [service]/[agent] tables too
    if user != "aggregator":
        tables["agent"]["cache_dir"] = str(tmp / (user + "-cache"))
    for name, values in tomllib.loads(extra).items():
        tables.setdefault(name, {}).update(values)
    return write_toml(tmp / f"run-{user}.toml", tables)


@needs_mosquitto
@pytest.mark.network
def test_the_fleet_keeps_training_through_revoke_and_add(fleet, tmp_path, model_cache):
    from fleet import Fleet, watch_shards
    from test_federation import history

    fd, _, broker = fleet(mutual_tls=False)
    f = Fleet(tmp_path, {}, model_cache=model_cache)
    shards = watch_shards([*DEVICES, "agent-004"], tmp_path, per_agent=100)
    state = tmp_path / "aggregator-state"
    state.mkdir()
    (state / "models").symlink_to(model_cache)
    try:
        agg = f.spawn("aggregator", "fedmq.aggregator.cli", run_config(fd, broker, "aggregator", tmp_path, f"""
[service]
state_dir = "{state}"
export_final = false
[model]
source = "zoo:sensor1d"
batch_size = 16
verify_steps = 5
[rounds]
rounds = 40
min_agents = 2
grace_s = 2
deadline_s = 60
[train]
epochs = 1
lr = 0.05
"""))
        agents = {u: f.spawn(u, "fedmq.edge_agent.cli", run_config(fd, broker, u, tmp_path,
                                                                  f'[data]\nsource = "npz:{shards[u]}"\n'))
                  for u in DEVICES}
        wait_until(lambda: any(len(r["participants_list"]) == 3 for r in history(f)), 120,
                   what="a round with the three devices")
        n = broker.reloads()
        assert cli_main(["add", "--fleet-dir", str(fd), "--agent", "agent-004"]) == 0
        assert cli_main(["revoke", "--fleet-dir", str(fd), "--agent", "agent-003", "--pid", str(broker.proc.pid),
                         "--broker", f"localhost:{broker.port}"]) == 0
        reload_and_wait(broker, n)
        done = len(history(f))
        agents["agent-004"] = f.spawn("agent-004", "fedmq.edge_agent.cli", run_config(
            fd, broker, "agent-004", tmp_path, f'[data]\nsource = "npz:{shards["agent-004"]}"\n'))
        # the revoked device is refused when it reconnects, and stops for good (EXIT_AUTH 3: systemd does not restart)
        wait_until(lambda: not agents["agent-003"].alive(), 60, what="agent-003 to stop")
        log3 = agents["agent-003"].text()
        assert agents["agent-003"].popen.returncode == 3 and "refused credentials for 'agent-003'" in log3, log3[-2000:]
        wait_until(lambda: any(sorted(r["participants_list"]) == ["agent-001", "agent-002", "agent-004"]
                               for r in history(f)[done:]), 120, what="a round with the new device")
        h = history(f)
        after = h[done + 1:]  # from the first round opened after the reload
        # the round in flight at the revoke asked agent-003 (quorum = all asked) and may end at its deadline
        assert all(r["outcome"] == "aggregated" for r in h[:done] + after), [r["outcome"] for r in h]
        assert after and all("agent-003" not in r["participants_list"] for r in after)
        assert agg.alive() and agents["agent-001"].alive() and agents["agent-002"].alive()
    finally:
        f.stop_all()
        if not all(p.popen.returncode in (0, -15) for p in f.procs if p.name != "agent-003"):
            print(f.dump_logs())
