"""`fedgate config check FILE`: validate any fedgate config and explain what is wrong.

The kind of file is recognised from its top-level tables: ``[bridge]`` or ``[[device]]``
(an array) is a bridge register map, ``[task]`` an aggregator config, ``[device]`` (one
table) an edge gateway config. Each kind is checked by the loader its service uses, so
``check`` can never disagree with the service.

For edge and aggregator configs the check goes on (:mod:`fedgate.preflight`, one line per
check): the files the config names are readable by the service's user (``--user``), the
client certificate names the configured id, belongs to its key and to the fleet CA, the
signing key and keyring load; with ``--live`` also the broker: TLS handshake and CONNACK
within ``--timeout``, SUBACK for the service's subscriptions, PUBACK on its own topic.
``--syntax-only`` checks the file's contents alone (an example written for another
machine).

Exit status: the service's own codes: 0 ready, 78 configuration error, 77 not authorized
by the broker, 69 broker unavailable; 2 unrecognised file or bad command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any, TextIO

from fedcore.config import load_toml
from fedcore.errors import EXIT_CODES, ConfigError

_LOADERS = {
    "edge": ("edge.config", "load_edge_config"),
    "aggregator": ("aggregator.config", "load_aggregator_config"),
    "bridge": ("firmware_bridge.config", "load_bridge_config"),
}

_HINTS = {
    "required key is missing": "add the key; docs list every key with its meaning",
    "unknown key (misspelt?)": "remove the key or fix its spelling; unknown keys are never ignored",
    "overlapping registers": "two signals read the same register: check the addresses and the "
    "type sizes (u32/i32/f32 take two registers)",
}


def register(subparsers: Any) -> None:
    config = subparsers.add_parser("config", help="check fedgate config files")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = sub.add_parser(
        "check", help="validate a bridge, edge or aggregator config and explain errors"
    )
    check.add_argument("file", help="TOML file")
    check.add_argument("--kind", choices=sorted(_LOADERS), help="skip detection")
    check.add_argument("--live", action="store_true",
                       help="also try the broker: TLS and the certificate, without opening a session")
    check.add_argument("--session", action="store_true",
                       help="--live: also open a session as the service and try its SUBACKs and a "
                       "PUBACK (over TLS this takes a running service's connection over: stop it first)")
    check.add_argument("--user", metavar="NAME",
                       help="check file access as this user, the service's (default: the current user; "
                       "another user needs root)")
    check.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                       help="--live: give up on the broker after this long (exit 69; default 10)")
    check.add_argument("--syntax-only", action="store_true",
                       help="check the file's contents only: no files, certificates or broker")
    check.set_defaults(func=lambda a: check_file(
        a.file, a.kind, live=a.live or a.session, session=a.session, user=a.user, timeout_s=a.timeout, syntax_only=a.syntax_only))


def detect_kind(data: dict[str, Any]) -> str | None:
    if "bridge" in data or isinstance(data.get("device"), list):
        return "bridge"
    if isinstance(data.get("task"), dict):
        return "aggregator"
    if isinstance(data.get("device"), dict):
        return "edge"
    return None


def _loader(kind: str) -> Callable[[str], Any] | None:
    module, func = _LOADERS[kind]
    try:
        return getattr(importlib.import_module(module), func)
    except (ModuleNotFoundError, AttributeError):
        return None


def check_file(
    file: str,
    kind: str | None = None,
    out: TextIO | None = None,
    *,
    live: bool = False,
    session: bool = False,
    user: str | None = None,
    timeout_s: float = 10.0,
    syntax_only: bool = False,
) -> int:
    out = out or sys.stdout
    try:
        root = load_toml(file)
    except ConfigError as exc:
        out.write(explain(exc) + "\n")
        return exc.exit_code
    kind = kind or detect_kind(root.data)
    if kind is None:
        out.write(
            f"{file}: not a fedgate config I recognise: expected [bridge] + [[device]] (bridge), "
            "[task] (aggregator) or [device] (edge gateway)\n"
        )
        return 2
    load = _loader(kind)
    if load is None:
        module, func = _LOADERS[kind]
        out.write(
            f"{file}: looks like a {kind} config, but {module}.{func} is not available in this install\n"
        )
        return 2
    try:
        result = load(file)
    except ConfigError as exc:
        out.write(f"{kind} config: INVALID\n" + explain(exc) + "\n")
        return exc.exit_code
    out.write(f"{file}: valid {kind} config\n" + summary(kind, result) + "\n")
    if syntax_only or kind not in ("edge", "aggregator"):
        if live:
            out.write(f"{file}: --live checks edge and aggregator configs only\n")
        return 0
    return check_environment(file, kind, result, out, live=live, session=session, user=user,
                             timeout_s=timeout_s)


def check_environment(
    file: str, kind: str, config: Any, out: TextIO, *, live: bool, user: str | None, timeout_s: float,
    session: bool = False,
) -> int:
    """Files, certificates, keys and (``live``) the broker, one line per check."""
    from fedgate import preflight

    subject = (preflight.edge_subject if kind == "edge" else preflight.aggregator_subject)(config)
    subject.user, subject.live, subject.session, subject.timeout_s = user, live, session, timeout_s
    try:
        findings = preflight.run(subject)
    except preflight.UsageError as exc:
        out.write(f"fedgate config check: {exc}\n")
        return 2
    for finding in findings:
        out.write(finding.line() + "\n")
    code = preflight.exit_code(findings)
    problems = sum(not f.ok for f in findings)
    if code == 0:
        broker = ", broker included" if live else " (the broker was not tried: add --live)"
        skipped = sum(f.skipped for f in findings)
        out.write(f"{file}: ready to run: {len(findings) - skipped} checks passed"
                  f"{f', {skipped} skipped' if skipped else ''}{broker}\n")
    else:
        meaning = EXIT_CODES.get(code, "")
        out.write(f"{file}: {problems} problem{'s' if problems > 1 else ''}: "
                  f"`fedgate {kind} run` would exit {code} ({meaning})\n")
    return code


def explain(error: ConfigError) -> str:
    hint = next((h for key, h in _HINTS.items() if key in error.problem), "")
    lines = [
        f"  file:    {error.file}",
        f"  key:     {error.key}",
        f"  value:   {error.value!r}",
        f"  problem: {error.problem}",
    ]
    if hint:
        lines.append(f"  fix:     {hint}")
    return "\n".join(lines)


def summary(kind: str, cfg: Any) -> str:
    if kind == "bridge":
        lines = [
            f"  store: {cfg.store.path} (max {cfg.store.max_bytes // 2**20} MB, {cfg.store.max_age_s / 86400:g} days)"
        ]
        for dev in cfg.devices:
            lines.append(
                f"  device {dev.name}: {dev.link.bus} unit {dev.unit_id}, {len(dev.signals)} signals"
            )
        return "\n".join(lines)
    return "  " + ", ".join(f"{k}={getattr(cfg, k)}" for k in ("fleet", "task") if hasattr(cfg, k))


def main(argv: list[str] | None = None) -> int:  # for `python -m fedgate.cli_config FILE`
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    return check_file(parser.parse_args(argv).file)


if __name__ == "__main__":
    sys.exit(main())
