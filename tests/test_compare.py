"""The comparison grid: per-arm summaries (known answers) and a real two-arm run."""

import json
from pathlib import Path

import pytest

from haflq_flower import compare, predictions

from .conftest import TINY


def _results(accs, ups, tiers=("low", "high")):
    rounds = []
    for i, (acc, up) in enumerate(zip(accs, ups, strict=True)):
        clients = [
            {
                "tier": t,
                "peak_mem_bytes": 100 * (j + 1) + i,
                "optimizer_state_bytes": 10 * (j + 1),
                "weight_bytes": 1000 * (j + 1),
                "train_s": 4.0 * (j + 1) + i,
            }
            for j, t in enumerate(tiers)
        ]
        rounds.append(
            {
                "round": i,
                "accuracy": acc,
                "bytes_up": up,
                "bytes_down": 2 * up,
                "wall_s": 10.0 * i,
                "strategy_s": 0.1 if i else 0.0,
                "clients": clients if i else [],
            }
        )
    return {
        "rounds": rounds,
        "final": {"wall_s": 40.0, "accuracy_by_tier": {"low": 0.6, "high": 0.7}},
        "config": {"train.local-steps": 2},
    }


def test_summarize_run_known_answers():
    row = compare.summarize_run(_results([0.5, 0.6, 0.72, 0.71], [0, 100, 100, 100]), 0.7)
    assert row["final_accuracy"] == 0.71 and row["best_accuracy"] == 0.72
    assert row["rounds_to_target"] == 2 and row["bytes_up_to_target"] == 200
    assert row["bytes_up"] == 300 and row["bytes_down"] == 600
    # low: train_s 5, 6, 7 over rounds 1-3 with 2 local steps -> 3.0 s per step
    assert row["tiers"]["low"] == {
        "peak_mem_bytes": 103,
        "opt_bytes": 10,
        "weight_bytes": 1000,
        "step_s": 3.0,
    }
    assert row["accuracy_by_tier"] == {"low": 0.6, "high": 0.7}
    assert row["tiers"]["high"]["peak_mem_bytes"] == 203
    assert abs(row["strategy_share"] - 0.3 / 30.0) < 1e-12
    assert compare.summarize_run(_results([0.5, 0.6], [0, 1]), 0.9)["rounds_to_target"] is None


def test_config_string_quotes_strings_only():
    s = compare.config_string({"a": "x", "b": 2, "c": 0.5, "d": True})
    assert s == 'a="x" b=2 c=0.5 d=true'
    assert compare._parse_overrides([s]) == {"a": "x", "b": 2, "c": 0.5, "d": True}
    # a template with spaces, a newline and quotes survives the round trip
    template = {"data.template": 'Review: {text}\nSay "yes" or no:', "e": 1e-3}
    assert compare._parse_overrides([compare.config_string(template)]) == template


def test_grid_runs_two_arms_and_skips_finished(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    common = {k: v for k, v in TINY.items() if k != "num-server-rounds"}
    args = [
        "--out",
        str(out),
        "--arms",
        "fedit,haflq",
        "--rounds",
        "1",
        "--num-supernodes",
        "2",
        "--target",
        "0.0",
        "--run-config",
        compare.config_string(common),
        "--client-cpus",
        "1",
        "--timeout",
        "600",
        "--claims",
        "haflq:fedit",
    ]
    assert compare.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"fedit", "haflq", "claims", "decisions"}
    claims = summary["claims"]["rows"]
    # HAFLQ's clients upload r_k of R components: fewer bytes than FedIT's full adapter
    assert claims["communication"]["change_pct"] < 0
    assert claims["communication"]["ours"] == summary["haflq"]["runs"][0]["bytes_up"]
    # accuracy is decided by the paired test on the same rows (tiny model: a tie)
    assert 0.0 <= claims["accuracy"]["p"] <= 1.0
    assert "| uplink bytes (whole run) | -49% |" in (out / "summary.md").read_text()
    for arm in ("fedit", "haflq"):
        results = json.loads((out / f"{arm}-seed0" / "results.json").read_text())
        assert results["config"]["strategy.name"] == arm
        assert len(results["rounds"]) == 2
        # every round's predictions reproduce the accuracy in results.json exactly
        found = predictions.load(out / f"{arm}-seed0")
        assert sorted(found.rounds) == [0, 1] and found.split == "test"
        for r in results["rounds"]:
            assert found.accuracy(r["round"]) == r["accuracy"]
    decisions = summary["decisions"]
    assert decisions["reference"] == "haflq" and decisions["bounds"] is None
    assert set(decisions["arms"]) == {"fedit"}
    assert "| haflq vs |" in (out / "summary.md").read_text()
    assert "| fedit |" in (out / "summary.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "memory.png").stat().st_size > 0

    # A second call finds both arms finished and runs nothing.
    calls = []
    monkeypatch.setattr(compare.launch, "main", lambda argv: calls.append(argv) or 0)
    assert compare.main(args) == 0
    assert calls == []


def test_summary_plots_memory_per_tier(tmp_path):
    runs = [compare.summarize_run(_results([0.5, 0.6], [0, 100]), None)]
    compare.plot_comparison({"a": runs, "b": runs}, tmp_path)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_relative_change_and_resolution_known_answers():
    row = compare.relative_change([0.6, 0.62, 0.64], [0.4, 0.41, 0.39])
    assert row["change_pct"] == pytest.approx(100 * (0.62 - 0.4) / 0.4)
    assert row["resolved"]  # difference 0.22, standard error ~0.013
    close = compare.relative_change([0.6, 0.7], [0.62, 0.66])
    assert close["change_pct"] == pytest.approx(100 * (0.65 - 0.64) / 0.64)
    assert not close["resolved"]  # difference 0.01 inside twice the standard error
    assert not compare.relative_change([0.9], [0.1])["resolved"]  # one seed each
    assert compare.relative_change([1.0], [None])["change_pct"] is None


def test_paper_claims_compare_memory_bytes_and_accuracy():
    ours = [compare.summarize_run(_results([0.5, 0.75], [0, 50]), None)]
    base = [compare.summarize_run(_results([0.5, 0.5], [0, 100]), None)]
    found = compare.paper_claims(ours, base)
    assert found["communication"]["change_pct"] == pytest.approx(-50.0)
    assert found["accuracy"]["change_pct"] == pytest.approx(50.0)
    assert found["memory"]["change_pct"] == pytest.approx(0.0)  # same peaks (101, 201)
    assert compare.mean_tier_peak(ours[0]) == pytest.approx(151.0)
    assert {k: v["paper_pct"] for k, v in found.items()} == {
        "memory": -31.0,
        "communication": -49.0,
        "accuracy": 50.0,
    }
    text = compare.claims_markdown(found, "a", "b")
    assert "| final test accuracy | +50% | +50.0% | 0.7500 | 0.5000 | no |" in text


def test_rounds_table_averages_seeds():
    runs = [
        compare.summarize_run(_results([0.5, 0.6, 0.7], [0, 1, 1]), None),
        compare.summarize_run(_results([0.5, 0.8, 0.9], [0, 1, 1]), None),
    ]
    text = compare.rounds_markdown({"a": runs})
    assert "| a | 0.500 | 0.700 | 0.800 |" in text


def test_grid_resumes_interrupted_runs_and_skips_finished(tmp_path, monkeypatch):
    (tmp_path / "fedit-seed0").mkdir()
    (tmp_path / "fedit-seed0" / "results.json").write_text('{"rounds": [], "final": null}')
    (tmp_path / "fedit-seed0" / "checkpoint.npz").write_bytes(b"")
    (tmp_path / "haflq-seed0").mkdir()
    (tmp_path / "haflq-seed0" / "results.json").write_text('{"rounds": [], "final": {}}')
    calls = []
    monkeypatch.setattr(compare.launch, "main", lambda argv: calls.append(argv) or 0)
    compare.run_grid(tmp_path, ["fedit", "haflq", "bound-low"], [0], {"lora.rank": 8}, 3)
    assert len(calls) == 2  # haflq finished: skipped
    resumed = compare._parse_overrides([calls[0][calls[0].index("--run-config") + 1]])
    assert resumed["resume"] == str(tmp_path / "fedit-seed0")
    low = compare._parse_overrides([calls[1][calls[1].index("--run-config") + 1]])
    assert "resume" not in low
    assert (low["strategy.name"], low["lora.rank"], low["lora.alpha"]) == ("fedit", 2, 4.0)


def test_head_to_head_preset_adds_the_claims_pair_only_when_both_arms_run():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "head_to_head.py"
    spec = importlib.util.spec_from_file_location("head_to_head", path)
    h2h = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h2h)
    full = h2h.defaults("rotten-tomatoes", "")
    assert full[full.index("--claims") + 1] == "haflq-full:paper-baseline"
    part = h2h.defaults("rotten-tomatoes", "", "bound-high,bound-low,haflq")
    assert "--claims" not in part and part[part.index("--arms") + 1] == "bound-high,bound-low,haflq"
    assert h2h._flag(["--seeds", "0", "--arms", "a,b"], "--arms") == "a,b"
    assert h2h._flag(["--arms=c"], "--arms") == "c" and h2h._flag([], "--arms") is None


def test_an_arm_named_by_import_path_runs_that_strategy(tmp_path, monkeypatch):
    path = "tests.round_robin:RoundRobinSelection"
    assert compare.arm_overrides(path, {}) == {"strategy.name": path}
    calls = []
    monkeypatch.setattr(compare.launch, "main", lambda argv: calls.append(argv) or 0)
    compare.run_grid(tmp_path, [path], [0], {"num-server-rounds": 1}, 2)
    config = calls[0][calls[0].index("--run-config") + 1]
    assert f'strategy.name="{path}"' in config
    with pytest.raises(SystemExit, match="import path"):
        compare.run_grid(tmp_path, ["no-such-arm"], [0], {}, 2)
