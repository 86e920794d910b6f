"""The topic layout: every topic fedmq uses is built and parsed here, nowhere else.

Layout under ``<prefix>/<fleet>/`` (prefix defaults to ``fedmq``)::

    model                       retained  model artifact manifest (aggregator)
    global                      retained  current global weights (aggregator)
    round                       retained  round announcement (aggregator)
    metrics                     -         per-round results (aggregator)
    service                     retained  the aggregator's own status + last will (aggregator)
    delta                       retained  the latest global as a compressed delta from the previous one (aggregator)
    agents/<agent>/update       -         an agent's update (that agent only)
    agents/<agent>/status       retained  an agent's status + last will (that agent only)
    agents/<agent>/receipt      -         the aggregator's receipt for each update (read by that agent only)
    <channel>/chunk/<i>         retained  chunk i of a retained message too large for one packet
                                          (model, global: the plain topic then holds a ``chunked``
                                          pointer naming the blob the chunks make)

Names are restricted to ``[a-z0-9-]`` (1-64 characters, no leading/trailing dash): Mosquitto
ACL patterns substitute the username with ``%u`` and deny names holding ``+`` or ``#``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fedmq.broker.errors import TopicError

# ASCII-only patterns; ``\Z`` (not ``$``, which also matches before a final newline)
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?\Z")
PREFIX_RE = re.compile(r"[a-z0-9][a-z0-9-]*(?:/[a-z0-9][a-z0-9-]*)*\Z")
CHUNK_INDEX_RE = re.compile(r"(?:0|[1-9][0-9]{0,8})\Z")  # ASCII digits only: '¹'.isdigit() is True
MAX_TOPIC = 1024  # characters; longer topics are refused before any parsing


def check_name(value: str, what: str = "agent id") -> str:
    """Return ``value`` if it is a valid fleet/agent name, else raise TopicError."""
    if type(value) is not str or not NAME_RE.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 characters of [a-z0-9-], "
            "starting and ending with a letter or digit"
        )
    return value


class Channel(str, Enum):
    MODEL = "model"
    GLOBAL = "global"
    ROUND = "round"
    METRICS = "metrics"
    SERVICE = "service"
    DELTA = "delta"
    UPDATE = "update"
    STATUS = "status"
    RECEIPT = "receipt"


FLEET_CHANNELS = (Channel.MODEL, Channel.GLOBAL, Channel.ROUND, Channel.METRICS, Channel.SERVICE, Channel.DELTA)
#: retained channels whose large messages are chunked onto ``<topic>/chunk/<i>`` behind a pointer
CHUNKED_RETAINED = (Channel.MODEL, Channel.GLOBAL, Channel.DELTA)
AGENT_CHANNELS = (Channel.UPDATE, Channel.STATUS, Channel.RECEIPT)


@dataclass(frozen=True)
class ParsedTopic:
    """What a topic names: its channel, the agent (agent channels) and chunk index (if a chunk)."""

    channel: Channel
    agent: str | None = None
    chunk: int | None = None


@dataclass(frozen=True)
class Topics:
    """Builds and parses the topics of one fleet."""

    fleet: str
    prefix: str = "fedmq"

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")
        if not PREFIX_RE.match(self.prefix):
            raise TopicError(f"invalid topic prefix {self.prefix!r}: use [a-z0-9-] segments joined by '/'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    # -- builders ---------------------------------------------------------------------------
    def model(self) -> str:
        return f"{self.base}/model"

    def global_(self) -> str:
        return f"{self.base}/global"

    def round(self) -> str:
        return f"{self.base}/round"

    def metrics(self) -> str:
        return f"{self.base}/metrics"

    def service(self) -> str:
        return f"{self.base}/service"

    def delta(self) -> str:
        return f"{self.base}/delta"

    def update(self, agent: str) -> str:
        return f"{self.base}/agents/{check_name(agent)}/update"

    def status(self, agent: str) -> str:
        return f"{self.base}/agents/{check_name(agent)}/status"

    def receipt(self, agent: str) -> str:
        return f"{self.base}/agents/{check_name(agent)}/receipt"

    def channel(self, channel: Channel, agent: str | None = None) -> str:
        if channel in AGENT_CHANNELS:
            if agent is None:
                raise TopicError(f"channel {channel.value} needs an agent id")
            return f"{self.base}/agents/{check_name(agent)}/{channel.value}"
        return f"{self.base}/{channel.value}"

    def chunk(self, topic: str, index: int) -> str:
        """Topic of retained chunk ``index`` of a message normally published on ``topic``."""
        if index < 0:
            raise TopicError("chunk index must be >= 0")
        return f"{topic}/chunk/{index}"

    # -- subscription filters ----------------------------------------------------------------
    def all_updates(self) -> str:
        return f"{self.base}/agents/+/update"

    def all_statuses(self) -> str:
        return f"{self.base}/agents/+/status"

    def with_chunks(self, topic: str) -> list[str]:
        """Filters for a retained channel and its chunk topics."""
        return [topic, f"{topic}/chunk/+"]

    # -- parsing ------------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Parse a topic of this fleet; raise TopicError for anything outside the layout."""
        if type(topic) is not str or len(topic) > MAX_TOPIC or not topic.startswith(self.base + "/"):
            raise TopicError(f"topic {topic!r} is not under {self.base}/")
        parts = topic[len(self.base) + 1 :].split("/")
        chunk: int | None = None
        if len(parts) >= 3 and parts[-2] == "chunk":
            idx = parts[-1]
            if not CHUNK_INDEX_RE.match(idx):
                raise TopicError(f"bad chunk index in topic {topic!r}")
            chunk = int(idx)
            parts = parts[:-2]
        if len(parts) == 1:
            try:
                ch = Channel(parts[0])
            except ValueError:
                raise TopicError(f"unknown channel in topic {topic!r}") from None
            if ch not in FLEET_CHANNELS:
                raise TopicError(f"channel {ch.value} needs an agent: {topic!r}")
            return ParsedTopic(ch, None, chunk)
        if len(parts) == 3 and parts[0] == "agents":
            agent = check_name(parts[1])
            try:
                ch = Channel(parts[2])
            except ValueError:
                raise TopicError(f"unknown agent channel in topic {topic!r}") from None
            if ch not in AGENT_CHANNELS:
                raise TopicError(f"channel {ch.value} is not an agent channel: {topic!r}")
            return ParsedTopic(ch, agent, chunk)
        raise TopicError(f"topic {topic!r} does not match the fedmq layout")
