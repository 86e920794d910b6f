"""Plots of a run's history (accuracy and loss, bytes, participants per round), as PNG files.

Shared by ``fedmq-aggregator run`` (``PlotWriter``: redrawn after each round by a child process,
so rendering never delays the protocol) and ``simulate``. Uses matplotlib's Agg backend only.

Why a child process: matplotlib is ~38 MB of the aggregator's resident memory once imported (a
process of 44 MB with 100 devices became 82 MB), and drawing in a thread of the aggregator holds the
GIL for ~0.5 s per round, in the middle of the next round's intake (10 % of the process's samples at
10,000 agents). The child (``python -m fedmq.aggregator.plots --serve DIR``) reads one JSON line of
history rows per redraw on stdin and answers one line on stdout; it is started at the first redraw,
restarted if it dies, and ends when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILES = ("accuracy_loss.png", "bytes.png", "participants.png")
#: the history fields the plots read (what the renderer child is sent)
PLOTTED = ("round", "outcome", "eval_accuracy", "train_loss", "eval_loss", "bytes_received", "asked", "participants")


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
    """Redraws the plots in a child process; ``submit`` never blocks (only the latest history is kept)."""

    RESTARTS = 3  # a child that dies this many times in a row: no more plots (logged)

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._latest: list[dict] | None = None
        self._cv = threading.Condition()
        self._stop = False
        self.drawn = 0
        self.failed = False
        self._child: subprocess.Popen | None = None
        self._deaths = 0
        self._thread = threading.Thread(target=self._run, name="fedmq-plots", daemon=True)
        self._thread.start()

    def submit(self, history: list[dict]) -> None:
        with self._cv:
            self._latest = list(history)
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Draw what is pending, then stop (the child ends when its stdin closes)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        child, self._child = self._child, None
        if child is not None:
            try:
                if child.stdin is not None:
                    child.stdin.close()
                child.wait(timeout=max(1.0, timeout / 2))
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
                child.wait()

    def _spawn(self) -> subprocess.Popen:
        # its own session: a Ctrl-C or a group SIGTERM meant for the aggregator does not kill it mid-redraw
        # (close() ends it by closing its stdin)
        return subprocess.Popen([sys.executable, "-m", "fedmq.aggregator.plots", "--serve", str(self.out_dir)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                start_new_session=True)

    def _draw(self, rows: list[dict]) -> None:
        """One redraw by the child (started or restarted here); sets ``drawn`` or ``failed``."""
        if self._child is None or self._child.poll() is not None:
            if self._stop and self._child is not None:
                return  # stopping: no new renderer for a last redraw
            self._child = self._spawn()
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        try:
            # only what the plots read: a row also holds up to 1,000 participant ids, the rejections and the
            # strategy's parameters, and the whole history goes each time
            slim = [{k: r[k] for k in PLOTTED if k in r} for r in rows]
            child.stdin.write(json.dumps(slim, separators=(",", ":"), default=str) + "\n")
            child.stdin.flush()
            answer = child.stdout.readline().strip()
        except (OSError, ValueError):
            answer = ""
        if answer == "ok":
            self.drawn += 1
            self._deaths = 0
        elif answer == "no-matplotlib":
            self.failed = True
            log.warning("matplotlib is not installed: no plots in %s", self.out_dir)
        elif answer.startswith("error"):
            log.warning("drawing the plots failed: %s", answer[6:300])
        else:  # the child died (killed, out of memory): a new one for the next redraw
            self._child = None
            child.kill()
            child.wait()
            self._deaths += 1
            if self._deaths >= self.RESTARTS:
                self.failed = True
                log.warning("the plot renderer died %d times in a row: no more plots in %s", self._deaths,
                            self.out_dir)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._latest is None and not self._stop:
                    self._cv.wait()
                rows, self._latest = self._latest, None
                stop = self._stop
            if rows is not None and not self.failed:
                try:
                    self._draw(rows)
                except Exception:  # noqa: BLE001 - a plot must never end the service
                    log.exception("drawing the plots failed")
            if stop:
                return


def serve(out_dir: Path) -> int:
    """The child: one JSON list of history rows per stdin line -> the plots -> one answer line.

    Answers go to a copy of the original stdout; fd 1 itself then points at stderr, so that nothing a
    library prints can be taken for an answer."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        try:
            rows = json.loads(line)
            if not isinstance(rows, list):
                raise ValueError("not a list of rows")
            write_plots([r for r in rows if isinstance(r, dict)], out_dir)
            answer = "ok"
        except ImportError:
            answer = "no-matplotlib"
        except Exception as e:  # noqa: BLE001 - answered, and the next redraw is tried
            answer = f"error {type(e).__name__}: {e}".replace("\n", " ")
        answers.write(answer + "\n")
        answers.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedmq.aggregator.plots",
                                 description="Draw a run's plots: from history.jsonl, or (--serve) as the "
                                             "aggregator's renderer, one JSON line of rows per redraw on stdin.")
    ap.add_argument("--serve", metavar="DIR", help="renderer mode: write the plots into DIR")
    ap.add_argument("--history", metavar="FILE", help="history.jsonl of a state_dir")
    ap.add_argument("--out", metavar="DIR", help="with --history: where to write the plots")
    args = ap.parse_args(argv)
    if args.serve:
        return serve(Path(args.serve))
    if not args.history or not args.out:
        ap.error("give --serve DIR, or --history FILE --out DIR")
    from .state import HistoryLog

    history = HistoryLog(Path(args.history).parent)
    history.jsonl = Path(args.history)  # the file given, whatever its name
    rows, _ = history.read()  # torn and unreadable lines dropped, as at a restart
    for p in write_plots(rows, Path(args.out)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
