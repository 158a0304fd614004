"""The `fedgate` command line. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fedcore.errors import FedgateError

# Top-level command -> the module that registers it through `register(subparsers)`.
_AREAS = {
    "aggregator": "fedgate.cli_services",
    "edge": "fedgate.cli_services",
    "demo": "fedgate.cli_demo",
    "bridge": "fedgate.cli_bridge",
    "provision": "fedgate.cli_provision",
    "config": "fedgate.cli_config",
    "model": "fedgate.cli_model",
    "status": "fedgate.cli_status",
    "dashboard": "fedgate.cli_status",
}


_SERVICES = ("aggregator", "edge", "bridge")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; for a known command only its own area is imported, so a gateway's
    `fedgate edge run` does not load the field-bus stack or the X.509 tooling (memory)."""
    parser = argparse.ArgumentParser(
        prog="fedgate", description="Federated learning for industrial IoT over MQTT."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = [a for a in (argv or []) if not a.startswith("-")]
    wanted = [_AREAS[words[0]]] if words and words[0] in _AREAS else list(_AREAS.values())
    for name in dict.fromkeys(wanted):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # area not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # the services' own loggers tell the story at INFO (one line per round, waits,
    # failures) for the journal; commands that print their own output stay quiet
    if args.command in _SERVICES and getattr(args, "action", getattr(args, "bridge_command", "")) == "run":
        logging.getLogger("fedgate").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except FedgateError as exc:
        print(f"fedgate: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
