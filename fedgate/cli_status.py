"""`fedgate status` and `fedgate dashboard`: see a running fleet from the broker's retained topics.

``fedgate status --broker URL --fleet NAME [--task T] [--tls-dir BUNDLE] [--json] [--watch]``
prints every gateway (online or offline and since when, the version it runs and the one it
trains from, rows, last round, holdout evaluation, quarantine, epsilon) and every task
(lineage, phase, round, versions, fleet metric, rejections, what it waits for). Exit 0;
69 when the broker cannot be reached within ``--timeout``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--fleet", required=True, help="fleet name")
    p.add_argument("--task", default=None, help="only this task (default: every task)")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="an operator bundle (fedgate provision operator NAME): ca.crt, client.crt, "
                        "client.key and keyring.json to verify signatures")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the broker")


def register(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="the fleet's gateways and tasks, from the broker")
    _add_connection(status)
    status.add_argument("--json", action="store_true", help="one JSON object (per refresh)")
    status.add_argument("--watch", action="store_true", help="keep refreshing until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.set_defaults(func=_status)

    dash = sub.add_parser("dashboard", help="a read-only web page of the fleet, live (loopback by default)")
    _add_connection(dash)
    dash.add_argument("--host", default="127.0.0.1", help="address to serve on")
    dash.add_argument("--port", type=int, default=8470, help="port to serve on (0: any free port)")
    dash.set_defaults(func=_dashboard)


def _watch(args: argparse.Namespace, watch: Any = None) -> Any:
    from fedcore.errors import NotAuthorizedError, TransportError
    from fedgate.fleetwatch import FleetWatch

    watch = watch or FleetWatch(args.broker, args.fleet, args.task, args.tls_dir)
    watch.start()
    if not watch.wait_settled(args.timeout):
        watch.stop()
        raise TransportError(f"cannot reach the broker at {args.broker} within {args.timeout:g} s")
    if watch.refused:
        watch.stop()
        raise NotAuthorizedError(f"the broker refused to let this identity read "
                                 f"{', '.join(watch.refused)}: --tls-dir must be an operator "
                                 "bundle (fedgate provision operator NAME)")
    return watch


def _status(args: argparse.Namespace) -> int:
    watch = _watch(args)
    try:
        while True:
            view = watch.snapshot()
            if args.json:
                print(json.dumps(view, indent=None if args.watch else 2), flush=True)
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render(view, args.broker), flush=True)
            if not args.watch:
                return 0
            watch.changed.clear()
            watch.changed.wait(args.interval)
            time.sleep(min(0.2, args.interval))
    except KeyboardInterrupt:
        return 0
    finally:
        watch.stop()


def _dashboard(args: argparse.Namespace) -> int:
    from fedgate.dashboard import make_server, serve
    from fedgate.fleetwatch import FleetWatch

    watch = FleetWatch(args.broker, args.fleet, args.task, args.tls_dir)
    server = make_server(watch, args.host, args.port, args.broker)  # a taken port: 78 at once
    try:
        _watch(args, watch)
        return serve(watch, args.host, args.port, args.broker, server=server)
    finally:
        watch.stop()
        server.server_close()


def _clock(ts: float | None, zone: bool = False) -> str:
    if not ts:
        return "-"
    t = dt.datetime.fromtimestamp(ts).astimezone()  # local time, the zone named where it matters
    text = t.strftime("%H:%M:%S") if t.date() == dt.date.today() else t.strftime("%Y-%m-%d %H:%M")
    return f"{text} {t.strftime('%Z')}" if zone else text


def _eval(metrics: dict[str, float | None]) -> str:
    for key in ("rmse", "accuracy", "mse"):
        value = metrics.get(key)
        if value is not None:
            return f"{key} {value:.4g}"
    return "-"


def render(view: dict[str, Any], broker: str) -> str:
    """The human table of a fleet view (see fedgate.fleetview)."""
    lines = [f"fleet {view['fleet']} on {broker} at {_clock(view['time'], zone=True)}"]
    for t in view["tasks"]:
        metric = t.get("metric") or {}
        value = metric.get("value")
        lines.append(
            f"task {t['task']}: lineage {t.get('lineage', '?')}, {_phase(t)}, model "
            f"v{t.get('model_version', '?')}, deployed v{t.get('deployed_version', '?')} "
            f"({_mode(t.get('deployment_mode', '?'))}), {metric.get('name', 'metric')} "
            f"{f'{value:.4g}' if value is not None else '-'}, {len(t.get('online', []))} online")
        if t.get("waiting_for"):
            lines.append(f"  waiting for: {t['waiting_for']}")
        if t.get("candidate", -1) >= 0:
            lines.append(f"  canary: candidate v{t['candidate']} on {', '.join(t['canary'])}")
        if t.get("rejected"):
            lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(t["rejected"].items())))
    if not view["tasks"]:
        lines.append(f"no task state on fleet {view['fleet']!r} (is the aggregator running? "
                     "are --fleet and --task right?)")
    header = (f"{'gateway':20} {'state':8} {'since':9} {'runs':>5} {'trains':>6} {'activity':18} "
              f"{'rows':>7} {'new':>6} {'round':>6} {'holdout':16} {'quar.':5} {'eps':>6}")
    lines += ["", header]
    for g in view["gateways"]:
        eps = f"{g['epsilon']:.3g}" if g.get("epsilon") else "-"
        lines.append(
            f"{g['id'][:20]:20} {'online' if g['online'] else 'OFFLINE':8} {_clock(g['since']):9} "
            f"{_v(g['model_version']):>5} {_v(g['trained_version']):>6} {g['activity'][:18]:18} "
            f"{g['rows']:>7} {g['rows_new']:>6} {g['last_round'] if g['last_round'] >= 0 else '-':>6} "
            f"{_eval(g['last_eval']):16} {'YES' if g['quarantined'] else 'no':5} {eps:>6}")
        if g["activity_detail"]:
            lines.append(f"{'':20}   {g['activity_detail']}")  # the whole reason, on its own line
    if not view["gateways"]:
        lines.append(f"no gateway has reported on fleet {view['fleet']!r} (check --fleet, and that "
                     "--tls-dir is an operator's bundle: others may not read statuses)")
    if view["rejected"]:
        lines.append("messages this viewer refused: " +
                     ", ".join(f"{k} {v}" for k, v in sorted(view["rejected"].items())))
    return "\n".join(lines)


def _phase(t: dict[str, Any]) -> str:
    phase, round_, planned = t.get("phase", "?"), t.get("round", 0), t.get("rounds_planned")
    if phase == "statistics":
        return "statistics round (the fleet scaler)"
    if phase == "finished":
        return f"finished after round {round_ - 1}"
    return f"{phase} round {round_}{f' of {planned}' if planned else ''}"


def _mode(mode: str) -> str:
    return {"latest": "the newest", "version": "pinned", "canary": "canary trial"}.get(mode, mode)


def _v(version: int) -> str:
    return f"v{version}" if version >= 0 else "-"


