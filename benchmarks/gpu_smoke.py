"""CUDA-path check: bitsandbytes 4/8-bit on the GPU, LoRA training, measured memory.

Builds a randomly initialized model from a config.json (weights do not change memory or
step time), saves it as a local model directory, and runs it through the project's own
loading, LoRA and training code at each base precision. Accuracy is not meaningful here
(random weights); memory, step time and non-zero LoRA gradients are.

    python benchmarks/gpu_smoke.py --config path/config.json --tokenizer path/ --texts t.csv
    # block-wise bases too (issue 4): uniform levels and a 4/8/16 mix
    python benchmarks/gpu_smoke.py ... --block-patterns 4,8,16,mixed

``weight_bytes`` is the base model's exact weight memory (bitsandbytes statistics
included; LoRA and the head excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from haflq_flower.config import parse_run_config
from haflq_flower.lora.components import lora_modules
from haflq_flower.lora.state import trainable_state
from haflq_flower.lora.view import component_view
from haflq_flower.model import load_lora_model, select_device
from haflq_flower.quant.mixed import base_weight_bytes
from haflq_flower.train import evaluate, train_local


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="a model config.json")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    parser.add_argument("--texts", required=True, help="csv with text,label")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument(
        "--override",
        default="",
        help='config overrides, e.g. "hidden_size=2048 num_hidden_layers=16" (a bigger model)',
    )
    parser.add_argument("--quantizations", default="none,int8,nf4")
    parser.add_argument("--freeze-rank", type=int, default=2, help="also train r of R (freeze)")
    parser.add_argument(
        "--block-patterns",
        default="",
        help='block-wise bases, e.g. "4,8,16,mixed": a uniform level, or mixed (4/8/16 '
        "cycling over the blocks); rows are labelled blocks-<pattern>",
    )
    args = parser.parse_args()

    device = select_device()
    frame = pd.read_csv(args.texts)
    tmp = Path(tempfile.mkdtemp())
    config = AutoConfig.from_pretrained(args.config)
    for item in args.override.split():
        key, _, value = item.partition("=")
        setattr(config, key, type(getattr(config, key))(value))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(tmp)

    rows = []
    num_blocks = config.num_hidden_layers
    jobs = [(q, q, None, f) for q in args.quantizations.split(",") if q for f in (False, True)]
    for name in filter(None, args.block_patterns.split(",")):
        bits = (
            tuple((4, 8, 16)[i % 3] for i in range(num_blocks))
            if name == "mixed"
            else (int(name),) * num_blocks
        )
        jobs.append((f"blocks-{name}", "nf4", bits, False))
    for quant, quantization, block_bits, freeze in jobs:
        cfg = parse_run_config(
            {
                "model.name": str(tmp),
                "model.quantization": quantization,
                "train.local-steps": args.steps,
                "train.batch-size": args.batch_size,
            }
        )
        torch.cuda.empty_cache() if device.type == "cuda" else None
        model, tok = load_lora_model(cfg.model, cfg.lora, 2, 0, device, block_bits)
        weight_bytes = base_weight_bytes(model)

        sel = {m: np.arange(args.freeze_rank) for m in lora_modules(trainable_state(model))}
        ctx = component_view(model, sel, "freeze") if freeze else contextlib.nullcontext()
        with ctx as view:
            res = train_local(
                model,
                tok,
                frame,
                cfg.train,
                max_length=64,
                compute_dtype="bfloat16",
                device=device,
                seed=0,
                after_backward=view.track_importance if freeze else None,
            )
        # One more step with grads kept, to check LoRA-B gets gradients after an eval pass.
        evaluate(
            model,
            tok,
            frame.head(16),
            batch_size=16,
            max_length=64,
            compute_dtype="bfloat16",
            device=device,
        )
        grads_ok = _lora_grads_nonzero(model, tok, frame, device)
        kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
        rows.append(
            {
                "quantization": quant,
                "trained_rank": args.freeze_rank if freeze else cfg.lora.rank,
                "optimizer_state_bytes": res.optimizer_state_bytes,
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "params": sum(p.numel() for p in model.parameters()),
                "weight_bytes": weight_bytes,
                "peak_train_bytes": res.peak_mem_bytes,
                "s_per_step": res.train_s / res.steps,
                "lora_grads_nonzero": grads_ok,
                "linear_types": kinds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # row by row: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(rows, indent=2))
        # PEFT models hold reference cycles: collect them, or the next row's peak includes
        # this model's weights.
        del model, tok, ctx, view
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None


def _lora_grads_nonzero(model, tok, frame, device) -> bool:
    from haflq_flower.data import tokenize
    from haflq_flower.train import autocast_for

    model.train()
    batch = tokenize(tok, frame["text"].head(4).tolist(), 64, device)
    with autocast_for(device, "bfloat16"):
        loss = model(
            **batch, labels=torch.tensor(frame["label"].head(4).tolist(), device=device)
        ).loss
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    return bool(grads) and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.1f}s")
