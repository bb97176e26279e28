"""End to end: the in-process simulation and the real `flwr run` path, on the tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.simulation import run_simulation
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from haflq_flower import launch, predictions
from haflq_flower.client_app import make_client_app
from haflq_flower.config import parse_run_config
from haflq_flower.model import resolve_model_path
from haflq_flower.report import tier_rows
from haflq_flower.server_app import make_server_app

from .conftest import TINY, launch_tiny

# starts real processes (SuperLink, SuperNodes, Ray): `pytest -m "not slow"` skips it
pytestmark = pytest.mark.slow


def _check_results(out, num_rounds: int, num_clients: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(num_rounds + 1))
    for r in rounds[1:]:
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"])
        assert len(r["clients"]) == num_clients
        assert all(c["status"] == "ok" and c["num_examples"] > 0 for c in r["clients"])
        assert r["bytes_up"] == sum(c["bytes_up"] for c in r["clients"]) > 0
        assert r["bytes_down"] == sum(c["bytes_down"] for c in r["clients"]) > 0
        assert all(c["peak_mem_bytes"] > 0 and c["train_s"] > 0 for c in r["clients"])
        assert sorted(c["partition"] for c in r["clients"]) == list(range(num_clients))
    assert results["final"]["accuracy"] == rounds[-1]["accuracy"]
    assert results["config"]["model.name"] == "tiny"
    assert (out / "accuracy.png").stat().st_size > 0
    return results


def _simulate(overrides: dict, num_clients: int) -> dict:
    """In-process simulation with ``overrides``; returns the checked results."""
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    out = Path(overrides["output.dir"])
    return _check_results(out, num_rounds=overrides["num-server-rounds"], num_clients=num_clients)


def test_in_process_simulation(tmp_path):
    overrides = {**TINY, "output.dir": str(tmp_path / "run")}
    results = _simulate(overrides, num_clients=2)

    # The final adapter is a standard PEFT adapter that reproduces the global model.
    cfg = parse_run_config(overrides)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(cfg.model), num_labels=2, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, results["final"]["adapter_dir"])
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    "strategy, mode, aggregation",
    [("haflq", "freeze", "adaptive"), ("haflq", "truncate", "zero-pad"), ("hetlora", "", "")],
)
def test_in_process_simulation_with_three_tiers(tmp_path, strategy, mode, aggregation):
    overrides = {
        **TINY,
        "strategy.name": strategy,
        **({"strategy.mode": mode, "strategy.aggregation": aggregation} if mode else {}),
        # the truncation case also exercises the 8-bit downlink end to end
        **({"payload.downlink-bits": 8} if mode == "truncate" else {}),
        "output.dir": str(tmp_path / "run"),
    }
    results = _simulate(overrides, num_clients=3)
    for r in results["rounds"][1:]:
        by_tier = {c["tier"]: c for c in r["clients"]}
        # partition ids 0, 1, 2 fall in the tiers low, mid, high (ranks 2, 4, 8 of R = 8)
        assert {t: c["rank"] for t, c in by_tier.items()} == {"low": 2, "mid": 4, "high": 8}
        # more components trained -> more optimizer state and more bytes up
        opt = [by_tier[t]["optimizer_state_bytes"] for t in ("low", "mid", "high")]
        up = [by_tier[t]["bytes_up"] for t in ("low", "mid", "high")]
        assert opt[0] < opt[1] < opt[2] and up[0] < up[1] < up[2]
        assert len(r["clients_per_component"]) == 8
        if strategy == "haflq":  # adaptive, bit-packed uplink within each channel budget
            for c in r["clients"]:
                assert 0 < c["payload_bytes"] <= c["budget_bytes"]
                assert sum(c["bits"].values()) == c["components_up"] > 0
        assert r["control_bytes"] > 0 if r["round"] == 1 else r["control_bytes"] == 0


@pytest.fixture
def app_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_flwr_run_against_private_superlink(tmp_path, app_dir):
    """`flwr run` with a SuperLink on a free port and its own FLWR_HOME, stopped by PID."""
    out = tmp_path / "run"
    assert launch_tiny(out, TINY, 2, "--flwr-home", str(tmp_path / "flwr-home")) == 0
    _check_results(out, num_rounds=2, num_clients=2)
    assert (tmp_path / "flwr-home" / "config.toml").exists()


def test_flwr_run_failure_gives_nonzero_exit(tmp_path, app_dir):
    code = launch.main(
        [
            "--app",
            str(app_dir),
            "--num-supernodes",
            "1",
            "--flwr-home",
            str(tmp_path / "h"),
            "--output-dir",
            str(tmp_path / "run"),
            "--run-config",
            # a model that exists nowhere (hub offline in tests): the launcher's start-up
            # checks pass, the apps fail at run time
            "model.name='no-such-org/no-such-model'",
            "--timeout",
            "300",
        ]
    )
    assert code == 1


def test_flwr_run_that_applies_no_update_exits_nonzero(tmp_path, app_dir, capsys):
    """Every client fails every round (simulation.dropout=0.99, seeded): Flower reports
    the run completed, but no update was ever applied, so results.json says so and the
    launcher exits non-zero, printing where the results are."""
    from haflq_flower.client_app import drops_out

    assert all(drops_out(0, 1, p, 0.99) for p in (0, 1))
    out = tmp_path / "run"
    config = " ".join(
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
        for k, v in {**TINY, "num-server-rounds": 1, "simulation.dropout": 0.99}.items()
    )
    code = launch.main(
        [
            "--app",
            str(app_dir),
            "--num-supernodes",
            "2",
            "--client-cpus",
            "1",
            "--flwr-home",
            str(tmp_path / "flwr-home"),
            "--run-config",
            f'{config} output.dir="{out}"',  # output.dir from the run config is honoured
            "--timeout",
            "600",
        ]
    )
    printed = capsys.readouterr()
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    assert results["rounds"][1]["update"].startswith("skipped")
    assert results["final"]["status"] == "no-update-applied"
    assert results["final"]["rounds_applied"] == []
    assert "no-update-applied" in printed.err and str(out) in printed.out
    assert "**Status: no-update-applied**" in (out / "report.md").read_text()


def test_in_process_simulation_with_salience_block_precision(tmp_path):
    """Three memory tiers: each client's base is built with its own bit pattern."""
    overrides = {
        **TINY,
        "strategy.name": "haflq",
        "blocks.precision": "salience",
        "blocks.salience-metric": "gradient",
        # tiny: all-4-bit 0.072 MiB, one block at 8 bits 0.090 MiB, all-16 0.173 MiB
        "tiers.memory-mb": "0.075,0.095,1.0",
        "output.dir": str(tmp_path / "run"),
    }
    results = _simulate(overrides, num_clients=3)
    for r in results["rounds"][1:]:
        by_tier = {c["tier"]: c for c in r["clients"]}
        bits = {t: tuple(int(b) for b in c["block_bits"].split(",")) for t, c in by_tier.items()}
        assert bits["low"] == (4, 4) and bits["high"] == (16, 16)
        assert sorted(bits["mid"]) == [4, 8]
        weights = [by_tier[t]["weight_bytes"] for t in ("low", "mid", "high")]
        assert weights[0] < weights[1] < weights[2]
        for t, budget in (("low", 0.075), ("mid", 0.095), ("high", 1.0)):
            assert weights[("low", "mid", "high").index(t)] <= budget * 2**20
        # the salience query is control traffic of round 1 only
        assert r["control_bytes"] > 0 if r["round"] == 1 else r["control_bytes"] == 0
    by_tier_acc = results["final"]["accuracy_by_tier"]
    assert set(by_tier_acc) == {"low", "mid", "high"}
    assert all(0.0 <= a <= 1.0 for a in by_tier_acc.values())
    # the report's per-tier numbers are the records' own
    out = tmp_path / "run"
    assert results["final"]["status"] == "completed"
    rows = {t.tier: t for t in tier_rows(results)}
    last = {c["tier"]: c for c in results["rounds"][-1]["clients"]}
    for tier in ("low", "mid", "high"):
        assert rows[tier].lora_rank == last[tier]["rank"]
        assert rows[tier].block_bits == last[tier]["block_bits"]
        assert rows[tier].weight_bytes == last[tier]["weight_bytes"]
        assert rows[tier].accuracy_own_base == by_tier_acc[tier]
    report = (out / "report.md").read_text()
    assert f"Final test accuracy **{results['final']['accuracy']:.4f}**" in report
    assert "PeftModel.from_pretrained(base, " in report
    for png in ("accuracy.png", "memory.png", "uplink.png", "bits.png"):
        assert (out / png).stat().st_size > 0


def test_dropout_simulation_completes_and_records_what_happened(tmp_path):
    """Clients fail at random (seeded) in the real Ray simulation: a round where every
    client fails leaves the adapter unchanged, the others go on with who answered."""
    from haflq_flower.client_app import drops_out

    overrides = {
        **TINY,
        "num-server-rounds": 3,
        "simulation.dropout": 0.6,
        "output.dir": str(tmp_path / "run"),
    }
    expected = {r: [p for p in range(3) if drops_out(0, r, p, 0.6)] for r in (1, 2, 3)}
    assert expected[1] == [0, 1, 2] and len(expected[2]) == len(expected[3]) == 1
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    for r in (1, 2, 3):
        statuses = sorted(c["status"] for c in rounds[r]["clients"])
        assert statuses == sorted(["error"] * len(expected[r]) + ["ok"] * (3 - len(expected[r])))
        ok = sorted(c["partition"] for c in rounds[r]["clients"] if c["status"] == "ok")
        assert ok == [p for p in range(3) if p not in expected[r]]
        assert all("dropped out" in x["reason"] for x in rounds[r]["rejected"])
    assert rounds[1]["update"].startswith("skipped")
    assert rounds[1]["accuracy"] == rounds[0]["accuracy"]  # nothing changed in round 1
    assert rounds[2]["update"] == rounds[3]["update"] == "applied"
    assert results["final"]["replies"] == {"error": 5, "ok": 4}
    assert results["final"]["rounds_skipped"] == [1]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_eval_every_zero_evaluates_only_the_last_round(tmp_path):
    out = tmp_path / "run"
    overrides = {**TINY, "eval.every": 0, "output.dir": str(out)}
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # rounds 0 and 1 trained (bytes counted) but were not evaluated
    assert [r["accuracy"] for r in rounds[:2]] == [None, None]
    assert rounds[1]["bytes_up"] > 0 and 0.0 <= rounds[2]["accuracy"] <= 1.0
    assert results["final"]["accuracy"] == results["final"]["best_accuracy"]
    assert results["final"]["accuracy"] == rounds[2]["accuracy"]
    found = predictions.load(out)
    assert sorted(found.rounds) == [2] and found.accuracy(2) == rounds[2]["accuracy"]
    assert "| 0 | - | - |" in (out / "report.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0


def test_flwr_run_with_a_strategy_named_by_import_path(tmp_path, app_dir):
    """The extension path of docs/extending.md under the real `flwr run`: a user's app (this
    one plus the strategy's own key declared in its pyproject), whose ServerApp and every
    ClientApp (other processes) resolve the user's class from the run config and accept
    its option."""
    import shutil

    from haflq_flower import compare, launch

    app = tmp_path / "app"
    shutil.copytree(app_dir / "haflq_flower", app / "haflq_flower")
    (app / "tests").mkdir()
    for name in ("__init__.py", "round_robin.py"):
        shutil.copy(app_dir / "tests" / name, app / "tests" / name)
    shutil.copy(app_dir / "README.md", app / "README.md")
    pyproject = (app_dir / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject + "\n[tool.flwr.app.config.round-robin]\noffset = 0\n"
    )
    out = tmp_path / "run"
    config = {
        **TINY,
        "strategy.name": "tests.round_robin:RoundRobinSelection",
        "round-robin.offset": 1,  # the strategy's own key: every ClientApp must accept it
    }
    argv = ["--app", str(app), "--num-supernodes", "2", "--client-cpus", "1"]
    argv += ["--output-dir", str(out), "--run-config", compare.config_string(config)]
    assert launch.main([*argv, "--timeout", "600"]) == 0
    results = _check_results(out, num_rounds=2, num_clients=2)
    assert results["config"]["strategy.name"] == "tests.round_robin:RoundRobinSelection"
    assert results["config"]["round-robin.offset"] == 1
    # HAFLQ-style replies (component uploads) from clients of the default tiers
    assert all(c["components_up"] > 0 for r in results["rounds"][1:] for c in r["clients"])
