"""The agent's own copy of the global while it trains: dropped once the weights are in the interpreter,
read back from its cache file (checked against a digest) for the delta (edge_agent/service.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import GlobalModel

RUN = "ab" * 8
MID = "cd" * 32


class _NoNetwork:
    """Stands in for the MQTT client: nothing here crosses a network."""

    on_connected = None
    connected = False

    def __init__(self):
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []

    def publish(self, *a, **k):
        raise AssertionError("nothing is published here")

    def subscribe(self, topic, **k):
        self.subscribed.append(topic)

    def unsubscribe(self, topic, **k):
        self.unsubscribed.append(topic)


def _agent(tmp_path):
    from fedmq.edge_agent.config import AgentConfig, AgentSection, DataSection
    from fedmq.edge_agent.service import AgentService

    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int32))
    cfg = AgentConfig(agent=AgentSection(id="a", cache_dir=str(tmp_path / "cache")),
                      data=DataSection(source=f"npz:{tmp_path / 'd.npz'}"))
    return AgentService(cfg, client=_NoNetwork())


def _global(rnd: int, value: float) -> GlobalModel:
    return GlobalModel(rnd, MID, {"w000": np.full((4, 2), value, np.float32), "w001": np.arange(2, dtype=np.float32)},
                       0.0, run=RUN)


def test_a_spilled_global_comes_back_checked(tmp_path):
    ag = _agent(tmp_path)
    ag._handle(ag.topics.global_(), codec.encode(_global(0, 0.5)), True)
    kept = {n: t.copy() for n, t in ag.global_msg.tensors.items()}
    spilled = ag._spill_global()
    assert spilled is not None and ag.global_msg.tensors == {} and ag.global_msg.round == 0  # metadata only
    back = ag._unspill_global(spilled)
    assert ag.global_msg is back and sorted(back.tensors) == sorted(kept)
    for n in kept:
        assert np.array_equal(back.tensors[n], kept[n])
    # the file no longer holds that global (another one with the same run and round): refused, fetched again
    spilled = ag._spill_global()
    (tmp_path / "cache" / "global.msgpack").write_bytes(codec.encode(_global(0, 0.25)))
    ag._global_subscribed = "off"  # as while it trains on a global it holds
    with pytest.raises(RuntimeError, match="cannot be read back"):
        ag._unspill_global(spilled)
    assert ag.global_msg is None
    assert ag.client.subscribed[-1].startswith(ag.topics.global_())  # subscribed afresh: the retained one comes again


def test_no_spill_unless_the_cache_file_holds_that_global(tmp_path):
    ag = _agent(tmp_path)
    assert ag._spill_global() is None  # no global at all
    ag._handle(ag.topics.global_(), codec.encode(_global(0, 0.5)), True)
    ag._global_on_disk = None  # e.g. the cache write failed
    assert ag._spill_global() is None and ag.global_msg.tensors  # kept in memory
    ag._global_on_disk = (RUN, 0, MID)
    assert ag._spill_global() is not None  # positive control


def _served(model_cache):
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    return load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), model_cache)


def test_training_waits_for_step_and_a_failed_round_gives_the_global_back(tmp_path, model_cache):
    """Messages only mark a round as due (no received message may hold the global while it trains); a round
    that fails after the global was spilled leaves the global in memory and no interpreter behind."""
    from fedmq.broker.contract.messages import RoundAnnouncement, TrainConfig
    from fedmq.edge_agent.config import AgentConfig, AgentSection, DataSection
    from fedmq.edge_agent.service import AgentService

    served = _served(model_cache)
    y = np.zeros(40, np.int32)
    y[-1] = 99  # a label the model cannot have: fit refuses it, after the global was spilled
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 100, 6), np.float32), y=y)
    cfg = AgentConfig(agent=AgentSection(id="a", cache_dir=str(tmp_path / "cache")),
                      data=DataSection(source=f"npz:{tmp_path / 'd.npz'}"))
    client = _NoNetwork()
    statuses: list[bytes] = []
    client.publish = lambda topic, payload, **k: statuses.append(payload)  # only the agent's own status
    ag = AgentService(cfg, client=client)
    T = ag.topics
    ag._handle(T.model(), codec.encode(served.manifest(RUN)), True)
    assert ag.trainer is not None and ag.data_error is None  # the first example fits
    g = GlobalModel(0, served.model_id, served.initial_weights(), 0.0, run=RUN)
    ag._handle(T.global_(), codec.encode(g), True)
    ann = RoundAnnouncement(1, served.model_id, 0, 0.0, 2e9, TrainConfig(), None, 1, run=RUN)
    ag._handle(T.round(), codec.encode(ann), True)
    assert ag._train_due and ag.rounds_trained == 0  # due, not trained inside the handler
    ag._train_due = False
    with pytest.raises(Exception, match="labels"):
        ag._maybe_work(train=True)
    assert ag.trainer.interp is None  # released
    assert sorted(ag.global_msg.tensors) == sorted(served.initial_weights())  # the global is back in memory
    for n, w in served.initial_weights().items():
        assert np.array_equal(ag.global_msg.tensors[n], w)
    assert ag.rounds_trained == 0
    assert [codec.decode(p).state for p in statuses][-2:] == ["training", "idle"]
