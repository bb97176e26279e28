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
allocation the federated run uses). Each pattern runs without and with
``train.gradient-checkpointing`` (``--checkpointing``).

"Training memory" is the peak RSS minus the RSS before the model was loaded: on CPU the
runtime (Python, torch, data, tokenizer: ~500 MB) is in every client's RSS whatever its
base precision, as the CUDA context is on a GPU, where ``max_memory_allocated`` leaves
it out. Both figures are reported. On a GPU every column is the CUDA allocator's
(``memory_allocated`` before and after loading, ``max_memory_allocated`` during training),
so "runtime" is 0 there and training memory equals the peak.

``--malloc-mmap-threshold BYTES`` runs the children with glibc's
``MALLOC_MMAP_THRESHOLD_`` set: every allocation above it gets its own mapping, returned
to the OS when freed, so RSS follows live memory instead of what glibc's heap keeps after
transient buffers (bitsandbytes dequantizes every quantized layer in every call).

Writes ``memory.json``, ``memory.md`` (the table) and ``memory.png`` (weights and training
memory per pattern, with the paper's -31% against uniform-8) to ``--out``; ``--replot``
rewrites the last two from ``memory.json`` without measuring again.

``--override`` measures a random-initialized model of another shape (SmolLM2's config
with the given fields changed; memory does not depend on the weights' values), e.g. a
1.1B-parameter Llama shape:

    python benchmarks/block_memory.py --out outputs/bench-memory
    python benchmarks/block_memory.py --out outputs/bench-memory-1b --steps 2 \
        --override "hidden_size=2048 intermediate_size=5632 num_hidden_layers=22 \
                    num_attention_heads=32 num_key_value_heads=4 tie_word_embeddings=False"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(pattern: str, steps: int, model_name: str, checkpointing: bool) -> dict:
    """Runs in the child process."""
    import torch

    from haflq_flower.config import parse_run_config
    from haflq_flower.data import load_task
    from haflq_flower.model import load_lora_model, select_device
    from haflq_flower.quant.blocks import pattern_from_str
    from haflq_flower.quant.mixed import base_weight_bytes
    from haflq_flower.train import _rss_bytes, train_local

    torch.set_num_threads(2)
    cfg = parse_run_config(
        {
            "model.name": model_name,
            "train.local-steps": 1,
            "train.gradient-checkpointing": checkpointing,
        }
    )
    task = load_task(cfg.data)
    device = select_device()

    def resident() -> int:
        # On a GPU every figure is the CUDA allocator's, as the peak is.
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()

    runtime_rss = resident()
    bits = pattern_from_str(pattern)
    model, tokenizer = load_lora_model(cfg.model, cfg.lora, task.num_labels, 0, device, bits)
    loaded_rss = resident()
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
        "checkpointing": checkpointing,
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


def override_model(override: str, out: Path) -> str:
    """Save (once) a random-initialized model: SmolLM2's config with ``override`` applied."""
    import hashlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from haflq_flower.config import parse_run_config
    from haflq_flower.model import resolve_model_path

    target = out / f"model-{hashlib.sha256(override.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return str(target)
    source = resolve_model_path(parse_run_config({}).model)
    config = AutoConfig.from_pretrained(source)
    for item in override.split():
        key, _, value = item.partition("=")
        current = getattr(config, key)
        setattr(config, key, value == "True" if isinstance(current, bool) else type(current)(value))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    print(f"random-initialized model: {params / 1e9:.2f}B parameters in {target}", flush=True)
    return str(target)


def memory_kind(rows: list[dict]) -> str:
    return "RSS" if rows[0]["device"] == "cpu" else "CUDA allocated"


def table(rows: list[dict], steps: int) -> str:
    base8 = {r["checkpointing"]: r for r in rows if r["name"] == "uniform-8"}
    mem = memory_kind(rows)
    lines = [
        "| base | blocks at 4/8/16 bits | checkpointing | weights (MiB) "
        f"| peak {mem} (MiB) | vs uniform-8 | training memory (MiB) | vs uniform-8 "
        f"| {mem} before / after load (MiB) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base8[r["checkpointing"]]
        levels = [int(b) for b in r["pattern"].split(",")]
        counts = "/".join(str(levels.count(b)) for b in (4, 8, 16))
        train_mem = r["peak_mem_bytes"] - r["runtime_rss_bytes"]
        ref_train = ref["peak_mem_bytes"] - ref["runtime_rss_bytes"]
        lines.append(
            f"| {r['name']} | {counts} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['weight_bytes'] / 2**20:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
            f"{100 * (r['peak_mem_bytes'] / ref['peak_mem_bytes'] - 1):+.1f}% | "
            f"{train_mem / 2**20:.0f} | {100 * (train_mem / ref_train - 1):+.1f}% | "
            f"{r['runtime_rss_bytes'] / 2**20:.0f} / {r['loaded_rss_bytes'] / 2**20:.0f} | "
            f"{r['step_s']:.2f} |"
        )
    device = rows[0]["device"]
    return "\n".join(lines) + f"\n\nDevice: {device}; {steps} steps, batch 8.\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bars per pattern: base weights and training memory (checkpointing on where measured),
    with the paper's target, 31% below uniform-8's training memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpt = any(r["checkpointing"] for r in rows)
    rows = [r for r in rows if r["checkpointing"] == ckpt]
    names = [r["name"].split(" (")[0] for r in rows]
    weights = [r["weight_bytes"] / 2**20 for r in rows]
    train = [(r["peak_mem_bytes"] - r["runtime_rss_bytes"]) / 2**20 for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([i - 0.2 for i in x], weights, 0.4, label="base weights")
    ax.bar(
        [i + 0.2 for i in x],
        train,
        0.4,
        label=f"training memory (peak {memory_kind(rows)} - before load)",
    )
    ref = train[names.index("uniform-8")]
    ax.axhline(0.69 * ref, color="k", ls="--", lw=1, label="uniform-8 training memory - 31%")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB")
    ax.set_title(f"{title} (checkpointing {'on' if ckpt else 'off'})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--override", default="", help="random model of another shape")
    parser.add_argument("--metric", default="gradient")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, help="bytes; 0: glibc's")
    parser.add_argument("--replot", action="store_true", help="table and plot from memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.child, args.steps, args.model, args.child_checkpointing)
        print(json.dumps(result))
        return 0
    out = Path(args.out)
    if args.replot:
        return report(json.loads((out / "memory.json").read_text()), out, args)
    out.mkdir(parents=True, exist_ok=True)
    model = override_model(args.override, out) if args.override else args.model
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    rows = []
    for name, pattern in patterns(model, args.metric).items():
        for checkpointing in modes:
            cmd = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps)]
            cmd += ["--model", model, "--child", pattern]
            cmd += ["--child-checkpointing"] if checkpointing else []
            env = dict(os.environ)
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"pattern {name} failed (exit {proc.returncode})")
            row = {"name": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            mib = {k: row[k] / 2**20 for k in ("weight_bytes", "peak_mem_bytes")}
            print(
                f"{name:22s} ckpt {'on ' if checkpointing else 'off'} weights "
                f"{mib['weight_bytes']:7.1f} MiB  peak {mib['peak_mem_bytes']:7.0f} MiB  "
                f"runtime {row['runtime_rss_bytes'] / 2**20:5.0f} MiB  {row['step_s']:.2f} s/step",
                flush=True,
            )
            (out / "memory.json").write_text(json.dumps(rows, indent=2))
    return report(rows, out, args)


def report(rows: list[dict], out: Path, args: argparse.Namespace) -> int:
    """memory.md (the table) and memory.png (the plot) in ``out``."""
    text = table(rows, args.steps)
    if args.malloc_mmap_threshold:
        text += f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}.\n"
    (out / "memory.md").write_text(text)
    title = "random model, --override shape" if args.override else args.model
    plot(rows, out / "memory.png", title)
    print(text)
    print(f"Table: {out / 'memory.md'}; plot: {out / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
