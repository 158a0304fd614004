"""Pure tests of fedgate.fleetview: the fleet as `fedgate status` shows it."""

from __future__ import annotations

import json
import math

from fedcore.protocol.messages import Deployment, RoundPoint, RoundSummary, Status, TaskState
from fedgate.fleetview import FleetView

NOW = 1_750_000_000.0
LINEAGE = "20250615T120000Z-9f3a"


def state(**changes: object) -> TaskState:
    fields: dict[str, object] = dict(
        lineage=LINEAGE, phase="waiting", round=4, model_version=3, rounds_planned=0,
        waiting_for="new rows: 120 of 500", next_round_at=0.0, online=("gw1", "gw2"),
        quarantined=("gw2",), budget_spent=(), deployed_version=3, deployment_mode="latest",
        rejected={"late": 2}, epsilon={"gw1": 1.25}, metric="rmse",
        metric_higher_is_better=False,
        history=(RoundPoint(2, 2, 2, 900, 0.5, 3.0, NOW - 120), RoundPoint(3, 3, 2, 950, 0.4, 2.5, NOW - 60)),
        updated_at=NOW - 5,
    )
    fields.update(changes)
    return TaskState(**fields)  # type: ignore[arg-type]


def online(**changes: object) -> Status:
    fields: dict[str, object] = dict(
        state="online", software="fedgate 1.0", model_version=3, lineage=LINEAGE, trained_version=3,
        since=NOW - 3600, activity="ready", rows=1200, rows_new=60, rows_needed=500,
        last_round=3, last_rows=1000, last_eval={"eval_rmse": 0.41, "eval_mae": 0.3},
        epsilon=0.9, deployment=1, rejected={"old_lineage": 1},
    )
    fields.update(changes)
    return Status(**fields)  # type: ignore[arg-type]


def summary() -> RoundSummary:
    return RoundSummary(round=3, model_version=3, participants=("gw1", "gw2"), num_samples=950,
                        bytes_up=4096, bytes_down=8192, wall_s=2.5, alerts=("gw2 quarantined",),
                        lineage=LINEAGE, per_gateway={"gw1": {"eval_rmse": 0.4, "rows": 500.0}})


def record() -> Deployment:
    return Deployment(sequence=1, lineage=LINEAGE, mode="latest", version=3, reason="lineage started",
                      timestamp=NOW - 600)


def fleet() -> FleetView:
    view = FleetView("plant-a")
    view.on_state("boilers", state())
    view.on_summary("boilers", summary())
    view.on_deployment("boilers", record())
    view.on_status("gw1", "boilers", online(), NOW - 10)
    view.on_status("gw2", "boilers", online(epsilon=0.0, activity="waiting_for_data",
                                          activity_detail="62 of 500 rows"), NOW - 10)
    view.on_status("gw3", "boilers", Status(state="offline", since=NOW - 7200), NOW - 10)
    view.on_status("pump1", "pumps", online(lineage="", last_eval={}), NOW - 10)
    return view


def gateway(view: dict, name: str) -> dict:
    (found,) = [g for g in view["gateways"] if g["id"] == name]
    return found


def test_gateways_online_offline_and_their_figures() -> None:
    view = fleet().to_dict(NOW)
    assert [g["id"] for g in view["gateways"]] == ["gw1", "gw2", "gw3", "pump1"]
    gw1, gw3 = gateway(view, "gw1"), gateway(view, "gw3")
    assert gw1["online"] is True and gw1["since"] == NOW - 3600
    assert gw1["activity"] == "ready" and gw1["rows"] == 1200 and gw1["rows_new"] == 60
    assert gw1["last_eval"] == {"rmse": 0.41, "mae": 0.3}  # without the eval_ prefix
    assert gw1["task"] == "boilers" and gw1["software"] == "fedgate 1.0"
    assert gw3["online"] is False and gw3["since"] == NOW - 7200
    assert gw3["model_version"] == -1 and gw3["activity"] == ""
    unset = gateway(fleet().to_dict(NOW), "pump1")
    assert unset["online"] is True
    gw2 = gateway(view, "gw2")
    assert (gw2["activity"], gw2["activity_detail"]) == ("waiting_for_data", "62 of 500 rows")


def test_quarantine_and_epsilon_come_from_the_task_state() -> None:
    view = fleet().to_dict(NOW)
    gw1, gw2, gw3 = (gateway(view, n) for n in ("gw1", "gw2", "gw3"))
    assert gw2["quarantined"] is True and gw1["quarantined"] is False
    # the aggregator's ledger wins over the gateway's own count
    assert gw1["epsilon"] == 1.25
    # no ledger entry: the gateway's own count, or None when it spent nothing
    assert gw3["epsilon"] is None and gw2["epsilon"] is None
    pump = gateway(view, "pump1")  # a task without a task state: its own count
    assert pump["quarantined"] is False and pump["epsilon"] == 0.9


def test_the_task_from_its_state_summary_and_deployment() -> None:
    (task,) = fleet().to_dict(NOW, task="boilers")["tasks"]
    assert task["task"] == "boilers" and task["lineage"] == LINEAGE
    assert (task["phase"], task["round"], task["model_version"]) == ("waiting", 4, 3)
    assert task["waiting_for"] == "new rows: 120 of 500"
    assert task["next_round_at"] is None  # 0: not set
    assert task["metric"] == {"name": "rmse", "higher_is_better": False, "value": 0.4}
    assert [p["round"] for p in task["history"]] == [2, 3]
    assert task["last_round"]["participants"] == ["gw1", "gw2"]
    assert task["last_round"]["per_gateway"] == {"gw1": {"eval_rmse": 0.4, "rows": 500.0}}
    assert task["deployment"] == {"sequence": 1, "mode": "latest", "version": 3, "candidate": -1,
                                  "canary": [], "reason": "lineage started", "time": NOW - 600}


def test_a_nan_metric_is_shown_as_none() -> None:
    view = FleetView("plant-a")
    points = (RoundPoint(1, 1, 2, 900, math.nan, 3.0, NOW - 60),)
    view.on_state("boilers", state(history=points))
    (task,) = view.to_dict(NOW)["tasks"]
    assert task["metric"]["value"] is None
    assert task["history"][0]["metric"] is None
    json.dumps(view.to_dict(NOW), allow_nan=False)


def test_a_task_with_no_history_has_no_metric_value() -> None:
    view = FleetView("plant-a")
    view.on_state("boilers", state(history=()))
    assert view.to_dict(NOW)["tasks"][0]["metric"]["value"] is None


def test_filtering_by_task() -> None:
    view = fleet()
    pumps = view.to_dict(NOW, task="pumps")
    assert [g["id"] for g in pumps["gateways"]] == ["pump1"]
    assert pumps["tasks"] == []  # no retained state for the pumps task yet
    boilers = view.to_dict(NOW, task="boilers")
    assert [g["id"] for g in boilers["gateways"]] == ["gw1", "gw2", "gw3"]
    assert [t["task"] for t in boilers["tasks"]] == ["boilers"]
    assert view.to_dict(NOW, task="nothing") == {"fleet": "plant-a", "time": NOW, "tasks": [],
                                                 "gateways": [], "rejected": {}}


def test_a_task_known_only_by_its_summary() -> None:
    view = FleetView("plant-a")
    view.on_summary("pumps", summary())
    (task,) = view.to_dict(NOW)["tasks"]
    assert set(task) == {"task", "last_round"}


def test_rejected_messages_are_counted_by_reason() -> None:
    view = fleet()
    for reason in ("bad_signature", "bad_signature", "decode"):
        view.on_rejected(reason)
    assert view.to_dict(NOW)["rejected"] == {"bad_signature": 2, "decode": 1}


def test_a_newer_status_replaces_the_older_one() -> None:
    view = fleet()
    view.on_status("gw1", "boilers", Status(state="offline", since=NOW), NOW)
    assert gateway(view.to_dict(NOW), "gw1")["online"] is False


def test_the_view_is_json() -> None:
    view = fleet().to_dict(NOW)
    text = json.dumps(view, allow_nan=False)
    assert json.loads(text) == view
