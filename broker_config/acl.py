"""The Mosquitto ACL, generated only from :data:`fedcore.protocol.topics.ACL_RULES`.

Theory of operation: each :class:`~fedcore.protocol.topics.AclRule` holds a topic pattern
with ``{fleet}``, ``{task}``, ``{device}`` and ``{stage}`` placeholders and its permission
bits. A client's MQTT username is its certificate CN (``use_identity_as_username``).

- Device permissions become ``pattern`` lines, which Mosquitto applies to every
  authenticated client with ``%u`` replaced by its username: ``{device}`` -> ``%u``, so a
  gateway can only touch the ``{device}`` level equal to its own CN. Shared topics (round,
  model, metrics) are ``pattern`` lines too, without ``%u``: Mosquitto applies ``topic``
  lines placed before any ``user`` line to *anonymous* clients only, which would lock every
  gateway out. (Mosquitto warns at start that those patterns lack ``%u``; that is expected.)
- Aggregator permissions become ``topic`` lines under ``user <aggregator>``, with
  ``{device}`` and ``{stage}`` as ``+`` (the aggregator serves every device).
- Operators (status, dashboards, plant systems) get a ``user <operator>`` block with a
  ``topic read`` line per rule whose ``operator_read`` is set, ``{device}`` as ``+``.
  Because ``pattern`` lines apply to every client, they would also let an operator write
  on the per-device topics carrying its own name (``update/<operator>`` ...). The block
  therefore opens with ``topic deny`` lines for exactly those topics: Mosquitto checks a
  user's deny lines before anything else and stops at the first one that matches, so the
  operator can write nothing anywhere. No device can carry an operator's name
  (provisioning keeps names unique), so the denied topics belong to nobody.
- ``{fleet}`` is the fleet name or ``+``; ``{chunk}`` (a model chunk's hash, written by the
  aggregator alone) is ``+``. ``{task}`` is ``+`` unless the fleet declares its tasks
  (``fedgate provision ca --task``): then every line a device or the aggregator *writes*
  under is repeated per task, so a device can write (and retain) under those tasks only.
  ``{stage}`` is repeated per :data:`~fedcore.protocol.topics.SECAGG_STAGES`. With declared
  tasks, what one device can keep in the broker's retained store is bounded:
  (tasks x (1 update + 1 update chunk + 4 stages) + status + telemetry) messages of at most
  the broker's ``message_size_limit``. Reads stay ``+``: reading grows nothing.

Anything not granted is denied (Mosquitto's rule once an acl_file is set). A test parses
this output back and checks it against the rules and real topics built by ``Topics``.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedcore.errors import LocalProtocolError
from fedcore.protocol.topics import ACL_RULES, SECAGG_STAGES, AclRule, check_name


def _access(read: bool, write: bool) -> str | None:
    if read and write:
        return "readwrite"
    if read:
        return "read"
    if write:
        return "write"
    return None


def _fill(rule: AclRule, fleet: str, device: str) -> str:
    return rule.pattern.format(fleet=fleet, task="+", device=device, stage="+", chunk="+")


def _lines(prefix: str, access: str, rule: AclRule, fleet: str, device: str, tasks: tuple[str, ...]) -> list[str]:
    """Reads as one ``+`` line; writes one line per declared task and per secagg stage."""
    per_task = bool(tasks) and "{task}" in rule.pattern
    if "write" not in access or not (per_task or "{stage}" in rule.pattern):
        return [f"{prefix} {access} {_fill(rule, fleet, device)}"]
    stages = SECAGG_STAGES if "{stage}" in rule.pattern else ("+",)
    writes = [f"{prefix} write " + rule.pattern.format(fleet=fleet, task=task, device=device, stage=stage,
                                                       chunk="+")
              for task in (tasks if per_task else ("+",)) for stage in stages]
    return ([f"{prefix} read {_fill(rule, fleet, device)}"] if access == "readwrite" else []) + writes


def _operator_block(name: str, fleet: str) -> list[str]:
    lines = [f"user {name}"]
    for rule in ACL_RULES:
        if "{device}" in rule.pattern and (rule.device_read or rule.device_write):
            lines.append(f"topic deny {_fill(rule, fleet, name)}")
    for rule in ACL_RULES:
        if rule.operator_read:
            lines.append(f"topic read {_fill(rule, fleet, '+')}")
    return lines


def generate_acl(fleet: str = "+", aggregator: str = "aggregator", operators: Iterable[str] = (),
                 tasks: Iterable[str] = ()) -> str:
    """The acl_file text for one fleet (or every fleet with ``'+'``), its operators and its
    declared tasks (none: any task)."""
    if fleet != "+":
        check_name(fleet, "fleet")
    task_names = tuple(sorted({check_name(name, "task") for name in tasks}))
    check_name(aggregator, "aggregator")
    operator_names = sorted({check_name(name, "operator") for name in operators})
    if aggregator in operator_names:
        raise LocalProtocolError(f"operator {aggregator!r} has the aggregator's name")
    lines = [
        "# Mosquitto ACL for fedgate. Generated from fedcore.protocol.topics.ACL_RULES;",
        "# do not edit: regenerate with `fedgate provision broker`.",
        "# Username = client certificate CN. Everything not granted here is denied.",
        "",
        "# Every client (gateways): shared topics, then the client's own subtree (%u = CN).",
    ]
    shared = [r for r in ACL_RULES if "{device}" not in r.pattern]
    own = [r for r in ACL_RULES if "{device}" in r.pattern]
    for rule in shared + own:
        access = _access(rule.device_read, rule.device_write)
        if access is not None:
            lines += _lines("pattern", access, rule, fleet, "%u", task_names)
    lines += ["", "# The aggregator identity alone publishes round, model and metrics.", f"user {aggregator}"]
    for rule in ACL_RULES:
        access = _access(rule.aggregator_read, rule.aggregator_write)
        if access is not None:
            lines += _lines("topic", access, rule, fleet, "+", task_names)
    if operator_names:
        lines += [
            "",
            "# Operators read and never write. The deny lines close the per-device topics",
            "# carrying the operator's own name, which the patterns above would open to it.",
        ]
    for name in operator_names:
        lines += ["", *_operator_block(name, fleet)]
    return "\n".join(lines) + "\n"
