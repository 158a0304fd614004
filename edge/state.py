"""What a gateway remembers across restarts (``state_dir/edge-state.json``): the lineage it
follows and the last deployment record it applied - both only ever move forward, which is
what lets a restarted gateway refuse a replayed older lineage or deployment - the newest row
time it trained on (so a restart does not count old rows as new) and whether the rounds it
takes part in are private (so no evaluation leaks in its first status after a restart).

Written atomically (temporary file, fsync, rename). A write that fails (a full disk) is
reported by the caller and retried at the next change; the gateway keeps running.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge import privacy
from edge.privacy import GatewayLedger, PrivacyPolicy
from fedcore.errors import ConfigError, LocalProtocolError

FILE = "edge-state.json"


@dataclass(frozen=True, slots=True)
class EdgeState:
    lineage: str = ""  # the lineage the participant follows
    deployment: int = -1  # sequence of the last deployment record applied
    deployment_lineage: str = ""  # and its lineage
    trained_until: float = float("-inf")  # newest row time trained on (rows after it are new)
    private: bool = False  # the last round announced DP noise: evaluations stay on the gateway


def load(state_dir: Path) -> EdgeState:
    """The saved state, or the empty one; a damaged file counts as empty (nothing to keep)."""
    try:
        data = json.loads((state_dir / FILE).read_text("utf-8"))
        return EdgeState(str(data.get("lineage", "")), int(data.get("deployment", -1)),
                         str(data.get("deployment_lineage", "")),
                         float(data.get("trained_until", float("-inf"))),
                         bool(data.get("private", False)))
    except (OSError, ValueError, TypeError, AttributeError):
        return EdgeState()


def save(state_dir: Path, state: EdgeState) -> None:
    """Raises OSError when the disk refuses (the caller logs it)."""
    _write(state_dir, FILE, asdict(state))  # -inf is written as -Infinity, which json reads back


def _write(state_dir: Path, name: str, data: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / name
    tmp = path.with_name(name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_ledger(state_dir: Path, policy: PrivacyPolicy) -> GatewayLedger:
    """The gateway's own privacy ledger (``state_dir/privacy-ledger.json``), empty if there is
    none. Unlike the state above, a damaged ledger is not taken as empty (that would hand the
    gateway a fresh budget): it raises ConfigError (exit 78, no restart) and the gateway does
    not start until an operator repairs or removes the file."""
    path = state_dir / privacy.FILE
    why = "repair it, or remove it to give this gateway a fresh epsilon budget"
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return GatewayLedger(policy)
    except OSError as exc:
        raise ConfigError(str(path), "state.dir", str(state_dir),
                          f"cannot read the privacy ledger: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
        return GatewayLedger.from_dict(policy, data if isinstance(data, dict) else {})
    except (ValueError, LocalProtocolError) as exc:
        raise ConfigError(str(path), "state.dir", str(state_dir),
                          f"the privacy ledger is damaged ({exc}): {why}") from exc


def save_ledger(state_dir: Path, ledger: GatewayLedger) -> None:
    """Raises OSError when the disk refuses (the caller logs it)."""
    _write(state_dir, privacy.FILE, ledger.to_dict())
