"""Binding a configured rule to the round machine: FLTrust gets the aggregator's root update."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.fusion import make_fuse


def test_fltrust_uses_the_server_update_from_the_held_weights() -> None:
    held = [np.zeros(2, np.float32)]
    calls: list[list[np.ndarray]] = []

    def server_update(weights: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(weights)
        return [np.array([1.0, 0.0], np.float32)]

    fuse = make_fuse("fltrust", {}, server_update)
    honest = [np.array([2.0, 0.1], np.float32)]
    liar = [np.array([-50.0, 0.0], np.float32)]  # points against the root update: trust 0
    fused = fuse([honest, liar], [1.0, 1.0], held)
    assert calls and calls[0] is held
    # only the honest update counts, rescaled to the server update's norm
    assert fused[0][0] > 0 and np.linalg.norm(fused[0]) <= 1.0 + 1e-5


def test_fltrust_without_root_data_is_refused() -> None:
    with pytest.raises(ValueError, match="root data"):
        make_fuse("fltrust", {})
