"""From raw MQTT messages to validated protocol messages: decode, reassemble, de-duplicate, count.

Both services feed every incoming message through a ``Receiver``: it parses the topic, decodes
the payload under the size limits, checks the kind belongs on the channel, reassembles chunked
payloads (charged to the sending agent) and counts every rejection by reason
(fedmq.broker.contract.reasons). Updates are not de-duplicated here: whether a re-sent update is a
duplicate depends on whether the round controller accepted the first copy (a copy refused for a
reason that can change, e.g. ``no_open_round``, must count when re-sent).

A chunked retained message (model, global) is assembled only from the blob its plain topic's
``chunked`` pointer names; chunks of any other blob on the chunk topics (an older version, a
previous aggregator process) are ignored (``stale_chunk``), so versions can never be mixed.
It never raises on what the network sends: an unexpected exception while handling one message
becomes a counted ``internal`` rejection with its traceback logged once per distinct cause.

Rejections are logged at a bounded rate (``RejectLog``): at most one line per (source, reason) per
interval and one summary line with the counts of the interval. Call ``tick()`` about once a second:
it expires idle chunked blobs (returning their memory to the OS) and flushes the summary.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import Reassembler, ReassemblyLimits, release_memory
from fedmq.broker.contract.messages import (
    Chunk,
    ChunkSet,
    DecodeLimits,
    GlobalDelta,
    GlobalModel,
    Message,
    ModelManifest,
    Receipt,
    RoundAnnouncement,
    RoundMetrics,
    ServiceStatus,
    Signed,
    Status,
    Update,
)
from fedmq.broker.contract.signing import TrustedKeys
from fedmq.broker.contract.topics import CHUNKED_RETAINED, Channel, ParsedTopic, Topics
from fedmq.broker.errors import ChunkError, DecodeError, TopicError

log = logging.getLogger(__name__)

#: the one message kind each channel carries (chunks may come on any channel and must reassemble to it)
CHANNEL_KINDS: dict[Channel, type[Message]] = {
    Channel.MODEL: ModelManifest, Channel.GLOBAL: GlobalModel, Channel.ROUND: RoundAnnouncement,
    Channel.METRICS: RoundMetrics, Channel.UPDATE: Update, Channel.STATUS: Status, Channel.SERVICE: ServiceStatus,
    Channel.RECEIPT: Receipt, Channel.DELTA: GlobalDelta,
}
#: the aggregator's retained channels, signed with the fleet's key when the receiver holds trusted keys
SIGNED_CHANNELS = (Channel.MODEL, Channel.GLOBAL, Channel.ROUND, Channel.SERVICE, Channel.DELTA)
#: channels that are never retained: an empty payload there is an error, elsewhere a cleared retained message
NON_RETAINED = (Channel.UPDATE, Channel.METRICS, Channel.RECEIPT)
#: freed reassembly bytes above which ``tick`` asks the allocator to return memory to the OS
TRIM_THRESHOLD = 1 << 20
MAX_CAUSES = 256  # distinct internal-error causes remembered (each logged with its traceback once)


@dataclass
class Received:
    topic: ParsedTopic
    message: Message
    nbytes: int  # bytes on the wire, chunks included
    retained: bool = False
    payload: bytes | memoryview | None = None  # the encoded message (the reassembled blob if chunked)


class RejectLog:
    """Bounded rejection logging: one line per (source, reason) per interval, then a summary line.

    Within an interval the first rejection of each key is logged (up to ``max_lines`` keys); the
    rest are only counted. When the interval ends (checked on every record and on ``flush``) one
    summary line gives the interval's total and its largest counts. Lines per interval are
    therefore at most ``max_lines + 1``, whatever arrives.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_lines: int = 20, top: int = 10) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.log = logger
        self.interval_s = float(interval_s)
        self._clock = clock
        self.max_lines = max_lines
        self.top = top
        self._start = clock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lines = 0

    def record(self, source: str, reason: str, detail: str) -> None:
        now = self._clock()
        self.flush(now)
        key = (source, reason)
        first = key not in self._counts
        self._counts[key] += 1
        if first and self._lines < self.max_lines:
            self._lines += 1
            self.log.warning("rejected message from %s: %s (%s); further %s/%s rejections are summarised every %.0f s",
                             source, detail[:300], reason, source, reason, self.interval_s)

    def flush(self, now: float | None = None, force: bool = False) -> None:
        """Emit the interval's summary line if the interval is over (or ``force``) and anything was suppressed."""
        now = self._clock() if now is None else now
        if not force and now - self._start < self.interval_s:
            return
        total = sum(self._counts.values())
        if total > self._lines:  # something was not logged on its own line
            top = ", ".join(f"{s}/{r}={n}" for (s, r), n in self._counts.most_common(self.top))
            more = len(self._counts) - min(len(self._counts), self.top)
            self.log.warning("%d messages rejected in the last %.0f s (%d keys): %s%s", total, now - self._start,
                             len(self._counts), top, f" and {more} more keys" if more else "")
        self._counts.clear()
        self._lines = 0
        self._start = now


class Receiver:
    """Turns raw (topic, payload) pairs into validated messages; counts and logs what it refuses.

    ``limits`` bound decoding, ``reassembly`` the chunk reassembler (size it with
    ``ReassemblyLimits.for_fleet``), ``log_interval_s`` the rejection log's interval.
    """

    def __init__(self, topics: Topics, limits: DecodeLimits | None = None,
                 reassembly: ReassemblyLimits | None = None,
                 on_reject: Callable[[str], None] | None = None, log_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, trust: TrustedKeys | None = None) -> None:
        self.topics = topics
        #: with keys: messages on SIGNED_CHANNELS must be signed by one of them (the agent); None: not checked
        self.trust = trust
        self.limits = limits or DecodeLimits()
        self.reassembler = Reassembler(reassembly, clock)
        self.rejected: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()  # "cleared", "stale_chunk": counted, not errors
        self.accepted = 0
        self.duplicates = 0
        self.bytes_in = 0
        self.reject_log = RejectLog(log, log_interval_s, clock)
        self._clock = clock
        #: retained stream -> the blob its pointer names ("" after a plain, unchunked message)
        self._pointer: dict[str, str] = {}
        #: retained stream -> (blob id, message) assembled before its pointer arrived (one per stream)
        self._pending: OrderedDict[str, tuple[str, Received]] = OrderedDict()
        self._on_reject = on_reject
        self._causes: set[tuple[str, str]] = set()

    # -- counting ------------------------------------------------------------------------------------
    def reject(self, reason: str, detail: str, topic: str, source: str | None = None) -> None:
        """Count one rejection, log it at the bounded rate and tell ``on_reject``."""
        self.rejected[reason] += 1
        self.reject_log.record(source or _source_of(topic), reason, f"{detail} [topic {topic[:120]!r}]")
        if self._on_reject is not None:
            try:
                self._on_reject(reason)
            except Exception as e:  # the callback is ours, but it must not take the receiver down
                self._log_cause(e, "on_reject callback")

    def internal_error(self, exc: BaseException, topic: str, what: str = "handling a message") -> None:
        """Count an unexpected exception as an ``internal`` rejection; its traceback is logged once per cause."""
        self._log_cause(exc, f"{what} on {topic[:120]!r}")
        self.reject("internal", f"{type(exc).__name__} while {what}", topic)

    def _log_cause(self, exc: BaseException, what: str) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        cause = (type(exc).__name__, where)
        if cause in self._causes:
            return
        if len(self._causes) < MAX_CAUSES:
            self._causes.add(cause)
        log.error("unexpected %s at %s while %s (a bug; logged once per cause, later ones only counted)",
                  cause[0], where, what, exc_info=exc)

    def counts(self) -> dict[str, int]:
        """Every counter: rejections by reason, ignored messages, chunk duplicates, accepted."""
        out = {f"rejected_{k}": v for k, v in self.rejected.items()}
        out.update({k: v for k, v in self.ignored.items()})
        out["chunk_duplicates"] = self.reassembler.duplicates
        out["chunk_expired"] = self.reassembler.expired
        out["accepted"] = self.accepted
        return out

    # -- timer ---------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> int:
        """Periodic work (call about once a second): expire idle blobs, return freed memory, flush logs.

        Returns the number of blobs expired. ``now`` defaults to the receiver's clock (monotonic).
        """
        now = self._clock() if now is None else now
        expired = self.reassembler.expire(now)
        if self.reassembler.take_freed() >= TRIM_THRESHOLD:
            release_memory()
        self.reject_log.flush(now)
        return expired

    # -- the entry point -----------------------------------------------------------------------------
    def feed(self, topic: str, payload: bytes, retained: bool = False) -> Received | None:
        """Return the decoded message when one is complete and new; None otherwise. Never raises."""
        try:
            return self._feed(topic, payload, retained)
        except Exception as e:  # last line of defence: one message must never end the service
            try:
                self.internal_error(e, topic if isinstance(topic, str) else repr(topic)[:120])
            except Exception:  # pragma: no cover - logging itself failed
                self.rejected["internal"] += 1
            return None

    def _feed(self, topic: str, payload: bytes, retained: bool) -> Received | None:
        n = memoryview(payload).nbytes
        self.bytes_in += n
        try:
            parsed = self.topics.parse(topic)
        except TopicError as e:
            self.reject(e.reason, str(e), str(topic), source="(unparsed topic)")
            return None
        source = parsed.agent or parsed.channel.value
        if n == 0:
            if parsed.channel in NON_RETAINED and parsed.chunk is None:
                self.reject("empty", "empty payload", topic, source)
            else:
                self.ignored["cleared"] += 1  # a cleared retained message (status, model/global chunks, ...)
            return None
        expected = CHANNEL_KINDS[parsed.channel]
        pointed = parsed.channel in CHUNKED_RETAINED  # a retained stream with a chunk pointer
        try:
            msg = codec.decode(payload, self.limits)
            nbytes = n
            raw: bytes | memoryview = payload
            if isinstance(msg, ChunkSet):
                if not pointed or parsed.chunk is not None:
                    raise DecodeError(f"a chunk pointer on the {parsed.channel.value} channel", reason="wrong_channel")
                return self._on_pointer(topic, msg)
            if isinstance(msg, Chunk):
                if parsed.chunk is not None and parsed.chunk != msg.index:
                    raise ChunkError(f"chunk {msg.index} published on chunk topic {parsed.chunk}",
                                     reason="chunk_inconsistent")
                stream = topic if parsed.chunk is None else topic.rsplit("/chunk/", 1)[0]
                if pointed and parsed.chunk is not None and stream in self._pointer \
                        and self._pointer[stream] != msg.blob_id:
                    self.ignored["stale_chunk"] += 1  # another version's chunk: never mixed in
                    return None
                blob = self.reassembler.add(msg, stream, sender=source)
                if blob is None:
                    return None
                blob_id = msg.blob_id
                nbytes = len(blob)
                raw = blob
                msg = codec.decode(blob, self.limits)
                if isinstance(msg, (Chunk, ChunkSet)):
                    raise DecodeError("a chunk may not contain a chunk", reason="malformed")
                parsed = ParsedTopic(parsed.channel, parsed.agent, None)
            elif parsed.chunk is not None:
                raise DecodeError(f"a {msg.KIND} message on a chunk topic", reason="wrong_channel")
            elif pointed:
                self._pointer[topic] = ""  # a plain message: chunks now on the chunk topics are stale
                self._pending.pop(topic, None)
                self.reassembler.discard_source(topic)
            msg = self._unwrap(msg, parsed.channel)
            if not isinstance(msg, expected):
                raise DecodeError(f"a {msg.KIND} message on the {parsed.channel.value} channel", reason="wrong_channel")
            if parsed.agent is not None and getattr(msg, "agent", parsed.agent) != parsed.agent:
                raise DecodeError(f"payload claims agent {getattr(msg, 'agent')!r} on {parsed.agent!r}'s topic",
                                  reason="agent_mismatch")
        except (DecodeError, ChunkError) as e:
            self.reject(e.reason, str(e), topic, source)
            return None
        got = Received(parsed, msg, nbytes, retained, raw)
        if pointed and raw is not payload:  # assembled from a retained stream's chunks
            stream = topic.rsplit("/chunk/", 1)[0]
            if stream not in self._pointer:  # its pointer has not arrived yet: hold the newest blob
                self._pending[stream] = (blob_id, got)
                self._pending.move_to_end(stream)
                while len(self._pending) > 4:
                    self._pending.popitem(last=False)
                return None
        self.accepted += 1
        return got

    def _unwrap(self, msg: Message, channel: Channel) -> Message:
        """Verify a signed envelope (before its body is decoded) and return the body's message."""
        if isinstance(msg, Signed):
            if channel not in SIGNED_CHANNELS:
                raise DecodeError(f"a signed message on the {channel.value} channel", reason="wrong_channel")
            if self.trust is not None:
                self.trust.verify(channel.value, msg.key_id, msg.sig, msg.body)
            inner = codec.decode(msg.body, self.limits)
            if isinstance(inner, (Chunk, ChunkSet, Signed)):
                raise DecodeError(f"a signed {inner.KIND} message", reason="malformed")
            return inner
        if self.trust is not None and channel in SIGNED_CHANNELS:
            raise DecodeError(f"an unsigned {msg.KIND} message on the {channel.value} channel: this agent accepts "
                              "only messages signed with the fleet's key", reason="unsigned")
        return msg

    def _on_pointer(self, topic: str, ptr: ChunkSet) -> Received | None:
        """A retained stream now names blob ``ptr.blob_id``: drop other blobs' partials, release a pending one."""
        self._pointer[topic] = ptr.blob_id
        while len(self._pointer) > 64:  # bounded: there are two pointed streams per fleet
            self._pointer.pop(next(iter(self._pointer)))
        self.reassembler.discard_source(topic, keep=ptr.blob_id)
        pending = self._pending.pop(topic, None)
        if pending is not None and pending[0] == ptr.blob_id:
            self.accepted += 1
            return pending[1]
        return None


def _source_of(topic: str) -> str:
    parts = topic.split("/")
    if "agents" in parts:
        i = parts.index("agents")
        if i + 1 < len(parts):
            return "".join(c if c.isascii() and (c.isalnum() or c == "-") else "?" for c in parts[i + 1][:64])
    return "(fleet topic)"
