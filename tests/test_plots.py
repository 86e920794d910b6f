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


def test_matplotlib_stays_out_of_the_aggregators_process(tmp_path):
    """The renderer is a child process: the process that submits never imports matplotlib (~38 MB)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fedmq.aggregator.plots import FILES, PlotWriter
        out = Path({str(tmp_path / "plots")!r})
        w = PlotWriter(out)
        w.submit([{{"round": 1, "outcome": "aggregated", "eval_accuracy": 0.5, "train_loss": 1.0,
                    "bytes_received": 10.0, "participants": 2.0, "asked": 2.0}}])
        end = time.monotonic() + 60
        while w.drawn < 1 and not w.failed and time.monotonic() < end:
            time.sleep(0.05)
        w.close()
        print(w.drawn, w.failed, "matplotlib" in sys.modules, all((out / f).exists() for f in FILES))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "False", "True"]  # drawn, by the child, not here


def test_a_renderer_that_dies_is_replaced(tmp_path):
    w = PlotWriter(tmp_path / "plots")
    try:
        w.submit(_rows(3))
        wait_until(lambda: w.drawn >= 1, 60, what="the first redraw")
        first = w._child
        first.kill()
        first.wait()
        w.submit(_rows(4))
        wait_until(lambda: w.drawn >= 2, 60, what="a redraw by a new renderer")
        assert w._child is not first and w._child.poll() is None and not w.failed
    finally:
        w.close()
    assert w._child is None


def test_plots_from_a_history_file(tmp_path):
    import json
    import subprocess
    import sys

    hist = tmp_path / "history.jsonl"
    hist.write_text("".join(json.dumps(r) + "\n" for r in _rows(4)))
    out = subprocess.run([sys.executable, "-m", "fedmq.aggregator.plots", "--history", str(hist), "--out",
                          str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(_png(tmp_path / "p" / f) for f in FILES)
    bad = subprocess.run([sys.executable, "-m", "fedmq.aggregator.plots"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2  # usage
