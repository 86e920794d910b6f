"""bench/codec: encode/decode throughput of fedmq's wire format vs Flower's serializer.

Flower (``flwr.common.ndarrays_to_parameters`` / ``parameters_to_ndarrays``) is installed only in
the benchmark environment (.bench-venv, see bench/run.sh). Both sides get the same arrays:
P float32 parameters in 4 layers. Prints a Markdown table (MB/s and speed-up) and bytes on the
wire per update encoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, now, timeit  # noqa: E402

from fedmq.broker.contract import codec  # noqa: E402
from fedmq.broker.contract.messages import GlobalModel, Update  # noqa: E402
from fedmq.broker.contract.tensors import Compression  # noqa: E402

MID = "ab" * 32


def layers(p: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [p // 2, p // 4, p // 8, p - p // 2 - p // 4 - p // 8]
    return {f"layer{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(sizes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    print(f"## bench/codec — {now()}\n\nMachine: {machine()}\n")
    print("| params | direction | fedmq MB/s | Flower MB/s | fedmq / Flower |")
    print("|---:|---|---:|---:|---:|")
    for p in (int(s) for s in args.sizes.split(",")):
        w = layers(p)
        nbytes = p * 4
        msg = GlobalModel(1, MID, w, 0.0)
        arrs = list(w.values())
        enc = codec.Encoder()
        t_enc = timeit(lambda: enc.encode(msg), args.repeat)
        t_enc_bytes = timeit(lambda: codec.encode(msg), args.repeat)
        payload = codec.encode(msg)
        t_dec = timeit(lambda: codec.decode(payload), args.repeat)
        t_fenc = timeit(lambda: ndarrays_to_parameters(arrs), args.repeat)
        params = ndarrays_to_parameters(arrs)
        t_fdec = timeit(lambda: parameters_to_ndarrays(params), args.repeat)
        # both decoders must return the same arrays
        ours = codec.decode(payload).tensors
        theirs = parameters_to_ndarrays(params)
        assert all(np.array_equal(a, b) for a, b in zip(ours.values(), theirs))
        mb = nbytes / 1e6
        for label, t_ours, t_fl in (("encode (reused buffer)", t_enc, t_fenc),
                                    ("encode to bytes", t_enc_bytes, t_fenc),
                                    ("decode", t_dec, t_fdec)):
            print(f"| {p:,} | {label} | {mb / t_ours:,.0f} | {mb / t_fl:,.0f} | {t_fl / t_ours:.2f}x |")
    print("\nBytes on the wire for one update of 1,000,000 float32 parameters (4 layers):\n")
    print("| encoding | payload bytes | vs raw |")
    print("|---|---:|---:|")
    w = layers(1_000_000)
    raw = None
    for enc_name, comp in (("raw float32", Compression("raw")), ("float16", Compression("f16")),
                           ("int8", Compression("int8")), ("top-k 1%", Compression("topk", 0.01))):
        n = len(codec.encode(Update(1, "a", MID, "0123456789abcdef", 10, w, {}, 0.0, comp)))
        raw = raw or n
        print(f"| {enc_name} | {n:,} | {n / raw:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
