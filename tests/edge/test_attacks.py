"""Attack transforms against hand-computed cases, and the gateway-facing attack objects."""

from __future__ import annotations

import numpy as np
import pytest

from edge import attacks
from fedcore.protocol.messages import ModelSpec

BASE = [np.array([1.0, 1.0], np.float32)]
TRAINED = [np.array([2.0, 0.0], np.float32)]  # delta [1, -1]
REGRESSION = ModelSpec(kind="mlp", layer_sizes=(3, 4, 1), task="regression")
CLASSIFIER = ModelSpec(kind="mlp", layer_sizes=(3, 4, 3), task="classification")
AUTOENCODER = ModelSpec(kind="autoencoder", layer_sizes=(3, 2, 3), task="anomaly")


def sent(name: str, **params: float) -> list[float]:
    attack = attacks.make_attack(name, np.random.default_rng(0), **params)
    return attack.poison_weights(BASE, TRAINED)[0].tolist()


def test_sign_flip_and_scale_act_on_the_delta_not_the_weights() -> None:
    assert sent("sign_flip") == [0.0, 2.0]  # 1 - 1, 1 + 1
    assert sent("sign_flip", factor=3.0) == [-2.0, 4.0]
    assert sent("scale") == [11.0, -9.0]  # 1 + 10, 1 - 10
    assert sent("scale", factor=2.0) == [3.0, -1.0]


def test_gaussian_noise_has_the_asked_spread_and_follows_the_seed() -> None:
    delta = [np.zeros((100, 100), np.float32)]
    a = attacks.gaussian_noise(delta, np.random.default_rng(5), std=0.5)
    b = attacks.gaussian_noise(delta, np.random.default_rng(5), std=0.5)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].dtype == np.float32
    assert float(a[0].std()) == pytest.approx(0.5, rel=0.03)
    assert abs(float(a[0].mean())) < 0.02


def test_label_flip_mirrors_classes_and_negates_regression_targets() -> None:
    x = np.zeros((3, 3), np.float32)
    attack = attacks.make_attack("label_flip", np.random.default_rng(0))
    _, y = attack.poison_data(CLASSIFIER, x, np.array([0, 1, 2]))
    assert y.tolist() == [2, 1, 0]
    _, y = attack.poison_data(REGRESSION, x, np.array([0.5, -1.0, 2.0], np.float32))
    assert y.tolist() == [-0.5, 1.0, -2.0]
    assert attack.poison_weights(BASE, TRAINED) is TRAINED
    with pytest.raises(ValueError, match="autoencoder"):
        attack.poison_data(AUTOENCODER, x, x)


def test_delta_attacks_leave_the_data_alone() -> None:
    x, y = np.ones((2, 3), np.float32), np.array([1.0, 2.0], np.float32)
    attack = attacks.make_attack("scale", np.random.default_rng(0))
    assert attack.poison_data(REGRESSION, x, y) == (x, y)


def test_alie_z_matches_the_paper_formula() -> None:
    # n = 10, m = 2: s = 6 - 2 = 4, Phi^-1(6/10) = 0.2533
    assert attacks.alie_z(10, 2) == pytest.approx(0.253347, abs=1e-5)
    # n = 8, m = 2: s = 3, Phi^-1(5/8) = 0.3186
    assert attacks.alie_z(8, 2) == pytest.approx(0.318639, abs=1e-5)
    with pytest.raises(ValueError):
        attacks.alie_z(10, 0)


def test_little_is_enough_hand_case() -> None:
    benign = [[np.array([1.0, -1.0], np.float32)], [np.array([3.0, -3.0], np.float32)]]
    # mu = [2, -2], sigma = [1, 1]: shift each coordinate 1 sigma against its sign
    assert attacks.little_is_enough(benign, 1.0)[0].tolist() == [1.0, -1.0]
    assert attacks.little_is_enough(benign, 0.5)[0].tolist() == [1.5, -1.5]


def test_little_is_enough_hides_inside_the_benign_spread() -> None:
    rng = np.random.default_rng(2)
    mean = rng.standard_normal(200)
    benign = [[(mean + rng.standard_normal(200)).astype(np.float32)] for _ in range(8)]
    z = attacks.alie_z(10, 2)
    malicious = attacks.little_is_enough(benign, z)[0].astype(np.float64)
    stack = np.stack([b[0] for b in benign]).astype(np.float64)
    mu, sigma = stack.mean(axis=0), stack.std(axis=0)
    assert np.all(np.abs(malicious - mu) <= z * sigma + 1e-5)
    # closer to the benign mean than any benign update is: a distance rule cannot tell
    benign_distances = np.linalg.norm(stack - mu, axis=1)
    assert np.linalg.norm(malicious - mu) < benign_distances.min()
    # yet it points against the honest direction on every coordinate it moves
    moved = np.abs(mu) > 0
    assert np.all(np.sign(malicious - mu)[moved] == -np.sign(mu)[moved])


def test_little_is_enough_local_hand_case() -> None:
    # delta [3, -4]: RMS = sqrt(12.5) = 3.5355; shift each coordinate against its sign
    got = attacks.little_is_enough_local([np.array([3.0, -4.0], np.float32)], z=1.0, spread=1.0)
    assert got[0].tolist() == pytest.approx([3 - 12.5**0.5, -4 + 12.5**0.5], abs=1e-6)
    assert sent("little_is_enough", z=0.5, spread=2.0) == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("flood", {}, "unknown attack 'flood'"),
        ("scale", {"factr": 3}, "'factr'"),
        ("scale", {"factor": "big"}, "'factor'"),
        ("scale", {"factor": True}, "'factor'"),
        ("gaussian_noise", {"std": -1.0}, "'std'"),
        ("label_flip", {"rate": 0.5}, "'rate'"),
    ],
)
def test_bad_attack_names_and_parameters_are_refused(name: str, params: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        attacks.make_attack(name, np.random.default_rng(0), **params)


def test_every_attack_changes_what_is_sent_or_trained_on() -> None:
    x = np.zeros((3, 3), np.float32)
    y = np.array([0.5, -1.0, 2.0], np.float32)
    for name in attacks.ATTACKS:
        attack = attacks.make_attack(name, np.random.default_rng(0))
        weights = attack.poison_weights(BASE, TRAINED)
        _, y_used = attack.poison_data(REGRESSION, x, y)
        assert not np.array_equal(weights[0], TRAINED[0]) or not np.array_equal(y_used, y), name
