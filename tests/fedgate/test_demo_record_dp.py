"""`fedgate demo --dp-epsilon E --dp-level record`: the configs it writes calibrate DP-SGD."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import load_aggregator_config
from aggregator.main import with_calibrated_noise
from aggregator.privacy import record_epsilon
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.demo_configs import DemoOptions, write_configs


@pytest.mark.parametrize("level", ["record", "update"])
def test_demo_configs_choose_the_dp_level(tmp_path: Path, level: str) -> None:
    dataset = load_dataset("synthetic", gateways=3, max_rows_per_unit=600)
    options = DemoOptions(dataset="synthetic", gateways=3, rounds=5, fleet="test",
                          max_rows_per_unit=600, dp_epsilon=2.0, dp_level=level)
    files = write_configs(tmp_path, "mqtt://127.0.0.1:1883", options, dataset,
                          default_spec(dataset), default_train_config(dataset))
    config = with_calibrated_noise(load_aggregator_config(files.aggregator))
    train, pipeline = config.rounds.train, config.rounds.pipeline
    if level == "record":
        smallest = min(u.num_train for u in dataset.units.values())
        assert config.privacy.min_records == smallest
        assert pipeline.noise_multiplier == 0 and train.dp_clip == 1.0
        assert record_epsilon(train, smallest, 5, 1e-5) == pytest.approx(2.0, rel=0.02)
    else:
        assert train.dp_noise == 0 and pipeline.noise_multiplier > 0
