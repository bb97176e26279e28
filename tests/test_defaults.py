"""The default job (`make run`, `flwr run .`): HAFLQ across heterogeneous simulated
devices, with FedIT one flag away."""

from __future__ import annotations

import pytest

from haflq_flower.config import DEFAULTS, ConfigError
from haflq_flower.launch import DEFAULT_SUPERNODES
from haflq_flower.strategy import load_run_config


def test_default_job_is_haflq_on_heterogeneous_devices():
    cfg = load_run_config({})
    assert cfg.strategy.name == "haflq"
    assert (cfg.strategy.mode, cfg.strategy.aggregation) == ("freeze", "adaptive")
    assert cfg.strategy.payload.uplink == "auto"  # adaptive for haflq
    assert cfg.data.partitioner == "dirichlet"  # label skew
    tiers = cfg.strategy.tiers
    profiles = [tiers.for_partition(p, DEFAULT_SUPERNODES) for p in range(DEFAULT_SUPERNODES)]
    assert [p.tier for p in profiles] == ["low", "low", "mid", "mid", "high", "high"]
    assert [p.lora_rank for p in profiles] == [2, 2, 4, 4, 8, 8]
    # farther devices get less uplink: distances fall from the low to the high tier
    distances = [p.distance_km for p in profiles]
    assert distances == sorted(distances, reverse=True) and distances[0] > distances[-1]


def test_fedit_is_one_flag_away():
    cfg = load_run_config({"strategy.name": "fedit"})
    assert cfg.strategy.name == "fedit" and not cfg.strategy.blocks.enabled


def test_auto_block_precision_follows_budgets_and_strategy():
    budgets = {"blocks.precision": "auto", "tiers.memory-mb": "120,140,200"}
    assert load_run_config(budgets).strategy.blocks.precision == "salience"
    assert load_run_config({**budgets, "strategy.name": "hetlora"}).strategy.blocks.enabled
    # FedIT assigns no per-client precision: auto turns it off instead of failing
    fedit = load_run_config({**budgets, "strategy.name": "fedit"})
    assert fedit.strategy.blocks.precision == "off"
    # no budgets: nothing to allocate
    assert load_run_config({"blocks.precision": "auto"}).strategy.blocks.precision == "off"
    # an explicit salience with FedIT still fails with the reason
    with pytest.raises(ConfigError, match="blocks.precision"):
        load_run_config({**budgets, "blocks.precision": "salience", "strategy.name": "fedit"})
    assert DEFAULTS["blocks.precision"] in ("off", "auto")
