"""Rendering Mosquitto configuration and ACL files from typed settings.

Used by ``fedmq-broker provision`` (production files) and by the local launcher (development,
demos, tests), so both run the same configuration the project ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from string import Template

from fedmq.broker.contract.topics import Topics


@dataclass
class Listener:
    port: int
    bind: str = "0.0.0.0"
    cafile: str | None = None  # set all three for a TLS listener
    certfile: str | None = None
    keyfile: str | None = None
    require_certificate: bool = False
    crlfile: str | None = None  # with require_certificate: revoked client certs (reloaded on SIGHUP)
    #: client id := username (Mosquitto's use_username_as_clientid): one device's credentials can
    #: never take over (disconnect) another device's session by connecting with its client id
    bind_client_id: bool = False

    def render(self) -> str:
        lines = [f"listener {self.port} {self.bind}"]
        if self.bind_client_id:
            lines.append("use_username_as_clientid true")
        if self.certfile:
            lines += [f"cafile {self.cafile}", f"certfile {self.certfile}", f"keyfile {self.keyfile}",
                      "tls_version tlsv1.2"]
            if self.require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
                if self.crlfile:
                    lines.append(f"crlfile {self.crlfile}")
        return "\n".join(lines)


def queued_messages_for(n_agents: int) -> int:
    """Mosquitto's per-client queue, sized for the aggregator: it holds a round of every agent's traffic
    (statuses, chunked updates)."""
    return max(10_000, 50 * n_agents)


def inflight_messages_for(n_agents: int) -> int:
    """Mosquitto's per-client in-flight window (QoS 1 sent, not yet acknowledged), sized for the aggregator:
    a window of 100 drains about 100 x (1 / round trip) messages/s; a large fleet needs more so that the
    aggregator's intake, not the window, bounds it. Devices receive little, so the window never fills for them."""
    return max(100, min(1000, n_agents // 10))


@dataclass
class BrokerConf:
    listeners: list[Listener]
    password_file: str | None = None  # None: anonymous development broker (no ACL)
    acl_file: str | None = None
    data_dir: str = "/mosquitto/data"
    persistence: bool = False  # a crash would restore a stale snapshot (see the template)
    autosave_interval: int = 60
    max_packet_size: int = 0  # 0 = Mosquitto's default
    max_inflight_messages: int = 100
    max_queued_messages: int = 10_000  # per client; sized for the aggregator, which receives everything
    max_queued_bytes: int = 0  # per client; 0 = no byte bound (max_queued_messages applies)
    log_file: str | None = None  # None: stderr
    extra: list[str] = field(default_factory=list)

    def _listener(self, listener: Listener) -> str:
        if self.password_file is not None and not listener.bind_client_id:  # authenticated: bind the identity
            listener = Listener(**{**listener.__dict__, "bind_client_id": True})
        return listener.render()

    def render(self) -> str:
        if self.log_file:
            log = f"log_dest file {self.log_file}"
        else:
            log = "log_dest stderr"
        log += "\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true"
        if self.password_file is None:
            text = _template("mosquitto.conf.in").replace(
                "allow_anonymous false\npassword_file ${password_file}\nacl_file ${acl_file}",
                "# development broker: anonymous clients, no ACL\nallow_anonymous true")
        else:
            text = _template("mosquitto.conf.in")
        out = Template(text).substitute(
            password_file=self.password_file, acl_file=self.acl_file, data_dir=self.data_dir.rstrip("/"),
            persistence="true" if self.persistence else "false", autosave_interval=self.autosave_interval,
            max_packet_size=self.max_packet_size, max_queued_messages=self.max_queued_messages,
            max_inflight_messages=self.max_inflight_messages, max_queued_bytes=self.max_queued_bytes, log_lines=log,
            listeners="\n\n".join(self._listener(x) for x in self.listeners),
        )
        if not self.max_packet_size:
            out = out.replace("max_packet_size 0\n", "")
        if not self.max_queued_bytes:
            out = out.replace("max_queued_bytes 0\n", "")
        return out + ("\n".join(self.extra) + "\n" if self.extra else "")


def render_acl(topics: Topics, aggregator: str = "aggregator") -> str:
    return Template(_template("acl.in")).substitute(fleet=topics.fleet, base=topics.base, aggregator=aggregator)


def _template(name: str) -> str:
    return (resources.files("fedmq.broker.ops") / "templates" / name).read_text()  # one name per step (3.10)
