"""Running the deployed model on the gateway: int8 .tflite in LiteRT, anomaly scores.

:class:`ModelServer` holds the engine of the model the gateway runs (``edge.deployment``
says which). Loading a model exports it to a full-integer int8 .tflite calibrated on this
gateway's own training rows, writes it to ``state_dir/models/v{version}-{lineage}.tflite`` (the
``keep`` files written last are kept, older ones deleted) and loads it into the interpreter.
:meth:`score` runs the newest rows through it: the anomaly scores, with an alert threshold
at the 99th percentile of the scores on the calibration rows, go into a telemetry body.

A file that cannot be written (a full disk) is logged; the model still runs from memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.inference import InferenceEngine, anomaly_scores, telemetry
from fedcore.learning.params import Params
from fedcore.protocol.messages import ModelSpec, Telemetry

log = logging.getLogger("fedgate.edge")
CALIBRATION_ROWS = 512
SCORED_ROWS = 256


class ModelServer:
    def __init__(self, folder: Path, keep: int = 3) -> None:
        self.folder = folder
        self.keep = keep
        self.version = -1
        self.loaded: tuple[str, int] = ("", -1)  # (lineage, version): versions repeat across lineages
        self.spec: ModelSpec | None = None
        self.engine: InferenceEngine | None = None
        self.threshold: float | None = None
        self.size = 0

    def reset(self) -> None:
        """Forget the running model (a new lineage)."""
        self.version, self.loaded, self.engine, self.spec = -1, ("", -1), None, None

    def load(self, spec: ModelSpec, lineage: str, version: int, weights: Params,
             x_train: np.ndarray, y_train: np.ndarray | None, target_scale: float) -> None:
        """Export and load ``weights``; raises on a model LiteRT refuses."""
        from fedcore.learning.tflite_export import export_int8

        calibration = x_train[-CALIBRATION_ROWS:]
        tflite = export_int8(spec, weights, calibration_x=calibration)
        engine = InferenceEngine.from_bytes(tflite)
        self._write(f"v{version}-{lineage or 'none'}.tflite", tflite)
        observed = None if y_train is None else y_train[-CALIBRATION_ROWS:]
        reference = anomaly_scores(spec, engine.predict(calibration), calibration, observed) * target_scale
        self.threshold = float(np.percentile(reference, 99)) if reference.size else None
        self.engine, self.spec, self.version, self.size = engine, spec, version, len(tflite)
        self.loaded = (lineage, version)

    def score(self, x: np.ndarray, y: np.ndarray | None, target_scale: float) -> Telemetry | None:
        """Telemetry for the newest rows ``x`` (scaled), or None when nothing is loaded."""
        if self.engine is None or self.spec is None or len(x) == 0:
            return None
        x, y = x[-SCORED_ROWS:], None if y is None else y[-SCORED_ROWS:]
        scores = anomaly_scores(self.spec, self.engine.predict(x), x, y) * target_scale
        return telemetry(self.version, scores, self.threshold)

    def _write(self, name: str, tflite: bytes) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(tflite)
            files = sorted(self.folder.glob("v*.tflite"), key=lambda p: p.stat().st_mtime_ns)
            for old in files[: max(0, len(files) - self.keep)]:  # the oldest written go
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot write %s/%s: %s; the model runs from memory", self.folder, name,
                      exc.strerror or exc)
