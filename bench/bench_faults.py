"""Fault suite: crashes, broker restarts and a partition on a real fleet, and what each lost.

Each scenario runs on a fresh fleet (bench/fault_fleet.py: Mosquitto with the provisioned
mTLS listener and ACL, 3 simulated turbines on Modbus TCP, 3 bridges, 3 store-fed gateways,
the aggregator; every one a separate process; the last gateway behind a partition proxy).
Once ``--warmup`` rounds have committed with every gateway, the fault is injected
``--repeat`` times, each time *mid-round*: a random moment (seeded) of the training phase
after the aggregator announced a round and before that round committed (whether it really
landed mid-round is recorded). After each injection the bench waits for recovery and
``--settle`` more rounds with every gateway before the next one.

Scenarios (``--scenarios``, default all):

- ``aggregator-kill``: SIGKILL the aggregator, start it again 3 s later (the unit's RestartSec)
- ``gateway-kill``: SIGKILL gateway gw-1, start it again 5 s later
- ``bridge-kill``: SIGKILL gw-1's bridge, start it again 5 s later
- ``broker-restart``: stop and start Mosquitto, configured without persistence
- ``broker-restart-persistent``: the same with persistence on (the provisioned default)
- ``partition``: gw-3's link goes silent for ``--partition-s`` (60 s) both ways, nothing closed

What is counted, over the whole run of a scenario (definitions also in RESULTS_faults.md):

- rounds lost: round numbers between the first and the last committed that never
  committed, plus rounds that had to be rerun (a gateway trained and sent a fresh update
  twice for the same round, i.e. under two message ids);
- updates lost: fresh updates (message ids) a gateway logged as sent for a committed round
  in which it is not a participant (the round summary), less those the aggregator refused
  with a logged reason about the update itself (listed apart; ``late`` and ``stale_round``
  are not: such an update was sent for a round still open and counts as lost);
- samples lost: the training rows of the lost updates; and, apart, records a sample store
  misses (the turbines number their rows: a record number never written);
- time to recover: from the injection, and from the end of the fault (restart or heal),
  until the first round that commits after the fault's end with every gateway in it.

Usage: python bench/bench_faults.py [--quick] [--scenarios gateway-kill partition ...]
       [--repeat 3] [--out bench/faults.json] [--results bench/RESULTS_faults.md]
       [--soak bench/soak.json]
       python bench/bench_faults.py --from-json bench/faults.json --results ... (re-render)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_fleet import FaultFleet, FleetOptions  # noqa: E402
from fault_report import render_results, table  # noqa: E402

TIMING_REASONS = ("late", "stale_round")
SCENARIOS = ("aggregator-kill", "gateway-kill", "bridge-kill", "broker-restart",
             "broker-restart-persistent", "partition")


@dataclass
class Injection:
    round: int  # the round in progress when the fault began
    t_inject: float
    t_end: float = 0.0
    mid_round: bool = False  # that round had not committed when the fault began
    recovered_round: int = 0
    recover_from_injection_s: float = float("nan")
    recover_from_end_s: float = float("nan")


@dataclass
class ScenarioResult:
    scenario: str
    injections: list[Injection] = field(default_factory=list)
    rounds_committed: int = 0
    rounds_missing: list[int] = field(default_factory=list)
    rounds_rerun: list[int] = field(default_factory=list)
    deadline_extended: list[int] = field(default_factory=list)
    updates_sent: int = 0
    updates_lost: list[tuple[str, int, int]] = field(default_factory=list)  # device, round, rows
    updates_refused: list[tuple[str, int, str]] = field(default_factory=list)
    updates_unknown: int = 0  # summary not seen and not every gateway in the round
    samples_lost: int = 0
    store_records: dict[str, int] = field(default_factory=dict)
    store_missing: dict[str, int] = field(default_factory=dict)
    lineages: int = 0
    seconds: float = 0.0
    error: str = ""


class History:
    """Every committed round seen in history.jsonl (which the aggregator rotates)."""

    def __init__(self, fleet: FaultFleet) -> None:
        self.fleet = fleet
        self.rounds: dict[int, dict[str, Any]] = {}

    def poll(self) -> dict[int, dict[str, Any]]:
        for entry in self.fleet.committed():
            self.rounds.setdefault(int(entry["round"]), entry)
        return self.rounds

    def last(self) -> int:
        return max(self.poll(), default=0)

    def full_after(self, t: float) -> dict[str, Any] | None:
        """The first round committed after ``t`` with every gateway in it."""
        n = len(self.fleet.devices)
        found = [e for e in self.poll().values() if e["time"] > t and e["participants"] == n]
        return min(found, key=lambda e: e["time"]) if found else None


def wait(what: str, probe: Callable[[], Any], timeout: float, fleet: FaultFleet) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout:g} s\n{fleet.group.logs_text(15)}")


def inject(fleet: FaultFleet, scenario: str, args: argparse.Namespace, rng: random.Random,
           history: History) -> Injection:
    """Wait for a round to be announced, wait a random part of its training, then the fault."""
    last = history.last()
    wait("the next round's announcement", lambda: fleet.announced() > last, 60, fleet)
    time.sleep(rng.uniform(0.0, 0.3))
    shot = Injection(round=fleet.announced(), t_inject=time.time())
    if scenario == "aggregator-kill":
        fleet.kill("aggregator")
        time.sleep(3.0)
        fleet.start("aggregator")
    elif scenario in ("gateway-kill", "bridge-kill"):
        name = f"{'edge' if scenario == 'gateway-kill' else 'bridge'}-{fleet.devices[0]}"
        fleet.kill(name)
        time.sleep(5.0)
        fleet.start(name)
    elif scenario.startswith("broker-restart"):
        fleet.restart_broker()
    elif scenario == "partition":
        assert fleet.proxy is not None
        fleet.proxy.partition()
        time.sleep(args.partition_s)
        fleet.proxy.heal()
    shot.t_end = time.time()
    shot.mid_round = shot.round not in history.poll() or history.poll()[shot.round]["time"] > shot.t_inject
    return shot


def recover(fleet: FaultFleet, shot: Injection, history: History, args: argparse.Namespace) -> None:
    entry = wait("a round with every gateway after the fault",
                 lambda: history.full_after(shot.t_end), args.recover_timeout, fleet)
    shot.recovered_round = int(entry["round"])
    shot.recover_from_injection_s = entry["time"] - shot.t_inject
    shot.recover_from_end_s = entry["time"] - shot.t_end
    # settle: more full rounds before the next fault, so faults do not overlap
    target = shot.recovered_round + args.settle
    wait("settling rounds", lambda: history.full_after(shot.t_end) and history.last() >= target,
         args.recover_timeout, fleet)


def account(fleet: FaultFleet, history: History, result: ScenarioResult) -> None:
    rounds = history.poll()
    summaries = fleet.summaries()
    n = len(fleet.devices)
    last = max(rounds, default=0)
    first = min(rounds, default=1)
    result.rounds_committed = len(rounds)
    result.rounds_missing = [r for r in range(first, last + 1) if r not in rounds]
    # round 0 is the statistics round: no model update. "late" and "stale_round" say when
    # the update arrived, not what is wrong with it (it was sent for an open round): such
    # an update counts as lost
    refused = [(d, r, why) for d, r, why in fleet.rejected() if r >= 1]
    result.updates_refused = refused
    refused_keys = {(d, r) for d, r, why in refused if why not in TIMING_REASONS}
    per_key: dict[tuple[str, int], list[int]] = {}
    for sent in fleet.sent():
        if sent.round <= last:  # the round in progress at the end is not judged
            per_key.setdefault((sent.device, sent.round), []).append(sent.rows)
    result.rounds_rerun = sorted({r for (_, r), rows in per_key.items() if len(rows) > 1})
    result.deadline_extended = sorted(set(fleet.quorum_missed()))
    for (device, rnd), rows in sorted(per_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        result.updates_sent += len(rows)
        if rnd not in rounds:
            lost = list(rows)  # the round never committed
        elif rnd in summaries:
            lost = rows[1:] if device in summaries[rnd].participants else list(rows)
        elif rounds[rnd]["participants"] == n:
            lost = rows[1:]
        else:
            result.updates_unknown += len(rows)
            continue
        if (device, rnd) in refused_keys:
            continue  # refused with a reason: listed in updates_refused
        result.updates_lost += [(device, rnd, r) for r in lost]
    result.samples_lost = sum(r for _, _, r in result.updates_lost)
    if rounds and not result.updates_sent:
        # rounds committed but no gateway log line matched: the log format changed and
        # every "0 lost" would be false
        raise RuntimeError("no 'update sent' line found in the gateways' logs (fault_fleet.UPDATE_SENT)")
    for device in fleet.devices:
        result.store_records[device], result.store_missing[device] = fleet.store_gaps(device)
    result.lineages = fleet.lineages()


def run_scenario(scenario: str, args: argparse.Namespace, rng: random.Random) -> ScenarioResult:
    work = Path(tempfile.mkdtemp(prefix=f"fedgate-faults-{scenario}-"))
    options = FleetOptions(persistence=scenario != "broker-restart")
    result = ScenarioResult(scenario)
    started = time.monotonic()
    try:
        with FaultFleet(work, options) as fleet:
            history = History(fleet)
            fleet.wait_ready(args.warmup, args.start_timeout)
            for i in range(args.repeat):
                shot = inject(fleet, scenario, args, rng, history)
                result.injections.append(shot)
                recover(fleet, shot, history, args)
                print(f"  {scenario} #{i + 1}: round {shot.round} (mid-round: {shot.mid_round}), "
                      f"recovered at round {shot.recovered_round}, "
                      f"{shot.recover_from_injection_s:.1f} s after the fault, "
                      f"{shot.recover_from_end_s:.1f} s after its end", flush=True)
            account(fleet, history, result)
    except (TimeoutError, AssertionError, RuntimeError) as exc:
        result.error = str(exc)[-3000:]
        print(f"  {scenario}: FAILED: {result.error}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partition-s", type=float, default=60.0)
    parser.add_argument("--warmup", type=int, default=3, help="full rounds before the first fault")
    parser.add_argument("--settle", type=int, default=2, help="full rounds between faults")
    parser.add_argument("--quick", action="store_true",
                        help="one injection each, a 20 s partition, one settling round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--recover-timeout", type=float, default=240.0)
    parser.add_argument("--keep", action="store_true", help="keep each fleet's folder (logs, state)")
    parser.add_argument("--out", default="bench/faults.json")
    parser.add_argument("--results", default="", help="also write this RESULTS markdown file")
    parser.add_argument("--soak", default="", help="a bench_soak.py JSON record to cite in --results")
    parser.add_argument("--from-json", default="",
                        help="run nothing: print the table (and write --results) of this record")
    args = parser.parse_args(argv)
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        print(table(record))
        if args.results:
            Path(args.results).write_text(render_results(record, Path(args.soak) if args.soak else None))
        return 0
    if args.quick:
        args.repeat, args.partition_s, args.settle = 1, min(args.partition_s, 20.0), 1
    rng = random.Random(args.seed)
    results = []
    for scenario in args.scenarios:
        print(f"{scenario}: {args.repeat} injection(s)", flush=True)
        results.append(run_scenario(scenario, args, rng))
    record = {"args": vars(args), "command": " ".join(["python", "bench/bench_faults.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "results": [asdict(r) for r in results]}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(table(record))
    if args.results:
        Path(args.results).write_text(render_results(record, Path(args.soak) if args.soak else None))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
