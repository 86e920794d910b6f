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

    def publish(self, *a, **k):
        raise AssertionError("nothing is published here")


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
    with pytest.raises(RuntimeError, match="cannot be read back"):
        ag._unspill_global(spilled)
    assert ag.global_msg is None


def test_no_spill_unless_the_cache_file_holds_that_global(tmp_path):
    ag = _agent(tmp_path)
    assert ag._spill_global() is None  # no global at all
    ag._handle(ag.topics.global_(), codec.encode(_global(0, 0.5)), True)
    ag._global_on_disk = None  # e.g. the cache write failed
    assert ag._spill_global() is None and ag.global_msg.tensors  # kept in memory
    ag._global_on_disk = (RUN, 0, MID)
    assert ag._spill_global() is not None  # positive control
