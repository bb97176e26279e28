"""Time one evaluation batch and one training step of the default model per base precision
and compute dtype, on this machine (CPU or GPU), through the project's own loading code.

    python benchmarks/cpu_step_time.py --combos none:float32,nf4:float32,int8:float32,none:bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from haflq_flower.config import parse_run_config
from haflq_flower.data import load_task, tokenize
from haflq_flower.model import load_lora_model, select_device
from haflq_flower.train import autocast_for


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--combos", default="none:float32,nf4:float32,int8:float32,nf4:bfloat16")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (best of)")
    args = parser.parse_args()
    device = select_device()
    print(
        f"| base | compute | eval batch of 32 (s) | train step, batch 8 (s, best of {args.steps}) |"
    )
    print("|---|---|---|---|")
    for combo in args.combos.split(","):
        quant, dtype = combo.split(":")
        cfg = parse_run_config(
            {"model.name": args.model, "model.quantization": quant, "model.compute-dtype": dtype}
        )
        texts = load_task(cfg.data).test["text"].tolist()[:32]
        model, tok = load_lora_model(cfg.model, cfg.lora, 2, 0, device)
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast_for(device, dtype):
            model(**tokenize(tok, texts, 64, device))
        eval_s = time.perf_counter() - start
        model.train()
        steps = []
        for i in range(args.steps):
            start = time.perf_counter()
            with autocast_for(device, dtype):
                batch = tokenize(tok, texts[8 * (i % 4) : 8 * (i % 4) + 8], 64, device)
                out = model(**batch, labels=torch.ones(8, dtype=torch.long, device=device))
            out.loss.backward()
            steps.append(time.perf_counter() - start)
        print(f"| {quant} | {dtype} | {eval_s:.2f} | {min(steps):.2f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
