"""Plots of a run's history (accuracy and loss, bytes, participants per round), as PNG files.

Shared by ``fedmq-aggregator run`` (``PlotWriter``: redrawn in a background thread after each round,
so rendering never delays the protocol) and ``simulate``. Uses matplotlib's Agg backend only.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILES = ("accuracy_loss.png", "bytes.png", "participants.png")


def write_plots(history: list[dict], out_dir: Path) -> list[Path]:
    """Draw the plots of ``history`` (rows of history.jsonl) into ``out_dir``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [h for h in history if h.get("outcome") == "aggregated"]
    if not rows:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = [h["round"] for h in rows]
    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax[0].plot(r, [h.get("eval_accuracy", np.nan) for h in rows], marker="o")
    ax[0].set(xlabel="round", ylabel="held-out accuracy", title="accuracy per round")
    ax[1].plot(r, [h.get("train_loss", np.nan) for h in rows], marker="o", label="train (agents)")
    ax[1].plot(r, [h.get("eval_loss", np.nan) for h in rows], marker="s", label="held-out")
    ax[1].set(xlabel="round", ylabel="loss", title="loss per round")
    ax[1].legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / FILES[0]))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(r, [h.get("bytes_received", 0) / 1e6 for h in rows])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="MB received (updates)", title="bytes per round")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / FILES[1]))
    plt.close(fig)
    every = [h for h in history if "participants" in h]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([h["round"] for h in every], [h.get("asked", np.nan) for h in every], marker="s", label="asked")
    ax.plot([h["round"] for h in every], [h["participants"] for h in every], marker="o", label="counted")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="agents", title="participants per round")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / FILES[2]))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    """Rendered in memory, then replaced atomically: a reader never sees a half-written file."""
    import io

    from fedmq.broker.storage import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    return atomic_write(path, buf.getbuffer())


class PlotWriter:
    """Redraws the plots in a daemon thread; ``submit`` never blocks (only the latest history is kept)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._latest: list[dict] | None = None
        self._cv = threading.Condition()
        self._stop = False
        self.drawn = 0
        self.failed = False
        self._thread = threading.Thread(target=self._run, name="fedmq-plots", daemon=True)
        self._thread.start()

    def submit(self, history: list[dict]) -> None:
        with self._cv:
            self._latest = list(history)
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Draw what is pending, then stop."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._latest is None and not self._stop:
                    self._cv.wait()
                rows, self._latest = self._latest, None
                stop = self._stop
            if rows is not None and not self.failed:
                try:
                    write_plots(rows, self.out_dir)
                    self.drawn += 1
                except ImportError:
                    self.failed = True
                    log.warning("matplotlib is not installed: no plots in %s", self.out_dir)
                except Exception:  # noqa: BLE001 - a plot must never end the service
                    log.exception("drawing the plots failed")
            if stop:
                return
