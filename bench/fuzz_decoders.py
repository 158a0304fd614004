"""Long decoder fuzzing run: `python -m bench.fuzz_decoders [--n N] [--seeds S]`.

Runs the same harness as tests/fedcore/test_fuzz_decoders.py (which does 100,000 payloads
per CI run) for longer, prints the payload rate, crashes and rejection reasons, and peak
traced memory. Results are recorded by hand in bench/RESULTS_fuzz.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

from tests.fedcore import fuzz_harness as harness


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000, help="payloads per seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trace-memory", action="store_true", help="tracemalloc (about 3x slower)")
    args = parser.parse_args()
    total, crashes, peak = 0, 0, 0
    rejected: dict[str, int] = {}
    start = time.perf_counter()
    for seed in range(args.seeds):
        if args.trace_memory:
            tracemalloc.start()
        stats = harness.fuzz(args.n, seed=seed)
        if args.trace_memory:
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        total += stats.payloads
        crashes += len(stats.crashes)
        for name, payload, error in stats.crashes[:3]:
            print(f"CRASH {name}: {error} payload={payload[:64].hex()}")
        for key, n in stats.rejected.items():
            rejected[key] = rejected.get(key, 0) + n
    elapsed = time.perf_counter() - start
    print(f"payloads {total}  crashes {crashes}  {elapsed:.1f} s  {total / elapsed:,.0f} payloads/s")
    if args.trace_memory:
        print(f"peak traced memory {peak / 1e6:.2f} MB")
    print("pipeline.decode_update fuzzed:", harness.DECODE_UPDATE is not None)
    for key, n in sorted(rejected.items(), key=lambda kv: -kv[1]):
        print(f"  {n:9d}  {key}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
