"""Publishing protocol messages, chunked when they do not fit one packet.

Non-retained messages (updates, metrics) are chunked on their own topic; retained ones (model,
global) put chunk i on ``<topic>/chunk/<i>`` (retained) and clear the plain topic plus any
chunk topics left over from a previous, larger version, so a late subscriber finds one
complete, consistent set.
"""

from __future__ import annotations

import logging

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import CHUNK_OVERHEAD, split
from fedmq.broker.contract.messages import Message
from fedmq.broker.contract.topics import Topics
from fedmq.broker.transport.client import MqttClient

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self._encoder = codec.Encoder()
        self._retained_chunks: dict[str, int] = {}
        self.bytes_out = 0

    def publish(self, topic: str, msg: Message, *, retain: bool = False, qos: int = 1,
                timeout: float = 60.0) -> int:
        """Publish ``msg``; return the number of packets used (1 = not chunked)."""
        return self.publish_payload(topic, self._encoder.encode(msg), retain=retain, qos=qos, timeout=timeout)

    def publish_payload(self, topic: str, payload: bytes | memoryview, *, retain: bool = False, qos: int = 1,
                        timeout: float = 60.0) -> int:
        """Publish an encoded payload, chunked when it does not fit one packet."""
        payload = memoryview(payload)
        limit = self.client.max_payload(topic + "/chunk/999999")
        if payload.nbytes <= limit:
            self.client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
            self.bytes_out += payload.nbytes
            if retain:
                self._clear_chunks(topic, 0)
            return 1
        chunks = split(payload, limit - CHUNK_OVERHEAD)
        for ch in chunks:
            data = codec.encode(ch)
            target = self.topics.chunk(topic, ch.index) if retain else topic
            self.client.publish(target, data, qos=qos, retain=retain, timeout=timeout)
            self.bytes_out += len(data)
        if retain:
            self.client.publish(topic, b"", qos=qos, retain=True, timeout=timeout)
            self._clear_chunks(topic, len(chunks))
        log.debug("published %s in %d chunks (%d bytes)", topic, len(chunks), payload.nbytes)
        return len(chunks)

    def _clear_chunks(self, topic: str, keep: int) -> None:
        old = self._retained_chunks.get(topic, 0)
        for i in range(keep, old):
            self.client.publish(self.topics.chunk(topic, i), b"", qos=1, retain=True)
        self._retained_chunks[topic] = keep
