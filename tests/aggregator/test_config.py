"""The aggregator's config loader: errors name file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import load_aggregator_config
from fedcore.errors import ConfigError

GOOD = """
[task]
fleet = "plant1"
name = "wind"
[model]
layer_sizes = [5, 32, 16, 1]
scaling = "none"
[rounds]
rounds = 3
[fusion]
rule = "trimmed_mean"
trim_fraction = 0.2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    return path


def test_a_good_config_loads_into_frozen_objects(tmp_path: Path) -> None:
    cfg = load_aggregator_config(write(tmp_path, GOOD))
    assert cfg.fleet == "plant1" and cfg.rounds.rounds == 3
    assert cfg.spec.layer_sizes == (5, 32, 16, 1)
    assert cfg.fusion.rule == "trimmed_mean" and cfg.fusion.params == {"trim_fraction": 0.2}
    assert cfg.state_dir == tmp_path / "aggregator-state"
    with pytest.raises(AttributeError):
        cfg.fleet = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("rounds = 3", "rounds = -1"), "rounds.rounds", "must be >= 0"),
        (("[rounds]", "[schedule]\nwindows = [\"25:00-06:00\"]\n[rounds]"), "schedule.windows", "HH:MM-HH:MM"),
        (("[rounds]", "[schedule]\ntimezone = \"Mars/Olympus\"\n[rounds]"), "schedule.timezone", "unknown timezone"),
        (("[rounds]", "[deploy]\npolicy = \"yolo\"\n[rounds]"), "deploy.policy", "must be one of"),
        (("scaling = \"none\"", "scaling = \"federated\""), "model.features", "feature names"),
        (("rounds = 3", "roundz = 3"), "rounds.roundz", "unknown key"),
        (('fleet = "plant1"', 'fleet = "plant/1"'), "task.fleet", "letters, digits"),
        (('rule = "trimmed_mean"', 'rule = "mean-ish"'), "fusion.rule", "mean-ish"),
        (("trim_fraction = 0.2", "trim_fraction = 0.7"), "fusion.rule", "trim_fraction"),
        (("layer_sizes = [5, 32, 16, 1]", "layer_sizes = [5]"), "model.layer_sizes", "at least two"),
        (("[rounds]", "[pipeline]\nnoise_multiplier = 1.0\n[rounds]"), "pipeline.noise_multiplier", "clip_norm"),
        (("[rounds]", '[pipeline]\ncompression = ["gzip"]\n[rounds]'), "pipeline.compression", "gzip"),
        (("[rounds]", "[reputation]\nwindow = 0\n[rounds]"), "reputation.window", ">= 1"),
        (('rule = "trimmed_mean"\ntrim_fraction = 0.2', 'rule = "fltrust"'), "fusion.root_data", "root data"),
        (("rounds = 3", "rounds = 3\nstraggler_factor = nan"), "rounds.straggler_factor", "finite"),
        (("rounds = 3", "rounds = 3\nround_timeout_s = inf"), "rounds.round_timeout_s", "finite"),
        (("rounds = 3", 'rounds = 3\nmode = "buffered"\nmin_interval_s = -1'), "rounds.min_interval_s", ">= 0"),
        (('name = "wind"', 'name = "status"'), "task.name", "branch of the topic tree"),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path: Path, change, key, words) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(path)
    text = str(err.value)
    assert str(path) in text and key in text and words in text


def test_not_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(write(tmp_path, "[task\n"))
    assert "not valid TOML" in str(err.value)


BUFFERED = GOOD.replace('rule = "trimmed_mean"\ntrim_fraction = 0.2', 'rule = "fedavg"').replace(
    "rounds = 3", 'rounds = 3\nmode = "buffered"\nbuffer_size = 4\nmax_staleness = 2\nstaleness_exponent = 1.0')


def test_buffered_rounds_load(tmp_path: Path) -> None:
    rounds = load_aggregator_config(write(tmp_path, BUFFERED)).rounds
    assert rounds.mode == "buffered"
    assert (rounds.buffered.buffer_size, rounds.buffered.max_staleness,
            rounds.buffered.staleness_exponent) == (4, 2, 1.0)
    assert load_aggregator_config(write(tmp_path, GOOD)).rounds.mode == "sync"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (('mode = "buffered"', 'mode = "async"'), "rounds.mode", "'async'"),
        (("buffer_size = 4", "buffer_size = 0"), "rounds.buffer_size", "= 0: must be >= 1"),
        (("max_staleness = 2", "max_staleness = -1"), "rounds.max_staleness", "= -1: must be >= 0"),
        (("staleness_exponent = 1.0", "staleness_exponent = -0.5"), "rounds.staleness_exponent", "= -0.5: must be >= 0"),
        (('mode = "buffered"\n', ""), "rounds.buffer_size", '= 4: is for mode = "buffered" only'),
        (("rounds = 3", "rounds = 3\nmin_participants = 5"), "rounds.min_participants", "= 5: must be <= buffer_size (4)"),
        (("rounds = 3", "rounds = 3\nfraction = 0.5"), "rounds.fraction", "= 0.5: selects a cohort"),
        (('rule = "fedavg"', 'rule = "median"'), "fusion.rule", "'median': needs one round's whole cohort; buffered mode supports fedavg, norm_bound"),
        (("[rounds]", "[schedule]\ninterval_s = 60\n[rounds]"), "schedule.interval_s", "= 60: schedules synchronous rounds"),
    ],
)
def test_buffered_refusals_name_file_key_and_value(tmp_path: Path, change, key, words) -> None:
    path = write(tmp_path, BUFFERED.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(path)
    text = str(err.value)
    assert str(path) in text and key in text and words in text  # words start with the value


def test_the_buffered_example_of_the_configuration_reference_loads(tmp_path: Path) -> None:
    page = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    section = page.split('### Buffered rounds (`[rounds] mode = "buffered"`)', 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    text = GOOD.replace('rule = "trimmed_mean"\ntrim_fraction = 0.2', 'rule = "fedavg"')
    text = text.replace("[rounds]\nrounds = 3\n", "").replace("[fusion]", example + "[fusion]")
    rounds = load_aggregator_config(write(tmp_path, text)).rounds
    assert rounds.mode == "buffered" and rounds.buffered.buffer_size == 10
    assert rounds.min_participants == 2
