"""Block salience: how much each transformer block matters, from one calibration batch.

Three metrics, each one number per block (higher = keep at higher precision):

- ``gradient``: gradient sensitivity ``sum |w * dL/dw|`` over the block's linear weights
  (the first-order estimate of the loss change if the block's weights were removed);
- ``influence``: block influence ``1 - mean cos(h_in, h_out)`` over real tokens (a block
  that barely changes its input matters little);
- ``quantization``: the loss increase when only this block's linear weights are
  quantized to 4 bits (NF4 round trip through bitsandbytes) and all others stay exact.

The loss is the base model's own next-token loss on the calibration text: it needs no
labels and no trained head, so salience is meaningful before the first round. The model
must be unquantized (the metrics look at exact weights).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .mixed import block_linears, transformer_blocks

METRICS = ("gradient", "influence", "quantization")


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over real (non-padding) tokens."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
    ).loss


def gradient_salience(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    blocks = transformer_blocks(model)
    weights = [[lin.weight for _, lin in block_linears(b)] for b in blocks]
    saved = {id(w): w.requires_grad for ws in weights for w in ws}
    try:
        for ws in weights:
            for w in ws:
                w.requires_grad_(True)
                w.grad = None
        lm_loss(model, batch).backward()
        scores = [
            sum(float((w.detach() * w.grad).abs().sum()) for w in ws if w.grad is not None)
            for ws in weights
        ]
    finally:
        for ws in weights:
            for w in ws:
                w.grad = None
                w.requires_grad_(saved[id(w)])
    return np.asarray(scores, dtype=np.float64)


def influence_salience(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    blocks = transformer_blocks(model)
    mask = batch["attention_mask"].bool()
    scores = [0.0] * len(blocks)

    def hook(index: int) -> Callable:
        def capture(module, args, kwargs, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            scores[index] = float(1.0 - cos[mask].mean())

        return capture

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return np.asarray(scores, dtype=np.float64)


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a 4-bit NF4 layer would see it (quantize, then dequantize)."""
    import bitsandbytes.functional as bnbf

    codes, state = bnbf.quantize_4bit(
        weight.float().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False
    )
    return bnbf.dequantize_4bit(codes, state).to(weight.dtype)


def quantization_salience(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    blocks = transformer_blocks(model)
    with torch.no_grad():
        base = float(lm_loss(model, batch))
        scores = []
        for block in blocks:
            linears = [lin for _, lin in block_linears(block)]
            exact = [lin.weight.data for lin in linears]
            for lin in linears:
                lin.weight.data = nf4_round_trip(lin.weight.data)
            try:
                scores.append(float(lm_loss(model, batch)) - base)
            finally:
                for lin, w in zip(linears, exact, strict=True):
                    lin.weight.data = w
    return np.asarray(scores, dtype=np.float64)


_METRIC_FUNCTIONS = {
    "gradient": gradient_salience,
    "influence": influence_salience,
    "quantization": quantization_salience,
}


def block_salience(model: nn.Module, batch: dict[str, torch.Tensor], metric: str) -> np.ndarray:
    """One salience value per transformer block under ``metric`` (see module doc)."""
    if metric not in _METRIC_FUNCTIONS:
        raise ValueError(f"unknown salience metric {metric!r}; choose one of {METRICS}")
    was_training = model.training
    model.eval()
    try:
        scores = _METRIC_FUNCTIONS[metric](model, batch)
    finally:
        model.train(was_training)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{metric} salience is not finite: {scores}")
    return scores
