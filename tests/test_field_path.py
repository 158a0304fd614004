"""The field path as a test: the README's "Running a real fleet", command by command.

The commands are read from the README's code block, not copied here, and run as separate
processes through the CLI only: provisioning, Mosquitto from the generated config, two
simulated turbines on Modbus TCP, two bridges filling their stores, two store-fed gateways
and the aggregator from examples/ (installed as the README says), `fedgate status`, the
dashboard, `fedgate model ...`. What a test must change is substituted and listed in
``knobs``: ports, folders (each gateway gets its own /etc/fedgate and /var/lib), the second
gateway's id and turbine, and a few timings (rows arrive ten times faster, a gateway joins
with 100 rows instead of 500, rounds every 2 s instead of every 10 min, 4 rounds).

What the run must show, as the field-grade issue lists it: the gateways start before their
stores have enough rows, wait, then train; rounds continue as rows arrive and each round
trains on more rows than the one before; `fedgate status --json` shows both gateways
online at the current version; `fedgate model rollback` puts both on the previous version;
the aggregator, finished after 4 rounds and restarted with 7, continues its lineage.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgate.processes import ProcessGroup, fedgate_argv, wait_for
from tests.deployed_subscriber import aggregator_key, decode_and_verify, run_tflite

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
UNITS = ("R80711", "R80721")
LONG_RUNNING = ("mosquitto -c", "fedgate bridge simulate", "fedgate bridge run", "fedgate edge run",
                "fedgate aggregator run", "fedgate dashboard")
WAIT = 120.0  # generous: the machine is shared; nothing here is a timing assertion


def _commands(block: str) -> list[tuple[str, str]]:
    out, section = [], ""
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("#"):
            section = line
        elif line:
            out.append((section, line.split("  #", 1)[0].strip()))
    return out


def readme_commands() -> list[tuple[str, str]]:
    """(section comment, command) of every line of the README's "Running a real fleet" block."""
    text = (REPO / "README.md").read_text()
    return _commands(text.split("## Running a real fleet", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0])


def docs_commands() -> list[str]:
    """Every command of every ```sh block in docs/ (the field path runs them all)."""
    out = []
    for page in sorted((REPO / "docs").glob("*.md")):
        for block in page.read_text().split("```sh\n")[1:]:
            out += [c for _, c in _commands(block.split("```", 1)[0])]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def plant_dir() -> Iterator[Path]:
    # Mosquitto's account must pass through the folder; pytest's temp folders are private
    path = Path(tempfile.mkdtemp(prefix="fedgate-field-path-"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FieldPath:
    """Runs README commands with the substitutions of one place (the broker host, a
    gateway, the aggregator's host)."""

    def __init__(self, root: Path, group: ProcessGroup) -> None:
        self.root = root
        self.group = group
        self.broker_port = free_port()
        self.ran: list[str] = []

    def run(self, command: str, subs: dict[str, str], name: str = "", timeout: float = 120,
            extra: str = "", cwd: Path | None = None, expect: int = 0) -> str:
        """Run a documented ``command`` with ``subs`` applied (and ``extra`` arguments of the
        test); returns its output, asserting its exit code is ``expect``."""
        self.ran.append(command)
        line = command + extra
        for old, new in subs.items():
            line = line.replace(old, new)
        for part in line.split(" && "):
            argv = shlex.split(part)
            if argv[0] == "fedgate":
                argv = fedgate_argv(*argv[1:])
            if any(command.startswith(p) for p in LONG_RUNNING) or command.endswith("--watch"):
                self.group.start(name or argv[1], argv, cwd=cwd or self.root)
                return ""
            done = subprocess.run(argv, cwd=cwd or self.root, capture_output=True, text=True, timeout=timeout)
            assert done.returncode == expect, f"{line}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def status(self) -> dict[str, Any]:
        out = self.run("fedgate status --broker mqtts://127.0.0.1:8883 --fleet plant1 "
                       "--tls-dir fleet/operators/ops --json", self.broker_subs())
        return json.loads(out)

    def broker_subs(self) -> dict[str, str]:
        return {"8883": str(self.broker_port)}


def _edit(path: Path, knobs: dict[str, str]) -> None:
    text = path.read_text()
    for old, new in knobs.items():
        assert old in text, f"{path.name} no longer contains {old!r}"
        text = text.replace(old, new)
    path.write_text(text)


def test_the_readme_fleet_runs_learns_and_is_steered(plant_dir: Path) -> None:
    commands = readme_commands()
    root = plant_dir
    shutil.copytree(REPO / "examples", root / "examples")
    with ProcessGroup(root / "logs") as group:
        fp = FieldPath(root, group)
        broker = fp.broker_subs()
        gateways = []
        for i, unit in enumerate(UNITS, start=1):
            etc = root / f"gw{i}" / "etc" / "fedgate"
            gateways.append({
                "/etc/fedgate": str(etc), "gw-turbine-1": f"gw-turbine-{i}", "R80711": unit,
                "5020": str(free_port()), "8883": str(fp.broker_port)})
        agg_etc = root / "agg" / "etc" / "fedgate"
        aggregator = {"/etc/fedgate": str(agg_etc), **broker}

        def knobs_for_gateway(i: int, subs: dict[str, str]) -> None:
            etc = Path(subs["/etc/fedgate"])
            var = etc.parent.parent / "var" / "lib"
            _edit(etc / "bridge.toml", {"/var/lib/": f"{var}/", "port = 5020": f"port = {subs['5020']}",
                                        "period = 1.0": "period = 0.1"})
            _edit(etc / "edge.toml", {"/var/lib/": f"{var}/", 'id = "gw-turbine-1"': f'id = "gw-turbine-{i}"',
                                      "127.0.0.1:8883": f"127.0.0.1:{fp.broker_port}",
                                      "min_rows = 500": "min_rows = 100",
                                      "metrics_port = 9471": f"metrics_port = {free_port()}"})

        for section, command in commands:
            if section.startswith("# The security officer"):
                extra = {"--dir fleet": "--dir fleet"}
                if command.startswith("fedgate provision device"):
                    for i in range(1, len(UNITS) + 1):
                        fp.run(command, {"gw-turbine-1": f"gw-turbine-{i}"})
                    continue
                fp.run(command, {**broker, **extra}, name="mosquitto")
            elif section.startswith("# Each gateway"):
                for i, subs in enumerate(gateways, start=1):
                    if command.startswith("fedgate bridge simulate"):
                        fp.run(command, subs, name=f"turbine-{i}", extra=" --speed 6000")
                        continue
                    if command.startswith("fedgate bridge probe"):
                        wait_for("the simulated turbine", lambda s=subs: _listening(int(s["5020"])), WAIT)
                    name = {"fedgate bridge run": f"bridge-{i}", "fedgate edge run": f"edge-{i}"}
                    fp.run(command, subs, name=next((v for k, v in name.items() if command.startswith(k)), ""))
                    if command.startswith("cp examples/bridge.toml"):
                        knobs_for_gateway(i, subs)
            elif section.startswith("# The aggregator"):
                if command.startswith("cp examples/aggregator.toml"):
                    fp.run(command, aggregator)
                    _edit(agg_etc / "aggregator.toml", {
                        "/var/lib/": f"{root}/agg/var/lib/", "127.0.0.1:8883": f"127.0.0.1:{fp.broker_port}",
                        "rounds = 0 ": "rounds = 4 ", "interval_s = 600": "interval_s = 2",
                        "min_new_rows = 300": "min_new_rows = 20",
                        "metrics_port = 9470": f"metrics_port = {free_port()}"})
                    wait_for("both gateways online", lambda: _online(fp.status(), 2), WAIT, group=group)
                    continue
                fp.run(command, aggregator, name="aggregator")
            elif section.startswith("# See and steer"):
                steer(fp, command, aggregator, group, agg_etc)
        operations(fp, aggregator, group, agg_etc)
        assert {c for _, c in commands} <= set(fp.ran), "every README command ran"
        assert set(docs_commands()) <= set(fp.ran), set(docs_commands()) - set(fp.ran)
        # the gateways started before their stores had enough rows, waited, then trained
        for i in (1, 2):
            log = group.children[f"edge-{i}"].output()
            assert re.search(r"waiting for data: \d+ of 100 training rows", log), log
            assert log.index("waiting for data") < log.index("statistics of")


def steer(fp: FieldPath, command: str, aggregator: dict[str, str], group: ProcessGroup,
          agg_etc: Path) -> None:
    """The last part of the README: status, dashboard, model commands, each with its checks."""
    if command.startswith("fedgate status"):
        # rounds continue as rows arrive, each round on more rows than the one before
        view = wait_for("3 rounds committed", lambda: _rounds(fp.status(), 3), WAIT, group=group,
                        alive=["aggregator", "edge-1", "edge-2"])
        history = view["tasks"][0]["history"]
        rows = [h["rows"] for h in history]
        assert all(b > a for a, b in zip(rows, rows[1:], strict=False)), rows
        current = wait_for("both gateways on the current version",
                           lambda: _on_version(fp.status()), WAIT, group=group)
        assert all(g["online"] and g["last_round"] >= 1 for g in current["gateways"])
        fp.run(command, fp.broker_subs())  # the table as an operator reads it
        # another plant system subscribes to the deployed model, with no fedgate code
        deployed = decode_and_verify(_retained(fp, "fg/plant1/wind-power/deployed"),
                                     aggregator_key(json.loads((fp.root / "fleet/keyring.json").read_text())))
        assert deployed.version >= 3 and deployed.features[0] == "Ws_avg"
        raw = np.array([[8.0, 0.5, 0.8, 10.0, 2.0], [12.0, -0.2, 0.9, 3.0, -5.0]])
        model = fp.root / "agg" / "var" / "lib" / "fedgate-aggregator" / "models" / f"v{deployed.version}.npz"
        assert np.allclose(run_tflite(deployed.tflite, raw), _reference(model, deployed.spec, raw), atol=0.5)
    elif command.startswith("fedgate dashboard"):
        port = free_port()
        fp.run(command, fp.broker_subs(), name="dashboard", extra=f" --port {port}")
        page = wait_for("the dashboard page", lambda: _get(f"http://127.0.0.1:{port}/"), WAIT,
                        group=group, alive=["dashboard"])
        assert "<html" in page.lower()
        api = json.loads(wait_for("the dashboard's data", lambda: _get(f"http://127.0.0.1:{port}/api/fleet"), WAIT))
        assert {g["id"] for g in api["gateways"]} == {"gw-turbine-1", "gw-turbine-2"}
        group.stop("dashboard")
    elif command.startswith("fedgate model list"):
        out = fp.run(command, aggregator)
        assert re.search(r"deployed \d+ \(mode latest\)", out), out
    elif command.startswith("fedgate model rollback"):
        out = fp.run(command, aggregator)
        match = re.search(r"rolled back to version (\d+)", out)
        assert match, out
        previous = int(match.group(1))
        view = wait_for("both gateways on the previous version",
                        lambda: _all_run(fp.status(), previous), WAIT, group=group)
        task = _task(view)
        assert task["deployment_mode"] == "version" and previous < task["model_version"]
    elif command.startswith("fedgate model deploy latest"):
        # the run finishes after 4 rounds; restarted with 7 it continues its lineage
        lineage = _task(fp.status())["lineage"]
        wait_for("the run to finish", lambda: _task(fp.status()).get("phase") == "finished", WAIT, group=group)
        group.stop("aggregator")
        _edit(agg_etc / "aggregator.toml", {"rounds = 4 ": "rounds = 7 "})
        fp.run("fedgate aggregator run -c /etc/fedgate/aggregator.toml", aggregator, name="aggregator")
        view = wait_for("round 7 committed", lambda: _rounds(fp.status(), 7), WAIT, group=group,
                        alive=["aggregator"])
        assert _task(view)["lineage"] == lineage
        assert "continues with round 5" in group.children["aggregator"].output()
        out = fp.run(command, aggregator)
        assert "follows the newest model" in out, out
    else:
        fp.run(command, aggregator)


def _reference(model_file: Path, spec: list[Any], raw: np.ndarray) -> np.ndarray:
    """What the fleet's model predicts in kW for raw rows, computed from the aggregator's
    own file of that version and the fleet scaler in the deployed spec."""
    from fedcore.learning.models import forward
    from fedcore.protocol.messages import ModelSpec

    with np.load(model_file) as data:
        weights = [data[f"w_{i}"] for i in range(len(data.files))]
    s = ModelSpec(*spec)
    x = (raw - np.array(s.feature_mean)) / np.array(s.feature_std)
    return np.asarray(forward(s, weights, x.astype(np.float32)) * s.target_std + s.target_mean)


def operations(fp: FieldPath, aggregator: dict[str, str], group: ProcessGroup, agg_etc: Path) -> None:
    """The commands of docs/ (operations.md) on the same fleet, each with its check."""
    run = {c: c for c in docs_commands()}
    # versions 0..7 exist in this run: version 3 stands in for the page's 12
    three = {**aggregator, " 12 ": " 3 "}
    view = json.loads(fp.run(run["fedgate status --broker mqtts://127.0.0.1:8883 --fleet plant1 "
                                 "--tls-dir fleet/operators/ops --json"], fp.broker_subs()))
    assert {g["id"] for g in view["gateways"]} == {"gw-turbine-1", "gw-turbine-2"}
    watch = [c for c in run if c.endswith("--watch")][0]
    fp.run(watch, fp.broker_subs(), name="status-watch")
    wait_for("the watched table", lambda: "gw-turbine-2" in group.children["status-watch"].output(),
             WAIT, group=group, alive=["status-watch"])
    group.stop("status-watch")
    shown = json.loads(fp.run(run["fedgate model show 12 -c /etc/fedgate/aggregator.toml"], three,
                              extra=" --json"))
    assert shown["version"] == 3 and shown["parameters"] == 5 * 32 + 32 + 32 * 16 + 16 + 16 + 1
    out = fp.run(run["fedgate model deploy 12 -c /etc/fedgate/aggregator.toml"], three)
    assert "version 3 deployed" in out, out
    wait_for("both gateways on version 3", lambda: _all_run(fp.status(), 3), WAIT, group=group)
    out = fp.run(run["fedgate model rollback -c /etc/fedgate/aggregator.toml"], aggregator)
    assert "rolled back to version" in out, out
    fp.run(run["fedgate model deploy latest -c /etc/fedgate/aggregator.toml"], aggregator)
    listed = fp.run(run["fedgate model list -c /etc/fedgate/aggregator.toml"], aggregator)
    assert "(mode latest)" in listed, listed
    audit = fp.run(run["python3 -c \"from aggregator.audit import verify_chain; "
                       "print(verify_chain('audit.jsonl'))\""], aggregator,
                   cwd=fp.root / "agg" / "var" / "lib" / "fedgate-aggregator")
    assert "ok=True" in audit, audit
    release = fp.run(run["fedgate aggregator release gw-turbine-1 -c /etc/fedgate/aggregator.toml"],
                     aggregator, expect=1)
    assert "gw-turbine-1 is not quarantined" in release, release
    # a new lineage: the aggregator stopped, its state archived, started again
    old = _task(fp.status())["lineage"]
    group.stop("aggregator")
    out = fp.run(run["fedgate aggregator new-lineage -c /etc/fedgate/aggregator.toml"], aggregator)
    assert "archived" in out, out
    fp.run("fedgate aggregator run -c /etc/fedgate/aggregator.toml", aggregator, name="aggregator")
    view = wait_for("both gateways in a round of the new lineage", lambda: _new_lineage(fp.status(), old),
                    WAIT, group=group, alive=["aggregator"])
    assert all(g["lineage"] == _task(view)["lineage"] for g in view["gateways"])


def _new_lineage(view: dict[str, Any], old: str) -> dict[str, Any] | None:
    task = _task(view)
    ok = (task.get("lineage", old) > old and _rounds(view, 1) is not None
          and all(g["lineage"] == task["lineage"] and g["last_round"] >= 1 for g in view["gateways"]))
    return view if ok else None


def _retained(fp: FieldPath, topic: str) -> bytes:
    """One retained message, read with paho and the operator's bundle (no fedgate code)."""
    import ssl

    import paho.mqtt.client as mqtt

    bundle = fp.root / "fleet" / "operators" / "ops"
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plant-historian",
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(bundle / "ca.crt"), certfile=str(bundle / "client.crt"),
                   keyfile=str(bundle / "client.key"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", fp.broker_port)
    client.loop_start()
    try:
        wait_for(f"the retained message on {topic}", lambda: got, 30)
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return None


def _task(view: dict[str, Any]) -> dict[str, Any]:
    return view["tasks"][0] if view["tasks"] else {}


def _online(view: dict[str, Any], n: int) -> dict[str, Any] | None:
    return view if sum(g["online"] for g in view["gateways"]) >= n else None


def _rounds(view: dict[str, Any], n: int) -> dict[str, Any] | None:
    history = _task(view).get("history", [])
    return view if history and history[-1]["round"] >= n else None


def _on_version(view: dict[str, Any]) -> dict[str, Any] | None:
    task = _task(view)
    ok = len(view["gateways"]) == 2 and all(
        g["online"] and g["model_version"] == task.get("deployed_version") for g in view["gateways"])
    return view if ok else None


def _all_run(view: dict[str, Any], version: int) -> dict[str, Any] | None:
    ok = all(g["online"] and g["model_version"] == version for g in view["gateways"])
    return view if ok and len(view["gateways"]) == 2 else None
