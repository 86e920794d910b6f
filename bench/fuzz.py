"""A longer fuzz run of the properties in tests/test_fuzz.py (atheris is not on this machine's index).

Runs every property of tests/test_fuzz.py in batches with fresh seeds until the time budget is
used, counting inputs tried and crashes (a property failing = an untyped exception, an allocation
above the bound, or an invariant broken). Usage::

    .venv/bin/python bench/fuzz.py --minutes 5 [--seed 0]

Prints one line per property and a total; exit code 1 when anything crashed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
PROPERTIES = ["test_decode_raw_bytes_raises_only_decode_error", "test_decode_mutated_valid_payloads",
              "test_decode_structure_aware_maps", "test_each_kind_from_wire_raises_only_decode_error",
              "test_decode_allocates_at_most_a_constant_times_the_payload", "test_reassembler_random_chunk_sequences",
              "test_topic_parser_raises_only_topic_error", "test_receiver_feed_never_raises"]


def _load_tests():
    spec = importlib.util.spec_from_file_location("fedmq_fuzz_props", ROOT / "tests" / "test_fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def run(minutes: float, seed: int, batch: int) -> int:
    mod = _load_tests()
    budget = minutes * 60.0 / len(PROPERTIES)
    total_tried = total_crashes = 0
    for name in PROPERTIES:
        fn = getattr(mod, name)
        inner = fn.hypothesis.inner_test
        tried = [0]

        def counting(*a, _inner=inner, **k):
            tried[0] += 1
            return _inner(*a, **k)

        fn.hypothesis.inner_test = counting
        crashes = 0
        t_end = time.monotonic() + budget
        i = 0
        while time.monotonic() < t_end:
            fn._hypothesis_internal_use_settings = settings(
                deadline=None, database=None, max_examples=batch, derandomize=False,
                suppress_health_check=list(HealthCheck))
            fn._hypothesis_internal_use_seed = seed * 1_000_003 + i
            i += 1
            try:
                fn()
            except Exception:
                crashes += 1
                print(f"CRASH in {name} (seed {seed * 1_000_003 + i - 1}):", file=sys.stderr)
                traceback.print_exc()
        print(f"{name}: {tried[0]} inputs, {crashes} crashes, {budget:.0f} s")
        total_tried += tried[0]
        total_crashes += crashes
    print(f"TOTAL: {total_tried} inputs tried, {total_crashes} crashes")
    return 1 if total_crashes else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500, help="examples per hypothesis run (one seed)")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # rejections are expected by the million; keep the output readable
    return run(args.minutes, args.seed, args.batch)


if __name__ == "__main__":
    sys.exit(main())
