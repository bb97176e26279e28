"""Does salience pick the right blocks? The base model's held-out loss at equal budgets.

For three weight-memory budgets (the tiers of ``benchmarks/block_precision.py``), build
the base LM with the bit pattern each salience metric allocates (real bitsandbytes
modules), and with random orders under the same budget, and measure its next-token
loss on held-out text (the task's test split, which calibration never sees). A
metric that ranks blocks well gives a lower loss than random orders at the same bytes.
Uniform 4/8/16-bit rows anchor the scale. Calibration: ``--calibration-rows`` rows of
the training split (what one calibration client would use).

    python benchmarks/block_salience.py --out outputs/bench-salience

Writes ``salience.json`` and ``salience.md`` (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from haflq_flower.config import parse_run_config
from haflq_flower.data import load_task, tokenize
from haflq_flower.model import load_calibration_model, release_freed_memory
from haflq_flower.quant.blocks import (
    BlockLayout,
    allocate_block_bits,
    pattern_to_str,
    random_salience,
)
from haflq_flower.quant.mixed import apply_block_bits, base_weight_bytes, block_layout
from haflq_flower.quant.salience import METRICS, block_salience, lm_loss

# Tier budgets as positions between uniform patterns: low = 1/4 of the way from all-4 to
# all-8 bits, mid = 3/4 of the way, high = halfway from all-8 to all-16.
TIER_POSITIONS = {"low": (4, 8, 0.25), "mid": (4, 8, 0.75), "high": (8, 16, 0.5)}


def tier_budgets(layout: BlockLayout) -> dict[str, float]:
    """Weight-memory budget (bytes) of each tier, from the model's own layout."""
    n = layout.num_blocks
    out = {}
    for tier, (lo, hi, frac) in TIER_POSITIONS.items():
        a, b = layout.weight_bytes((lo,) * n), layout.weight_bytes((hi,) * n)
        out[tier] = a + frac * (b - a)
    return out


def held_out_loss(cfg, pattern, texts, batch_size: int = 16) -> tuple[float, int]:
    device = torch.device("cpu")
    model, tokenizer = load_calibration_model(cfg.model, device)
    apply_block_bits(model, pattern, torch.float32, device)
    weight = base_weight_bytes(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, texts[i : i + batch_size], cfg.model.max_length)
            tokens = int(batch["attention_mask"].sum() - len(batch["attention_mask"]))
            total += float(lm_loss(model, batch)) * tokens
            count += tokens
    del model
    release_freed_memory()
    return total / count, weight


def summary_table(
    rows: list[dict], tiers: list[str], seconds: dict[str, float], calibration_rows: int
) -> str:
    """The markdown table of docs/benchmarks.md: held-out loss per budget and arm."""
    lines = [
        "| budget | uniform-4 | "
        + " | ".join(METRICS)
        + " | random (mean ± sd, n) | best random |",
        "|---|---|" + "---|" * len(METRICS) + "---|---|",
    ]
    uniform = {r["arm"]: r for r in rows if r["tier"] == "uniform"}
    for tier in tiers:
        cells = {r["arm"]: r for r in rows if r["tier"] == tier}
        rand = [r["loss"] for a, r in cells.items() if a.startswith("random")]
        mib = cells["gradient"]["block_mib"]
        lines.append(
            f"| {tier} ({mib:.0f} MiB of blocks) | {uniform['uniform-4']['loss']:.4f} | "
            # each metric's loss, and how many of the random orders it beats
            + " | ".join(
                f"{cells[m]['loss']:.4f} ({sum(r > cells[m]['loss'] for r in rand)}/{len(rand)})"
                for m in METRICS
            )
            + f" | {statistics.fmean(rand):.4f} ± {statistics.stdev(rand):.4f} ({len(rand)})"
            + f" | {min(rand):.4f} |"
        )
    lines.append(
        "\nUniform: "
        + ", ".join(f"{a} {r['loss']:.4f} ({r['block_mib']:.0f} MiB)" for a, r in uniform.items())
        + f"; calibration rows: {calibration_rows}; salience time: "
        + ", ".join(f"{m} {s:.1f} s" for m, s in seconds.items())
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--calibration-rows", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiers", default=",".join(TIER_POSITIONS), help="budgets to test")
    args = parser.parse_args(argv)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    cfg = parse_run_config({"model.name": args.model, "model.compute-dtype": "float32"})
    task = load_task(cfg.data)
    calib_texts = task.train.sample(n=args.calibration_rows, random_state=0)["text"].tolist()
    eval_texts = task.test["text"].tolist()[: args.eval_rows]

    model, tokenizer = load_calibration_model(cfg.model, torch.device("cpu"))
    layout = block_layout(model)
    batch = tokenize(tokenizer, calib_texts, cfg.model.max_length)
    salience, seconds = {}, {}
    for metric in METRICS:
        start = time.perf_counter()
        salience[metric] = block_salience(model, batch, metric)
        seconds[metric] = time.perf_counter() - start
        print(f"{metric}: {seconds[metric]:.1f} s", flush=True)
    del model
    release_freed_memory()

    # Embeddings of the causal LM are tied to its head and stay fp32 here; the table
    # reports block bytes, which is what the patterns change.
    n = layout.num_blocks
    rows = []

    def record(tier: str, arm: str, pattern) -> None:
        loss, weight = held_out_loss(cfg, pattern, eval_texts)
        rows.append(
            {
                "tier": tier,
                "arm": arm,
                "pattern": pattern_to_str(pattern),
                "block_mib": (weight - layout.fixed_bytes) / 2**20,
                "loss": loss,
            }
        )
        print(
            f"{tier:5s} {arm:14s} loss {loss:.4f} blocks {rows[-1]['block_mib']:.1f} MiB",
            flush=True,
        )

    for bits in (16, 8, 4):
        record("uniform", f"uniform-{bits}", (bits,) * n)
    for tier, budget in tier_budgets(layout).items():
        if tier not in tiers:
            continue
        for metric in METRICS:
            record(tier, metric, allocate_block_bits(salience[metric], layout, budget))
        for seed in range(args.random_seeds):
            record(
                tier,
                f"random-{seed}",
                allocate_block_bits(random_salience(n, seed), layout, budget),
            )

    (out / "salience.json").write_text(
        json.dumps(
            {
                "salience": {m: v.tolist() for m, v in salience.items()},
                "seconds": seconds,
                "rows": rows,
            },
            indent=2,
        )
    )
    text = summary_table(rows, tiers, seconds, args.calibration_rows)
    (out / "salience.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
