"""The aggregator's TOML configuration (see docs/configuration.md), validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.commands.config import BrokerSection, load_tables
from fedmq.broker.contract.tensors import ENCODINGS
from fedmq.broker.contract.topics import NAME_RE
from fedmq.broker.errors import ConfigError

from .strategies import build_strategy
from .strategies.registry import KEYS as STRATEGY_KEYS

#: [service] read_batch: at most this many messages read ahead (each may be a model-size update)
MAX_READ_BATCH = 100_000
#: [service] rcvbuf_bytes other than 0: at least 64 KiB (one buffered read), at most what setsockopt takes (a C int)
MIN_RCVBUF = 65536
MAX_RCVBUF = 2**31 - 1


@dataclass
class ServiceSection:
    id: str = "aggregator"
    state_dir: str = "./fedmq-state"
    #: HTTP port of the dashboard, /api/status, /api/fleet and /metrics; 0 = off
    http_port: int = 0
    http_addr: str = ""  # "" = prometheus_addr (127.0.0.1 unless set)
    prometheus_port: int = 0  # the older name of http_port (used when http_port is 0)
    prometheus_addr: str = "127.0.0.1"  # the older name of http_addr
    export_final: bool = True  # write final .keras + inference .tflite when the run ends
    plots: bool = True  # redraw state_dir/plots/*.png after every round (a child process; needs matplotlib)
    #: the fleet's Ed25519 model-signing key (PEM; `fedmq-broker provision` writes aggregator/signing.key):
    #: model, global, round and service messages are signed with it; "" = unsigned
    signing_key: str = ""
    publish_timeout_s: float = 30.0  # wait for the broker's PUBACK of one retained publish before retrying later
    #: intake (docs/configuration.md, "Intake"): messages the pumped client reads ahead of the protocol loop;
    #: the rest of a backlog waits in the socket buffer and the broker's per-client queue
    read_batch: int = 64
    #: SO_RCVBUF of the aggregator's connection, bytes (0 = the kernel's default; Linux caps it at
    #: net.core.rmem_max): the broker hands over a backlog without waiting for the aggregator to be scheduled
    rcvbuf_bytes: int = 4 << 20
    #: the open round's journal (aggregator/journal.py): "fsync" (an update is on disk before its receipt
    #: and its MQTT acknowledgement), "write" (in the kernel: survives a crash of the process, not of the
    #: host), "off" (a restart re-opens the round and every asked agent re-sends)
    journal: str = "fsync"

    def validate(self, section: str) -> None:
        if self.journal not in ("fsync", "write", "off"):
            raise ConfigError(f"{section}.journal = {self.journal!r}: use fsync, write or off")
        if not NAME_RE.match(self.id):
            raise ConfigError(f"{section}.id = {self.id!r}: use [a-z0-9-] (it is the MQTT username and client id)")
        for key in ("http_port", "prometheus_port"):
            if not (0 <= getattr(self, key) < 65536):
                raise ConfigError(f"{section}.{key} must be 0 (off) or a TCP port")
        if not self.publish_timeout_s > 0:
            raise ConfigError(f"{section}.publish_timeout_s must be > 0 seconds")
        if not (1 <= self.read_batch <= MAX_READ_BATCH):
            raise ConfigError(f"{section}.read_batch = {self.read_batch}: use 1 to {MAX_READ_BATCH} messages "
                              "(default 64)")
        if self.rcvbuf_bytes != 0 and not (MIN_RCVBUF <= self.rcvbuf_bytes <= MAX_RCVBUF):
            raise ConfigError(f"{section}.rcvbuf_bytes = {self.rcvbuf_bytes}: use 0 (the kernel's default) or "
                              f"{MIN_RCVBUF} to {MAX_RCVBUF} bytes (default 4194304 = 4 MiB)")


@dataclass
class ModelSection:
    source: str = "zoo:sensor1d"
    batch_size: int = 16
    optimizer: str = "sgd"
    verify_steps: int = 20
    seed: int = 0

    def validate(self, section: str) -> None:
        if ":" not in self.source:
            raise ConfigError(f"{section}.source = {self.source!r}: use 'zoo:NAME' or 'package.module:function'")
        if self.optimizer not in ("sgd", "momentum", "adam"):
            raise ConfigError(f"{section}.optimizer must be sgd, momentum or adam")
        if self.batch_size < 1:
            raise ConfigError(f"{section}.batch_size must be >= 1")


@dataclass
class RoundsSection:
    rounds: int = 10  # stop after this many aggregated rounds (0 = run until stopped)
    target_metric: str = ""  # e.g. "eval_accuracy": stop once it reaches target_value
    target_value: float = 0.0
    select: str = "all"  # all | fraction | list
    fraction: float = 1.0
    agents: list[str] = field(default_factory=list)
    min_agents: int = 1  # agents online before a round opens
    quorum: int = 0  # updates needed; 0 = use quorum_fraction
    quorum_fraction: float = 1.0
    deadline_s: float = 120.0
    grace_s: float = 5.0
    on_timeout: str = "abandon"  # abandon | extend
    max_extensions: int = 3
    seed: int = 0
    upload_window_s: float = 0.0  # agents spread their uploads over at least this many seconds (0 = at once)
    upload_rate: float = 2000.0  # ... and over at least asked / upload_rate seconds (0 = no pacing by size)
    participants_listed: int = 1000  # ids listed in a metrics message / history row (all go to participants.jsonl)
    exclude_after: int = 3  # rounds in a row with only refused updates before a device is no longer asked; 0 = never
    exclude_s: float = 3600.0  # an excluded device is asked again after this long (probation); 0 = until it restarts

    def validate(self, section: str) -> None:
        if self.upload_window_s > 86_400:
            raise ConfigError(f"{section}.upload_window_s must be at most 86400 (what agents accept)")
        if (self.upload_window_s < 0 or self.upload_rate < 0 or self.participants_listed < 0 or self.exclude_after < 0
                or self.exclude_s < 0):
            raise ConfigError(f"{section}.upload_window_s, upload_rate, participants_listed, exclude_after and "
                              "exclude_s must be >= 0")
        if self.select not in ("all", "fraction", "list"):
            raise ConfigError(f"{section}.select must be all, fraction or list")
        if self.select == "list" and not self.agents:
            raise ConfigError(f"{section}.agents must list agent ids when select = \"list\"")
        if not (0 < self.fraction <= 1) or not (0 < self.quorum_fraction <= 1):
            raise ConfigError(f"{section}.fraction and quorum_fraction must be in (0, 1]")
        if self.on_timeout not in ("abandon", "extend"):
            raise ConfigError(f"{section}.on_timeout must be abandon or extend")
        if self.deadline_s <= 0 or self.grace_s < 0:
            raise ConfigError(f"{section}.deadline_s must be > 0 and grace_s >= 0")
        for a in self.agents:
            if not NAME_RE.match(a):
                raise ConfigError(f"{section}.agents: {a!r} is not a valid agent id")
        if self.select == "list" and self.quorum > len(self.agents):
            raise ConfigError(f"{section}.quorum = {self.quorum} can never be met: select = \"list\" asks only the "
                              f"{len(self.agents)} listed agents; lower quorum or list more agents")
        if self.select != "list" and self.min_agents < 1:
            raise ConfigError(f"{section}.min_agents = {self.min_agents}: a round needs at least one online agent "
                              "(use >= 1)")


@dataclass
class TrainSection:
    epochs: int = 1
    lr: float = 0.05
    lr_decay: float = 1.0  # local lr of round r = lr * lr_decay ** (r - 1)
    mu: float = 0.0
    encoding: str = "raw"
    topk_fraction: float = 0.01
    #: the downlink: "raw" (each global as a full keyframe only) or "f16"/"int8" (also a retained delta
    #: from the previous global, which agents holding it fetch instead: about 2x / 4x fewer bytes)
    downlink: str = "raw"

    def validate(self, section: str) -> None:
        if self.downlink not in ("raw", "f16", "int8"):
            raise ConfigError(f"{section}.downlink must be raw, f16 or int8")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"{section}.encoding must be one of {', '.join(ENCODINGS)}")
        if self.epochs < 1 or self.lr <= 0 or self.mu < 0:
            raise ConfigError(f"{section}: epochs >= 1, lr > 0 and mu >= 0 are required")
        if not (0 < self.lr_decay <= 1):
            raise ConfigError(f"{section}.lr_decay must be in (0, 1] (1 = constant learning rate)")


@dataclass
class EvalSection:
    dataset: str = ""  # "" (off) | "watch" | "fashion-mnist" | "npz:/path/with/x_and_y.npz"
    groups: list[int] = field(default_factory=list)  # watch: held-out subjects
    max_examples: int = 0


@dataclass
class LimitsSection:
    """Per-agent budgets, spent before a payload is decoded (fedmq.aggregator.limits)."""

    enabled: bool = True
    msgs_per_s: float = 20.0  # sustained messages per second per agent
    msgs_burst: int = 200  # bucket size: messages an agent may send at once (a chunked upload)
    bytes_per_s: int = 0  # sustained bytes per second per agent; 0 = bytes_burst / 10
    bytes_burst: int = 0  # 0 = max(8 MiB, 3 x the model's size): one full update always fits
    log_interval_s: float = 10.0  # rejections: the first per (agent, reason) logged, then counts per interval
    quarantine_msgs_per_s: float = 100.0  # an agent over its limit by this many messages/s is unsubscribed; 0 = never
    quarantine_s: float = 300.0  # how long a quarantine lasts
    #: chunk reassembly (chunked updates): 0 = sized from the model and the fleet (ReassemblyLimits.for_fleet)
    reassembly_blob_bytes: int = 0  # one blob's declared size
    reassembly_total_bytes: int = 0  # every sender's blobs together
    reassembly_ttl_s: float = 120.0  # an incomplete blob idle this long is dropped

    def validate(self, section: str) -> None:
        if self.msgs_per_s <= 0 or self.msgs_burst < 1:
            raise ConfigError(f"{section}.msgs_per_s must be > 0 and msgs_burst >= 1 (enabled = false turns limits off)")
        if self.bytes_per_s < 0 or self.bytes_burst < 0:
            raise ConfigError(f"{section}.bytes_per_s and bytes_burst must be >= 0 (0 = sized from the model)")
        if self.log_interval_s <= 0:
            raise ConfigError(f"{section}.log_interval_s must be > 0")
        if self.reassembly_blob_bytes < 0 or self.reassembly_total_bytes < 0 or self.reassembly_ttl_s <= 0:
            raise ConfigError(f"{section}.reassembly_blob_bytes/_total_bytes must be >= 0 (0 = sized from the "
                              "fleet) and reassembly_ttl_s > 0")
        if self.quarantine_msgs_per_s < 0 or self.quarantine_s <= 0:
            raise ConfigError(f"{section}.quarantine_msgs_per_s must be >= 0 (0 = never) and quarantine_s > 0")


@dataclass
class AggregatorConfig:
    broker: BrokerSection = field(default_factory=BrokerSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    model: ModelSection = field(default_factory=ModelSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})

    @property
    def state_dir(self) -> Path:
        return Path(self.service.state_dir)


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> AggregatorConfig:
    cfg = load_tables(path, AggregatorConfig, overrides, raw={"strategy": tuple(STRATEGY_KEYS)})
    build_strategy(cfg.strategy)  # validate now: a bad strategy must fail at start-up
    return cfg
