"""A restart with another strategy is refused (exit 2, both named, the flag given) or, with the flag, starts fresh.

Seen before: fedavgm -> fedadam was accepted silently and crashed at the first round close (Adam's
``v`` never restored); fedadam -> fedavgm started momentum from Adam's moment.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.aggregator.config import AggregatorConfig, ModelSection, ServiceSection
from fedmq.aggregator.model_store import load_or_export
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.state import Checkpoint
from fedmq.aggregator.strategies import ClientUpdate
from fedmq.broker.errors import ConfigError


@pytest.fixture(scope="module")
def served(model_cache):
    return load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), model_cache)


def _service(tmp_path, served, strategy: dict, **kw) -> AggregatorService:
    cfg = AggregatorConfig(service=ServiceSection(state_dir=str(tmp_path / "state"), export_final=False),
                           strategy=strategy)
    svc = AggregatorService(cfg, served=served, **kw)
    return svc


def _one_round(svc: AggregatorService) -> None:
    """Run one aggregation of the service's strategy and checkpoint it (the strategy's state now holds something)."""
    g = svc.served.initial_weights()
    svc.strategy.begin_round(g, 1)
    delta = {k: np.full_like(v, 0.01) for k, v in g.items()}
    assert svc.strategy.add(ClientUpdate("a", 10, delta)) is None
    res = svc.strategy.finish()
    svc.global_weights, svc.global_round, svc.next_round = res.weights, 1, 2
    svc._checkpoint()


def test_another_strategy_is_refused_naming_both_and_the_flag(tmp_path, served):
    first = _service(tmp_path, served, {"name": "fedavgm", "server": {"momentum": 0.9}})
    first._restore()
    _one_round(first)
    ck = Checkpoint.load(first.checkpoint_path)
    assert ck.strategy_info["name"] == "fedavgm" and ck.strategy_info["server"] == "momentum"
    # the same strategy (other parameters) resumes its state: the momentum buffer carries over (control)
    same = _service(tmp_path, served, {"name": "fedavgm", "server": {"momentum": 0.5}})
    same._restore()
    st = same.strategy.state_dict()
    assert st and all(np.array_equal(st[k], ck.strategy[k]) for k in ck.strategy)
    with pytest.raises(ConfigError) as e:
        _service(tmp_path, served, {"name": "fedadam"})._restore()
    msg = str(e.value)
    assert "fedavgm" in msg and "fedadam" in msg and "--switch-strategy" in msg


def test_with_the_flag_the_new_strategy_starts_fresh_and_the_switch_is_recorded(tmp_path, served):
    first = _service(tmp_path, served, {"name": "fedavgm"})
    first._restore()
    _one_round(first)
    sw = _service(tmp_path, served, {"name": "fedadam"}, switch_strategy=True)
    sw._restore()
    assert sw._switched_from and "fedavgm" in sw._switched_from
    np.testing.assert_array_equal(next(iter(sw.global_weights.values())),
                                  next(iter(first.global_weights.values())))  # the weights carry over
    # a round closes without error with fresh Adam state (the crash seen before)
    g = sw.global_weights
    sw.strategy.begin_round(g, 2)
    assert sw.strategy.add(ClientUpdate("a", 10, {k: np.full_like(v, 0.01) for k, v in g.items()})) is None
    res = sw.strategy.finish()
    assert res.weights is not None and all(np.all(np.isfinite(w)) for w in res.weights.values())


def test_run_exits_2_on_a_strategy_change(tmp_path, served, model_cache):
    """The command: exit 2 (a config error, not restarted by systemd), before connecting anywhere."""
    from fedmq.aggregator.cli import main
    from fedmq.broker.commands.config import write_toml

    state = tmp_path / "state"
    first = _service(tmp_path, served, {"name": "fedavgm"})
    first._restore()
    _one_round(first)
    (state / "models").rmdir() if (state / "models").is_dir() and not any((state / "models").iterdir()) else None
    if not (state / "models").exists():
        (state / "models").symlink_to(model_cache)
    cfg = write_toml(tmp_path / "agg.toml", {
        "broker": {"host": "127.0.0.1", "port": 9, "fleet": "sw"},
        "service": {"state_dir": str(state), "export_final": False},
        "model": {"source": "zoo:sensor1d", "batch_size": 16, "verify_steps": 5},
        "strategy": {"name": "fedadam"}})
    assert main(["run", "--config", str(cfg), "--max-seconds", "1"]) == 2
