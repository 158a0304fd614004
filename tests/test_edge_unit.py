"""The gateway runs under its shipped unit as shipped, beside the bridge under its own.

`fedgate edge run -c /etc/fedgate/edge.toml` (the unit's ExecStart) runs as user
``fedgate`` with the bridge's folder mounted read-only, ``MemoryMax=1G`` and
``ProtectSystem=strict`` (tests/unit_sandbox.py applies them where PID 1 is not systemd),
next to the bridge unit running as ``fedgate-bridge`` against a simulated turbine. The
gateway starts before the store has enough rows: it reports READY, waits (its status says
so), answers the statistics round and trains; nothing it does writes to the bridge's
folder. A plain Mosquitto and an aggregator process complete the fleet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedgate.processes import ProcessGroup, fedgate_argv, wait_for
from firmware_bridge.simulator import (
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_toml,
)

from .unit_sandbox import UnitSandbox

ROOT = Path(__file__).resolve().parents[1]
STORE = "/var/lib/fedgate-bridge/samples.db"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the unit sandbox needs root")

EDGE_TOML = """
[device]
id = "gw-1"
fleet = "plant1"
task = "wind-power"
[broker]
url = "{url}"
[data]
source = "store"
store = "/var/lib/fedgate-bridge/samples.db"
device = "t1"
task = "regression"
features = ["Ws_avg", "sin(Wa_avg)", "cos(Wa_avg)", "Ot_avg", "Va_avg"]
target = "P_avg"
time_signal = "row_time"
record_signal = "row_seq"
min_rows = 80
[state]
dir = "/var/lib/fedgate-edge"
status_interval_s = 5
[inference]
enabled = true
"""

AGGREGATOR_TOML = """
[task]
fleet = "plant1"
name = "wind-power"
[broker]
url = "{url}"
[model]
layer_sizes = [5, 16, 1]
features = ["Ws_avg", "sin(Wa_avg)", "cos(Wa_avg)", "Ot_avg", "Va_avg"]
target = "P_avg"
[rounds]
rounds = 2
round_timeout_s = 60
[train]
optimizer = "adam"
learning_rate = 0.003
max_steps = 50
[state]
dir = "{state}"
"""


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    server = SimulatorServer()
    yield server
    server.close()


def test_the_gateway_runs_under_its_own_unit(sim: SimulatorServer, tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    etc, bridge_state, edge_state = (tmp_path / n for n in ("etc", "bridge-state", "edge-state"))
    for folder in (etc, bridge_state, edge_state):
        folder.mkdir()
    os.chmod(tmp_path, 0o755)  # the units' users pass through to their bound folders
    port = sim.add(SimulatedTurbine("R80711", speed=30000.0), 0)
    (etc / "bridge.toml").write_text(wind_bridge_toml([SimulatedDevice("t1", port)], STORE, period=0.05))
    (etc / "edge.toml").write_text(EDGE_TOML.format(url=mosquitto.url))
    os.chmod(etc / "edge.toml", 0o644)
    (tmp_path / "aggregator.toml").write_text(
        AGGREGATOR_TOML.format(url=mosquitto.url, state=tmp_path / "agg"))
    binds = {"/etc/fedgate": etc, "/var/lib/fedgate-bridge": bridge_state,
             "/var/lib/fedgate-edge": edge_state}
    edge_log = open(tmp_path / "edge.log", "ab")
    with ProcessGroup(tmp_path / "logs") as group, \
            UnitSandbox(ROOT / "systemd/fedgate-edge.service", binds=binds, stderr=edge_log) as edge:
        edge.wait_for("READY", timeout=60)  # connected, before the bridge wrote anything
        assert edge.memory_limit() == 1 << 30
        group.start("aggregator", fedgate_argv("aggregator", "run", "-c", str(tmp_path / "aggregator.toml")))
        with open(tmp_path / "bridge.log", "ab") as bridge_log, \
                UnitSandbox(ROOT / "systemd/fedgate-bridge.service", binds=binds, stderr=bridge_log) as bridge:
            bridge.wait_for("READY", timeout=60)
            wait_for("two rounds", lambda: "run finished after round 2" in group.children["aggregator"].output(),
                     180, group=group, alive=["aggregator"])
        log = (tmp_path / "edge.log").read_text()
        assert "waiting for data" in log and "round 2: update sent" in log, log
        assert edge.process is not None and edge.process.poll() is None, "the gateway kept running"
    edge_log.close()
    # the edge wrote its own state only; the bridge's folder holds the bridge's files
    assert {p.name for p in bridge_state.iterdir()} <= {"samples.db", "samples.db-wal", "samples.db-shm"}
    assert (edge_state / "edge-state.json").is_file() and list((edge_state / "models").glob("v*.tflite"))
    saved = json.loads((edge_state / "edge-state.json").read_text())
    assert saved["lineage"]
