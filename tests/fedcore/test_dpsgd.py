"""DP-SGD on the gateway: per-example gradients, clipping, noise, sampling, and the plain path."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import pytest

from fedcore.learning.models import init_params, loss_and_grads
from fedcore.learning.training import train_local
from fedcore.privacy.dpsgd import (
    clipped_grad_sum,
    dp_steps,
    noisy_gradient,
    per_example_grads,
    sampling_rate,
)
from fedcore.protocol.messages import ModelSpec, TrainConfig

REGRESSION = ModelSpec(kind="mlp", layer_sizes=(5, 8, 4, 2), activation="relu", task="regression")
CLASSIFIER = ModelSpec(kind="mlp", layer_sizes=(4, 6, 3), activation="tanh", task="classification")
AUTOENCODER = ModelSpec(kind="autoencoder", layer_sizes=(4, 2, 4), activation="tanh", task="anomaly")


def _data(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, spec.layer_sizes[0]))
    if spec.kind == "autoencoder":
        return x, None
    if spec.task == "classification":
        return x, rng.integers(0, spec.layer_sizes[-1], size=n)
    return x, rng.normal(size=(n, spec.layer_sizes[-1]))


def _params64(spec: ModelSpec, seed: int = 1) -> list[np.ndarray]:
    return [p.astype(np.float64) for p in init_params(spec, np.random.default_rng(seed))]


@pytest.mark.parametrize("spec", [REGRESSION, CLASSIFIER, AUTOENCODER], ids=["reg", "cls", "ae"])
def test_per_example_grads_equal_single_example_loop(spec: ModelSpec) -> None:
    params = _params64(spec)
    x, y = _data(spec, 7)
    batched = per_example_grads(spec, params, x, y)
    for i in range(x.shape[0]):
        _, single = loss_and_grads(spec, params, x[i : i + 1], None if y is None else y[i : i + 1])
        for got, want in zip(batched, single, strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", [REGRESSION, CLASSIFIER], ids=["reg", "cls"])
def test_clipped_sum_matches_explicit_clipping_and_norms_are_exact(spec: ModelSpec) -> None:
    params = _params64(spec)
    x, y = _data(spec, 9)
    per = per_example_grads(spec, params, x, y)
    norms = np.sqrt(sum(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in per))
    clip = float(np.median(norms))  # about half of the examples get clipped
    result = clipped_grad_sum(spec, params, x, y, clip)
    np.testing.assert_allclose(result.norms, norms, rtol=1e-10)
    scale = np.minimum(1.0, clip * (1 - 1e-6) / norms)  # the module shaves 1e-6 (float32 safety)
    for i in range(x.shape[0]):
        clipped_norm = np.sqrt(sum(np.sum((g[i] * scale[i]) ** 2) for g in per))
        assert clipped_norm <= clip * (1 + 1e-12)
    assert (norms > clip).any() and (norms < clip).any()
    for got, g in zip(result.grads, per, strict=True):
        want = np.einsum("n,n...->...", scale, g)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_each_example_contributes_at_most_the_clip_norm() -> None:
    """Sensitivity: removing one record changes the clipped sum by <= C (float32 training)."""
    params = init_params(REGRESSION, np.random.default_rng(3))
    x, y = _data(REGRESSION, 20, seed=4)
    x, y = 50 * x.astype(np.float32), y.astype(np.float32)  # large gradients: all clipped
    clip = 0.5
    full = clipped_grad_sum(REGRESSION, params, x, y, clip)
    assert (full.norms > clip).all()
    for i in range(x.shape[0]):
        keep = np.arange(x.shape[0]) != i
        less = clipped_grad_sum(REGRESSION, params, x[keep], y[keep], clip)
        change = np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2)
                             for a, b in zip(full.grads, less.grads, strict=True)))
        assert change <= clip * (1 + 1e-4)


def test_noise_std_of_the_summed_gradient_is_sigma_times_clip() -> None:
    params = _params64(REGRESSION)
    x, y = _data(REGRESSION, 16)
    clip, sigma, batch = 0.7, 1.3, 16.0
    rng = np.random.default_rng(5)
    clean = clipped_grad_sum(REGRESSION, params, x, y, clip).grads
    draws = []
    for _ in range(200):
        _, noisy = noisy_gradient(REGRESSION, params, x, y, clip, sigma, batch, rng)
        draws.append(np.concatenate([(b * batch - c).ravel() for b, c in zip(noisy, clean, strict=True)]))
    noise = np.stack(draws)  # 200 x 98 samples of the noise alone
    assert abs(noise.mean()) < 0.02
    assert noise.std() == pytest.approx(sigma * clip, rel=0.02)


def test_empty_batch_is_pure_noise() -> None:
    params = _params64(REGRESSION)
    x, y = _data(REGRESSION, 0)
    loss, grads = noisy_gradient(REGRESSION, params, x, y, 1.0, 2.0, 4.0, np.random.default_rng(0))
    assert np.isnan(loss)
    assert all(np.abs(g).sum() > 0 for g in grads)
    _, silent = noisy_gradient(REGRESSION, params, x, y, 1.0, 0.0, 4.0, np.random.default_rng(0))
    assert all(not g.any() for g in silent)


def test_steps_and_sampling_rate_follow_the_config() -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=64, max_steps=0)
    assert dp_steps(1000, cfg) == 2 * 16
    assert dp_steps(1000, msgspec.structs.replace(cfg, max_steps=20)) == 20
    assert sampling_rate(1000, cfg) == 0.064
    assert sampling_rate(10, cfg) == 1.0


def _train(cfg: TrainConfig, seed: int = 0) -> tuple[list[np.ndarray], object]:
    params = init_params(REGRESSION, np.random.default_rng(1))
    x, y = _data(REGRESSION, 300, seed=2)
    return train_local(REGRESSION, params, x, y, cfg, np.random.default_rng(seed))


def test_dp_off_is_bit_identical_to_the_plain_path() -> None:
    old_wire = msgspec.msgpack.encode(TrainConfig(local_epochs=2, batch_size=32, learning_rate=0.05))
    fields = msgspec.msgpack.decode(old_wire)
    assert fields[5:7] == [0.0, 0.0]  # the DP fields follow the five original ones
    plain = TrainConfig(local_epochs=2, batch_size=32, learning_rate=0.05)
    explicit = msgspec.structs.replace(plain, dp_clip=0.0, dp_noise=0.0)
    # reference: the loop the plain path has always run, with the same generator
    params = init_params(REGRESSION, np.random.default_rng(1))
    x, y = _data(REGRESSION, 300, seed=2)
    x, y = x.astype(np.float32), y.astype(np.float32)
    rng = np.random.default_rng(0)
    w = [p.copy() for p in params]
    for _ in range(2):
        order = rng.permutation(300)
        for start in range(0, 300, 32):
            idx = order[start : start + 32]
            _, g = loss_and_grads(REGRESSION, w, x[idx], y[idx])
            w = [a - np.float32(0.05) * b for a, b in zip(w, g, strict=True)]
    for cfg in (plain, explicit):
        got, result = _train(cfg)
        for a, b in zip(got, w, strict=True):
            np.testing.assert_array_equal(a, b)
        assert result.steps == 20  # type: ignore[attr-defined]


def test_dp_training_takes_the_accounted_steps_and_is_seeded() -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=32, learning_rate=0.05, dp_clip=1.0, dp_noise=1.1)
    a, result = _train(cfg, seed=7)
    b, _ = _train(cfg, seed=7)
    c, _ = _train(cfg, seed=8)
    assert result.steps == dp_steps(300, cfg) == 20  # type: ignore[attr-defined]
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    plain, _ = _train(TrainConfig(local_epochs=2, batch_size=32, learning_rate=0.05), seed=7)
    assert not all(np.array_equal(p, q) for p, q in zip(a, plain, strict=True))


def test_dp_training_with_noise_still_learns() -> None:
    params = init_params(REGRESSION, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = np.stack([x[:, 0] - x[:, 1], 0.5 * x[:, 2]], axis=1).astype(np.float32)
    cfg = TrainConfig(local_epochs=10, batch_size=32, learning_rate=0.03, optimizer="adam",
                      dp_clip=1.0, dp_noise=0.5)
    before, _ = loss_and_grads(REGRESSION, params, x, y)
    trained, _ = train_local(REGRESSION, params, x, y, cfg, np.random.default_rng(0))
    after, _ = loss_and_grads(REGRESSION, trained, x, y)
    assert after < 0.1 * before


def test_noise_without_clip_is_refused() -> None:
    with pytest.raises(ValueError, match="dp_clip"):
        _train(TrainConfig(dp_noise=1.0))


def test_training_module_does_not_import_scipy() -> None:
    code = ("import sys, fedcore.learning.training, fedcore.privacy.dpsgd; "
            "bad = [m for m in ('scipy', 'dp_accounting') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
