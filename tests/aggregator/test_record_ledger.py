"""Record-level (DP-SGD) accounting on the aggregator: calibration, epsilon, per-gateway ledger."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest

from aggregator.config import load_aggregator_config
from aggregator.main import make_ledger, with_calibrated_noise
from aggregator.privacy import (
    PrivacyLedger,
    epsilon_spent,
    record_charge,
    record_epsilon,
    record_noise_multiplier_for,
)
from aggregator.rounds import (
    DeviceOnline,
    RoundConfig,
    RoundStateMachine,
    Started,
    UpdateAccepted,
    UpdateReceived,
    UpdateRejected,
)
from fedcore.errors import ConfigError
from fedcore.learning.models import init_params
from fedcore.protocol.messages import (
    EncodedDelta,
    ModelSpec,
    ModelUpdate,
    PipelineConfig,
    TrainConfig,
)
from fedcore.protocol.tensors import encode_tensors

DELTA = 1e-5
TRAIN = TrainConfig(local_epochs=1, batch_size=64, learning_rate=0.003, optimizer="adam",
                    max_steps=500, dp_clip=1.0)


def test_epsilon_grows_with_steps_and_falls_with_sigma() -> None:
    q = 64 / 8000
    by_steps = [epsilon_spent(1.1, q, t, DELTA) for t in (100, 500, 2500)]
    assert by_steps[0] < by_steps[1] < by_steps[2]
    by_sigma = [epsilon_spent(z, q, 2500, DELTA) for z in (0.8, 1.1, 2.0)]
    assert by_sigma[0] > by_sigma[1] > by_sigma[2]


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibration_hits_the_target_within_two_percent(target: float) -> None:
    z = record_noise_multiplier_for(target, DELTA, TRAIN, rounds=20, min_records=8000)
    train = msgspec.structs.replace(TRAIN, dp_noise=z)
    eps = record_epsilon(train, 8000, 20, DELTA)
    assert eps <= target
    assert eps >= 0.98 * target


def test_more_records_than_the_calibration_bound_cost_less() -> None:
    z = record_noise_multiplier_for(2.0, DELTA, TRAIN, rounds=20, min_records=1000)
    train = msgspec.structs.replace(TRAIN, dp_noise=z)
    spent = [record_epsilon(train, n, 20, DELTA) for n in (1000, 4000, 30000)]
    assert spent[0] <= 2.0 and spent[1] < spent[0] and spent[2] < spent[1]


def test_charge_is_the_training_schedule() -> None:
    assert record_charge(TRAIN, 8000) == (0.008, 125)
    assert record_charge(TRAIN, 100000) == (0.00064, 500)  # max_steps caps the round
    assert record_charge(TRAIN, 10) == (1.0, 1)


def test_ledger_charges_each_gateway_with_its_own_rate() -> None:
    ledger = PrivacyLedger(100.0, DELTA, "stop", level="record")
    z = 1.1
    for _ in range(3):
        for device, n in (("small", 2000), ("large", 20000)):
            q, steps = record_charge(TRAIN, n)
            ledger.record(device, z, q, steps)
    small = epsilon_spent(z, 64 / 2000, 3 * 32, DELTA)
    large = epsilon_spent(z, 64 / 20000, 3 * 313, DELTA)
    assert ledger.epsilon("small") == pytest.approx(small)
    assert ledger.epsilon("large") == pytest.approx(large)
    assert large < small
    back = PrivacyLedger.from_dict(ledger.to_dict())
    assert back.level == "record" and back.spent() == ledger.spent()


def test_check_counts_all_steps_of_the_next_update() -> None:
    q, steps = record_charge(TRAIN, 2000)
    one_round = epsilon_spent(1.0, q, steps, DELTA)
    ledger = PrivacyLedger(1.1 * one_round, DELTA, "stop", level="record")
    assert ledger.check("g", 1.0, q, steps).allowed
    ledger.record("g", 1.0, q, steps)
    decision = ledger.check("g", 1.0, q, steps)
    assert not decision.allowed and "excluded" in decision.alert
    assert ledger.check("g", 1.0, q, 1).allowed  # one step alone would still fit
    assert decision.epsilon_after == pytest.approx(epsilon_spent(1.0, q, 2 * steps, DELTA))


def test_old_ledger_state_without_a_level_loads_as_update_level() -> None:
    data = PrivacyLedger(2.0, DELTA).to_dict()
    del data["level"]
    assert PrivacyLedger.from_dict(data).level == "update"


SPEC = ModelSpec(kind="mlp", layer_sizes=(3, 4, 1), activation="relu", task="regression")


def _update(num_samples: int) -> ModelUpdate:
    params = init_params(SPEC, np.random.default_rng(0))
    delta = EncodedDelta((), tuple(p.shape for p in params),
                         encode_tensors([np.zeros_like(p) for p in params]))
    return ModelUpdate(round=1, base_version=0, num_samples=num_samples, delta=delta)


def _machine(train: TrainConfig, ledger: PrivacyLedger) -> RoundStateMachine:
    config = RoundConfig(rounds=2, min_participants=3, train=train)
    params = init_params(SPEC, np.random.default_rng(0))
    machine = RoundStateMachine(config, SPEC, params, random.Random(1), ledger=ledger)
    machine.handle(Started(0.0))
    for device in ("a", "b", "c"):
        machine.handle(DeviceOnline(0.0, device))
    return machine


def test_round_machine_charges_record_level_from_num_samples() -> None:
    train = msgspec.structs.replace(TRAIN, dp_noise=1.1)
    ledger = PrivacyLedger(100.0, DELTA, "stop", level="record")
    machine = _machine(train, ledger)
    for device, n in (("a", 2000), ("b", 20000)):
        actions = machine.handle(UpdateReceived(1.0, device, f"id-{device}", _update(n)))
        assert any(isinstance(a, UpdateAccepted) for a in actions)
    assert ledger.epsilon("a") == pytest.approx(epsilon_spent(1.1, 64 / 2000, 32, DELTA))
    assert ledger.epsilon("b") == pytest.approx(epsilon_spent(1.1, 64 / 20000, 313, DELTA))


def test_round_machine_refuses_a_record_level_update_over_budget() -> None:
    train = msgspec.structs.replace(TRAIN, dp_noise=1.1)
    q, steps = record_charge(train, 500)
    ledger = PrivacyLedger(0.5 * epsilon_spent(1.1, q, steps, DELTA), DELTA, "stop", level="record")
    machine = _machine(train, ledger)
    actions = machine.handle(UpdateReceived(1.0, "a", "id-a", _update(500)))
    assert [a.reason for a in actions if isinstance(a, UpdateRejected)] == ["budget_spent"]
    assert ledger.epsilon("a") == 0.0


def test_update_level_charging_is_unchanged_without_record_noise() -> None:
    ledger = PrivacyLedger(100.0, DELTA, "stop")
    config = RoundConfig(rounds=2, min_participants=3, train=TRAIN,
                         pipeline=PipelineConfig(clip_norm=1.0, noise_multiplier=2.0))
    machine = RoundStateMachine(config, SPEC, init_params(SPEC, np.random.default_rng(0)),
                                random.Random(1), ledger=ledger)
    machine.handle(Started(0.0))
    machine.handle(DeviceOnline(0.0, "a"))
    machine.handle(UpdateReceived(1.0, "a", "id-a", _update(2000)))
    assert ledger.releases("a") == 1
    assert ledger.epsilon("a") == pytest.approx(epsilon_spent(2.0, 1.0, 1, DELTA))


RECORD_CONFIG = """
[task]
fleet = "plant1"
name = "wind"
[model]
layer_sizes = [5, 32, 16, 1]
scaling = "none"
[rounds]
rounds = 20
[train]
batch_size = 64
max_steps = 500
[pipeline]
target_epsilon = 2.0
dp_level = "record"
min_records = 5000
record_clip = 0.5
"""


def test_record_level_config_calibrates_train_dp_noise(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(RECORD_CONFIG)
    config = with_calibrated_noise(load_aggregator_config(path))
    train = config.rounds.train
    assert train.dp_clip == 0.5 and train.dp_noise > 0
    assert config.rounds.pipeline.noise_multiplier == 0  # no update-level noise on top
    assert record_epsilon(train, 5000, 20, 1e-5) == pytest.approx(2.0, rel=0.02)
    ledger = make_ledger(config)
    assert isinstance(ledger, PrivacyLedger) and ledger.level == "record"


@pytest.mark.parametrize("change, key", [
    (('target_epsilon = 2.0\n', ''), "dp_level"),
    (('record_clip = 0.5', 'record_clip = 0.0'), "record_clip"),
    (('dp_level = "record"', 'dp_level = "record"\nclip_norm = 1.0\nnoise_multiplier = 1.0'),
     "noise_multiplier"),
    (('dp_level = "record"', 'dp_level = "sample"'), "dp_level"),
])
def test_bad_record_level_config_names_the_key(tmp_path: Path, change: tuple[str, str], key: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(RECORD_CONFIG.replace(*change))
    with pytest.raises(ConfigError, match=key):
        load_aggregator_config(path)


def test_update_level_stays_the_default(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(RECORD_CONFIG.replace('dp_level = "record"\n', 'clip_norm = 0.3\n'))
    config = with_calibrated_noise(load_aggregator_config(path))
    assert config.privacy.level == "update" and config.rounds.train.dp_noise == 0
    assert config.rounds.pipeline.noise_multiplier > 0
    ledger = make_ledger(config)
    assert isinstance(ledger, PrivacyLedger) and ledger.level == "update"
