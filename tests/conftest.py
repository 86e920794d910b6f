"""Test harness: real brokers on free loopback ports, unique topics per test.

Set ``FEDMQ_TEST_BROKER=host:port`` to run the plain-broker tests against an external broker
(for example a Mosquitto in Docker on a developer's laptop); tests that need to restart,
reconfigure or provision a broker start their own.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops.launcher import LocalBroker, SecureFiles, find_mosquitto
from fedmq.broker.ops.provision import ProvisionSpec, provision


@dataclass
class BrokerAddr:
    host: str
    port: int
    protocol: str = "5"
    local: LocalBroker | None = None

    def log(self) -> str:
        return self.local.log() if self.local else "(external broker: no log)"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _print_log_on_failure(request, broker: LocalBroker) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n--- broker log ({broker.log_path}) ---\n{broker.log()[-8000:]}")


needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")


@pytest.fixture(scope="session")
def _session_broker():
    ext = os.environ.get("FEDMQ_TEST_BROKER")
    if ext:
        host, _, port = ext.rpartition(":")
        yield BrokerAddr(host or "127.0.0.1", int(port), os.environ.get("FEDMQ_TEST_PROTOCOL", "5"))
        return
    with LocalBroker() as b:
        yield BrokerAddr(b.host, b.port, b.protocol, b)


@pytest.fixture
def broker(_session_broker, request):
    """A plain broker shared by the session (or the external one)."""
    yield _session_broker
    if _session_broker.local is not None:
        _print_log_on_failure(request, _session_broker.local)


@pytest.fixture
def own_broker(request, tmp_path):
    """A broker of this test's own (so it may be killed, restarted or reconfigured)."""
    brokers: list[LocalBroker] = []

    def make(**kw) -> LocalBroker:
        b = LocalBroker(workdir=str(tmp_path / f"broker{len(brokers)}"), **kw)
        (tmp_path / f"broker{len(brokers)}").mkdir(exist_ok=True)
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        _print_log_on_failure(request, b)
        b.cleanup()


@pytest.fixture
def topics() -> Topics:
    """Unique topics for this test."""
    return Topics("t-" + uuid.uuid4().hex[:12])


@pytest.fixture
def secure_fleet(tmp_path, request):
    """A broker provisioned by `fedmq-broker provision`: TLS + passwords + ACL."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    fleet = "f-" + uuid.uuid4().hex[:8]
    prov = provision(ProvisionSpec(fleet, ["agent-a", "agent-b"], tmp_path / "prov", host="localhost"))
    b = prov.broker_dir
    files = SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                        str(b / "server.key"))
    (tmp_path / "sb").mkdir()
    lb = LocalBroker(files, workdir=str(tmp_path / "sb")).start()
    yield prov, lb
    _print_log_on_failure(request, lb)
    lb.cleanup()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """The sensor1d artifact exported once per session, shared by aggregator processes."""
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    d = tmp_path_factory.mktemp("model-cache")
    load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), d)
    return d


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``pred`` until it is truthy; fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
