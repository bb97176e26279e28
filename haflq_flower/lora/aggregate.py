"""Aggregation math on adapter states, free of Flower, Ray and models.

- :func:`weighted_average`: FedIT's factor averaging (homogeneous ranks).
- :func:`aggregate_components`: HAFLQ's rank-1 aggregation of component *deltas*, either
  adaptive (each component averaged over the clients that uploaded it) or zero-padded
  (missing components count as a zero delta over every participant: the dilution
  baseline).
- :func:`aggregate_hetlora`: HetLoRA's zero-padded, norm-weighted average of *values*.

Every function computes in float64 and returns float32 arrays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .components import A_SUFFIX, B_SUFFIX, Selection, a_key, b_key, lora_modules, other_keys
from .state import LoraState

ADAPTIVE = "adaptive"
ZERO_PAD = "zero-pad"
AGGREGATIONS = (ADAPTIVE, ZERO_PAD)


def _normalized(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    return w / w.sum()


def weighted_average(states: Sequence[LoraState], weights: Sequence[float]) -> LoraState:
    """``sum_k w_k x_k / sum_k w_k`` for every array, in float64, returned as float32.

    This is FedIT's factor averaging when applied to LoRA A and B separately; note that
    the product of averages is not the average of products (see docs/algorithms.md).
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = _normalized(weights)
    out: LoraState = OrderedDict()
    for name in states[0]:
        acc = np.zeros(states[0][name].shape, dtype=np.float64)
        for wk, state in zip(w, states, strict=True):
            acc += wk * state[name]
        out[name] = acc.astype(np.float32)
    return out


@dataclass
class ComponentUpload:
    """What one client sent: the components it updated, as deltas.

    Attributes
    ----------
    weight : float
        The client's aggregation weight n_k (its local dataset size).
    selection : Selection
        Per LoRA module, the global indices of the uploaded components.
    delta : LoraState
        A sub-state of deltas: ``A[idx, :]`` rows and ``B[:, idx]`` columns in selection
        order, and whole deltas of the non-LoRA parameters (the head).
    """

    weight: float
    selection: Selection
    delta: LoraState


def aggregate_components(
    global_state: LoraState, uploads: Sequence[ComponentUpload], rule: str = ADAPTIVE
) -> LoraState:
    """Rank-1 aggregation of component deltas.

    For every module ``m`` and component ``i``, with ``K`` the clients that uploaded it:

    - ``adaptive``: ``x += sum_{k in K} n_k dx_k / sum_{k in K} n_k`` if ``K`` is not
      empty, else ``x`` is unchanged (bit-identical);
    - ``zero-pad``: ``x += sum_{k in K} n_k dx_k / sum_{all k} n_k`` (missing = zero).

    Non-LoRA parameters are FedAvg'd over all participants under both rules. Averaging
    ``b`` and ``a`` separately keeps the factor cross-term within a component (see
    docs/algorithms.md); this is the method, not an approximation of this code.
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation rule {rule!r}; allowed: {AGGREGATIONS}")
    if not uploads:
        raise ValueError("aggregate_components needs at least one upload")
    weights = np.array([u.weight for u in uploads], dtype=np.float64)
    _normalized(weights)  # validates
    total = weights.sum()
    out: LoraState = OrderedDict((k, v.astype(np.float64)) for k, v in global_state.items())
    for module in lora_modules(global_state):
        ak, bk = a_key(module), b_key(module)
        num_a = np.zeros_like(out[ak])
        num_b = np.zeros_like(out[bk])
        den = np.zeros(out[ak].shape[0], dtype=np.float64)
        for w, up in zip(weights, uploads, strict=True):
            idx = up.selection[module]
            num_a[idx, :] += w * up.delta[ak]
            num_b[:, idx] += w * up.delta[bk]
            den[idx] += w
        if rule == ADAPTIVE:
            hit = den > 0
            out[ak][hit, :] += num_a[hit, :] / den[hit, None]
            out[bk][:, hit] += num_b[:, hit] / den[None, hit]
        else:
            out[ak] += num_a / total
            out[bk] += num_b / total
    for key in other_keys(global_state):
        out[key] += sum(w * up.delta[key] for w, up in zip(weights, uploads, strict=True)) / total
    return OrderedDict((k, v.astype(np.float32)) for k, v in out.items())


def component_counts(rank: int, modules: list[str], uploads: Sequence[ComponentUpload]):
    """Per module, how many clients uploaded each component (for logs and results)."""
    counts = {m: np.zeros(rank, dtype=np.int64) for m in modules}
    for up in uploads:
        for m in modules:
            counts[m][up.selection[m]] += 1
    return counts


def hetlora_weights(values: Sequence[LoraState], module: str) -> np.ndarray:
    """HetLoRA's per-client weights for one module: ``||B_k A_k||_F / sum_j ||B_j A_j||_F``.

    Falls back to equal weights when every product is zero (e.g. before any training).
    """
    norms = np.array(
        [
            np.linalg.norm(
                v[b_key(module)].astype(np.float64) @ v[a_key(module)].astype(np.float64)
            )
            for v in values
        ]
    )
    if norms.sum() <= 0 or not np.isfinite(norms).all():
        return np.full(len(values), 1.0 / len(values))
    return norms / norms.sum()


def aggregate_hetlora(global_state: LoraState, uploads: Sequence[ComponentUpload]) -> LoraState:
    """HetLoRA: zero-pad every client's truncated factors to R and average the *values*.

    ``A = sum_k w_k pad(A_k)``, ``B = sum_k w_k pad(B_k)`` per module with the norm-based
    weights of :func:`hetlora_weights`; a component no client holds becomes zero (the
    dilution the paper criticizes). Client values are the global components they
    received plus their deltas. The head is FedAvg'd with ``n_k`` weights.
    """
    if not uploads:
        raise ValueError("aggregate_hetlora needs at least one upload")
    out: LoraState = OrderedDict()
    modules = lora_modules(global_state)
    values: list[LoraState] = []
    for up in uploads:
        v: LoraState = OrderedDict()
        for m in modules:
            idx = up.selection[m]
            v[a_key(m)] = global_state[a_key(m)][idx, :] + up.delta[a_key(m)]
            v[b_key(m)] = global_state[b_key(m)][:, idx] + up.delta[b_key(m)]
        values.append(v)
    for m in modules:
        w = hetlora_weights(values, m)
        ak, bk = a_key(m), b_key(m)
        acc_a = np.zeros(global_state[ak].shape, dtype=np.float64)
        acc_b = np.zeros(global_state[bk].shape, dtype=np.float64)
        for wk, up, v in zip(w, uploads, values, strict=True):
            acc_a[up.selection[m], :] += wk * v[ak]
            acc_b[:, up.selection[m]] += wk * v[bk]
        out[ak], out[bk] = acc_a.astype(np.float32), acc_b.astype(np.float32)
    p = _normalized([u.weight for u in uploads])
    for key in other_keys(global_state):
        delta = sum(pk * up.delta[key] for pk, up in zip(p, uploads, strict=True))
        out[key] = (global_state[key] + delta).astype(np.float32)
    return OrderedDict((k, out[k]) for k in global_state)


__all__ = [
    "A_SUFFIX",
    "ADAPTIVE",
    "AGGREGATIONS",
    "B_SUFFIX",
    "ComponentUpload",
    "Selection",
    "ZERO_PAD",
    "aggregate_components",
    "aggregate_hetlora",
    "component_counts",
    "hetlora_weights",
    "weighted_average",
]
