"""`fedgate provision ...`: the fleet's credentials and the broker config (see docs/security.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedgate import provision


def _ca(args: argparse.Namespace) -> int:
    path = provision.init_ca(args.dir, fleet=args.fleet, aggregator=args.aggregator_name, days=args.days)
    print(f"fleet CA written; distribute {path} (the CA key stays in {Path(args.dir) / 'ca'})")
    return 0


def _device(args: argparse.Namespace) -> int:
    bundle = provision.provision_device(args.dir, args.name, days=args.days)
    print(f"gateway bundle: {bundle}  (copy this folder onto the gateway)")
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
    return 0


def _revoke(args: argparse.Namespace) -> int:
    provision.revoke(args.dir, args.name)
    print(
        f"revoked {args.name}. Copy keyring.json and revoked.json to the aggregator and the "
        "gateways, re-run `fedgate provision broker` and restart the broker (CRL)."
    )
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

    device = add("device", _device, "issue a gateway certificate and signing key")
    device.add_argument("name", help="device id (certificate CN), [A-Za-z0-9_.-]{1,64}")

    add("aggregator", _aggregator, "issue the aggregator certificate and signing key")

    broker = add("broker", _broker, "issue the broker certificate; render mosquitto.conf and ACL", days=False)
    broker.add_argument("--port", type=int, default=8883)
    broker.add_argument("--host", default="127.0.0.1", help="listener address")
    broker.add_argument("--san", action="append", default=[], help="extra DNS name/IP for the broker cert")
    broker.add_argument("--user", default=None, help="`user` line of mosquitto.conf (default: mosquitto)")

    revoke = add("revoke", _revoke, "revoke an identity (CRL + signing-key revocation list)", days=False)
    revoke.add_argument("name")
