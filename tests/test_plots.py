"""Plots of a run: drawn from the history rows, after each round, without blocking the protocol thread."""

from __future__ import annotations

import time

import pytest
from conftest import wait_until

from fedmq.aggregator.plots import FILES, PlotWriter, write_plots

pytest.importorskip("matplotlib")


def _rows(n):
    return [{"round": i, "outcome": "aggregated" if i != 3 else "abandoned", "eval_accuracy": 0.5 + i / 100,
             "train_loss": 1.0 / i, "eval_loss": 1.1 / i, "bytes_received": 1000.0 * i, "participants": 2.0,
             "asked": 3.0} for i in range(1, n + 1)]


def _png(p):
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_three_plots_are_written_from_the_history(tmp_path):
    paths = write_plots(_rows(5), tmp_path)
    assert [p.name for p in paths] == list(FILES) and all(_png(p) for p in paths)
    assert write_plots([{"round": 1, "outcome": "abandoned", "participants": 0.0}], tmp_path / "none") == []


def test_the_writer_redraws_in_the_background_and_never_blocks(tmp_path):
    w = PlotWriter(tmp_path / "plots")
    t0 = time.perf_counter()
    for n in range(1, 30):
        w.submit(_rows(n))  # a fast run: most are superseded before they are drawn
    submit_s = time.perf_counter() - t0
    wait_until(lambda: all((tmp_path / "plots" / f).exists() for f in FILES), 60, what="the plots")
    w.close()
    assert w.drawn >= 1 and not w.failed
    assert all(_png(tmp_path / "plots" / f) for f in FILES)
    print(f"29 submits took {submit_s * 1e3:.2f} ms; {w.drawn} redraws")
