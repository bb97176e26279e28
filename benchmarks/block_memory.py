"""Weight bytes, peak training memory and time per step of one client, per base pattern.

Each pattern runs in a fresh Python process (so allocator leftovers of one pattern never
inflate the next): load the base with the pattern (real bitsandbytes modules), add LoRA,
run ``--steps`` local training steps on the task, and report

- exact weight bytes of the base (``quant.mixed.base_weight_bytes``),
- peak memory during training: sampled process RSS on CPU (``train.peak_memory``),
  ``torch.cuda.max_memory_allocated`` on GPU,
- RSS before the model was loaded (the runtime: Python, torch, data, tokenizer) and
  right after (CPU),
- seconds per step (after one warm-up step).

Patterns: uniform 16/8/4 bits and the salience patterns of the three tiers of
``benchmarks/block_precision.py`` (gradient salience from 16 training rows, the same
allocation the federated run uses).

    python benchmarks/block_memory.py --out outputs/bench-memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(pattern: str, steps: int, model_name: str, metric: str) -> dict:
    """Runs in the child process."""
    import torch

    from haflq_flower.config import parse_run_config
    from haflq_flower.data import load_task
    from haflq_flower.model import load_lora_model, select_device
    from haflq_flower.quant.blocks import pattern_from_str
    from haflq_flower.quant.mixed import base_weight_bytes
    from haflq_flower.train import _rss_bytes, train_local

    torch.set_num_threads(2)
    cfg = parse_run_config({"model.name": model_name, "train.local-steps": 1})
    task = load_task(cfg.data)
    device = select_device()
    runtime_rss = _rss_bytes()
    bits = pattern_from_str(pattern)
    model, tokenizer = load_lora_model(cfg.model, cfg.lora, task.num_labels, 0, device, bits)
    loaded_rss = _rss_bytes()
    frame = task.train.iloc[:400]

    def train(n: int, seed: int):
        from dataclasses import replace

        return train_local(
            model,
            tokenizer,
            frame,
            replace(cfg.train, local_steps=n),
            max_length=cfg.model.max_length,
            compute_dtype=cfg.model.compute_dtype,
            device=device,
            seed=seed,
            desc="memory",
        )

    train(1, seed=0)  # warm-up (first-call allocations, bnb kernels)
    start = time.perf_counter()
    result = train(steps, seed=1)
    return {
        "pattern": pattern,
        "device": str(device),
        "weight_bytes": base_weight_bytes(model),
        "peak_mem_bytes": result.peak_mem_bytes,
        "runtime_rss_bytes": runtime_rss,
        "loaded_rss_bytes": loaded_rss,
        "step_s": (time.perf_counter() - start) / steps,
    }


def patterns(model_name: str, metric: str) -> dict[str, str]:
    import torch
    from block_salience import tier_budgets

    from haflq_flower.config import parse_run_config
    from haflq_flower.data import load_task, tokenize
    from haflq_flower.model import count_blocks, load_base_model, load_calibration_model
    from haflq_flower.quant.blocks import allocate_block_bits, pattern_to_str
    from haflq_flower.quant.mixed import block_layout
    from haflq_flower.quant.salience import block_salience

    cfg = parse_run_config({"model.name": model_name})
    task = load_task(cfg.data)
    n = count_blocks(cfg.model, task.num_labels)
    model, _ = load_base_model(cfg.model, task.num_labels, torch.device("cpu"), (16,) * n)
    layout = block_layout(model)
    del model
    lm, tokenizer = load_calibration_model(cfg.model, torch.device("cpu"))
    rows = task.train.sample(n=16, random_state=0)["text"].tolist()
    salience = block_salience(lm, tokenize(tokenizer, rows, cfg.model.max_length), metric)
    out = {f"uniform-{b}": pattern_to_str((b,) * n) for b in (16, 8, 4)}
    for tier, budget in tier_budgets(layout).items():
        out[f"{tier} ({budget / 2**20:.1f} MiB)"] = pattern_to_str(
            allocate_block_bits(salience, layout, budget)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metric", default="gradient")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.model, args.metric)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, pattern in patterns(args.model, args.metric).items():
        cmd = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps)]
        cmd += ["--model", args.model, "--child", pattern]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = {"name": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
        rows.append(row)
        mib = {k: row[k] / 2**20 for k in ("weight_bytes", "peak_mem_bytes", "runtime_rss_bytes")}
        print(
            f"{name:22s} weights {mib['weight_bytes']:7.1f} MiB  peak "
            f"{mib['peak_mem_bytes']:7.0f} MiB  runtime {mib['runtime_rss_bytes']:5.0f} MiB  "
            f"{row['step_s']:.2f} s/step",
            flush=True,
        )
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    base8 = next(r for r in rows if r["name"] == "uniform-8")
    lines = [
        "| base | blocks at 4/8/16 bits | weights (MiB) | peak training memory (MiB) "
        "| vs uniform-8 | RSS before / after load (MiB) | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        levels = [int(b) for b in r["pattern"].split(",")]
        counts = "/".join(str(levels.count(b)) for b in (4, 8, 16))
        change = r["peak_mem_bytes"] / base8["peak_mem_bytes"] - 1
        lines.append(
            f"| {r['name']} | {counts} | {r['weight_bytes'] / 2**20:.1f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} | {100 * change:+.1f}% | "
            f"{r['runtime_rss_bytes'] / 2**20:.0f} / {r['loaded_rss_bytes'] / 2**20:.0f} | "
            f"{r['step_s']:.2f} |"
        )
    text = "\n".join(lines) + f"\n\nDevice: {rows[0]['device']}; {args.steps} steps, batch 8.\n"
    (out / "memory.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
