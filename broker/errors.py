"""Typed errors shared by every fedmq component.

One root type (`FedmqError`) so callers can catch everything fedmq raises; each subclass
carries a short machine-readable ``reason`` used as a metric label and in logs.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Root of every error fedmq raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TopicError(FedmqError, ValueError):
    """A topic or agent id does not follow the layout (see fedmq.broker.contract.topics)."""

    reason = "bad_topic"


class DecodeError(FedmqError, ValueError):
    """A payload from the network is malformed, too large or not allowed."""

    reason = "malformed"


class EncodeError(FedmqError, ValueError):
    """A value cannot be put on the wire as asked (e.g. out of float16 range)."""

    reason = "encode"


class ChunkError(FedmqError):
    """A chunk was refused by the reassembler (bounds, hash, inconsistency)."""

    reason = "chunk"


class ConfigError(FedmqError):
    """Configuration is invalid; the message names the key and the fix."""

    reason = "config"


class MqttError(FedmqError):
    """Transport-level failure talking to the broker."""

    reason = "mqtt"


class ConnectError(MqttError):
    """The broker refused or did not answer the connection."""

    reason = "connect"


class AuthError(ConnectError):
    """Bad credentials or not authorized: retrying will not help."""

    reason = "auth"


class PayloadTooLarge(MqttError):
    """Refused client-side: the packet would exceed the broker's or our maximum."""

    reason = "too_large"


class PublishRejected(MqttError):
    """The broker answered a publish with a failure reason code (MQTT 5 PUBACK >= 0x80)."""

    reason = "rejected"


class SubscribeRejected(MqttError):
    """The broker refused a subscription (SUBACK failure code)."""

    reason = "sub_rejected"


class MqttTimeout(MqttError):
    """An operation on the broker did not complete within its timeout."""

    reason = "timeout"
