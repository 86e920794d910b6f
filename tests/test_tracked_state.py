"""The aggregator's retained state at (re)connect is tracked, not waited for: the broker's answers are
checked on later steps. A refusal or no answer within ``publish_timeout_s`` republishes (in 2 s), as a
failed wait did; all acknowledged clears the list without a republish (the positive control)."""

from __future__ import annotations

import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.aggregator.config import load_config
from fedmq.aggregator.service import AggregatorService
from fedmq.broker.transport.client import _Waiter


class StubClient:
    connected = True
    dropped = 0

    def __init__(self) -> None:
        self.forgotten: list[int] = []

    def forget(self, mid: int) -> None:
        self.forgotten.append(mid)


def service(tmp_path) -> AggregatorService:
    cfg = load_config(None, {"service": {"state_dir": str(tmp_path), "publish_timeout_s": 5.0}})
    svc = AggregatorService(cfg, client=StubClient())
    svc._republish.clear()
    return svc


def answered(rc: ReasonCode | None) -> _Waiter:
    w = _Waiter()
    if rc is not None:
        w.value = rc
        w.event.set()
    return w


def test_all_acknowledged_clears_without_a_republish(tmp_path):
    svc = service(tmp_path)
    svc._tracked = [("f/global", 1, answered(ReasonCode(PacketTypes.PUBACK, "Success"))),
                    ("f/round", 2, answered(None))]
    svc._tracked_until = time.monotonic() + 60
    svc._check_tracked()
    assert len(svc._tracked) == 2 and not svc._republish.is_set()  # one still open: nothing decided yet
    svc._tracked[1][2].value = ReasonCode(PacketTypes.PUBACK, "Success")
    svc._tracked[1][2].event.set()
    svc._check_tracked()
    assert svc._tracked == [] and not svc._republish.is_set() and svc.client.forgotten == []


def test_a_refusal_republishes_in_two_seconds(tmp_path):
    svc = service(tmp_path)
    svc._tracked = [("f/global", 1, answered(ReasonCode(PacketTypes.PUBACK, "Not authorized"))),
                    ("f/round", 2, answered(None))]
    svc._tracked_until = time.monotonic() + 60
    t0 = time.monotonic()
    svc._check_tracked()
    assert svc._republish.is_set() and svc._tracked == [] and svc.client.forgotten == [2]
    assert t0 + 1.5 <= svc._next_republish <= time.monotonic() + 2.5


def test_no_answer_in_time_republishes(tmp_path):
    svc = service(tmp_path)
    svc._tracked = [("f/global", 7, answered(None))]
    svc._tracked_until = time.monotonic() - 0.001
    svc._check_tracked()
    assert svc._republish.is_set() and svc._tracked == [] and svc.client.forgotten == [7]
