"""A real plant fleet for fault benchmarks: every part a separate process, every part killable.

Theory of operation
-------------------
:class:`FaultFleet` provisions a fleet (CA, aggregator, gateways, an operator; the broker's
generated mTLS listener and ACL, ``fedgate provision`` as an operator runs it) and starts,
each as its own process: Mosquitto, and per gateway a simulated La Haute Borne turbine on
Modbus TCP (``fedgate bridge simulate``, replaying its SCADA rows at ``speed`` times real
time), a bridge filling that gateway's sample store, and the store-fed gateway; then the
aggregator (statistics round first, then training rounds back to back). The last gateway
reaches the broker through a :class:`PartitionProxy`, so its link can be cut.

A fault is a method: :meth:`kill` sends SIGKILL to one service and :meth:`start` starts it
again with the same command (what ``Restart=on-failure`` does); :meth:`restart_broker`
stops and starts Mosquitto with its config (``persistence`` chooses whether that config
keeps sessions and retained messages on disk). Everything is stopped on every exit path.

What the bench counts comes from the parts themselves: the aggregator's ``history.jsonl``
(one line per committed round, with its participant count and wall time), the round
summaries on the metrics topic (who took part; read by an operator identity with a
persistent session), the services' logs (each update a gateway sent, each rejection,
re-announcement and lineage) and the sample stores (the ``row_seq`` record numbers a bridge
wrote).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partition_proxy import PartitionProxy

from fedcore.protocol import codec
from fedcore.protocol.messages import RoundSummary
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, MessageReceived
from fedcore.transport.paho import PahoTransport
from fedcore.transport.tls import TlsSettings
from fedgate import provision
from fedgate.broker import RunningBroker, free_port, port_accepts
from fedgate.processes import ProcessGroup, fedgate_argv, wait_for

REPO = Path(__file__).resolve().parents[1]
FLEET, TASK = "faults", "plant"
UNITS = ("R80711", "R80721", "R80736", "R80790")
FEATURES = '["Ws_avg", "sin(Wa_avg)", "cos(Wa_avg)", "Ot_avg", "Va_avg"]'
UPDATE_SENT = re.compile(r"round (\d+): update sent \((\d+) bytes, (\d+) training rows\)")
REJECTED = re.compile(r"message from (\S+) for round (\d+) rejected: (\S+)")
QUORUM_MISSED = re.compile(r"round (\d+): quorum missed")
ANNOUNCED = re.compile(r"round (\d+) announced on model version")


@dataclass(frozen=True)
class FleetOptions:
    gateways: int = 3
    speed: float = 3000.0  # rows replayed at this many times real time (3000: 5 rows/s)
    min_rows: int = 100
    # local training of a few tenths of a second whatever the rows held: a round has a middle
    local_epochs: int = 1000
    max_steps: int = 3000
    interval_s: float = 2.0  # a round starts at most this often (the aggregator's [schedule])
    persistence: bool = True  # the provisioned broker's default
    round_timeout_s: float = 30.0


@dataclass
class Sent:
    device: str
    round: int
    rows: int


@dataclass
class Observed:
    summaries: dict[int, RoundSummary] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultFleet:
    def __init__(self, work: Path, options: FleetOptions) -> None:
        self.work = work
        self.options = options
        self.devices = [f"gw-{i}" for i in range(1, options.gateways + 1)]
        self.partitioned_device = self.devices[-1]
        self.fleet_dir = work / "fleet"
        self.group = ProcessGroup(work / "logs")
        self.broker: RunningBroker | None = None
        self.proxy: PartitionProxy | None = None
        self.observed = Observed()
        self._observer: PahoTransport | None = None
        self.argv: dict[str, list[str]] = {}
        self.operator_bundle = self.fleet_dir / "operators" / "bench"

    # ---- start and stop ------------------------------------------------------------------

    def __enter__(self) -> FaultFleet:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        self.group.stop_all()
        if self.proxy is not None:
            self.proxy.stop()
        if self.broker is not None:
            self.broker.stop()

    def _start(self) -> None:
        self._start_broker()
        assert self.broker is not None
        self.proxy = PartitionProxy(self.broker.port).start()
        self._start_observer()
        for i, device in enumerate(self.devices):
            self._start_gateway(i, device)
        (self.work / "aggregator.toml").write_text(self._aggregator_toml())
        self.argv["aggregator"] = fedgate_argv("aggregator", "run", "-c", str(self.work / "aggregator.toml"))
        self.start("aggregator")

    def _start_broker(self) -> None:
        provision.init_ca(self.fleet_dir, fleet=FLEET, tasks=[TASK])
        provision.provision_aggregator(self.fleet_dir)
        for device in self.devices:
            provision.provision_device(self.fleet_dir, device)
        self.operator_bundle = provision.provision_operator(self.fleet_dir, "bench")
        port = free_port()
        conf = provision.provision_broker(self.fleet_dir, port=port, run_as_user="root")
        if not self.options.persistence:
            conf.write_text(conf.read_text().replace("persistence true", "persistence false"))
        self.broker = RunningBroker("mosquitto", port, ["mosquitto", "-c", str(conf)],
                                    self.fleet_dir / "broker" / "mosquitto.log", 10.0).start()

    def _start_gateway(self, i: int, device: str) -> None:
        sim_port = free_port()
        self.argv[f"turbine-{device}"] = fedgate_argv(
            "bridge", "simulate", "--unit", UNITS[i % len(UNITS)], "--port", str(sim_port),
            "--speed", str(self.options.speed))
        self.start(f"turbine-{device}")
        bridge = (REPO / "firmware_bridge/maps/wind_turbine.toml").read_text()
        bridge = bridge.replace('store = "samples.db"', f'store = "{self.store(device)}"')
        bridge = bridge.replace("port = 5020", f"port = {sim_port}").replace(
            "period = 1.0", f"period = {600.0 / self.options.speed / 2:.4f}")  # two polls a row
        (self.work / f"bridge-{device}.toml").write_text(bridge)
        (self.work / f"edge-{device}.toml").write_text(self._edge_toml(device))
        wait_for("the simulated turbine", lambda: port_accepts(sim_port), 30)
        self.argv[f"bridge-{device}"] = fedgate_argv("bridge", "run", "-c", str(self.work / f"bridge-{device}.toml"))
        self.argv[f"edge-{device}"] = fedgate_argv("edge", "run", "-c", str(self.work / f"edge-{device}.toml"))
        self.start(f"bridge-{device}")
        self.start(f"edge-{device}")

    def _start_observer(self) -> None:
        assert self.broker is not None
        bundle = self.operator_bundle
        self._observer = PahoTransport(
            f"mqtts://127.0.0.1:{self.broker.port}", "bench-fault-observer",
            tls=TlsSettings(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key"),
            rng=random.Random(0), backoff_max=2.0)
        topics = Topics(FLEET, TASK)
        observer = self._observer

        def on_event(event: Any) -> None:
            if isinstance(event, Connected):
                observer.subscribe(topics.metrics(), qos=1)
            elif isinstance(event, MessageReceived) and event.payload:
                summary = codec.decode_body(codec.decode(event.payload), RoundSummary)
                with self.observed.lock:
                    self.observed.summaries[summary.round] = summary

        observer.start(on_event)

    # ---- faults --------------------------------------------------------------------------

    def start(self, name: str) -> None:
        self.group.start(name, self.argv[name])

    def kill(self, name: str) -> None:
        """SIGKILL, no goodbye: the process's whole group, as a crash or an OOM kill."""
        child = self.group.children[name]
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.proc.wait()

    def restart_broker(self) -> None:
        assert self.broker is not None
        self.broker.restart()

    # ---- what happened -------------------------------------------------------------------

    def url_for(self, device: str) -> str:
        assert self.broker is not None and self.proxy is not None
        port = self.proxy.port if device == self.partitioned_device else self.broker.port
        return f"mqtts://127.0.0.1:{port}"

    def store(self, device: str) -> Path:
        return self.work / f"store-{device}.db"

    def committed(self) -> list[dict[str, Any]]:
        """The aggregator's committed rounds (history.jsonl entries, oldest first)."""
        path = self.work / "aggregator-state" / "history.jsonl"
        entries: dict[int, dict[str, Any]] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written
            entries[int(record["n"])] = record["entry"]
        return [entries[n] for n in sorted(entries)]

    def log(self, name: str) -> str:
        return self.group.children[name].output()

    def sent(self) -> list[Sent]:
        """Every fresh update (its own message id) each gateway logged as sent."""
        out = []
        for device in self.devices:
            for m in UPDATE_SENT.finditer(self.log(f"edge-{device}")):
                out.append(Sent(device, int(m.group(1)), int(m.group(3))))
        return out

    def rejected(self) -> list[tuple[str, int, str]]:
        return [(m.group(1), int(m.group(2)), m.group(3))
                for m in REJECTED.finditer(self.log("aggregator"))]

    def quorum_missed(self) -> list[int]:
        return [int(m.group(1)) for m in QUORUM_MISSED.finditer(self.log("aggregator"))]

    def announced(self) -> int:
        """The newest training round the aggregator announced (0: none yet)."""
        found = ANNOUNCED.findall(self.log("aggregator"))
        return int(found[-1]) if found else 0

    def lineages(self) -> int:
        return self.log("aggregator").count("new lineage ")

    def summaries(self) -> dict[int, RoundSummary]:
        with self.observed.lock:
            return dict(self.observed.summaries)

    def store_gaps(self, device: str) -> tuple[int, int]:
        """(records the store holds, records missing between its first and last): the
        turbine numbers its rows, so a record number never written is a lost sample."""
        with sqlite3.connect(f"file:{self.store(device)}?mode=ro", uri=True, timeout=10) as conn:
            rows = conn.execute(
                "SELECT DISTINCT CAST(value AS INTEGER) FROM samples JOIN signals ON signals.id = samples.signal"
                " WHERE signals.name = 'row_seq'").fetchall()
        seqs = sorted(r[0] for r in rows)
        if not seqs:
            return 0, 0
        return len(seqs), seqs[-1] - seqs[0] + 1 - len(seqs)

    def wait_ready(self, rounds: int, timeout: float) -> None:
        """Until ``rounds`` training rounds committed with every gateway in the last one."""
        def done() -> bool:
            c = self.committed()
            return len(c) >= rounds and c[-1]["participants"] == len(self.devices)
        wait_for(f"{rounds} rounds with every gateway", done, timeout, every=0.2,
                 group=self.group, alive=["aggregator"])

    # ---- configs -------------------------------------------------------------------------

    def _identity(self, bundle: Path, url: str, client_id: str) -> str:
        return f"""[broker]
url = "{url}"
client_id = "{client_id}"
ca_file = "{bundle / 'ca.crt'}"
cert_file = "{bundle / 'client.crt'}"
key_file = "{bundle / 'client.key'}"
[security]
keyring = "{bundle / 'keyring.json'}"
revocations = "{bundle / 'revoked.json'}"
signing_key = "{bundle / 'signing.key'}"
"""

    def _edge_toml(self, device: str) -> str:
        return f"""[device]
id = "{device}"
fleet = "{FLEET}"
task = "{TASK}"
{self._identity(self.fleet_dir / 'devices' / device, self.url_for(device), device)}
[data]
source = "store"
store = "{self.store(device)}"
device = "turbine"
task = "regression"
features = {FEATURES}
target = "P_avg"
time_signal = "row_time"
record_signal = "row_seq"
exclude_when = ["P_avg <= 0 and Ws_avg > 4"]
holdout_every = 5
holdout_block_s = 86400
min_rows = {self.options.min_rows}
[data.valid]
Ot_avg = [-40, 50]
Ws_avg = [0, 40]
P_avg = [-100, 2255]
Va_avg = [-180, 180]
[state]
dir = "{self.work / ('edge-' + device)}"
"""

    def _aggregator_toml(self) -> str:
        assert self.broker is not None
        n = len(self.devices)
        return f"""[task]
fleet = "{FLEET}"
name = "{TASK}"
{self._identity(self.fleet_dir / 'aggregator', f'mqtts://127.0.0.1:{self.broker.port}', 'aggregator')}
[model]
layer_sizes = [5, 16, 1]
features = {FEATURES}
target = "P_avg"
scaling = "federated"
[rounds]
rounds = 0
min_participants = {max(1, n - max(1, n // 10))}
round_timeout_s = {self.options.round_timeout_s}
[train]
batch_size = 64
learning_rate = 0.003
optimizer = "adam"
local_epochs = {self.options.local_epochs}
max_steps = {self.options.max_steps}
[schedule]
interval_s = {self.options.interval_s}
[state]
dir = "{self.work / 'aggregator-state'}"
"""


def now() -> float:
    return time.time()
