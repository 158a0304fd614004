"""`fedgate model list|show|deploy|rollback`: the model versions of a fleet and which one runs.

Run on the aggregator's host with its config. ``list`` and ``show`` read the aggregator's
state folder (checkpoint and kept model files); ``deploy`` and ``rollback`` are carried out
by the running aggregator, which publishes a signed deployment record the gateways follow
(``aggregator.deployment``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="model versions: list, show, deploy, roll back")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = msub.add_parser(name, help=help)
        p.add_argument("-c", "--config", required=True, help="aggregator.toml")
        p.set_defaults(func=func)
        return p

    lst = add("list", _list, "the versions of the current lineage and the deployed one")
    lst.add_argument("--json", action="store_true", help="one JSON object")
    show = add("show", _show, "one version in detail")
    show.add_argument("version", type=int)
    show.add_argument("--json", action="store_true", help="one JSON object")
    deploy = add("deploy", _deploy, "run VERSION on every gateway (or `latest`: follow the newest)")
    deploy.add_argument("version", help="a kept version number, or latest")
    add("rollback", _rollback, "run the version deployed before the current one")


def _state(config_file: str) -> tuple[Any, dict[str, Any]]:
    from aggregator import checkpoint as checkpoints
    from aggregator.config import load_aggregator_config
    from fedcore.errors import ConfigError

    config = load_aggregator_config(config_file)
    try:
        saved = checkpoints.load(config.state_dir)
    except checkpoints.DamagedCheckpoint as exc:
        raise ConfigError(config.file, "state.dir", str(config.state_dir), f"damaged: {exc}") from None
    if saved is None:
        raise ConfigError(config.file, "state.dir", str(config.state_dir),
                          "holds no aggregator state yet (has the aggregator run?)")
    return config, saved.meta


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def versions(config_file: str) -> dict[str, Any]:
    """What ``fedgate model list --json`` prints."""
    from aggregator import checkpoint as checkpoints

    config, meta = _state(config_file)
    deployment = meta.get("deployment") or {}
    latest = int(meta["version"])
    deployed = latest if deployment.get("mode", "latest") == "latest" else int(deployment.get("version", latest))
    kept = set(checkpoints.kept_versions(config.state_dir))
    by_version = {int(h.get("version", h["round"])): h for h in meta.get("history", [])}
    # a round's holdout figures judge the model it trained from
    judged = {int(h["evaluated_version"]): h.get("metric") for h in meta.get("history", [])
              if "evaluated_version" in h}
    rows = []
    for version in sorted(kept | set(by_version)):
        h = by_version.get(version, {})
        metric = judged.get(version)
        rows.append({
            "version": version, "round": h.get("round"), "participants": h.get("participants"),
            "rows": h.get("rows"), "metric": None if metric is None or math.isnan(metric) else metric,
            "committed_at": h.get("time"), "kept": version in kept, "deployed": version == deployed,
        })
    spec = meta.get("spec") or []
    from fedcore.learning.metrics import holdout_metric

    metric = holdout_metric(spec[0], spec[3])[0] if len(spec) > 3 else "metric"
    return {"lineage": meta.get("lineage", ""), "latest": latest, "deployed": deployed,
            "metric": metric,
            "deployment_mode": deployment.get("mode", "latest"),
            "deployment_sequence": deployment.get("sequence", -1), "versions": rows,
            "deployments": deployment.get("history", [])}


def _list(args: argparse.Namespace) -> int:
    info = versions(args.config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"lineage {info['lineage']}: newest version {info['latest']}, deployed {info['deployed']} "
          f"(mode {info['deployment_mode']})")
    print(f"{'version':>8} {'round':>6} {'gws':>4} {'rows':>9} {info['metric']:>10}  {'committed':19}  kept")
    for r in info["versions"]:
        metric = f"{r['metric']:.4g}" if r["metric"] is not None else "-"
        mark = " <- deployed" if r["deployed"] else ""
        print(f"{r['version']:>8} {r['round'] if r['round'] is not None else '-':>6} "
              f"{r['participants'] if r['participants'] is not None else '-':>4} "
              f"{r['rows'] if r['rows'] is not None else '-':>9} {metric:>10}  "
              f"{_when(r['committed_at'] or 0):19}  {'yes' if r['kept'] else 'no '}{mark}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from aggregator import checkpoint as checkpoints
    from fedcore.errors import ConfigError

    config, meta = _state(args.config)
    weights = checkpoints.load_model(config.state_dir, args.version)
    if weights is None:
        raise ConfigError("<command line>", "VERSION", args.version,
                          f"not kept in {config.state_dir / 'models'} (see `fedgate model list`)")
    history = {int(h.get("version", h["round"])): h for h in meta.get("history", [])}
    h = history.get(args.version, {})
    # the holdout figures of a version come from the round that trained from it
    judged: dict[str, Any] = next(
        (j for j in meta.get("history", []) if j.get("evaluated_version") == args.version), {})
    digest = hashlib.sha256(b"".join(w.astype("<f4").tobytes() for w in weights)).hexdigest()
    names = ("kind", "layer_sizes", "activation", "task", "features", "target", "feature_mean",
             "feature_std", "target_mean", "target_std")
    info = {
        "lineage": meta.get("lineage", ""), "version": args.version,
        "spec": dict(zip(names, meta.get("spec") or [], strict=False)),
        "parameters": int(sum(w.size for w in weights)), "weights_sha256": digest,
        "file": str(checkpoints.model_path(config.state_dir, args.version)),
        "round": h.get("round"), "participants": h.get("participants"), "rows": h.get("rows"),
        "metrics": {k: v for k, v in judged.get("metrics", {}).items() if k.startswith("eval_")},
        "committed_at": h.get("time"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key in ("metrics", "spec"):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:24} {v:.6g}" if isinstance(v, float) else f"  {k:24} {v}")
        else:
            print(f"{key:14} {value}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from fedgate.cli_services import send_command

    if args.version == "latest":
        return send_command(args.config, {"command": "deploy", "version": "latest"})
    try:
        version = int(args.version)
    except ValueError:
        from fedcore.errors import ConfigError

        raise ConfigError("<command line>", "VERSION", args.version,
                          "a version number or `latest`") from None
    return send_command(args.config, {"command": "deploy", "version": version})


def _rollback(args: argparse.Namespace) -> int:
    from fedgate.cli_services import send_command

    return send_command(args.config, {"command": "rollback"})
