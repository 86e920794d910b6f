"""Start a local MQTT broker for development, demos and tests.

``LocalBroker`` renders the project's Mosquitto config (plain, or TLS + passwords + ACL from
``fedmq-broker provision``) on a free loopback port, starts the real ``mosquitto`` binary, waits
until it accepts TCP connections (never a fixed sleep), exposes its log and stops it cleanly.
Without a ``mosquitto`` binary it falls back to the embedded pure-Python broker amqtt (MQTT
3.1.1 only, no ACL) and says so.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq.broker.errors import FedmqError
from fedmq.broker.ops.mosquitto_conf import BrokerConf, Listener

log = logging.getLogger(__name__)


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH, then /usr/sbin which is not on every user's PATH)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, in 20000-24999 (below the kernel's ephemeral range) when it can be.

    A port from the ephemeral range (what binding port 0 gives) can be taken by any outgoing
    connection before its user binds it: with thousands of synthetic agents connecting, the
    aggregator's HTTP port was (bench/fleet.py, 10,000 agents: "Address already in use").
    """
    top = min(_ephemeral_low(), 25000)  # 25000+: RabbitMQ's 25672, MongoDB's 27017, Kubernetes NodePorts
    rng = random.Random()
    if top > 20000:
        for _ in range(64):
            port = rng.randrange(20000, top)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if not alive():
            raise FedmqError(f"broker process exited before accepting connections on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise FedmqError(f"broker did not accept connections on {host}:{port} within {timeout}s") from None
            time.sleep(delay)  # polling a condition with a deadline, not a fixed wait
            delay = min(delay * 2, 0.2)


@dataclass
class SecureFiles:
    """Files of a provisioned broker (see fedmq.broker.ops.provision)."""

    password_file: str
    acl_file: str
    ca_file: str
    cert_file: str
    key_file: str


class LocalBroker:
    """A Mosquitto (or amqtt) process on a free loopback port. Use as a context manager."""

    def __init__(self, secure: SecureFiles | None = None, port: int | None = None, *,
                 max_packet_size: int = 0, persistence: bool = False, workdir: str | None = None,
                 host: str = "127.0.0.1", allow_embedded: bool = True, force_embedded: bool = False,
                 fleet_size: int = 0, max_queued_messages: int = 0, max_inflight_messages: int = 0) -> None:
        from fedmq.broker.ops.mosquitto_conf import inflight_messages_for, queued_messages_for

        self.secure = secure
        #: per-client limits sized for the aggregator of a fleet of ``fleet_size`` devices (or given)
        self.max_queued_messages = max_queued_messages or queued_messages_for(fleet_size)
        self.max_inflight_messages = max_inflight_messages or inflight_messages_for(fleet_size)
        self.host = host
        self.port = port or free_port(host)
        self.max_packet_size = max_packet_size
        self.persistence = persistence
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-broker-"))
        self.binary = None if force_embedded else find_mosquitto()
        self.embedded = self.binary is None
        if self.embedded and not allow_embedded:
            raise FedmqError("mosquitto is not installed: apt-get install -y mosquitto")
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "broker.log"
        self.out_path = self.workdir / "broker.out"  # the process's own stdout/stderr
        self.conf_path = self.workdir / "mosquitto.conf"

    @property
    def protocol(self) -> str:
        """MQTT version the broker speaks best: amqtt only knows 3.1.1."""
        return "3.1.1" if self.embedded else "5"

    def config_text(self) -> str:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        if self.secure:
            s = self.secure
            listener = Listener(self.port, self.host, s.ca_file, s.cert_file, s.key_file)
            conf = BrokerConf([listener], s.password_file, s.acl_file, str(data), self.persistence,
                              max_packet_size=self.max_packet_size, log_file=str(self.log_path),
                              max_queued_messages=self.max_queued_messages,
                              max_inflight_messages=self.max_inflight_messages)
        else:
            conf = BrokerConf([Listener(self.port, self.host)], data_dir=str(data), persistence=self.persistence,
                              max_packet_size=self.max_packet_size, log_file=str(self.log_path),
                              max_queued_messages=self.max_queued_messages,
                              max_inflight_messages=self.max_inflight_messages)
        if os.geteuid() == 0:  # mosquitto drops root to user "mosquitto", who cannot read our temp files
            conf.extra.append("user root")
        return conf.render()

    def start(self, timeout: float = 15.0) -> "LocalBroker":
        if self.proc is not None and self.proc.poll() is None:
            return self
        logf = open(self.out_path, "ab")
        if self.binary is None:  # self.embedded
            if self.secure:
                raise FedmqError("the embedded broker cannot enforce TLS/ACL: install mosquitto")
            log.warning("mosquitto not found: using the embedded amqtt broker (MQTT 3.1.1 only)")
            cmd = [sys.executable, "-m", "fedmq.broker.ops.embedded", "--host", self.host, "--port", str(self.port)]
        else:
            self.conf_path.write_text(self.config_text())
            cmd = [self.binary, "-c", str(self.conf_path)]
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        try:
            wait_for_port(self.host, self.port, timeout, alive=lambda: self.proc.poll() is None)
        except FedmqError as e:
            self.stop()
            raise FedmqError(f"{e}\n--- broker log ---\n{self.log()}") from None
        log.info("broker %s listening on %s:%d", "amqtt" if self.embedded else "mosquitto", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as in a crash (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)

    def log(self) -> str:
        """The broker's log plus anything the process printed itself."""
        parts = []
        for p in (self.out_path, self.log_path):
            try:
                parts.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
