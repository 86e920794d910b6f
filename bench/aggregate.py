"""bench/aggregate: the streaming weighted mean vs Flower's ``aggregate``, and copy bandwidth.

Each case runs in a fresh process (peak RSS growth is measured from the moment the inputs exist:
VmHWM is reset through /proc/self/clear_refs). fedmq is measured through the whole strategy
(validation, finite check, weighting, fold, server step), as the round controller drives it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, now, timeit  # noqa: E402

CASES = [(10, 100_000), (100, 100_000), (10, 1_000_000), (100, 1_000_000), (10, 10_000_000)]


def rss_peak_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(k: int, p: int):
    rng = np.random.default_rng(0)
    sizes = [p // 2, p // 4, p // 8, p - p // 2 - p // 4 - p // 8]
    ups = [[rng.standard_normal(s, dtype=np.float32) for s in sizes] for _ in range(k)]
    ns = [int(x) for x in rng.integers(10, 1000, size=k)]
    return sizes, ups, ns


def run_case(which: str, k: int, p: int, repeat: int) -> dict:
    sizes, ups, ns = make_inputs(k, p)
    names = [f"l{i}" for i in range(4)]
    if which == "fedmq":
        from fedmq.aggregator.strategies import ClientUpdate, build_strategy

        g = {n: np.zeros(s, np.float32) for n, s in zip(names, sizes)}
        cus = [ClientUpdate(f"a{i}", ns[i], dict(zip(names, u))) for i, u in enumerate(ups)]
        strat = build_strategy({"name": "weighted"})

        def fn():
            strat.begin_round(g, 1)
            for u in cus:
                strat.add(u)
            return strat.finish().weights

    elif which == "flower":
        from flwr.server.strategy.aggregate import aggregate

        results = list(zip(ups, ns))

        def fn():
            return aggregate(results)

    else:  # copy bandwidth: np.copyto of 400 MB
        src = np.ones(100_000_000, np.float32)
        dst = np.empty_like(src)
        t = timeit(lambda: np.copyto(dst, src), repeat)
        return {"seconds": t, "gbps": 0.4 / t}
    base0 = rss_kb()
    reset_peak()
    out = fn()
    check = [out[n] for n in names] if which == "fedmq" else out
    del out
    first_mb = (rss_peak_kb() - base0) / 1024  # the first round: buffers made once + the result
    ref = [np.average(np.stack([u[i] for u in ups]), axis=0, weights=ns) for i in range(4)] if k * p <= 10**8 else None
    if ref is not None:
        for a, b in zip(check, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    del check
    base = rss_kb()
    reset_peak()
    t = timeit(fn, repeat, warmup=1)
    growth_mb = (rss_peak_kb() - base) / 1024
    return {"seconds": t, "gbps": k * p * 4 / t / 1e9, "growth_mb": growth_mb, "first_mb": first_mb,
            "model_mb": p * 4 / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.case:
        which, k, p = args.case.split(":")
        print(json.dumps(run_case(which, int(k), int(p), args.repeat)))
        return 0

    def sub(case: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--repeat", str(args.repeat)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    copy = sub("copy:0:0")
    print(f"## bench/aggregate — {now()}\n\nMachine: {machine()}\n")
    print(f"Copy bandwidth (np.copyto, 400 MB): {copy['gbps']:.1f} GB/s\n")
    print("Peak growth (× model): first round (buffers made once, plus the result) / later rounds.\n")
    print("| K × P | fedmq s | fedmq GB/s | % of copy | fedmq peak growth | Flower s | Flower GB/s "
          "| Flower peak growth | Flower time / fedmq time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, p in CASES:
        f = sub(f"fedmq:{k}:{p}")
        fl = sub(f"flower:{k}:{p}")
        print(f"| {k} × {p:,} | {f['seconds']:.4f} | {f['gbps']:.2f} | {100 * f['gbps'] / copy['gbps']:.0f}% "
              f"| {f['first_mb'] / f['model_mb']:.2f} / {f['growth_mb'] / f['model_mb']:.2f} "
              f"| {fl['seconds']:.4f} | {fl['gbps']:.2f} "
              f"| {fl['first_mb'] / fl['model_mb']:.2f} / {fl['growth_mb'] / fl['model_mb']:.2f} "
              f"| {fl['seconds'] / f['seconds']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
