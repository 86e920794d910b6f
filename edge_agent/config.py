"""The agent's TOML configuration (see docs/configuration.md), validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.commands.config import BrokerSection, load_tables
from fedmq.broker.contract.topics import NAME_RE
from fedmq.broker.errors import ConfigError


@dataclass
class AgentSection:
    id: str = ""
    cache_dir: str = "./fedmq-agent"
    runtime: str = ""  # "" = first available: ai_edge_litert, tflite_runtime, tensorflow
    num_threads: int = 0
    #: small devices: no XNNPACK delegate (its packed copies of the weights), and the interpreter
    #: is released between rounds (an idle agent holds no model-size buffers). FedAvg CNN: 98 MB
    #: peak instead of 106, about half the training speed (bench/agent_footprint).
    low_memory: bool = False
    #: keep the latest global model even in rounds that do not ask this agent (for on-device
    #: predictions between rounds); off: the global is fetched only when a round asks for it, so a
    #: device on a thin link never downloads intermediate globals it will not train on
    follow_global: bool = False
    #: the fleet's public model-signing keys ("ed25519:<base64>", written by `fedmq-broker provision`):
    #: model, global, round and service messages must be signed by one of them; empty = not checked
    trusted_keys: list[str] = field(default_factory=list)
    #: re-send an update from the outbox when no receipt came this many seconds after it was handed over
    #: (doubling up to 8x); receipts, not PUBACKs, say the aggregator holds it
    resend_s: float = 30.0
    #: when a (re)started aggregator announces itself, republish this agent's status within this many
    #: seconds (seeded per agent): the aggregator's presence re-sync at fleet scale
    presence_jitter_s: float = 5.0
    #: robustness experiments only: make this agent Byzantine ("sign_flip": send -delta,
    #: "scale": send 100 x delta). Never set on a real device.
    attack: str = ""

    def validate(self, section: str) -> None:
        import base64
        import binascii

        for k in self.trusted_keys:
            try:
                ok = isinstance(k, str) and k.startswith("ed25519:") and len(base64.b64decode(k[8:], validate=True)) == 32
            except (binascii.Error, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"{section}.trusted_keys: {k!r:.60} is not ed25519:<base64 of a 32-byte key> (copy "
                                  "the fleet's aggregator/signing.pub)")
        if not self.resend_s > 0 or self.presence_jitter_s < 0:
            raise ConfigError(f"{section}.resend_s must be > 0 and presence_jitter_s >= 0")
        if self.attack not in ("", "sign_flip", "scale"):
            raise ConfigError(f"{section}.attack must be empty, sign_flip or scale")
        if not NAME_RE.match(self.id or ""):
            raise ConfigError(f"{section}.id = {self.id!r}: set it to this device's agent id ([a-z0-9-], "
                              "equal to its MQTT username)")
        if self.runtime not in ("", "ai_edge_litert", "tflite_runtime", "tensorflow"):
            raise ConfigError(f"{section}.runtime must be empty (auto), ai_edge_litert, tflite_runtime or tensorflow")


@dataclass
class DataSection:
    source: str = ""  # npz:/path.npz | csv:/dir | callable:package.module:function
    eval_fraction: float = 0.0  # local held-out split for reporting val_accuracy / val_loss
    seed: int = 0

    def validate(self, section: str) -> None:
        kind = self.source.split(":", 1)[0]
        if kind not in ("npz", "csv", "callable"):
            raise ConfigError(f"{section}.source = {self.source!r}: use npz:/path.npz, csv:/dir or "
                              "callable:package.module:function")
        if not (0.0 <= self.eval_fraction < 1.0):
            raise ConfigError(f"{section}.eval_fraction must be in [0, 1)")


@dataclass
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    data: DataSection = field(default_factory=DataSection)

    @property
    def cache_dir(self) -> Path:
        return Path(self.agent.cache_dir)


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    cfg = load_tables(path, AgentConfig, overrides)
    if cfg.broker.username is not None and cfg.broker.username != cfg.agent.id:
        raise ConfigError(f"broker.username {cfg.broker.username!r} differs from agent.id {cfg.agent.id!r}: the "
                          "ACL lets an agent write only under its own username")
    return cfg
