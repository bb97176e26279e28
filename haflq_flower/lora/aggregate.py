"""Aggregation math on adapter states, free of Flower, Ray and models."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .state import LoraState


def weighted_average(states: Sequence[LoraState], weights: Sequence[float]) -> LoraState:
    """``sum_k w_k x_k / sum_k w_k`` for every array, in float64, returned as float32.

    This is FedIT's factor averaging when applied to LoRA A and B separately; note that
    the product of averages is not the average of products (see docs/algorithms.md).
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    w = w / w.sum()
    out: LoraState = OrderedDict()
    for name in states[0]:
        acc = np.zeros(states[0][name].shape, dtype=np.float64)
        for wk, state in zip(w, states, strict=True):
            acc += wk * state[name]
        out[name] = acc.astype(np.float32)
    return out
