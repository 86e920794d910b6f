"""Configuration: FEDMQ_<TABLE>_<KEY> overrides of every kind of key, and docs/configuration.md
matching the config dataclasses (every key, every default), through the services' real loaders."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.config import load_config as load_aggregator
from fedmq.aggregator.strategies import build_strategy
from fedmq.broker.commands.config import BrokerSection, build, env_name
from fedmq.broker.errors import ConfigError
from fedmq.edge_agent.config import AgentConfig
from fedmq.edge_agent.config import load_config as load_agent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
SERVICES = {"aggregator": (AggregatorConfig, load_aggregator), "agent": (AgentConfig, load_agent)}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No FEDMQ_* variable of the developer's shell may leak into these tests."""
    import os

    for k in list(os.environ):
        if k.startswith("FEDMQ_"):
            monkeypatch.delenv(k)


@pytest.fixture
def agent_file(tmp_path):
    p = tmp_path / "agent.toml"
    p.write_text('[agent]\nid = "a-1"\n[data]\nsource = "npz:/data/a.npz"\n')
    return str(p)


@pytest.fixture
def agg_file(tmp_path):
    p = tmp_path / "aggregator.toml"
    p.write_text('[rounds]\nrounds = 3\nagents = ["x-1"]\n[eval]\ngroups = [1]\n'
                 '[strategy]\nname = "fedavgm"\nserver = { lr = 1.0, momentum = 0.5 }\n')
    return str(p)


# -- one test per kind of key, through both services' loaders --------------------------------------
def test_int_float_bool_str_overrides_in_both_services(monkeypatch, agent_file, agg_file):
    monkeypatch.setenv("FEDMQ_BROKER_PORT", "18883")
    monkeypatch.setenv("FEDMQ_BROKER_HOST", "broker.example")
    monkeypatch.setenv("FEDMQ_BROKER_TLS_INSECURE", "true")
    monkeypatch.setenv("FEDMQ_BROKER_USERNAME", "a-1")
    for load, path in ((load_agent, agent_file), (load_aggregator, agg_file)):
        b = load(path).broker
        assert (b.port, b.host, b.tls_insecure, b.username) == (18883, "broker.example", True, "a-1")
    monkeypatch.setenv("FEDMQ_ROUNDS_MIN_AGENTS", "4")        # int
    monkeypatch.setenv("FEDMQ_ROUNDS_DEADLINE_S", "7.5")      # float
    monkeypatch.setenv("FEDMQ_TRAIN_LR", "1")                 # an int literal for a float key
    monkeypatch.setenv("FEDMQ_SERVICE_EXPORT_FINAL", "off")   # bool
    monkeypatch.setenv("FEDMQ_MODEL_SOURCE", "zoo:cnn")       # str
    c = load_aggregator(agg_file)
    assert (c.rounds.min_agents, c.rounds.deadline_s, c.service.export_final, c.model.source) == (4, 7.5, False,
                                                                                                   "zoo:cnn")
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.rounds.rounds == 3  # the file's value where no variable is set
    monkeypatch.setenv("FEDMQ_AGENT_LOW_MEMORY", "1")
    monkeypatch.setenv("FEDMQ_DATA_EVAL_FRACTION", "0.25")
    monkeypatch.setenv("FEDMQ_AGENT_NUM_THREADS", "2")
    a = load_agent(agent_file)
    assert (a.agent.low_memory, a.data.eval_fraction, a.agent.num_threads) == (True, 0.25, 2)


@pytest.mark.parametrize("value", ['["a-1","b-2"]', '["a-1", "b-2"]', "a-1,b-2", " a-1 , b-2 ,"])
def test_list_of_str_override(monkeypatch, agg_file, value):
    monkeypatch.setenv("FEDMQ_ROUNDS_AGENTS", value)
    monkeypatch.setenv("FEDMQ_ROUNDS_SELECT", "list")
    c = load_aggregator(agg_file)
    assert c.rounds.agents == ["a-1", "b-2"] and c.rounds.select == "list"


@pytest.mark.parametrize("value", ["[9,10]", "[9, 10]", "9,10"])
def test_list_of_int_override(monkeypatch, agg_file, value):
    monkeypatch.setenv("FEDMQ_EVAL_GROUPS", value)
    assert load_aggregator(agg_file).eval.groups == [9, 10]


def test_empty_list_override(monkeypatch, agg_file):
    monkeypatch.setenv("FEDMQ_EVAL_GROUPS", "")
    monkeypatch.setenv("FEDMQ_ROUNDS_AGENTS", "[]")
    c = load_aggregator(agg_file)
    assert c.eval.groups == [] and c.rounds.agents == []


@pytest.mark.parametrize("var, value, needle", [
    ("FEDMQ_EVAL_GROUPS", "9,x", "FEDMQ_EVAL_GROUPS[1]"),
    ("FEDMQ_EVAL_GROUPS", '["9"]', "must be an integer"),
    ("FEDMQ_EVAL_GROUPS", "[9,", "array literal"),
    ("FEDMQ_ROUNDS_AGENTS", "[1, 2]", "must be a string"),
    ("FEDMQ_ROUNDS_AGENTS", "ok,Bad+Id", "'Bad+Id' is not a valid agent id"),
    ("FEDMQ_BROKER_PORT", "notaport", "FEDMQ_BROKER_PORT"),
    ("FEDMQ_BROKER_PORT", "99999", "broker.port"),
    ("FEDMQ_SERVICE_EXPORT_FINAL", "maybe", "FEDMQ_SERVICE_EXPORT_FINAL"),
    ("FEDMQ_ROUNDS_QUORM", "3", "did you mean FEDMQ_ROUNDS_QUORUM"),
])
def test_bad_overrides_name_the_variable(monkeypatch, agg_file, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        load_aggregator(agg_file)
    assert needle in str(e.value)


def test_strategy_table_keys(monkeypatch, agg_file):
    monkeypatch.setenv("FEDMQ_STRATEGY_NAME", "fedadam")
    monkeypatch.setenv("FEDMQ_STRATEGY_SERVER_LR", "0.5")         # sub-table key, merged with the file's
    monkeypatch.setenv("FEDMQ_STRATEGY_MAX_UPDATES", "500")      # a top-level key with an underscore
    monkeypatch.setenv("FEDMQ_STRATEGY_WEIGHTS", '["samples", "quality"]')
    monkeypatch.setenv("FEDMQ_STRATEGY_CLIP", "{ bound = 2.0 }")  # a whole sub-table
    c = load_aggregator(agg_file)
    assert c.strategy == {"name": "fedadam", "server": {"lr": 0.5, "momentum": 0.5}, "max_updates": 500,
                          "weights": ["samples", "quality"], "clip": {"bound": 2.0}}
    s = build_strategy(c.strategy)
    assert (s.name, s.server.name, s.server.lr, s.max_updates) == ("fedadam", "adam", 0.5, 500)
    assert s.clipper is not None and s.clipper.bound == 2.0


def test_strategy_override_without_a_strategy_table(monkeypatch, agent_file, tmp_path):
    p = tmp_path / "a.toml"
    p.write_text("[rounds]\nrounds = 1\n")
    monkeypatch.setenv("FEDMQ_STRATEGY_SERVER_LR", "0.25")
    c = load_aggregator(str(p))
    assert c.strategy == {"server": {"lr": 0.25}}
    assert build_strategy(c.strategy).server.lr == 0.25  # name defaults to fedavg


@pytest.mark.parametrize("var, value, needle", [
    ("FEDMQ_STRATEGY_SERVER_LRR", "0.5", "strategy.server.lrr"),
    ("FEDMQ_STRATEGY_NAME", "fedavgg", "did you mean 'fedavg'"),
    ("FEDMQ_STRATEGY_WEIGHTS", "samples,quality", "strategy.weights"),  # lists here need the literal
])
def test_bad_strategy_overrides_are_refused(monkeypatch, agg_file, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        load_aggregator(agg_file)
    assert needle in str(e.value)


def test_agent_ignores_the_aggregators_tables(monkeypatch, agent_file):
    """One environment may serve both services: the agent has no [rounds] table."""
    monkeypatch.setenv("FEDMQ_ROUNDS_AGENTS", "a-1,b-2")
    monkeypatch.setenv("FEDMQ_SERVICE_STATE_DIR", "/tmp/x")
    monkeypatch.setenv("FEDMQ_AGENT_CACHE_DIR", "/tmp/agent-cache")
    assert load_agent(agent_file).agent.cache_dir == "/tmp/agent-cache"
    monkeypatch.setenv("FEDMQ_AGENT_CACHEDIR", "/tmp/y")
    with pytest.raises(ConfigError, match="did you mean FEDMQ_AGENT_CACHE_DIR"):
        load_agent(agent_file)


# -- every key of every table can be overridden ------------------------------------------------------
#: values for string keys whose values are checked (anything else gets a free-form string)
STRING_VALUES = {
    ("broker", "protocol"): "3.1.1", ("rounds", "select"): "fraction", ("rounds", "on_timeout"): "extend",
    ("train", "encoding"): "f16", ("model", "optimizer"): "adam", ("model", "source"): "zoo:cnn",
    ("agent", "runtime"): "tensorflow", ("agent", "attack"): "scale", ("agent", "id"): "b-2",
    ("broker", "username"): "a-1", ("data", "source"): "csv:/data/a", ("eval", "dataset"): "npz:/e.npz",
    ("service", "id"): "agg-2", ("broker", "fleet"): "f2", ("broker", "prefix"): "p2", ("train", "downlink"): "int8",
    ("service", "journal"): "write",
}


def _sections(root: type):
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            yield f.name, hints[f.name]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _other_value(table: str, f: dataclasses.Field, typ, tmp_path: Path) -> tuple[str, object]:
    """An environment value for ``[table] f`` and the value it must load as (!= the default)."""
    base = typing.get_args(typ)[0] if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"),
                                                                                        "UnionType", None)) else typ
    d = _default(f)
    if base is bool:
        return ("false" if d else "true"), not d
    if base is int:
        return str(d + 1), d + 1
    if base is float:
        v = d / 2 if d else 0.5
        return repr(v), v
    if typing.get_origin(base) is list:
        if typing.get_args(base)[0] is int:
            return "3,4", [3, 4]
        if f.name == "trusted_keys":  # public keys: ed25519:<base64> (no commas in base64)
            keys = ["ed25519:" + __import__("base64").b64encode(bytes([i]) * 32).decode() for i in (1, 2)]
            return ",".join(keys), keys
        return "x-1,y-2", ["x-1", "y-2"]
    if f.name.endswith("_file"):
        p = tmp_path / f"{f.name}.pem"
        p.write_text("x")
        return str(p), str(p)
    v = STRING_VALUES.get((table, f.name), f"/tmp/fedmq-test-{f.name}")
    return v, v


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_key_of_every_table_is_overridable(monkeypatch, tmp_path, service, agent_file, agg_file):
    root, load = SERVICES[service]
    path = agent_file if service == "agent" else agg_file
    companions = {("broker", "cert_file"): "key_file", ("broker", "key_file"): "cert_file"}
    checked = 0
    for table, cls in _sections(root):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            with monkeypatch.context() as m:
                raw, want = _other_value(table, f, hints[f.name], tmp_path)
                m.setenv(env_name(table, f.name), raw)
                if (table, f.name) in companions:  # both or neither
                    other = companions[(table, f.name)]
                    p = tmp_path / f"{other}.pem"
                    p.write_text("x")
                    m.setenv(env_name(table, other), str(p))
                if (table, f.name) == ("broker", "username") and service == "agent":
                    want = "a-1"  # must equal agent.id
                if (table, f.name) == ("agent", "id"):
                    m.setenv("FEDMQ_BROKER_USERNAME", "b-2")
                try:
                    cfg = load(path)
                except ConfigError as e:
                    pytest.fail(f"{env_name(table, f.name)}={raw!r} refused ({e}): give [{table}] {f.name} a valid "
                                f"test value in STRING_VALUES")
                got = getattr(getattr(cfg, table), f.name)
                assert got == want, (table, f.name, got, want)
                checked += 1
    assert checked >= (20 if service == "aggregator" else 15)


# -- docs/configuration.md lists every key of the dataclasses, with their defaults -------------------
def _doc_tables() -> dict[tuple[str, str], dict[str, str]]:
    """{(service, table): {key: default text}} from the key tables of docs/configuration.md."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    service, table = "", None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            service = {"## Aggregator": "aggregator", "## Agent": "agent"}.get(line.strip(), "")
            table = None
            m = re.match(r"## \[(\w+)\] \(both services\)", line)
            if m:
                service, table = "both", m.group(1)
                out[(service, table)] = {}
        elif line.startswith("### "):
            m = re.match(r"### \[(\w+)\]", line)
            table = m.group(1) if m else None
            if table is not None:
                out[(service, table)] = {}
        elif table is not None and line.startswith("| `"):
            key, default, _ = line.strip().strip("|").split("|", 2)
            keys = re.findall(r"`(\w+)`", key)
            assert len(keys) == 1, f"one key per row in docs/configuration.md: {line!r}"
            assert keys[0] not in out[(service, table)], f"[{table}] {keys[0]} documented twice"
            out[(service, table)][keys[0]] = default.strip()
    return out


def _doc_value(text: str):
    if text == "none":
        return None
    m = re.fullmatch(r"`(.*)`", text)
    assert m, f"a default is a TOML value in backticks, `none` or `required`: {text!r}"
    return tomllib.loads("v = " + m.group(1))["v"]


def _expected_tables():
    """{(service, table): dataclass} for both services; [broker] is one shared table."""
    out = {}
    for service, (root, _) in SERVICES.items():
        for table, cls in _sections(root):
            if cls is BrokerSection:
                out[("both", table)] = cls
            else:
                out[(service, table)] = cls
    return out


def test_docs_list_every_key_of_every_table_and_nothing_else():
    doc = _doc_tables()
    want = _expected_tables()
    assert set(doc) >= set(want), f"tables missing from docs/configuration.md: {sorted(set(want) - set(doc))}"
    for where, cls in want.items():
        keys = {f.name for f in dataclasses.fields(cls)}
        missing, extra = keys - set(doc[where]), set(doc[where]) - keys
        assert not missing, f"{where}: keys not documented in docs/configuration.md: {sorted(missing)}"
        assert not extra, f"{where}: documented keys that do not exist: {sorted(extra)}"


def test_doc_defaults_equal_the_dataclass_defaults():
    doc = _doc_tables()
    for (service, table), cls in _expected_tables().items():
        for f in dataclasses.fields(cls):
            text = doc[(service, table)][f.name]
            d = _default(f)
            if text == "required":
                # only for keys whose default is refused: the service cannot start without them
                with pytest.raises(ConfigError, match=rf"{table}\.{f.name}"):
                    build(cls, {}, table, env={})
                continue
            v = _doc_value(text)
            assert v == d and type(v) in (type(d), int if type(d) is float else type(d)), \
                f"[{table}] {f.name}: docs say {text}, the code's default is {d!r}"


# -- [service] read_batch / rcvbuf_bytes: the aggregator's intake bounds ----------------------------
def test_intake_keys_defaults_toml_and_env(monkeypatch, tmp_path):
    assert (AggregatorConfig().service.read_batch, AggregatorConfig().service.rcvbuf_bytes) == (64, 4194304)
    cfg = load_aggregator(None)
    assert (cfg.service.read_batch, cfg.service.rcvbuf_bytes) == (64, 4 << 20)
    p = tmp_path / "aggregator.toml"
    p.write_text("[service]\nread_batch = 512\nrcvbuf_bytes = 0\n")  # 0 = the kernel's default
    cfg = load_aggregator(str(p))
    assert (cfg.service.read_batch, cfg.service.rcvbuf_bytes) == (512, 0)
    monkeypatch.setenv("FEDMQ_SERVICE_READ_BATCH", "8")  # the variable wins over the file
    monkeypatch.setenv("FEDMQ_SERVICE_RCVBUF_BYTES", "65536")
    cfg = load_aggregator(str(p))
    assert (cfg.service.read_batch, cfg.service.rcvbuf_bytes) == (8, 65536)


@pytest.mark.parametrize("key, value, needle", [
    ("read_batch", 0, r"service\.read_batch = 0: use 1 to 100000"),
    ("read_batch", -1, r"service\.read_batch = -1"),
    ("read_batch", 100_001, r"service\.read_batch = 100001"),
    ("rcvbuf_bytes", 1000, r"service\.rcvbuf_bytes = 1000: use 0 \(the kernel's default\) or 65536"),
    ("rcvbuf_bytes", -1, r"service\.rcvbuf_bytes = -1"),
    ("rcvbuf_bytes", 2**31, r"service\.rcvbuf_bytes = 2147483648"),  # setsockopt takes a C int
])
def test_intake_keys_refuse_bad_values(monkeypatch, key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_aggregator(None, {"service": {key: value}})
    monkeypatch.setenv(env_name("service", key), str(value))  # the same check for an override
    with pytest.raises(ConfigError, match=needle):
        load_aggregator(None)


def test_intake_keys_reach_the_services_mqtt_client(tmp_path):
    """What the service's pumped client is built with (not started: nothing connects)."""
    from fedmq.aggregator.service import AggregatorService

    for over, want in (({}, (64, 4194304)), ({"read_batch": 7, "rcvbuf_bytes": 1 << 20}, (7, 1 << 20)),
                       ({"rcvbuf_bytes": 0}, (64, 0))):
        cfg = load_aggregator(None, {"service": {"state_dir": str(tmp_path / "state"), **over}})
        svc = AggregatorService(cfg)
        assert svc.client.own_thread is False  # the pumped client: the only one that uses both
        assert (svc.client.cfg.read_batch, svc.client.cfg.rcvbuf) == want


# -- [broker] session_expiry: the aggregator's session survives a short connection loss -------------
class CuttableLink:
    """A TCP relay between one client and the broker that the test can cut and restore (a real
    network path: the client and the broker see real connection losses)."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self._target = (host, port)
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._socks: list = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            if not self._open.is_set():
                conn.close()
                continue
            up = socket.create_connection(self._target)
            with self._lock:
                self._socks += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        self._open.clear()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._srv.close()


def _messages_until(client, last: bytes, timeout: float = 15.0) -> list[bytes]:
    import time

    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = client.get(timeout=0.1)
        if m is not None:
            got.append(m.payload)
            if m.payload == last:
                return got
    raise AssertionError(f"{last!r} never arrived; got {got}")


@pytest.mark.parametrize("expiry", [60, 0])
def test_aggregator_session_keeps_updates_published_while_disconnected(broker, topics, tmp_path, expiry):
    """session_expiry > 0: an update published while the aggregator's link is down arrives after
    it reconnects; session_expiry = 0 (negative control): it is lost, while a message published after
    the reconnect arrives on the same subscription (positive control)."""
    import uuid

    import paho.mqtt.client as paho
    from conftest import wait_until

    from fedmq.aggregator.service import AggregatorService
    from fedmq.broker.transport.client import MqttClient, MqttConfig

    if broker.protocol != "5":
        pytest.skip("persistent sessions are MQTT 5 here")
    link = CuttableLink(broker.host, broker.port)
    agg_id = "agg-" + uuid.uuid4().hex[:8]
    p = tmp_path / "aggregator.toml"
    p.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {link.port}\nfleet = "{topics.fleet}"\n'
                 f'session_expiry = {expiry}\n[service]\nid = "{agg_id}"\nstate_dir = "{tmp_path / "state"}"\n')
    cfg = load_aggregator(str(p))
    svc = AggregatorService(cfg)  # not started: the client it would connect with
    if expiry:
        assert svc.client.cfg.clean_start == paho.MQTT_CLEAN_START_FIRST_ONLY
        assert svc.client.cfg.session_expiry == expiry
    else:
        assert svc.client.cfg.clean_start is True
    mc = cfg.broker.mqtt(cfg.service.id, resume_session=True, reconnect_min_s=0.1, reconnect_max_s=0.3)
    assert (mc.clean_start, mc.session_expiry) == (svc.client.cfg.clean_start, svc.client.cfg.session_expiry)
    agg = MqttClient(mc)
    agent = MqttClient(MqttConfig(broker.host, broker.port, client_id="pub-" + uuid.uuid4().hex[:8],
                                  protocol=broker.protocol))
    try:
        agg.connect()
        agg.subscribe(topics.all_updates(), qos=1)
        agent.connect()
        agent.publish(topics.update("agent-1"), b"before", qos=1)
        assert _messages_until(agg, b"before") == [b"before"]
        link.cut()
        wait_until(lambda: not agg.connected, what="the aggregator's connection loss")
        agent.publish(topics.update("agent-1"), b"during", qos=1)  # acknowledged by the broker
        link.restore()
        wait_until(lambda: agg.connected and agg.reconnects >= 1, timeout=15, what="the reconnect")
        agent.publish(topics.update("agent-1"), b"after", qos=1)
        got = _messages_until(agg, b"after")
        # QoS 1 is at least once: "before" may come again if its PUBACK was cut off with the link
        assert set(got) <= {b"before", b"during", b"after"}
        if expiry:
            assert b"during" in got and got.index(b"during") < got.index(b"after")
        else:
            assert b"during" not in got
    finally:
        agg.close()
        agent.close()
        link.close()
