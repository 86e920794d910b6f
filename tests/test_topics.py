import pytest

from fedmq.broker.contract.topics import Channel, ParsedTopic, Topics, check_name
from fedmq.broker.errors import TopicError


def test_build_and_parse_every_topic():
    t = Topics("lab-1")
    assert t.model() == "fedmq/lab-1/model"
    assert t.update("pi-07") == "fedmq/lab-1/agents/pi-07/update"
    assert t.status("pi-07") == "fedmq/lab-1/agents/pi-07/status"
    cases = {
        t.model(): ParsedTopic(Channel.MODEL),
        t.global_(): ParsedTopic(Channel.GLOBAL),
        t.round(): ParsedTopic(Channel.ROUND),
        t.metrics(): ParsedTopic(Channel.METRICS),
        t.update("a"): ParsedTopic(Channel.UPDATE, "a"),
        t.status("a"): ParsedTopic(Channel.STATUS, "a"),
        t.receipt("a"): ParsedTopic(Channel.RECEIPT, "a"),
        t.service(): ParsedTopic(Channel.SERVICE),
        t.chunk(t.global_(), 12): ParsedTopic(Channel.GLOBAL, None, 12),
        t.chunk(t.model(), 0): ParsedTopic(Channel.MODEL, None, 0),
    }
    for topic, parsed in cases.items():
        assert t.parse(topic) == parsed
    for ch in Channel:
        agent = "x1" if ch in (Channel.UPDATE, Channel.STATUS, Channel.RECEIPT) else None
        assert t.parse(t.channel(ch, agent)).channel is ch


def test_custom_prefix():
    t = Topics("f", prefix="acme/fl")
    assert t.round() == "acme/fl/f/round"
    assert t.parse("acme/fl/f/agents/z/update") == ParsedTopic(Channel.UPDATE, "z")
    with pytest.raises(TopicError):
        Topics("f", prefix="Bad/+")


@pytest.mark.parametrize("bad", ["", "A", "a+b", "a#", "a/b", "-a", "a-", "a b", "é", "a" * 65, "a_b"])
def test_bad_names_rejected(bad):
    with pytest.raises(TopicError):
        check_name(bad)
    with pytest.raises(TopicError):
        Topics("f").update(bad)


@pytest.mark.parametrize("topic", [
    "fedmq/other/model", "fedmq/f/models", "fedmq/f/agents/a/updates", "fedmq/f/agents/A/update",
    "fedmq/f/agents/+/update", "fedmq/f/agents/a/b/update", "fedmq/f/update", "fedmq/f/agents/a/model",
    "fedmq/f/global/chunk/x", "fedmq/f/global/chunk/01", "fedmq/f/global/chunk/-1", "fedmq/f", "",
    "fedmq/f/model/chunk/1/chunk/2",
])
def test_parse_rejects_outside_layout(topic):
    with pytest.raises(TopicError):
        Topics("f").parse(topic)
