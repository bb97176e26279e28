"""Run several strategies ("arms") on the same task and compare them in one table.

Every arm is a real ``flwr run`` (through :mod:`haflq_flower.launch`) with the same data,
partitions, tiers and seeds; only the arm's run-config overrides differ. Each arm writes
its own results directory; an arm whose ``results.json`` is complete is not run again.

    python -m haflq_flower.compare --out runs/ablation --arms fedit,hetlora,haflq \\
        --rounds 5 --num-supernodes 10 --run-config "data.partitioner=\\"dirichlet\\""
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import launch, predictions, stats
from .config import parse_run_config
from .results import evaluated_accuracies

# Named arms: run-config overrides on top of the common config.
ARMS: dict[str, dict[str, Any] | Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    # every client at the global rank R: the homogeneous upper bound
    "fedit": {"strategy.name": "fedit"},
    "hetlora": {"strategy.name": "hetlora"},
    "freeze-zeropad": {
        "strategy.name": "haflq",
        "strategy.mode": "freeze",
        "strategy.aggregation": "zero-pad",
    },
    "truncate-zeropad": {
        "strategy.name": "haflq",
        "strategy.mode": "truncate",
        "strategy.aggregation": "zero-pad",
    },
    "truncate-adaptive": {
        "strategy.name": "haflq",
        "strategy.mode": "truncate",
        "strategy.aggregation": "adaptive",
    },
    # HAFL: importance freezing + adaptive rank-1 aggregation
    "haflq": {
        "strategy.name": "haflq",
        "strategy.mode": "freeze",
        "strategy.aggregation": "adaptive",
    },
    # ... plus bandwidth-adaptive bit-packed uploads and a 16-bit downlink
    "haflq-quant": {
        "strategy.name": "haflq",
        "strategy.mode": "freeze",
        "strategy.aggregation": "adaptive",
        "payload.uplink": "adaptive",
        "payload.downlink-bits": 16,
    },
}
# The peers (docs/algorithms.md, "Peer methods"), each on the shared client path.
ARMS.update(
    {
        "fedit-trunc": {"strategy.name": "fedit-trunc"},
        "flexlora": {"strategy.name": "flexlora"},
        # FLoRA merges into the base weights every round: it needs a 16-bit base
        "flora": {"strategy.name": "flora", "model.quantization": "none"},
        "ffa-lora": {"strategy.name": "ffa-lora"},
        # FedEx-LoRA also merges (its exact residual) into the base: 16-bit base
        "fedex-lora": {"strategy.name": "fedex-lora", "model.quantization": "none"},
        "lora-fair": {"strategy.name": "lora-fair"},
        "fedsa-lora": {"strategy.name": "fedsa-lora"},
    }
)
# The paper's claims: HAFLQ with every mechanism (salience-mixed base within each tier's
# tiers.memory-mb, importance freezing, adaptive aggregation, adaptive uplink) against the
# paper-style baseline (HetLoRA-like truncation with zero-padding, a uniform 8-bit base,
# full-precision uploads).
ARMS["haflq-full"] = {**ARMS["haflq-quant"], "blocks.precision": "salience"}
ARMS["paper-baseline"] = {
    "strategy.name": "hetlora",
    "blocks.precision": "uniform-8",
    "payload.uplink": "fp32",
}
# Block-wise base precision (HAFLQ's first mechanism), all on the HAFL strategy: uniform
# bases, and mixed bases within each tier's tiers.memory-mb (random order vs salience).
for _name, _precision in (
    ("blocks-16", "uniform-16"),
    ("blocks-8", "uniform-8"),
    ("blocks-4", "uniform-4"),
    ("blocks-random", "random"),
    ("blocks-salience", "salience"),
):
    ARMS[_name] = {**ARMS["haflq"], "blocks.precision": _precision}


def bound_low(common: Mapping[str, Any]) -> dict[str, Any]:
    """FedIT with every client at the smallest tier rank r_min, at the heterogeneous arms'
    LoRA scale: ``lora.alpha`` scaled by r_min / R so that alpha/r_min equals their
    alpha/R (the same alpha at a lower rank would multiply the update's scale)."""
    cfg = parse_run_config({k: v for k, v in common.items() if k != "output.dir"})
    rank = cfg.lora.rank
    r_min = min(p.budget(rank) for p in cfg.strategy.tiers.profiles)
    return {
        "strategy.name": "fedit",
        "lora.rank": r_min,
        "lora.alpha": cfg.lora.alpha * r_min / rank,
    }


# The bounds every heterogeneous arm sits between (docs/benchmarks.md): FedIT with every
# client at the global rank R, and FedIT with every client at the smallest tier rank.
ARMS["bound-high"] = {"strategy.name": "fedit"}
ARMS["bound-low"] = bound_low
# Client-level DP on HAFLQ (docs/privacy.md), central noise, C = 1: clipping alone
# (z = 0, epsilon = inf: what clipping, equal weights and no importance scores cost), and
# two noise levels (4 rounds, every client every round: epsilon 22,112 and 10.7 at 1e-5)
for _name, _z in (("haflq-dp-clip", 0.0), ("haflq-dp-z0.01", 0.01), ("haflq-dp-z1", 1.0)):
    ARMS[_name] = {
        **ARMS["haflq"],
        "dp.mode": "central",
        "dp.clip": 1.0,
        "dp.noise-multiplier": _z,
    }
# HAFL: HAFLQ's selection and aggregation with full-precision uploads (so a gap can be
# pinned on payload quantization or on selection and aggregation)
ARMS["haflq-fp32"] = {**ARMS["haflq"], "payload.uplink": "fp32"}


def arm_overrides(arm: str, common: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config overrides of ``arm`` on top of ``common``; an arm named by an import
    path (``my_strategies:RoundRobin``) is that strategy with the common settings."""
    if ":" in arm:
        return {"strategy.name": arm}
    entry = ARMS[arm]
    return dict(entry(common) if callable(entry) else entry)


def config_string(config: Mapping[str, Any]) -> str:
    """A ``--run-config`` string: strings quoted, booleans lower-case."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, str):  # a TOML basic string: JSON's escapes are valid there
            parts.append(f"{key}={json.dumps(value)}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _complete(results_path: Path) -> bool:
    if not results_path.exists():
        return False
    try:
        return json.loads(results_path.read_text()).get("final") is not None
    except json.JSONDecodeError:
        return False


def run_grid(
    out_dir: Path,
    arms: Sequence[str],
    seeds: Sequence[int],
    common: Mapping[str, Any],
    num_supernodes: int,
    launcher_args: Sequence[str] = (),
    parallel: int = 1,
) -> list[Path]:
    """Run every (arm, seed) not finished yet; return their result directories.

    A run that stopped part-way (a checkpoint but no final results) is resumed from its
    checkpoint. ``parallel`` > 1 runs that many arms at once, each its own launcher
    process (own SuperLink, own Ray) logging to ``<run dir>/launch.log``: for a GPU
    that several arms share (``--client-gpus``).
    """
    unknown = [a for a in arms if a not in ARMS and ":" not in a]
    if unknown:
        raise SystemExit(
            f"error: unknown arm(s) {unknown}; known: {', '.join(ARMS)}, or an import path "
            "package.module:ClassName"
        )
    dirs, jobs = [], []
    for seed in seeds:
        for arm in arms:
            run_dir = out_dir / f"{arm}-seed{seed}"
            dirs.append(run_dir)
            if _complete(run_dir / "results.json"):
                print(f"[compare] {run_dir.name}: already finished, skipped", flush=True)
                continue
            config = {**common, **arm_overrides(arm, common), "seed": seed}
            if (run_dir / "checkpoint.npz").exists():
                config["resume"] = str(run_dir)
                print(f"[compare] {run_dir.name}: resuming from its checkpoint", flush=True)
            print(f"[compare] {run_dir.name}: {config_string(config)}", flush=True)
            argv = [
                "--num-supernodes",
                str(num_supernodes),
                "--output-dir",
                str(run_dir),
                "--run-config",
                config_string(config),
                *launcher_args,
            ]
            jobs.append((run_dir, argv))
    if parallel <= 1:
        for run_dir, argv in jobs:
            _report(run_dir, launch.main(argv))
        return dirs
    from concurrent.futures import ThreadPoolExecutor

    def run_one(job: tuple[Path, list[str]]) -> None:
        run_dir, argv = job
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "launch.log", "ab") as log_file:
            code = subprocess.call(
                [sys.executable, "-m", "haflq_flower.launch", *argv],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _report(run_dir, code)

    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        for future in [pool.submit(run_one, job) for job in jobs]:
            future.result()
    finally:  # on Ctrl-C or a deadline: start no queued arm (running ones stop with us)
        pool.shutdown(wait=True, cancel_futures=True)
    return dirs


def _report(run_dir: Path, code: int) -> None:
    if code != 0:
        print(f"[compare] {run_dir.name}: FAILED (exit {code})", flush=True)
    else:
        print(f"[compare] {run_dir.name}: finished", flush=True)


def summarize_run(results: dict, target: float | None) -> dict[str, Any]:
    """One arm's row: accuracy, bytes, memory per tier, time, strategy overhead."""
    rounds = results["rounds"]
    trained = [r for r in rounds if r["round"] > 0]
    cum_up, to_target_round, to_target_bytes = 0, None, None
    for r in rounds:
        cum_up += r["bytes_up"]
        acc = r.get("accuracy")
        if target is not None and to_target_round is None and acc is not None and acc >= target:
            to_target_round, to_target_bytes = r["round"], cum_up
    tiers: dict[str, dict[str, int]] = {}
    tier_of = _tier_lookup(results, trained)
    for r in trained:
        for c in r["clients"]:
            t = tiers.setdefault(
                tier_of(c), {"peak_mem_bytes": 0, "opt_bytes": 0, "weight_bytes": 0, "train_s": []}
            )
            t["peak_mem_bytes"] = max(t["peak_mem_bytes"], int(c.get("peak_mem_bytes") or 0))
            t["opt_bytes"] = max(t["opt_bytes"], int(c.get("optimizer_state_bytes") or 0))
            t["weight_bytes"] = max(t["weight_bytes"], int(c.get("weight_bytes") or 0))
            t["train_s"].append(float(c.get("train_s") or 0.0))
    steps = int(results.get("config", {}).get("train.local-steps") or 0)
    for t in tiers.values():
        times = t.pop("train_s")
        t["step_s"] = statistics.fmean(times) / steps if times and steps else None
    walls = [r["wall_s"] for r in rounds]
    round_s = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    strategy_s = sum(r.get("strategy_s", 0.0) for r in trained)
    final = results["final"] or {}
    return {
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "best_accuracy": max(evaluated_accuracies(rounds), default=None),
        "rounds_to_target": to_target_round,
        "bytes_up_to_target": to_target_bytes,
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "tiers": tiers,
        "wall_s": final.get("wall_s"),
        "accuracy_by_tier": final.get("accuracy_by_tier") or {},
        "strategy_share": strategy_s / sum(round_s) if sum(round_s) > 0 else None,
        # mean over the trained rounds of ||avg of client products - global||/||avg||
        "aggregation_residual": _mean_spread([r.get("aggregation_residual") for r in trained])[0],
        "accuracy_by_round": [r["accuracy"] for r in rounds],
        "cum_bytes_up_by_round": _cumsum([r["bytes_up"] for r in rounds]),
    }


def _tier_lookup(results: dict, trained: list[dict]):
    """A client's tier: the one it reported, else the run config's tier of its partition
    (FedIT asks no profile; with full participation the partition count is max id + 1)."""
    try:
        table = parse_run_config(
            {k: v for k, v in results.get("config", {}).items() if k != "output.dir"}
        ).strategy.tiers
    except Exception:  # results written by another version: fall back to "all"
        table = None
    parts = [c.get("partition", -1) for r in trained for c in r["clients"]]
    count = max(parts, default=-1) + 1

    def tier_of(client: dict) -> str:
        if client.get("tier"):
            return client["tier"]
        part = client.get("partition", -1)
        if table is not None and 0 <= part < count:
            return table.for_partition(part, count).tier
        return "all"

    return tier_of


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt_acc(mean: float | None, spread: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {spread:.4f}" if n > 1 else "")


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def summarize(
    out_dir: Path,
    arms: Sequence[str],
    seeds: Sequence[int],
    target: float | None,
    common_config: Mapping[str, Any] | None = None,
    claims: tuple[str, str] | None = None,
    reference: str | None = None,
):
    """Write ``summary.json`` and ``summary.md`` (and plots) for the finished runs;
    with ``claims = (arm, baseline)``, also the paper's claims side by side. Runs that
    wrote predictions get paired decisions against ``reference`` (default: ``haflq``
    when run, else the first arm) and the bounds check."""
    rows = _finished_runs(out_dir, arms, seeds, target)
    tier_names = _tier_names(rows, common_config)
    with_blocks = any(
        t.get("weight_bytes") for runs in rows.values() for r in runs for t in r["tiers"].values()
    )
    head = _table_head(target, tier_names, with_blocks)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table: dict[str, dict] = {}
    for arm, runs in rows.items():
        cells, table[arm] = _arm_row(arm, runs, tier_names, with_blocks)
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n\n" + rounds_markdown(rows)
    correct = load_correct(out_dir, arms, seeds)
    if correct:
        ref = reference or ("haflq" if "haflq" in correct else next(iter(correct)))
        decisions = paired_decisions(correct, ref)
        table["decisions"] = decisions
        markdown += "\n" + decisions_markdown(decisions)
        if ref not in correct:  # a grid in pieces: the bounds may be decided already
            markdown += f"\nNo finished run of the reference {ref!r} yet: no arm compared.\n"
    if claims is not None and all(arm in rows for arm in claims):
        found = paper_claims(rows[claims[0]], rows[claims[1]])
        pairs = _pairs(correct, *claims)
        if pairs:  # accuracy decided by the paired test, not by the spread over seeds
            test = stats.pooled_mcnemar(pairs)
            found["accuracy"]["p"] = test.p
            found["accuracy"]["resolved"] = test.p < ALPHA
        table["claims"] = {"arm": claims[0], "baseline": claims[1], "rows": found}
        markdown += "\n" + claims_markdown(found, *claims)
    (out_dir / "summary.md").write_text(markdown)
    (out_dir / "summary.json").write_text(json.dumps(table, indent=2))
    plot_comparison(rows, out_dir, tier_names)
    return markdown


def _finished_runs(
    out_dir: Path, arms: Sequence[str], seeds: Sequence[int], target: float | None
) -> dict[str, list[dict]]:
    """Per arm, the summary of every finished seed's run (unfinished runs are left out)."""
    rows: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in seeds:
            path = out_dir / f"{arm}-seed{seed}" / "results.json"
            if _complete(path):
                rows.setdefault(arm, []).append(summarize_run(json.loads(path.read_text()), target))
    return rows


def _tier_names(rows: dict[str, list[dict]], common_config: Mapping[str, Any] | None) -> list[str]:
    """The tiers the runs met: in the run config's order, then any others by name."""
    seen = {t for runs in rows.values() for r in runs for t in r["tiers"]}
    order = [p.tier for p in parse_run_config(dict(common_config or {})).strategy.tiers.profiles]
    return [t for t in order if t in seen] + sorted(seen - set(order))


def _table_head(target: float | None, tier_names: list[str], with_blocks: bool) -> list[str]:
    block_head = (
        [f"weights {t} (MiB)" for t in tier_names]
        + [f"acc. on {t} base" for t in tier_names]
        + [f"s/step {t}" for t in tier_names]
        if with_blocks
        else []
    )
    return [
        "arm",
        "seeds",
        "final acc",
        "best acc",
        f"rounds to {target}" if target else "rounds to target",
        "MB up to target",
        "MB up",
        "MB down",
        *[f"peak RSS {t} (MB)" for t in tier_names],
        *[f"optim. state {t} (KB)" for t in tier_names],
        *block_head,
        "aggregation residual",
        "wall (s)",
        "strategy share",
    ]


def _tier_max(runs: list[dict], tier: str, key: str) -> float:
    return max(r["tiers"].get(tier, {}).get(key, 0) for r in runs)


def _arm_row(
    arm: str, runs: list[dict], tier_names: list[str], with_blocks: bool
) -> tuple[list[str], dict]:
    """One arm's table cells (means over seeds; memory as the largest seen) and its
    summary.json entry."""
    n = len(runs)
    final = _mean_spread([r["final_accuracy"] for r in runs])
    best = _mean_spread([r["best_accuracy"] for r in runs])
    to_round = _mean_spread([r["rounds_to_target"] for r in runs])
    to_bytes = _mean_spread([r["bytes_up_to_target"] for r in runs])
    up = _mean_spread([r["bytes_up"] for r in runs])[0]
    down = _mean_spread([r["bytes_down"] for r in runs])[0]
    wall = _mean_spread([r["wall_s"] for r in runs])[0]
    share = _mean_spread([r["strategy_share"] for r in runs])[0]
    residual = _mean_spread([r.get("aggregation_residual") for r in runs])[0]
    block_cells = []
    if with_blocks:
        tier_acc = {
            t: _mean_spread([r["accuracy_by_tier"].get(t) for r in runs]) for t in tier_names
        }
        step = {
            t: _mean_spread([r["tiers"].get(t, {}).get("step_s") for r in runs])[0]
            for t in tier_names
        }
        block_cells = [
            *[f"{_tier_max(runs, t, 'weight_bytes') / 2**20:.1f}" for t in tier_names],
            *[_fmt_acc(*tier_acc[t], n) for t in tier_names],
            *["-" if step[t] is None else f"{step[t]:.2f}" for t in tier_names],
        ]
    cells = [
        arm,
        str(n),
        _fmt_acc(*final, n),
        _fmt_acc(*best, n),
        "-" if to_round[0] is None else f"{to_round[0]:.1f}",
        _mb(to_bytes[0]),
        _mb(up),
        _mb(down),
        *[f"{_tier_max(runs, t, 'peak_mem_bytes') / 1e6:.0f}" for t in tier_names],
        *[f"{_tier_max(runs, t, 'opt_bytes') / 1e3:.0f}" for t in tier_names],
        *block_cells,
        "-" if residual is None else f"{residual:.4f}",
        "-" if wall is None else f"{wall:.0f}",
        "-" if share is None else f"{100 * share:.2f}%",
    ]
    return cells, {"runs": runs, "final": final, "best": best, "seeds": n}


BOUNDS = ("bound-high", "bound-low")
ALPHA = 0.05


def final_correct(run_dir: Path) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(last evaluated round, labels, per-row correctness) from a run's predictions, or
    ``None`` when the run wrote none."""
    try:
        found = predictions.load(run_dir)
    except predictions.PredictionsError:
        return None
    last = max(found.rounds)
    return last, found.labels, found.correct(last)


def load_correct(
    out_dir: Path, arms: Sequence[str], seeds: Sequence[int]
) -> dict[str, dict[int, np.ndarray]]:
    """Per arm and seed, every evaluated row's correctness after the final round, for
    the finished runs that wrote predictions. Runs must end at the same round, and the
    runs of one seed must share their rows (each seed draws its own test rows): a
    mismatch is an error, not a silent skip."""
    out: dict[str, dict[int, np.ndarray]] = {}
    last_round: tuple[int, str] | None = None
    for seed in seeds:
        reference: tuple[np.ndarray, str] | None = None
        for arm in arms:
            run_dir = out_dir / f"{arm}-seed{seed}"
            if not _complete(run_dir / "results.json"):
                continue
            found = final_correct(run_dir)
            if found is None:
                continue
            last, labels, correct = found
            last_round = last_round or (last, run_dir.name)
            reference = reference or (labels, run_dir.name)
            if last != last_round[0]:
                raise SystemExit(
                    f"error: {run_dir.name} ends at round {last}, {last_round[1]} at round "
                    f"{last_round[0]}: paired tests need equal rounds"
                )
            if not np.array_equal(labels, reference[0]):
                raise SystemExit(
                    f"error: {run_dir.name} evaluated other rows than {reference[1]} "
                    f"({len(labels)} against {len(reference[0])}): the runs of one seed "
                    "must share the test rows (same data settings)"
                )
            out.setdefault(arm, {})[seed] = correct
    return dict(sorted(out.items(), key=lambda item: list(arms).index(item[0])))


def _pairs(correct, a: str, b: str) -> list[tuple[np.ndarray, np.ndarray]]:
    seeds = sorted(set(correct.get(a, {})) & set(correct.get(b, {})))
    return [(correct[a][s], correct[b][s]) for s in seeds]


def paired_decisions(
    correct: Mapping[str, Mapping[int, np.ndarray]], reference: str, bounds=BOUNDS
) -> dict[str, Any]:
    """The bounds check and every arm against ``reference`` on the same rows.

    Bounds: ``bound-high`` vs ``bound-low``, pooled exact McNemar over their common
    seeds; "decided apart" needs p < 0.05 with high above low. Arms: for each arm with
    seeds in common with ``reference``, the mean accuracy difference (reference - arm),
    McNemar per seed and pooled, a paired-bootstrap 95% interval, and the pooled p-values
    Holm-adjusted over the family of arms; "decided" at adjusted p < 0.05. Gap closed
    ``(acc - low) / (high - low)`` with a bootstrap interval, only when the bounds are
    decided apart.
    """
    out: dict[str, Any] = {"reference": reference, "alpha": ALPHA, "bounds": None, "arms": {}}
    high, low = bounds
    bounds_apart = False
    if correct.get(high) and correct.get(low):
        pairs = _pairs(correct, high, low)
        test = stats.pooled_mcnemar(pairs) if pairs else None
        acc_high = float(np.mean([c.mean() for c in correct[high].values()]))
        acc_low = float(np.mean([c.mean() for c in correct[low].values()]))
        bounds_apart = test is not None and test.p < ALPHA and acc_high > acc_low
        out["bounds"] = {
            "high": acc_high,
            "low": acc_low,
            "seeds": len(pairs),
            "b": None if test is None else test.b,
            "c": None if test is None else test.c,
            "p": None if test is None else test.p,
            "decided_apart": bounds_apart,
        }
    arms = [a for a in correct if a != reference and _pairs(correct, reference, a)]
    raw_p = []
    for arm in arms:
        pairs = _pairs(correct, reference, arm)
        interval = stats.paired_bootstrap(pairs)
        row = {
            "seeds": len(pairs),
            "reference_acc": float(np.mean([a.mean() for a, _ in pairs])),
            "arm_acc": float(np.mean([b.mean() for _, b in pairs])),
            "diff": interval.estimate,
            "ci": [interval.low, interval.high],
        }
        if all(stats.is_binary(a) and stats.is_binary(b) for a, b in pairs):
            pooled = stats.pooled_mcnemar(pairs)
            row.update(
                test="mcnemar",
                per_seed_p=[stats.mcnemar_exact(a, b).p for a, b in pairs],
                b=pooled.b,
                c=pooled.c,
                p=pooled.p,
            )
        else:  # per-client models (FedSA-LoRA): a row scores the fraction of clients right
            row.update(
                test="permutation",
                per_seed_p=[stats.paired_permutation([pair]) for pair in pairs],
                b=None,
                c=None,
                p=stats.paired_permutation(pairs),
            )
        raw_p.append(row["p"])
        out["arms"][arm] = row
    for arm, adjusted in zip(arms, stats.holm(raw_p), strict=True):
        row = out["arms"][arm]
        row["p_holm"] = adjusted
        if adjusted >= ALPHA:
            row["verdict"] = "not decided"
        else:
            row["verdict"] = "decided better" if row["diff"] > 0 else "decided worse"
    if bounds_apart:
        for arm in [reference, *arms]:
            if arm in bounds or arm not in correct:
                continue
            common = sorted(set(correct[arm]) & set(correct[low]) & set(correct[high]))
            if not common:
                continue
            gap = stats.gap_closed(
                [(correct[arm][s], correct[low][s], correct[high][s]) for s in common]
            )
            out.setdefault("gap_closed", {})[arm] = [gap.estimate, gap.low, gap.high]
    return out


def decisions_markdown(found: Mapping[str, Any]) -> str:
    """The bounds line and the "reference vs arm" table."""
    ref = found["reference"]
    lines = ["Paired decisions on the same evaluated rows, final round:", ""]
    bounds = found.get("bounds")
    gaps = found.get("gap_closed", {})
    if bounds is None:
        lines.append("Bounds: not run (arms bound-high and bound-low); no gap closed.")
    else:
        verdict = "decided apart" if bounds["decided_apart"] else "NOT decided apart"
        p = "-" if bounds["p"] is None else f"{bounds['p']:.3g}"
        lines.append(
            f"Bounds: bound-high {bounds['high']:.4f} vs bound-low {bounds['low']:.4f} "
            f"({bounds['seeds']} paired seed(s); rows only high right {bounds['b']}, only low "
            f"right {bounds['c']}; exact McNemar p = {p}): **{verdict}**."
        )
        if not bounds["decided_apart"]:
            lines.append(
                "The regime cannot separate a known upper and lower bound: no method "
                "comparison below is a result (change the regime: more rounds, a harder "
                "task, a lower smallest rank)."
            )
    if ref in gaps:
        g = gaps[ref]
        lines.append(
            f"`{ref}` closes {100 * g[0]:.0f}% of the gap (95% CI {100 * g[1]:.0f}% to "
            f"{100 * g[2]:.0f}%)."
        )
    lines += [
        "",
        f"| {ref} vs | seeds | acc {ref} | acc arm | diff | 95% CI (bootstrap) | only {ref} "
        "right / only arm right | p per seed | p pooled | p Holm | verdict | gap closed by arm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in found["arms"].items():
        gap = gaps.get(arm)
        gap_text = (
            "-"
            if gap is None
            else f"{100 * gap[0]:.0f}% ({100 * gap[1]:.0f} to {100 * gap[2]:.0f})"
        )
        discordant = "(permutation)" if row["b"] is None else f"{row['b']} / {row['c']}"
        lines.append(
            f"| {arm} | {row['seeds']} | {row['reference_acc']:.4f} | {row['arm_acc']:.4f} | "
            f"{row['diff']:+.4f} | {row['ci'][0]:+.4f} to {row['ci'][1]:+.4f} | "
            f"{discordant} | {', '.join(f'{p:.3g}' for p in row['per_seed_p'])} | "
            f"{row['p']:.3g} | {row['p_holm']:.3g} | {ref} {row['verdict']} | {gap_text} |"
        )
    lines += [
        "",
        f"diff = accuracy of {ref} minus the arm's (mean over paired seeds). McNemar's exact "
        "test per seed and pooled (discordant rows summed over seeds); the pooled p-values "
        f"are Holm-adjusted over the {len(found['arms'])} arm(s) of this table; decided at "
        f"adjusted p < {found['alpha']}. The tests cover the evaluated rows, not training "
        "noise: that is what the seeds are for. An arm evaluated per client (FedSA-LoRA: "
        "each client's own model) scores a row by the fraction of its clients right; "
        "McNemar does not apply there, so its p-values come from a paired sign-flip "
        "permutation test on the per-row differences (20,000 flips).",
    ]
    return "\n".join(lines) + "\n"


def _mean_evaluated(values) -> float:
    """Mean of the seeds that evaluated this round (NaN, a gap in a plot, if none did)."""
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else float("nan")


def rounds_markdown(rows: Mapping[str, list[dict]]) -> str:
    """Accuracy by round (round 0 = before training), mean over each arm's seeds."""
    if not rows:
        return ""
    count = max(len(r["accuracy_by_round"]) for runs in rows.values() for r in runs)
    lines = [
        "Accuracy by round (mean over seeds):",
        "",
        "| arm | " + " | ".join(f"round {i}" for i in range(count)) + " |",
        "|---|" + "---|" * count,
    ]
    for arm, runs in rows.items():
        cells = []
        for i in range(count):
            values = [
                r["accuracy_by_round"][i]
                for r in runs
                if i < len(r["accuracy_by_round"]) and r["accuracy_by_round"][i] is not None
            ]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The paper's headline numbers (arXiv 2411.06581, abstract): HAFLQ against its baseline.
PAPER_CLAIMS = {"memory": -31.0, "communication": -49.0, "accuracy": 50.0}
CLAIM_LABELS = {
    "memory": "peak client memory (mean over tiers)",
    "communication": "uplink bytes (whole run)",
    "accuracy": "final test accuracy",
}


def mean_tier_peak(run: Mapping[str, Any], tiers: Sequence[str] | None = None) -> float | None:
    """Mean over ``tiers`` (default: all of the run's) of each tier's peak training
    memory in one run; ``None`` if one of them has no measurement."""
    names = list(run["tiers"]) if tiers is None else list(tiers)
    peaks = [run["tiers"].get(t, {}).get("peak_mem_bytes") for t in names]
    if not peaks or not all(peaks):
        return None
    return statistics.fmean(peaks)


def relative_change(ours: Sequence[float | None], base: Sequence[float | None]) -> dict[str, Any]:
    """``100 (mean(ours) - mean(base)) / mean(base)``, and whether the difference of
    means exceeds twice its standard error (``resolved``; never with one run per side,
    where the spread is unknown)."""
    a = [v for v in ours if v is not None]
    b = [v for v in base if v is not None]
    if not a or not b or statistics.fmean(b) == 0:
        return {"ours": None, "baseline": None, "change_pct": None, "resolved": False}
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    out: dict[str, Any] = {
        "ours": mean_a,
        "baseline": mean_b,
        "ours_sd": statistics.stdev(a) if len(a) > 1 else None,
        "baseline_sd": statistics.stdev(b) if len(b) > 1 else None,
        "n": [len(a), len(b)],
        "change_pct": 100.0 * (mean_a - mean_b) / mean_b,
    }
    if len(a) > 1 and len(b) > 1:
        se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        out["resolved"] = abs(mean_a - mean_b) > 2 * se
    else:
        out["resolved"] = False
    return out


def paper_claims(ours: Sequence[dict], base: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Relative memory, communication and accuracy change of ``ours`` (an arm's runs,
    one per seed) against ``base``, with the paper's numbers."""
    # memory: the same tiers on both sides (a tier one run lacks would skew the mean)
    common = set.intersection(*(set(r["tiers"]) for r in (*ours, *base)))
    tiers = sorted(common)
    found = {
        "memory": relative_change(
            [mean_tier_peak(r, tiers) for r in ours], [mean_tier_peak(r, tiers) for r in base]
        ),
        "communication": relative_change(
            [r["bytes_up"] for r in ours], [r["bytes_up"] for r in base]
        ),
        "accuracy": relative_change(
            [r["final_accuracy"] for r in ours], [r["final_accuracy"] for r in base]
        ),
    }
    for key, row in found.items():
        row["paper_pct"] = PAPER_CLAIMS[key]
    return found


def claims_markdown(found: Mapping[str, Mapping[str, Any]], arm: str, baseline: str) -> str:
    """The claims table: ours next to the paper's."""
    lines = [
        f"Paper's claims: `{arm}` against `{baseline}` (mean over seeds). Accuracy is decided "
        "by the pooled exact McNemar test on the same rows (p < 0.05) where the runs wrote "
        "predictions; memory and bytes, measured per run, when the difference exceeds twice "
        "its standard error (2+ seeds per arm)",
        "",
        f"| quantity | paper | ours | {arm} | {baseline} | decided |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in found.items():
        if row["change_pct"] is None:
            lines.append(f"| {CLAIM_LABELS[key]} | {row['paper_pct']:+.0f}% | - | - | - | - |")
            continue
        scale, unit = (1e6, " MB") if key != "accuracy" else (1.0, "")
        fmt = "{:.4f}" if key == "accuracy" else "{:.1f}"

        def cell(mean, sd, scale=scale, unit=unit, fmt=fmt):
            text = fmt.format(mean / scale) + unit
            return text + (f" ± {fmt.format(sd / scale)}" if sd is not None else "")

        lines.append(
            f"| {CLAIM_LABELS[key]} | {row['paper_pct']:+.0f}% | {row['change_pct']:+.1f}% | "
            f"{cell(row['ours'], row['ours_sd'])} | {cell(row['baseline'], row['baseline_sd'])}"
            f" | {'yes' if row['resolved'] else 'no'}"
            + (f" (p = {row['p']:.3g})" if row.get("p") is not None else "")
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(
    rows: Mapping[str, list[dict]], out_dir: Path, tiers: Sequence[str] | None = None
) -> None:
    """accuracy vs round and vs cumulative uplink (mean over each arm's seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, runs in rows.items():
        count = min(len(r["accuracy_by_round"]) for r in runs)
        acc = [_mean_evaluated(r["accuracy_by_round"][i] for r in runs) for i in range(count)]
        up = [statistics.fmean(r["cum_bytes_up_by_round"][i] for r in runs) for i in range(count)]
        label = arm if len(runs) == 1 else f"{arm} ({len(runs)} seeds)"
        ax1.plot(range(count), acc, marker="o", label=label)
        ax2.plot([b / 1e6 for b in up], acc, marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("cumulative uplink (MB)")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    plot_memory(rows, out_dir, tiers)


def plot_memory(
    rows: Mapping[str, list[dict]], out_dir: Path, tiers: Sequence[str] | None = None
) -> None:
    """memory.png: peak training memory (and base weight bytes, where measured) per
    tier, one group of bars per arm (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if tiers is None:  # in the order first seen
        tiers = list(dict.fromkeys(t for runs in rows.values() for t in runs[0]["tiers"]))
    if not tiers:
        return
    with_weights = any(
        t.get("weight_bytes") for runs in rows.values() for t in runs[0]["tiers"].values()
    )
    panels = [("peak_mem_bytes", "peak training memory (MiB)")]
    if with_weights:
        panels.append(("weight_bytes", "base weights (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / len(rows)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for i, (arm, runs) in enumerate(rows.items()):
            values = [runs[0]["tiers"].get(t, {}).get(key, 0) / 2**20 for t in tiers]
            ax.bar([x + i * width for x in range(len(tiers))], values, width, label=arm)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tiers))], tiers)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out_dir / "memory.png", dpi=120)
    plt.close(fig)


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (TOML-ish values) into a dict."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        for token in _split(item):
            key, _, value = token.partition("=")
            if not _:
                raise SystemExit(f"error: run-config item {token!r} is not key=value")
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
    return out


# key=value with a TOML value: a quoted string (may hold spaces and escapes) or a bare word
_ITEM = re.compile(r"""\s*([^\s=]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|'[^']*'|[^\s"']+))""")


def _split(text: str) -> list[str]:
    """``key=value`` items of a run-config string; quoted values keep their spaces."""
    items, pos = [], 0
    while text[pos:].strip():
        match = _ITEM.match(text, pos)
        if match is None:
            raise SystemExit(f"error: cannot parse run-config near {text[pos : pos + 40]!r}")
        items.append(match.group(1))
        pos = match.end()
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for every arm's results")
    parser.add_argument("--arms", default="fedit,hetlora,freeze-zeropad,truncate-adaptive,haflq")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--target", type=float, default=None, help="target accuracy")
    parser.add_argument("--run-config", action="append", default=[], help="common overrides")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the table")
    parser.add_argument(
        "--parallel", type=int, default=1, help="arms run at once (e.g. sharing one GPU)"
    )
    parser.add_argument(
        "--claims",
        default=None,
        metavar="ARM:BASELINE",
        help="also compare ARM against BASELINE next to the paper's -31%% memory, -49%% "
        "communication and +50%% accuracy (e.g. haflq-full:paper-baseline)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="arm every other arm is tested against, row by row (default: haflq if run)",
    )
    args, launcher_args = parser.parse_known_args(argv)

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    common = {"num-server-rounds": args.rounds, **_parse_overrides(args.run_config)}
    claims = None
    if args.claims:  # checked before hours of runs, not after
        arm, _, baseline = args.claims.partition(":")
        if not baseline or arm not in arms or baseline not in arms:
            raise SystemExit(
                f"error: --claims {args.claims!r} must be ARM:BASELINE, both among --arms"
            )
        claims = (arm, baseline)
    if not args.summary_only:
        run_grid(out_dir, arms, seeds, common, args.num_supernodes, launcher_args, args.parallel)
    markdown = summarize(out_dir, arms, seeds, args.target, common, claims, args.reference)
    print(markdown)
    print(f"Summary: {out_dir / 'summary.md'}; plot: {out_dir / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
