"""The gateway agent: the only edge module with clocks, files and the network.

One thread runs the loop: transport events arrive on a queue; messages are decoded and
verified, fed to the pure :class:`Participant`, and its actions carried out. Training runs
inline (it takes seconds; the transport's network thread keeps the connection alive
meanwhile and queues what arrives). Birth and last will go on the status topic, retained.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge import participant as pm
from edge.config import EdgeConfig
from edge.security import EdgeSecurity
from fedcore.errors import RemoteProtocolError
from fedcore.learning.training import evaluate, train_local
from fedcore.protocol import codec
from fedcore.protocol.messages import GlobalModel, Kind, ModelSpec, RoundAnnouncement, Status
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.systemd import SystemdNotifier
from fedcore.transport.base import Connected, Disconnected, MessageReceived, Transport


class Attack(Protocol):
    """A malicious gateway, for attack experiments only (see edge/attacks.py)."""

    def poison_data(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def poison_weights(self, base: list[np.ndarray], trained: list[np.ndarray]) -> list[np.ndarray]: ...

log = logging.getLogger("fedgate.edge")
SOFTWARE = "fedgate-edge/0.1"


@dataclass(frozen=True)
class LocalData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    target_scale: float = 1.0  # regression errors are reported in the target's own unit


def status_payload(
    config: EdgeConfig, security: EdgeSecurity, state: str, model_version: int, now: float
) -> bytes:
    """A signed birth/last-will message for the status topic."""
    body = Status(state=state, software=SOFTWARE, model_version=model_version)
    env = codec.make_envelope(Kind.STATUS, config.fleet, config.task, 0, config.device, body, now)
    return codec.encode(security.sign(env))


class EdgeService:
    def __init__(
        self,
        config: EdgeConfig,
        transport: Transport,
        data: LocalData,
        security: EdgeSecurity,
        encode: pm.EncodeFn = pm.encode_raw,
        attack: Attack | None = None,
        clock: Callable[[], float] = time.time,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.data = data
        self.security = security
        self.clock = clock
        self.notifier = notifier or SystemdNotifier(None)
        self.topics = Topics(config.fleet, config.task)
        self.rng = np.random.default_rng(config.seed)
        self.attack = attack
        self.machine = pm.Participant(config.device, encode=encode)
        self.events: queue.Queue[object] = queue.Queue()
        self.stopping = threading.Event()
        self.rejected: Counter[str] = Counter()
        self.eval_stats: dict[str, float] = {}

    def status_message(self, state: str) -> bytes:
        return status_payload(self.config, self.security, state, self.machine.version, self.clock())

    def run(self) -> int:
        self.transport.start(self.events.put)
        while not self.stopping.is_set():
            self.notifier.watchdog()
            try:
                item = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Connected):
                self._on_connected(item)
            elif isinstance(item, Disconnected):
                log.warning("broker connection lost: %s", item.reason)
            elif isinstance(item, MessageReceived):
                self._on_message(item)
        self.notifier.notify("STOPPING=1")
        self._goodbye()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _goodbye(self) -> None:
        try:
            self.transport.publish(self.topics.status(self.config.device),
                                   self.status_message("offline"), qos=1, retain=True, wait=2.0)
        except Exception as exc:  # the broker may already be gone; the will covers it
            log.info("could not publish offline status: %s", exc)
        self.transport.stop()

    def _on_connected(self, event: Connected) -> None:
        for topic in (self.topics.model(), self.topics.round()):
            self.transport.subscribe(topic, qos=1)
        self.transport.publish(self.topics.status(self.config.device),
                               self.status_message("online"), qos=1, retain=True)
        log.info("connected (session present: %s)", event.session_present)
        self.notifier.notify(f"READY=1\nSTATUS=connected, model version {self.machine.version}")

    def _on_message(self, msg: MessageReceived) -> None:
        now = self.clock()
        try:
            parsed = parse_topic(msg.topic)
            if parsed.kind is TopicKind.MODEL:
                env = self.security.open_from_aggregator(msg.payload, Kind.MODEL)
                model = codec.decode_body(env, GlobalModel)
                self._apply(self.machine.handle(pm.ModelReceived(now, model)))
            elif parsed.kind is TopicKind.ROUND:
                env = self.security.open_from_aggregator(msg.payload, Kind.ROUND)
                ann = codec.decode_body(env, RoundAnnouncement)
                self._apply(self.machine.handle(pm.RoundAnnounced(now, ann)))
        except RemoteProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.warning("rejected message on %s: %s", msg.topic, exc)

    def _apply(self, actions: list[pm.Action]) -> None:
        for action in actions:
            if isinstance(action, pm.InstallModel):
                self._install(action)
            elif isinstance(action, pm.StartTraining):
                self._apply(self.machine.handle(self._train(action)))
            elif isinstance(action, pm.PublishUpdate):
                env = codec.make_envelope(Kind.UPDATE, self.config.fleet, self.config.task,
                                          action.round, self.config.device, action.update,
                                          self.clock(), message_id=action.message_id)
                payload = codec.encode(self.security.sign(env))
                self.transport.publish(self.topics.update(self.config.device), payload, qos=1)
                log.info("round %d: update sent (%d bytes%s)", action.round, len(payload),
                         ", resend" if action.resend else "")
            elif isinstance(action, pm.ModelRefused):
                self.rejected[action.reason] += 1
                log.warning("model version %d refused: %s", action.version, action.reason)
            elif isinstance(action, pm.SatOut):
                log.warning("round %d: sitting out (%s)", action.round, action.reason)

    def _install(self, action: pm.InstallModel) -> None:
        spec = action.model.spec
        self.eval_stats = {}
        if len(self.data.y_test):
            scores = evaluate(spec, action.weights, self.data.x_test, self.data.y_test,
                              target_scale=self.data.target_scale)
            self.eval_stats = {f"eval_{k}": float(v) for k, v in scores.items()}
        log.info("installed model version %d %s", action.model.version, self.eval_stats)
        if self.config.inference:
            self._run_inference(action.model, action.weights)

    def _run_inference(self, model: GlobalModel, weights: list[np.ndarray]) -> None:
        """Export the new model to int8 .tflite, run it with LiteRT on the latest local rows
        and publish the anomaly scores on this gateway's telemetry topic."""
        from edge.inference import InferenceEngine, anomaly_scores, telemetry
        from fedcore.learning.tflite_export import export_int8

        spec = model.spec
        calibration = self.data.x_train[-512:]
        tflite = export_int8(spec, weights, calibration_x=calibration)
        folder = self.config.state_dir / "models"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"v{model.version}.tflite").write_bytes(tflite)
        engine = InferenceEngine.from_bytes(tflite)
        scale = self.data.target_scale
        # alert threshold: the 99th percentile of the scores on this gateway's training rows
        reference = anomaly_scores(spec, engine.predict(calibration), calibration,
                                   self.data.y_train[-512:]) * scale
        threshold = float(np.percentile(reference, 99)) if reference.size else None
        recent_x, recent_y = self.data.x_test[-256:], self.data.y_test[-256:]
        if len(recent_x) == 0:
            return
        scores = anomaly_scores(spec, engine.predict(recent_x), recent_x, recent_y) * scale
        body = telemetry(model.version, scores, threshold)
        env = codec.make_envelope(Kind.TELEMETRY, self.config.fleet, self.config.task,
                                  model.round, self.config.device, body, self.clock())
        self.transport.publish(self.topics.telemetry(self.config.device),
                               codec.encode(self.security.sign(env)), qos=1)
        log.info("model version %d running in LiteRT (int8, %d bytes): %s", model.version,
                 len(tflite), {k: round(v, 3) for k, v in body.values.items()})

    def _train(self, action: pm.StartTraining) -> pm.TrainingFinished | pm.TrainingFailed:
        spec = self.machine.model.spec if self.machine.model else None
        assert spec is not None
        x, y = self.data.x_train, self.data.y_train
        if self.attack is not None:
            x, y = self.attack.poison_data(spec, x, y)
        started = time.perf_counter()
        try:
            weights, result = train_local(spec, action.weights, x, y, action.train, self.rng)
        except ValueError as exc:  # e.g. no training rows yet, or a config it cannot run
            log.error("round %d: local training failed: %s", action.round, exc)
            return pm.TrainingFailed(self.clock(), action.round, f"training failed: {exc}")
        if not np.isfinite(result.loss) or not all(np.isfinite(w).all() for w in weights):
            log.error("round %d: local training diverged (loss %s); sitting this round out",
                      action.round, result.loss)
            return pm.TrainingFailed(self.clock(), action.round, "training diverged")
        if self.attack is not None:
            weights = self.attack.poison_weights(action.weights, weights)
        stats = dict(self.eval_stats)
        stats["train_s"] = time.perf_counter() - started
        return pm.TrainingFinished(self.clock(), action.round, action.base_version, weights,
                                   result.num_samples, result.loss, stats)
