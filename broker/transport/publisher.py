"""Publishing protocol messages, chunked when they do not fit one packet.

Non-retained messages (updates, metrics) are chunked on their own topic. A retained one (model,
global) first puts a ``chunked`` pointer on its plain topic (the blob id, size and digest), then
chunk i on ``<topic>/chunk/<i>`` (retained), then clears chunk topics left over from a previous,
larger version. Subscribers assemble only the blob the pointer names, so a late subscriber never
mixes versions, and stale chunks (even from a previous process, see ``forget_retained``) are inert.
"""

from __future__ import annotations

import hashlib
import logging

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import CHUNK_OVERHEAD, split
from fedmq.broker.contract.messages import ChunkSet, Message
from fedmq.broker.contract.signing import Signer
from fedmq.broker.contract.topics import Topics
from fedmq.broker.transport.client import MqttClient

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, client: MqttClient, topics: Topics, signer: Signer | None = None) -> None:
        self.client = client
        self.topics = topics
        #: signs model, global, round and service messages (the channels agents verify)
        self.signer = signer
        self._signed = {topics.model(): "model", topics.global_(): "global", topics.round(): "round",
                        topics.service(): "service", topics.delta(): "delta"}
        #: topic -> sha256 of what we last put on the plain retained topic (a foreign write differs)
        self.retained_digest: dict[str, bytes] = {}
        self._encoder = codec.Encoder()
        self._retained_chunks: dict[str, int] = {}
        self.bytes_out = 0

    def publish(self, topic: str, msg: Message, *, retain: bool = False, qos: int = 1,
                timeout: float = 60.0, wait: bool = True, track: list | None = None) -> int:
        """Publish ``msg`` (signed on the signed channels when a signer is set); return the packets used."""
        payload: bytes | memoryview = self._encoder.encode(msg)
        channel = self._signed.get(topic)
        if self.signer is not None and channel is not None:
            payload = self.signer.wrap(channel, payload)
        return self.publish_payload(topic, payload, retain=retain, qos=qos, timeout=timeout, wait=wait, track=track)

    def publish_payload(self, topic: str, payload: bytes | memoryview, *, retain: bool = False, qos: int = 1,
                        timeout: float = 60.0, wait: bool = True, infos: list | None = None,
                        track: list | None = None) -> int:
        """Publish an encoded payload, chunked when it does not fit one packet.

        ``wait=False`` hands every packet to paho without waiting for PUBACKs (paho re-sends after
        a reconnect); pass a list as ``infos`` to collect their ``MQTTMessageInfo`` handles. ``track``
        (a list): nothing waits either, and ``(topic, mid, waiter)`` of every packet is appended to it,
        for the caller to check the broker's answers later (MqttClient.publish ``track``).
        """
        payload = memoryview(payload)
        limit = self.client.max_payload(topic + "/chunk/999999")

        def send(target: str, data: bytes | memoryview, keep: bool) -> None:
            r = self.client.publish(target, data, qos=qos, retain=keep, timeout=timeout, wait=wait and track is None,
                                    track=track is not None)
            if infos is not None and r.info is not None:
                infos.append(r.info)
            if track is not None and r.waiter is not None:
                track.append((target, r.mid, r.waiter))

        if payload.nbytes <= limit:
            if retain:
                self.retained_digest[topic] = hashlib.sha256(payload).digest()
            send(topic, payload, retain)
            self.bytes_out += payload.nbytes
            if retain:
                self._clear_chunks(topic, 0)
            return 1
        chunks = split(payload, limit - CHUNK_OVERHEAD)
        if retain:  # the pointer first: a subscriber then knows which blob the chunks it gets make
            first = chunks[0]
            pointer = codec.encode(ChunkSet(first.blob_id, first.total, first.size, first.sha256))
            self.retained_digest[topic] = hashlib.sha256(pointer).digest()
            send(topic, pointer, True)
        for ch in chunks:
            data = codec.encode(ch)
            send(self.topics.chunk(topic, ch.index) if retain else topic, data, retain)
            self.bytes_out += len(data)
        if retain:
            self._clear_chunks(topic, len(chunks))
        log.debug("published %s in %d chunks (%d bytes)", topic, len(chunks), payload.nbytes)
        return len(chunks)

    def forget_retained(self, topic: str, chunks: int) -> None:
        """Say that ``chunks`` chunk topics of ``topic`` may hold retained data (e.g. found at start-up
        from a previous process): the next publish on ``topic`` clears those it does not overwrite."""
        self._retained_chunks[topic] = max(self._retained_chunks.get(topic, 0), chunks)

    def _clear_chunks(self, topic: str, keep: int) -> None:
        old = self._retained_chunks.get(topic, 0)
        for i in range(keep, old):
            self.client.publish(self.topics.chunk(topic, i), b"", qos=1, retain=True, wait=False)
        self._retained_chunks[topic] = keep
