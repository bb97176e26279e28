"""Block salience: how much each transformer block matters, from one calibration batch.

Four metrics, each one number per block (higher = keep at higher precision):

- ``gradient``: gradient sensitivity ``sum |w * dL/dw|`` over the block's linear weights
  (the first-order estimate of the loss change if the block's weights were removed);
- ``influence``: block influence ``1 - mean cos(h_in, h_out)`` over real tokens (a block
  that barely changes its input matters little);
- ``quantization``: the loss increase when only this block's linear weights are
  quantized to 4 bits (NF4 round trip through bitsandbytes) and all others stay exact,
  measured against the exact model's own next-token distribution (the mean KL
  divergence over real tokens). Against the text's labels the difference is noisy in
  sign on a small batch (measured on SmolLM2-135M, 16 rows: 10 of 30 blocks showed a
  loss *decrease* under quantization); the KL form is never negative and is the
  expected loss increase when the exact model is right.
- ``recovery``: the same KL measured at the allocation's own starting point: with every
  block's linear weights NF4-rounded, how much of the KL to the exact model is recovered
  when only this block is restored to exact weights. ``quantization`` asks what 4 bits
  cost one block of an otherwise exact model; ``recovery`` asks what upgrading one block
  buys in an otherwise 4-bit model, which is the decision the allocation makes (errors of
  earlier blocks change what a later block's error does). Same cost: one forward pass
  per block. Recovered KL can be slightly negative on a small batch; it is clipped at 0.

The gradient metric uses the base model's own next-token loss on the calibration text:
it needs no labels and no trained head, so salience is meaningful before the first
round. The model must be unquantized (the metrics look at exact weights).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .blocks import SALIENCE_METRICS
from .mixed import block_linears, transformer_blocks


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over real (non-padding) tokens."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
    ).loss


def gradient_salience(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    blocks = transformer_blocks(model)
    weights = [[lin.weight for _, lin in block_linears(b)] for b in blocks]
    flat = [w for ws in weights for w in ws]
    saved = [w.requires_grad for w in flat]
    try:
        for w in flat:
            w.requires_grad_(True)
        # autograd.grad, not backward: no .grad is left on any parameter
        grads = iter(torch.autograd.grad(lm_loss(model, batch), flat, allow_unused=True))
        scores = []
        for ws in weights:
            total = 0.0
            for w in ws:
                g = next(grads)
                total += 0.0 if g is None else float((w.detach() * g).abs().sum())
            scores.append(total)
    finally:
        for w, flag in zip(flat, saved, strict=True):
            w.requires_grad_(flag)
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


def _next_token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits.float(), dim=-1)[batch["attention_mask"].bool()]


def _kl_to_exact(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """A function giving the model's current mean KL(p_exact || p_now) over real tokens,
    where p_exact is the next-token distribution of the model as it is now."""
    exact_lp = _next_token_log_probs(model, batch)
    exact_p = exact_lp.exp()

    def kl() -> float:
        return float((exact_p * (exact_lp - _next_token_log_probs(model, batch))).sum(-1).mean())

    return kl


def _set_weights(linears: list[nn.Module], weights: list[torch.Tensor]) -> None:
    for lin, w in zip(linears, weights, strict=True):
        lin.weight.data = w


def quantization_salience(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    linears = [[lin for _, lin in block_linears(b)] for b in transformer_blocks(model)]
    scores = []
    with torch.no_grad():
        kl = _kl_to_exact(model, batch)
        for ls in linears:
            exact = [lin.weight.data for lin in ls]
            _set_weights(ls, [nf4_round_trip(w) for w in exact])
            try:
                scores.append(max(kl(), 0.0))
            finally:
                _set_weights(ls, exact)
    return np.asarray(scores, dtype=np.float64)


def recovery_salience(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    linears = [[lin for _, lin in block_linears(b)] for b in transformer_blocks(model)]
    exact = [[lin.weight.data for lin in ls] for ls in linears]
    scores = []
    with torch.no_grad():
        kl = _kl_to_exact(model, batch)
        rounded = [[nf4_round_trip(w) for w in ws] for ws in exact]
        try:
            for ls, ws in zip(linears, rounded, strict=True):
                _set_weights(ls, ws)
            all_4bit = kl()
            for ls, ws, rs in zip(linears, exact, rounded, strict=True):
                _set_weights(ls, ws)  # only this block exact
                scores.append(max(all_4bit - kl(), 0.0))
                _set_weights(ls, rs)
        finally:
            for ls, ws in zip(linears, exact, strict=True):
                _set_weights(ls, ws)
    return np.asarray(scores, dtype=np.float64)


_METRIC_FUNCTIONS = {
    "gradient": gradient_salience,
    "influence": influence_salience,
    "quantization": quantization_salience,
    "recovery": recovery_salience,
}
METRICS = SALIENCE_METRICS
assert tuple(_METRIC_FUNCTIONS) == METRICS, "quant/blocks.py names every metric implemented here"


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
