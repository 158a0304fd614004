"""`fedgate aggregator ...` and `fedgate edge run`: the two long-running services and the
commands an operator sends a running aggregator."""

from __future__ import annotations

import argparse

COMMAND_TIMEOUT_S = 15.0


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
    new = agg_sub.add_parser("new-lineage", help="archive the state: the next start trains a "
                             "new lineage (after changing [model]); the aggregator must be stopped")
    new.add_argument("-c", "--config", required=True, help="aggregator.toml")
    new.set_defaults(func=_new_lineage)

    edge = sub.add_parser("edge", help="the gateway agent")
    edge_sub = edge.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = edge_sub.add_parser("run", help="run the gateway agent against the configured broker")
    run.add_argument("-c", "--config", required=True, help="edge.toml")
    run.set_defaults(func=_run_edge)


def _run_aggregator(args: argparse.Namespace) -> int:
    from aggregator.main import run_aggregator

    return run_aggregator(args.config)


def send_command(config_file: str, command: dict[str, object]) -> int:
    """Hand ``command`` to the running aggregator of ``config_file``; print its answer.
    Exit 0 when carried out, 1 when refused, 69 when no aggregator answered."""
    from aggregator import commands
    from aggregator.config import load_aggregator_config
    from fedcore.errors import TransportError

    config = load_aggregator_config(config_file)
    try:
        ident = commands.submit(config.state_dir, command)
    except OSError as exc:
        from fedcore.errors import ConfigError

        raise ConfigError(config_file, "state.dir", str(config.state_dir),
                          f"cannot hand the aggregator a command: {exc.strerror or exc} (run as "
                          "its user or root)") from None
    result = commands.wait_result(config.state_dir, ident, COMMAND_TIMEOUT_S)
    if result is None:
        (config.state_dir / "commands" / f"{ident}.json").unlink(missing_ok=True)
        raise TransportError(f"no answer from the aggregator of {config_file} within "
                             f"{COMMAND_TIMEOUT_S:.0f} s (is it running? state folder "
                             f"{config.state_dir}); the command was withdrawn")
    print(result.get("message", ""))
    return 0 if result.get("ok") else 1


def _release(args: argparse.Namespace) -> int:
    from fedcore.protocol.topics import check_name

    return send_command(args.config, {"command": "release", "device": check_name(args.device, "device")})


def _new_lineage(args: argparse.Namespace) -> int:
    from aggregator.main import new_lineage

    archive = new_lineage(args.config)
    if archive is None:
        print("no saved state: the next start opens a new lineage anyway")
    else:
        print(f"state archived in {archive}; the next `fedgate aggregator run` opens a new lineage "
              "and the gateways follow it")
    return 0


def _run_edge(args: argparse.Namespace) -> int:
    from edge.main import run_edge

    return run_edge(args.config)
