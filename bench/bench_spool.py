"""What the gateway's spool costs: one fsync'd append per message before it is published,
one un-synced done mark per PUBACK, and the read of a full spool at start-up.

For each payload size, ``--count`` messages are added to a spool in ``--dir`` (a folder on
the disk under test: the fsync is the cost) and then acknowledged; times are medians and
90th percentiles per message. Then a spool of ``max_entries`` 4 KB messages (a gateway cut
off for 1000 rounds of the demo's model) is loaded the way a restarted gateway loads it.

Usage: python bench/bench_spool.py [--sizes 4096 65536 1048576] [--count 200] [--dir PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edge.spool import Spool


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_size(folder: Path, size: int, count: int) -> dict[str, float]:
    spool = Spool(folder, count + 1, 1 << 40)
    payload = b"\xa5" * size
    adds, removes, seqs = [], [], []
    for i in range(count):
        started = time.perf_counter()
        entry, _ = spool.add("fg/plant/wind/update/gw1", payload, 1, False, "update", i, f"id-{i}")
        adds.append(time.perf_counter() - started)
        assert entry is not None
        seqs.append(entry.seq)
    for seq in seqs:
        started = time.perf_counter()
        spool.remove(seq)
        removes.append(time.perf_counter() - started)
    spool.close()
    return {"add_median_ms": statistics.median(adds) * 1e3, "add_p90_ms": percentile(adds, 0.9) * 1e3,
            "ack_median_ms": statistics.median(removes) * 1e3,
            "ack_p90_ms": percentile(removes, 0.9) * 1e3}


def full_load(folder: Path, entries: int, size: int) -> tuple[float, int]:
    spool = Spool(folder, entries, 1 << 40)
    for i in range(entries):
        spool.add("fg/plant/wind/update/gw1", b"\xa5" * size, 1, False, "update", i, f"id-{i}")
    spool.close()
    started = time.perf_counter()
    again = Spool(folder, entries, 1 << 40)
    seconds = time.perf_counter() - started
    loaded = len(again)
    again.close()
    return seconds, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536, 1048576])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="folder on the disk under test")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-spool-"))
    print("| payload (bytes) | add + fsync, median / p90 (ms) | done mark, median / p90 (ms) |")
    print("|---:|---:|---:|")
    for size in args.sizes:
        r = one_size(base / f"s{size}", size, args.count)
        print(f"| {size:,} | {r['add_median_ms']:.2f} / {r['add_p90_ms']:.2f} | "
              f"{r['ack_median_ms']:.3f} / {r['ack_p90_ms']:.3f} |")
    seconds, loaded = full_load(base / "full", 1000, 4096)
    print(f"\nload of a full spool ({loaded} entries of 4,096 bytes): {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
