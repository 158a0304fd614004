"""Synthetic benchmark task: 24-feature, 4-class Gaussian blobs with label skew per gateway.

For measuring the system (round overhead, bytes, robustness), never for accuracy claims.
Four class centres are drawn once from ``N(0, 0.5^2)`` in 24 dimensions; a sample is its
class centre plus unit Gaussian noise (a centralized MLP reaches about 90% accuracy, so
there is room to see a model get worse). Each gateway draws its class proportions from
``Dirichlet(0.5)``: most gateways see mostly one or two classes, the non-IID skew that makes
federated averaging harder than pooled training. Each gateway has 2,000 samples; the last
20% (400) are its test rows. Rows are i.i.d., so which rows go to test does not matter.
Everything is drawn from ``numpy.random.default_rng(seed)``: same seed, same data.
"""

from __future__ import annotations

import numpy as np

from fedcore.datasets.base import DatasetError, FederatedDataset, RawUnit, assemble, split_unit

NUM_FEATURES = 24
NUM_CLASSES = 4
SAMPLES_PER_GATEWAY = 2000
TEST_FRACTION = 0.2
DIRICHLET_ALPHA = 0.5
CENTRE_SCALE = 0.5
DEFAULT_GATEWAYS = 10


def load_synthetic(
    *, gateways: int | None = None, max_rows_per_unit: int | None = None, seed: int = 0
) -> FederatedDataset:
    n_gateways = DEFAULT_GATEWAYS if gateways is None else gateways
    if n_gateways < 1:
        raise DatasetError("synthetic", "gateways", gateways, "must be >= 1")
    n = SAMPLES_PER_GATEWAY if max_rows_per_unit is None else min(max_rows_per_unit, SAMPLES_PER_GATEWAY)
    if n < 5:
        raise DatasetError("synthetic", "max_rows_per_unit", max_rows_per_unit, "must be >= 5")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, CENTRE_SCALE, size=(NUM_CLASSES, NUM_FEATURES))
    n_test = max(1, round(n * TEST_FRACTION))
    order = np.arange(n, dtype=np.float64)
    test = order >= n - n_test
    width = len(str(n_gateways - 1))
    raw: dict[str, RawUnit] = {}
    for g in range(n_gateways):
        proportions = rng.dirichlet(np.full(NUM_CLASSES, DIRICHLET_ALPHA))
        y = rng.choice(NUM_CLASSES, size=n, p=proportions)
        x = centres[y] + rng.standard_normal((n, NUM_FEATURES))
        raw[f"gw{g:0{width}d}"] = split_unit(x, y, order, ~test, test)
    features = tuple(f"f{i:02d}" for i in range(NUM_FEATURES))
    return assemble(
        "synthetic", "classification", features, "class", raw, num_classes=NUM_CLASSES
    )
