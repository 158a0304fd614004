"""`fedgate bridge ...`: simulate a device, probe live values, run the bridge service."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any


def register(subparsers: Any) -> None:
    bridge = subparsers.add_parser(
        "bridge", help="field bus: simulate, probe and run the Modbus/serial bridge"
    )
    sub = bridge.add_subparsers(dest="bridge_command", required=True, metavar="ACTION")

    from firmware_bridge.simulator import add_arguments

    sim = sub.add_parser(
        "simulate", help="serve one wind turbine of the real data set as a Modbus TCP device"
    )
    add_arguments(sim)
    sim.set_defaults(func=_simulate)

    probe = sub.add_parser("probe", help="print live decoded values of every signal")
    probe.add_argument("-c", "--config", required=True, help="bridge TOML file")
    probe.add_argument(
        "--once", action="store_true", help="print one snapshot and exit (0 if every signal read, 69 if not)"
    )
    probe.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes")
    probe.set_defaults(func=_probe)

    run = sub.add_parser("run", help="run the bridge service (systemd Type=notify)")
    run.add_argument("-c", "--config", required=True, help="bridge TOML file")
    run.set_defaults(func=_run)


def _simulate(args: argparse.Namespace) -> int:
    from firmware_bridge.simulator import run_from_args

    return run_from_args(args)


def _probe(args: argparse.Namespace) -> int:
    from firmware_bridge.config import load_bridge_config
    from firmware_bridge.probe import probe

    return probe(load_bridge_config(args.config), once=args.once, refresh=args.refresh)


def _run(args: argparse.Namespace) -> int:
    import logging

    from firmware_bridge.config import load_bridge_config
    from firmware_bridge.runtime import serve

    config = load_bridge_config(args.config)
    logging.getLogger("fedgate.bridge").setLevel(logging.INFO)
    stop = threading.Event()
    # SIGTERM from systemd: finish the current flush and exit 0.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watchdog = os.environ.get("WATCHDOG_USEC")
    serve(config, os.environ.get("NOTIFY_SOCKET"), int(watchdog) if watchdog else None, stop)
    return 0
