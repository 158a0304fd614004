"""The aggregator's writes to its state folder, and what a refused write does.

The checkpoint comes first and must succeed before anything that depends on it goes out
(the runtime holds those actions until :meth:`StateWriter.checkpoint` returns True). The
model file of each checkpointed version follows once the model is out
(:meth:`StateWriter.model_files`); a refused one is kept by version and written later,
oldest first, none forgotten (bounded by ``keep_models``). Either failure is logged once,
exported as ``fedgate_state_write_failing`` and retried every ``RETRY_WRITE_S``
(:meth:`StateWriter.may_retry`): a full disk holds the run, it does not crash it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import checkpoint as checkpoints
from aggregator.rounds import Checkpoint

log = logging.getLogger("fedgate.aggregator")

RETRY_WRITE_S = 5.0


class StateWriter:
    def __init__(self, state_dir: Path, keep_models: int, metrics: Any, clock: Callable[[], float]) -> None:
        self.state_dir = state_dir
        self.keep_models = keep_models
        self.metrics = metrics  # AggregatorMetrics or None
        self.clock = clock
        self.failed_at = 0.0  # when the last write was refused (0: writes succeed)
        self.models_due: dict[int, list[np.ndarray]] = {}

    def may_retry(self, now: float) -> bool:
        """Writes may be tried now: none was refused, or the last refusal is RETRY_WRITE_S old."""
        return now - self.failed_at >= RETRY_WRITE_S

    def checkpoint(self, checkpoint: Checkpoint, round_: int) -> bool:
        """Write the checkpoint; False when the disk refused it (logged once)."""
        try:
            checkpoints.save(self.state_dir, checkpoint)
        except OSError as exc:
            if not self.failed_at:
                log.error("cannot write the checkpoint to %s: %s; holding round %d until it can "
                          "be written (retrying every %.0f s)", self.state_dir,
                          exc.strerror or exc, round_, RETRY_WRITE_S)
            self._failing()
            return False
        self.models_due[int(checkpoint.meta["version"])] = checkpoint.weights
        while len(self.models_due) > max(1, self.keep_models):
            lost = min(self.models_due)
            del self.models_due[lost]
            log.error("model file %d was never written (the disk refused it); it is not kept", lost)
        if self.failed_at:  # the model files due are tried right after
            log.warning("the checkpoint is written again; resuming")
            self._written()
        return True

    def model_files(self, protect: set[int]) -> None:
        """The model files of the checkpoints written, oldest first, then the pruning of old
        ones (``protect``: versions the deployment still needs)."""
        if not self.models_due:
            return
        try:
            for version in sorted(self.models_due):
                checkpoints.save_model(self.state_dir, version, self.models_due[version])
                del self.models_due[version]
            checkpoints.prune_models(self.state_dir, self.keep_models, protect)
        except OSError as exc:
            if not self.failed_at:
                log.error("cannot write model file %d to %s: %s (retrying every %.0f s)",
                          min(self.models_due), self.state_dir, exc.strerror or exc, RETRY_WRITE_S)
            self._failing()
            return
        if self.failed_at:
            log.warning("model files are written again")
            self._written()

    def _failing(self) -> None:
        self.failed_at = self.clock()
        if self.metrics is not None:
            self.metrics.disk_full.set(1)

    def _written(self) -> None:
        self.failed_at = 0.0
        if self.metrics is not None:
            self.metrics.disk_full.set(0)
