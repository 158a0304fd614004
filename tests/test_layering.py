"""Imports only go down: fedgate -> services -> fedcore; services never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"edge", "aggregator", "firmware_bridge"}
ALLOWED: dict[str, set[str]] = {
    "fedcore": set(),
    "edge": {"fedcore"},
    "aggregator": {"fedcore"},
    "firmware_bridge": {"fedcore"},
    "broker_config": {"fedcore"},
    "fedgate": {"fedcore", "edge", "aggregator", "firmware_bridge", "broker_config"},
}
# Gateways must not pull in scipy: the DP accountant is aggregator-only.
EDGE_FORBIDDEN = {"dp_accounting", "scipy"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_only_go_down() -> None:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in (ROOT / package).rglob("*.py"):
            for name in imports_of(path) & set(ALLOWED):
                if name != package and name not in allowed:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not problems, "\n".join(problems)


def test_gateway_code_does_not_import_the_dp_accountant() -> None:
    problems = []
    for package in ("fedcore", "edge", "firmware_bridge"):
        for path in (ROOT / package).rglob("*.py"):
            bad = imports_of(path) & EDGE_FORBIDDEN
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import aggregator.rounds\nfrom edge import runtime\n")
    assert {"aggregator", "edge"} <= imports_of(bad)
