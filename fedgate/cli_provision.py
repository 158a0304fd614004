"""`fedgate provision ...`: the fleet's credentials and the broker config (see docs/security.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from broker_config.render import DEFAULT_RUN_USER, FleetLayout
from fedgate import provision

_RELOAD = "make the running Mosquitto re-read it: kill -HUP <mosquitto pid>"


def _acl_reload_hint(dir: Path) -> None:
    acl = FleetLayout(dir).broker_acl
    if acl.is_file():
        print(f"broker ACL rewritten: {acl}; {_RELOAD}")


def _ca(args: argparse.Namespace) -> int:
    path = provision.init_ca(args.dir, fleet=args.fleet, aggregator=args.aggregator_name, days=args.days,
                             tasks=args.task)
    print(f"fleet CA written; distribute {path} (the CA key stays in {Path(args.dir) / 'ca'})")
    if not args.task:
        print("note: no --task given: devices may write under any task name (docs/security.md)")
    return 0


def _task(args: argparse.Namespace) -> int:
    before = provision.declared_tasks(args.dir)
    if provision.declare_task(args.dir, args.name):
        print(f"task {args.name} declared" if before else
              f"task {args.name} declared: this fleet allowed any task name, now only {args.name} "
              "(declare every other task it runs too)")
        _acl_reload_hint(args.dir)
    else:
        print(f"task {args.name} was already declared")
    return 0


def _device(args: argparse.Namespace) -> int:
    bundle = provision.provision_device(args.dir, args.name, days=args.days)
    print(f"gateway bundle: {bundle}  (copy this folder onto the gateway)")
    return 0


def _operator(args: argparse.Namespace) -> int:
    bundle = provision.provision_operator(args.dir, args.name, days=args.days)
    print(f"operator bundle: {bundle}  (read-only; copy this folder to the status/dashboard host)")
    _acl_reload_hint(args.dir)
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    bundle = provision.provision_aggregator(args.dir, days=args.days)
    print(f"aggregator bundle: {bundle}")
    return 0


def _broker(args: argparse.Namespace) -> int:
    conf = provision.provision_broker(
        args.dir, port=args.port, host=args.host, san=["127.0.0.1", "localhost", *args.san],
        run_as_user=args.user,
    )
    print(f"broker config: {conf}\nrun: mosquitto -c {conf}")
    for note in provision.broker_access_notes(args.dir):
        print(f"note: {note}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    role = provision.revoke(args.dir, args.name)
    print(
        f"revoked {role} {args.name}. Copy keyring.json and revoked.json to the aggregator and "
        "the gateways, and restart the broker: a reload (kill -HUP) makes it re-read the CRL "
        f"and ACL for new connections, only a restart drops {args.name}'s open connection."
    )
    if role == "operator":
        _acl_reload_hint(args.dir)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("provision", help="create the fleet CA, identities and broker config")
    sub = parser.add_subparsers(dest="provision_command", required=True, metavar="WHAT")

    def add(name: str, func: Any, help: str, days: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        p.add_argument("--dir", type=Path, required=True, help="the fleet's credential folder")
        if days:
            p.add_argument("--days", type=int, default=provision.LEAF_DAYS, help="certificate lifetime")
        p.set_defaults(func=func)
        return p

    ca = add("ca", _ca, "create the fleet CA (once per fleet)", days=False)
    ca.add_argument("--fleet", default="+", help="restrict the broker ACL to this fleet name")
    ca.add_argument("--aggregator-name", default="aggregator", help="CN of the aggregator identity")
    ca.add_argument("--days", type=int, default=provision.CA_DAYS, help="CA lifetime")
    ca.add_argument("--task", action="append", default=[], metavar="NAME",
                    help="a task of this fleet (repeat for each): the ACL lets devices write under "
                    "these task names only (default: any task)")

    task = add("task", _task, "declare a task: the ACL lets devices write under declared tasks only", days=False)
    task.add_argument("name", help="task name, 1-64 of [A-Za-z0-9_.-], no leading '.'")

    device = add("device", _device, "issue a gateway certificate and signing key")
    device.add_argument("name", help="device id (certificate CN), 1-64 of [A-Za-z0-9_.-], no leading '.'")

    operator = add("operator", _operator, "issue a read-only operator certificate (status, dashboard)")
    operator.add_argument("name", help="operator name (certificate CN), 1-64 of [A-Za-z0-9_.-], no leading '.'")

    add("aggregator", _aggregator, "issue the aggregator certificate and signing key")

    broker = add("broker", _broker, "issue the broker certificate; render mosquitto.conf and ACL", days=False)
    broker.add_argument("--port", type=int, default=8883)
    broker.add_argument("--host", default="127.0.0.1", help="listener address")
    broker.add_argument("--san", action="append", default=[], help="extra DNS name/IP for the broker cert")
    broker.add_argument(
        "--user", default=DEFAULT_RUN_USER,
        help="account Mosquitto switches to when started as root; run as root, provisioning "
        "hands broker/ to it (default: %(default)s)",
    )

    revoke = add("revoke", _revoke, "revoke an identity (CRL + signing-key revocation list)", days=False)
    revoke.add_argument("name")
