"""From raw MQTT messages to validated protocol messages: decode, reassemble, de-duplicate, count.

Both services feed every incoming message through a ``Receiver``: it parses the topic, decodes
the payload under the size limits, reassembles chunked payloads (per sender topic), drops exact
duplicates (QoS 1 redelivery; an agent re-sending from its outbox) and counts every rejection
by reason. It never raises on what the network sends.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import Reassembler, ReassemblyLimits
from fedmq.broker.contract.messages import Chunk, DecodeLimits, Message, Update
from fedmq.broker.contract.topics import ParsedTopic, Topics
from fedmq.broker.errors import ChunkError, DecodeError, TopicError

log = logging.getLogger(__name__)


@dataclass
class Received:
    topic: ParsedTopic
    message: Message
    nbytes: int  # bytes on the wire, chunks included
    retained: bool = False


class Receiver:
    def __init__(self, topics: Topics, limits: DecodeLimits | None = None,
                 reassembly: ReassemblyLimits | None = None, dedupe_window: int = 4096,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.topics = topics
        self.limits = limits or DecodeLimits()
        self.reassembler = Reassembler(reassembly)
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self.duplicates = 0
        self.bytes_in = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window = dedupe_window
        self._on_reject = on_reject

    def reject(self, reason: str, detail: str, topic: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected message on %s: %s (%s)", topic, detail, reason)
        if self._on_reject is not None:
            self._on_reject(reason)

    def _fresh(self, key: str) -> bool:
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        return True

    def feed(self, topic: str, payload: bytes, retained: bool = False) -> Received | None:
        """Return the decoded message when one is complete and new; None otherwise."""
        self.bytes_in += len(payload)
        try:
            parsed = self.topics.parse(topic)
        except TopicError as e:
            self.reject(e.reason, str(e), topic)
            return None
        if not payload:  # a cleared retained message
            return None
        try:
            msg = codec.decode(payload, self.limits)
            nbytes = len(payload)
            if isinstance(msg, Chunk):
                source = topic if parsed.chunk is None else topic.rsplit("/chunk/", 1)[0]
                blob = self.reassembler.add(msg, source)
                if blob is None:
                    return None
                nbytes = len(blob)
                msg = codec.decode(blob, self.limits)
                if isinstance(msg, Chunk):
                    raise DecodeError("a chunk may not contain a chunk", reason="malformed")
                parsed = ParsedTopic(parsed.channel, parsed.agent, None)
            if parsed.agent is not None and getattr(msg, "agent", parsed.agent) != parsed.agent:
                raise DecodeError(f"payload claims agent {getattr(msg, 'agent')!r} on {parsed.agent!r}'s topic",
                                  reason="agent_mismatch")
            # Updates are the only non-idempotent messages: one per (agent, round, update_id).
            if isinstance(msg, Update) and not self._fresh(f"{msg.agent}/{msg.round}/{msg.update_id}"):
                return None
        except (DecodeError, ChunkError) as e:
            self.reject(e.reason, str(e), topic)
            return None
        self.accepted += 1
        return Received(parsed, msg, nbytes, retained)
