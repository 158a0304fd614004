"""`fedgate aggregator run` and `fedgate edge run`: the two long-running services."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    agg = sub.add_parser("aggregator", help="the aggregation service")
    agg_sub = agg.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = agg_sub.add_parser("run", help="run the aggregator against the configured broker")
    run.add_argument("-c", "--config", required=True, help="aggregator.toml")
    run.set_defaults(func=_run_aggregator)
    rel = agg_sub.add_parser("release", help="release a quarantined gateway (running aggregator)")
    rel.add_argument("device", help="the gateway's id")
    rel.add_argument("-c", "--config", required=True, help="aggregator.toml")
    rel.set_defaults(func=_release)

    edge = sub.add_parser("edge", help="the gateway agent")
    edge_sub = edge.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = edge_sub.add_parser("run", help="run the gateway agent against the configured broker")
    run.add_argument("-c", "--config", required=True, help="edge.toml")
    run.set_defaults(func=_run_edge)


def _run_aggregator(args: argparse.Namespace) -> int:
    from aggregator.main import run_aggregator

    return run_aggregator(args.config)


def _release(args: argparse.Namespace) -> int:
    from aggregator.config import load_aggregator_config
    from fedcore.protocol.topics import check_name

    config = load_aggregator_config(args.config)
    folder = config.state_dir / "commands"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"release-{check_name(args.device, 'device')}").touch()
    print(f"release of {args.device} queued; the aggregator applies it within a second "
          "(see its log and the audit log)")
    return 0


def _run_edge(args: argparse.Namespace) -> int:
    from edge.main import run_edge

    return run_edge(args.config)
