"""The fault suite's table and its RESULTS_faults.md, from the JSON record bench_faults.py writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TIMING_REASONS = ("late", "stale_round")  # bench_faults.py counts these updates as lost
DEFINITIONS = """\
What is counted, over the whole run of a scenario (warm-up, every injection, every recovery):

- **rounds lost**: round numbers between the first and the last committed round that never
  committed (no model, no summary), plus rounds that had to be rerun: a gateway trained and
  sent a fresh update (a new message id) twice for the same round. Rounds whose deadline was
  extended because the quorum was missed are listed apart (they committed once, late).
- **updates lost**: fresh updates (message ids) a gateway logged as sent (`round R: update
  sent`) for a round that committed, where the gateway is not among the round summary's
  participants, or for a round that never committed; excluding updates the aggregator refused
  with a logged, documented reason about the update itself (listed apart as refused). A
  `late` or `stale_round` refusal is not such a reason: the gateway sent the update for a
  round that was still open when it sent it, so such an update counts as lost. A re-send of a cached
  update (same message id) is not a new update; the statistics round (round 0) carries no
  update and is not counted.
- **samples lost**: the training rows of the lost updates. Apart from that, **records
  missed**: the turbines number their rows (`row_seq`); a record number between the first and
  the last in a gateway's sample store that the store never received (the bridge was not
  polling while the turbine moved on).
- **time to recover**: from the injection, and from the end of the fault (the restart, or the
  partition healing), until the first round that commits after the fault's end with every
  gateway in it (the aggregator's commit time in `history.jsonl`).
- **mid-round**: the round announced last when the fault began had not committed yet.
"""


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _span(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return _fmt(values[0]) if len(values) == 1 else f"{_fmt(min(values))}-{_fmt(max(values))}"


def before_faults(r: dict[str, Any]) -> int:
    """Lost updates of rounds before the first fault (start-up, not the fault's doing)."""
    first = min((s["round"] for s in r["injections"]), default=math.inf)
    return sum(1 for _, n, _ in r["updates_lost"] if n < first)


def row(r: dict[str, Any]) -> list[str]:
    shots = r["injections"]
    missed = sum(r["store_missing"].values())
    return [
        r["scenario"],
        f"{len(shots)} ({sum(s['mid_round'] for s in shots)})",
        str(r["rounds_committed"]),
        str(len(r["rounds_missing"]) + len(r["rounds_rerun"])),
        str(len(r["deadline_extended"])),
        f"{len(r['updates_lost'])} of {r['updates_sent']}"
        + (f" ({early} before the first fault)" if (early := before_faults(r)) else ""),
        str(sum(1 for _, _, why in r["updates_refused"] if why not in TIMING_REASONS))
        + (f" ({r['updates_unknown']} unknown)" if r["updates_unknown"] else ""),
        str(r["samples_lost"]),
        str(missed),
        _span([s["recover_from_injection_s"] for s in shots]),
        _span([s["recover_from_end_s"] for s in shots]),
        "FAILED" if r["error"] else "ok",
    ]


HEADER = ["scenario", "faults (mid-round)", "rounds committed", "rounds lost", "deadline extended",
          "updates lost", "refused for a reason", "samples lost", "records missed", "recover from fault, s",
          "recover from fault end, s", "run"]


def table(record: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in record["results"]]
    return "\n".join(lines)


def details(record: dict[str, Any]) -> str:
    out = []
    for r in record["results"]:
        parts = [f"- `{r['scenario']}`: faults at rounds "
                 + ", ".join(f"{s['round']}{'' if s['mid_round'] else ' (between rounds)'}" for s in r["injections"])]
        if r["rounds_missing"]:
            parts.append(f"rounds never committed {r['rounds_missing']}")
        if r["rounds_rerun"]:
            parts.append(f"rounds rerun {r['rounds_rerun']}")
        if r["deadline_extended"]:
            parts.append(f"deadline extended in rounds {r['deadline_extended']}")
        if r["updates_lost"]:
            parts.append("updates lost (gateway, round, rows) " + ", ".join(
                f"({d}, {n}, {rows})" for d, n, rows in r["updates_lost"]))
        if r["updates_refused"]:
            parts.append("refused (gateway, round, reason) " + ", ".join(
                f"({d}, {n}, {why})" for d, n, why in r["updates_refused"]))
        if any(r["store_missing"].values()):
            parts.append("records missed per store " + ", ".join(
                f"{d} {m} of {r['store_records'][d] + m}" for d, m in r["store_missing"].items()))
        if r["lineages"] != 1:
            parts.append(f"{r['lineages']} lineages")
        if r["error"]:
            parts.append(f"FAILED: {r['error'].splitlines()[0]}")
        out.append("; ".join(parts))
    return "\n".join(out)


def soak_section(path: Path) -> str:
    if not path.is_file():
        return ""
    soak = json.loads(path.read_text())
    s = soak["summary"]
    a = soak["args"]
    command = (f"python bench/bench_soak.py --rounds {a['rounds']} --gateways {a['gateways']} "
               f"--sample {a['sample']:g} --out {a['out']}")
    lines = ["## Soak (`bench/bench_soak.py`)", "", "```sh", command, "```", "",
             f"{s['rounds']:.0f} rounds in {s['seconds']:.0f} s; RSS (MB) after the warm-up (the first fifth "
             "of the samples) and at the end:", "",
             "| process | after warm-up | end | max | growth |", "|---|---:|---:|---:|---:|"]
    for key, v in s.items():
        if key.endswith("_rss_mb"):
            lines.append(f"| {key[:-7]} | {v['after_warmup']:.1f} | {v['end']:.1f} | {v['max']:.1f} | "
                         f"{v['growth_pct']:+.1f} % |")
    return "\n".join(lines) + "\n"


def render_results(record: dict[str, Any], soak: Path | None = None) -> str:
    return "\n".join([
        "# Faults: what a crash, a broker restart or a partition loses", "",
        "```sh", record["command"], "```", "",
        f"Run {record['date']} on this 2-core machine, shared with other work. Each scenario on a "
        "fresh fleet of separate processes on loopback: Mosquitto with the provisioned mTLS "
        "listener and ACL, 3 simulated La Haute Borne turbines (Modbus TCP), 3 bridges, 3 "
        "store-fed gateways and the aggregator (a round at most every 2 s); gw-3 reaches the "
        "broker through a proxy that can cut its link silently. Each fault is injected "
        f"{record['args']['repeat']} time(s), at a random moment of a round's training.", "",
        table(record), "", details(record), "", DEFINITIONS, "",
        soak_section(soak) if soak is not None else "",
    ])
