from pathlib import Path

import pytest
import tomllib

from haflq_flower.config import DEFAULTS, ConfigError
from haflq_flower.strategy import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def _flatten(prefix: str, table: dict) -> dict:
    out = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        out.update(_flatten(full, value) if isinstance(value, dict) else {full: value})
    return out


def test_defaults_match_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = _flatten("", pyproject["tool"]["flwr"]["app"]["config"])
    assert declared == DEFAULTS


def test_empty_config_takes_defaults():
    cfg = load_run_config({})
    assert cfg.num_rounds == DEFAULTS["num-server-rounds"]
    assert cfg.lora.rank == 8 and cfg.lora.scaling == 16 / 8
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert cfg.output_dir.is_absolute()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("lora.rank", 0, "lora.rank"),
        ("lora.rank", "eight", "must be of type int"),
        ("model.quantization", "3bit", "allowed: none, nf4, fp4, int8"),
        ("data.partitioner", "shards", "allowed: iid, dirichlet"),
        ("strategy.fraction-train", 1.5, "[0, 1]"),
        ("output.dir", "relative/path", "absolute"),
        ("lora.target-modules", " , ", "names no module"),
        ("lora.such-key", 1, "unknown run config key"),
        ("nosection", 1, "unknown run config key"),
        ("blocks.precision", "uniform-3", "allowed: off, uniform-4"),
        ("blocks.salience-metric", "magic", "allowed: gradient, influence, quantization"),
        ("blocks.calibration-rows", 0, "blocks.calibration-rows"),
        ("tiers.memory-mb", "100,200", "tiers.memory-mb has 2 value(s) for 3 tier(s)"),
        ("tiers.memory-mb", "100,-1,300", "'memory-mb' must be a finite number >= 0"),
    ],
)
def test_bad_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_run_config({key: value})
    assert fragment in str(err.value)


def test_int_given_for_float_is_accepted():
    assert load_run_config({"train.learning-rate": 1}).train.learning_rate == 1.0


def test_block_precision_needs_a_strategy_that_assigns_patterns():
    with pytest.raises(ConfigError, match="needs a strategy that assigns"):
        load_run_config({"blocks.precision": "salience", "strategy.name": "fedit"})
    cfg = load_run_config(
        {"blocks.precision": "salience", "strategy.name": "haflq", "tiers.memory-mb": "1,2,0"}
    )
    assert cfg.strategy.blocks.enabled and cfg.strategy.blocks.salience_metric == "recovery"
    budgets = [p.memory_budget_bytes for p in cfg.strategy.tiers.profiles]
    assert budgets == [2**20, 2 * 2**20, float("inf")]


@pytest.mark.parametrize(
    "every, expected",
    [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4, 5]), (3, [0, 3, 5]), (0, [5]), (7, [0, 5])],
)
def test_eval_every_schedules_the_server_evaluations(every, expected):
    train = load_run_config({"eval.every": every}).train
    assert [r for r in range(6) if train.evaluates_after(r, 5)] == expected


def test_eval_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="eval.every"):
        load_run_config({"eval.every": -1})


def test_keys_of_other_sections_are_the_apps_and_kept():
    """Under `flwr run` every key of the app's pyproject reaches every run: a section that
    is not haflq-flower's (a strategy's own options) is kept in the written config and
    not used; a typo inside one of our sections is still an error (above)."""
    cfg = load_run_config({"my-strategy.knob": 2})
    assert cfg.raw["my-strategy.knob"] == 2 and cfg.options is None
