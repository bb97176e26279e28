"""Paired tests (known answers), the predictions file, and the decisions of `compare`."""

import math

import numpy as np
import pytest

from haflq_flower import compare, predictions, stats


def _pair(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return np.array(a), np.array(b)


def test_binomial_two_sided_known_answers():
    assert stats.binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert stats.binomial_two_sided(2, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.binomial_two_sided(8, 10) == stats.binomial_two_sided(2, 10)  # symmetric
    assert stats.binomial_two_sided(5, 10) == 1.0  # capped
    assert stats.binomial_two_sided(0, 0) == 1.0
    # a large count stays exact (no float overflow in the binomial coefficients)
    assert stats.binomial_two_sided(450, 1000) == pytest.approx(0.0017305, rel=1e-3)


def test_mcnemar_exact_counts_only_discordant_rows():
    a, b = _pair(both=50, only_a=10, only_b=2, neither=30)
    test = stats.mcnemar_exact(a, b)
    assert (test.b, test.c, test.discordant) == (10, 2, 12)
    assert test.p == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    # concordant rows do not move the test
    a2, b2 = _pair(both=5, only_a=10, only_b=2, neither=500)
    assert stats.mcnemar_exact(a2, b2).p == test.p
    assert stats.mcnemar_exact(b, a).p == test.p and stats.mcnemar_exact(b, a).b == 2
    with pytest.raises(ValueError):
        stats.mcnemar_exact(a, b[:-1])


def test_pooled_mcnemar_sums_discordant_rows_over_seeds():
    pooled = stats.pooled_mcnemar([_pair(5, 3, 0, 2), _pair(5, 2, 1, 2)])
    assert (pooled.b, pooled.c) == (5, 1)
    assert pooled.p == pytest.approx(2 * (1 + 6) / 64)


def test_paired_bootstrap_intervals():
    same = stats.paired_bootstrap([_pair(40, 0, 0, 60)])
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    a, b = _pair(0, 100, 0, 0)
    assert stats.paired_bootstrap([(a, b)]).low == 1.0
    clear = stats.paired_bootstrap([_pair(200, 60, 10, 130)], seed=1)
    assert clear.estimate == pytest.approx(50 / 400)
    assert clear.low < clear.estimate < clear.high and clear.excludes(0.0)
    small = stats.paired_bootstrap([_pair(200, 6, 4, 190)])
    assert not small.excludes(0.0)


def test_paired_bootstrap_treats_seeds_as_strata():
    # each seed on its own rows (even a different number of them): seeds weigh equally
    two = stats.paired_bootstrap([_pair(0, 100, 0, 0), _pair(0, 0, 0, 40)])
    assert two.estimate == pytest.approx(0.5)  # (1.0 + 0.0) / 2, not 100 / 140
    # no row varies within its seed: every resample gives the estimate
    assert (two.low, two.high) == pytest.approx((0.5, 0.5))
    # a seed's rows never mix with another's: twins give the one seed's interval
    one = stats.paired_bootstrap([_pair(200, 60, 10, 130)], seed=3)
    twins = stats.paired_bootstrap([_pair(200, 60, 10, 130)] * 2, seed=3)
    assert twins.estimate == one.estimate
    assert twins.high - twins.low < one.high - one.low  # two independent row samples


def test_gap_closed_known_answers():
    n = 100
    high = np.arange(n) < 100  # all right
    low = np.arange(n) < 50
    arm = np.arange(n) < 75
    gap = stats.gap_closed([(arm, low, high)], seed=0)
    assert gap.estimate == pytest.approx(0.5)
    assert gap.low <= 0.5 <= gap.high
    assert stats.gap_closed([(high, low, high)]).estimate == pytest.approx(1.0)
    assert stats.gap_closed([(low, low, high)]).estimate == pytest.approx(0.0)
    with pytest.raises(ValueError):
        stats.gap_closed([(arm, low, low)])
    with pytest.raises(ValueError):  # one seed's runs on different rows
        stats.gap_closed([(arm[:-1], low, high)])
    # two seeds on their own rows: accuracies are means over seeds
    m = 40
    seed1 = (np.arange(m) < 30, np.arange(m) < 20, np.arange(m) < 40)  # 0.75, 0.5, 1.0
    both = stats.gap_closed([(arm, low, high), seed1])
    assert both.estimate == pytest.approx(0.5)


def _run(tmp_path, name: str, labels, predicted, last_round: int = 4):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    found = predictions.Predictions(labels=np.asarray(labels), split="test")
    found.add(last_round, np.asarray(predicted))
    predictions.save(run_dir, found)
    (run_dir / "results.json").write_text('{"final": {"accuracy": 0}}')


def test_load_correct_pairs_runs_within_each_seed(tmp_path):
    # seed 0 and seed 1 drew different test rows: allowed, they are never paired row by row
    _run(tmp_path, "haflq-seed0", [0, 1, 1], [0, 1, 0])
    _run(tmp_path, "fedit-seed0", [0, 1, 1], [1, 1, 1])
    _run(tmp_path, "haflq-seed1", [1, 0], [1, 1])
    _run(tmp_path, "fedit-seed1", [1, 0], [1, 0])
    found = compare.load_correct(tmp_path, ["haflq", "fedit"], [0, 1])
    assert list(found) == ["haflq", "fedit"]
    assert found["haflq"][0].tolist() == [True, True, False]
    assert found["fedit"][1].tolist() == [True, True]
    # within one seed, other rows are an error
    _run(tmp_path, "hetlora-seed1", [1, 1], [1, 1])
    with pytest.raises(SystemExit, match="must share the test rows"):
        compare.load_correct(tmp_path, ["haflq", "fedit", "hetlora"], [0, 1])
    _run(tmp_path, "hetlora-seed1", [1, 0], [1, 1], last_round=3)
    with pytest.raises(SystemExit, match="equal rounds"):
        compare.load_correct(tmp_path, ["haflq", "fedit", "hetlora"], [0, 1])


def test_holm_known_answer():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_predictions_round_trip(tmp_path):
    labels = np.array([0, 1, 1, 0, 1])
    found = predictions.Predictions(labels=labels, split="validation")
    found.add(0, np.array([0, 0, 0, 0, 0]))
    found.add(2, np.array([0, 1, 1, 1, 1]))
    predictions.save(tmp_path, found)
    back = predictions.load(tmp_path)
    assert back.split == "validation" and np.array_equal(back.labels, labels)
    assert sorted(back.rounds) == [0, 2]
    assert back.accuracy(0) == pytest.approx(0.4) and back.accuracy() == pytest.approx(0.8)
    with pytest.raises(predictions.PredictionsError):
        back.add(3, np.array([1, 1]))
    with pytest.raises(predictions.PredictionsError):
        back.correct(1)
    # a resumed run keeps its rounds; other rows start a new record
    assert sorted(predictions.load_or_new(tmp_path, labels, "validation").rounds) == [0, 2]
    assert predictions.load_or_new(tmp_path, labels, "test").rounds == {}
    assert predictions.load_or_new(tmp_path, labels[:-1], "validation").rounds == {}
    with pytest.raises(predictions.PredictionsError):
        predictions.load(tmp_path / "missing")


def _correct(acc_by_seed: dict[int, float], n: int = 400, shift: int = 0):
    """Correctness vectors whose first acc*n rows (rotated by ``shift``) are right."""
    return {s: np.roll(np.arange(n) < round(a * n), shift + s) for s, a in acc_by_seed.items()}


def test_paired_decisions_bounds_and_verdicts():
    correct = {
        "bound-high": _correct({0: 0.80, 1: 0.80}),
        "bound-low": _correct({0: 0.60, 1: 0.60}),
        "haflq": _correct({0: 0.78, 1: 0.78}),
        "weak": _correct({0: 0.55, 1: 0.55}),
        "twin": _correct({0: 0.78, 1: 0.78}),
    }
    found = compare.paired_decisions(correct, "haflq")
    assert found["bounds"]["decided_apart"] and found["bounds"]["b"] == 160
    assert found["bounds"]["p"] < 1e-30
    arms = found["arms"]
    assert arms["weak"]["verdict"] == "decided better"
    assert arms["weak"]["diff"] == pytest.approx(0.23)
    assert arms["twin"]["verdict"] == "not decided" and arms["twin"]["p"] == 1.0
    assert arms["bound-high"]["verdict"] == "decided worse"  # 0.78 vs 0.80: 16 rows each seed
    # Holm: the adjusted p-values are at least the raw ones
    assert all(r["p_holm"] >= r["p"] for r in arms.values())
    gap = found["gap_closed"]["haflq"]
    assert gap[0] == pytest.approx(0.9)
    text = compare.decisions_markdown(found)
    assert "**decided apart**" in text and "| weak | 2 |" in text
    assert "haflq decided better" in text


def test_paired_decisions_refuse_to_compare_when_bounds_tie():
    correct = {
        "bound-high": _correct({0: 0.70}),
        "bound-low": _correct({0: 0.69}),
        "haflq": _correct({0: 0.75}),
    }
    found = compare.paired_decisions(correct, "haflq")
    assert not found["bounds"]["decided_apart"]
    assert "gap_closed" not in found
    assert "NOT decided apart" in compare.decisions_markdown(found)
    assert math.isfinite(found["arms"]["bound-low"]["p"])


def test_bound_low_keeps_the_lora_scale():
    low = compare.bound_low({"tiers.lora-ranks": "2,4,8", "lora.rank": 8, "lora.alpha": 16})
    assert low == {"strategy.name": "fedit", "lora.rank": 2, "lora.alpha": 4.0}
    assert low["lora.alpha"] / low["lora.rank"] == 16 / 8
    one = compare.bound_low({"tiers.lora-ranks": "1,8", "tiers.names": "a,b", "lora.rank": 8})
    assert one["lora.rank"] == 1 and one["lora.alpha"] == pytest.approx(2.0)


def test_paired_permutation_known_answers():
    a, b = _pair(both=30, only_a=0, only_b=0, neither=20)
    assert stats.paired_permutation([(a, b)]) == 1.0  # no row differs: every flip ties
    a, b = _pair(both=0, only_a=40, only_b=0, neither=0)
    # every row favours A: only the all-plus and all-minus flips reach |mean| = 1, which
    # 20,000 random flips of 40 signs essentially never draw
    assert stats.paired_permutation([(a, b)]) == pytest.approx(1 / 20_001)
    # symmetric in the order of the two arms, and it agrees with McNemar on balance
    a, b = _pair(both=100, only_a=12, only_b=10, neither=78)
    p = stats.paired_permutation([(a, b)])
    assert p == pytest.approx(stats.paired_permutation([(b, a)]), abs=0.02)
    assert p == pytest.approx(stats.mcnemar_exact(a, b).p, abs=0.05)
    # fractional scores (share of clients right per row)
    frac = np.full(200, 0.5)
    assert stats.paired_permutation([(frac, frac)]) == 1.0
    assert stats.paired_permutation([(frac + 0.2, frac)]) < 1e-3
    assert not stats.is_binary(frac) and stats.is_binary(a)


def test_paired_decisions_use_the_permutation_test_for_per_client_arms():
    correct = {
        "haflq": _correct({0: 0.78}),
        # a per-client arm: two clients, one right where haflq is, one always wrong
        "personal": {0: _correct({0: 0.78})[0] * 0.5},
        "weak": _correct({0: 0.55}),
    }
    found = compare.paired_decisions(correct, "haflq")
    row = found["arms"]["personal"]
    assert row["test"] == "permutation" and row["b"] is None
    assert row["arm_acc"] == pytest.approx(0.39) and row["diff"] == pytest.approx(0.39)
    assert row["verdict"] == "decided better"
    assert found["arms"]["weak"]["test"] == "mcnemar"
    assert "(permutation)" in compare.decisions_markdown(found)
