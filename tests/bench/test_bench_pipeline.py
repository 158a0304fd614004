"""Smoke run of the pipeline bench's harness: real state machines, codec and training, tiny data.

Asserts the byte accounting (every gateway counted every round, up and down; compression
sends fewer bytes than raw fp32; what was counted is what the encoder reports) and that
DP runs are charged in the ledger. No timings are asserted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import msgspec
import numpy as np
import pytest

from aggregator.privacy import PrivacyLedger
from aggregator.rounds import RoundConfig
from fedcore.datasets import default_spec, default_train_config, evaluate_dataset, load_dataset
from fedcore.learning.models import init_params
from fedcore.protocol.messages import PipelineConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("harness")
ROUNDS = 2


@pytest.fixture(scope="module")
def setup():
    dataset = load_dataset("wind", max_rows_per_unit=120, seed=0)
    spec = default_spec(dataset)
    train = msgspec.structs.replace(default_train_config(dataset), max_steps=5)
    start = init_params(spec, np.random.default_rng(0))
    return dataset, spec, train, start


def _run(setup, pipeline: PipelineConfig, ledger=None):
    dataset, spec, train, start = setup
    config = RoundConfig(rounds=ROUNDS, min_participants=len(dataset.units), train=train,
                         pipeline=pipeline)
    return harness.run_federation(
        dataset, spec, config, start, seed=0, ledger=ledger,
        evaluate=lambda p: evaluate_dataset(dataset, spec, p),
    )


def test_every_gateway_is_counted_every_round(setup) -> None:
    dataset = setup[0]
    result = _run(setup, PipelineConfig())
    assert [r.round for r in result.records] == list(range(1, ROUNDS + 1))
    for record in result.records:
        assert set(record.up_bytes) == set(dataset.units) == set(record.down_bytes)
        assert all(b > 0 for b in record.up_bytes.values())
        assert all(b > 0 for b in record.down_bytes.values())
        assert np.isfinite(record.metrics["rmse"])
        assert set(record.pre_clip_norms) == set(dataset.units)
    assert result.rejected == {}
    assert result.final_model_bytes > 0
    # the model moved: training reached the aggregator through the wire
    assert not all(np.array_equal(a, b) for a, b in zip(result.final_weights, setup[3], strict=True))


def test_compression_sends_fewer_bytes_than_raw_fp32(setup) -> None:
    n = sum(int(np.prod(w.shape)) for w in setup[3])
    raw = _run(setup, PipelineConfig())
    small = _run(setup, PipelineConfig(compression=("topk:0.01", "int8", "zstd")))
    int8 = _run(setup, PipelineConfig(compression=("int8",)))
    # an uncompressed update carries at least the fp32 delta; the envelope adds a little
    assert 4 * n < raw.mean_up() < 4 * n + 1024
    assert small.mean_up() < int8.mean_up() < raw.mean_up()
    assert raw.mean_up() / small.mean_up() > 5
    # downlink is the fp32 model either way (plus the announcement naming the stages)
    assert raw.mean_down() > 4 * n
    assert abs(small.mean_down() - raw.mean_down()) < 64


def test_counted_update_bytes_match_what_the_encoder_reports(setup) -> None:
    result = _run(setup, PipelineConfig(compression=("int8", "zstd")))
    for record in result.records:
        assert set(record.delta_bytes) == set(record.up_bytes)
        for device, counted in record.up_bytes.items():
            # the envelope wraps the encoded delta, whose size the pipeline reports itself;
            # the rest is the header, ids and a few stats
            delta = record.delta_bytes[device]
            assert 0 < delta < counted < delta + 512


def test_dp_run_is_charged_in_the_ledger(setup) -> None:
    dataset = setup[0]
    ledger = PrivacyLedger(100.0, 1e-5, "stop")
    result = _run(setup, PipelineConfig(clip_norm=0.1, noise_multiplier=1.0), ledger=ledger)
    assert set(result.records[-1].epsilon) == set(dataset.units)
    assert all(ledger.releases(d) == ROUNDS for d in dataset.units)
    eps = [r.epsilon[next(iter(dataset.units))] for r in result.records]
    assert 0 < eps[0] < eps[-1] <= 100.0
    # under DP the gateways keep their clear pre-clip norms to themselves
    assert all(not r.pre_clip_norms for r in result.records)


def test_rounds_to_95_is_the_first_round_within_5_percent() -> None:
    bench = _load("bench_pipeline")
    assert bench.rounds_to_95([100.0, 60.0, 52.0, 50.0]) == 3
    assert bench.rounds_to_95([50.0, 80.0, 50.0]) == 1
    assert bench.rounds_to_95([30.0, 20.0]) == 2
