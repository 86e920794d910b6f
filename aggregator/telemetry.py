"""Prometheus metrics of the aggregator (own registry: several services may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Telemetry:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rounds = Counter("fedmq_rounds", "Closed rounds by outcome", ["outcome"], registry=r)
        self.accepted = Counter("fedmq_updates_accepted", "Updates that counted", registry=r)
        self.rejected = Counter("fedmq_updates_rejected", "Rejected messages by reason", ["reason"], registry=r)
        self.bytes_in = Counter("fedmq_update_bytes", "Bytes of accepted updates", registry=r)
        self.duration = Histogram("fedmq_round_duration_seconds", "Round wall time", registry=r,
                                  buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
        self.agents = Gauge("fedmq_connected_agents", "Agents whose retained status is not offline", registry=r)
        self.round = Gauge("fedmq_round", "Current round id", registry=r)
        self.weight_capped = Counter("fedmq_updates_weight_capped",
                                     "Accepted updates whose claimed sample count was capped", registry=r)
        self.inbox_dropped = Gauge("fedmq_inbox_dropped", "Messages dropped because the inbox was full", registry=r)
        self.broker_dropped = Gauge("fedmq_broker_dropped_messages",
                                    "Messages the broker dropped (full client queues; $SYS, Mosquitto)", registry=r)
        self.bytes_out = Counter("fedmq_global_bytes", "Bytes of published global models and deltas", registry=r)
        self.devices_known = Gauge("fedmq_devices_known", "Devices in the fleet table", registry=r)
        self.journal_errors = Counter("fedmq_journal_errors", "Round journal writes that failed (the round went on "
                                      "without one: a restart re-opens it)", registry=r)
        self.devices_excluded = Gauge("fedmq_devices_excluded",
                                      "Devices not asked: refused updates N rounds in a row or a reported error",
                                      registry=r)

