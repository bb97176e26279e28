"""Robust aggregation: clip each client's update norm before it is averaged.

Reply validation rejects what is malformed; a well-formed update can still be huge (a
bug, a diverged client, an attacker) and drag a weighted average anywhere. With
``strategy.clip-factor = c > 0`` every update ``d_k`` of a round is scaled to

    d_k <- d_k * min(1, tau / ||d_k||),  tau = c * lower_median_k ||d_k||

(norms over the whole update: LoRA factors and head). The *lower* median is the middle
norm for an odd count and the smaller of the two middle ones for an even count, so with
two clients the larger update is bounded by ``c`` times the smaller one. An update of
norm 0 is left as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from .components import LoraState


def state_norm(state: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all arrays of ``state`` taken together (in float64)."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values()))
    )


def clip_scales(norms: Sequence[float], factor: float) -> np.ndarray:
    """Per-update scales ``min(1, factor * lower_median(norms) / norm)``.

    ``factor <= 0`` means no clipping (all ones).
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0 or factor <= 0:
        return np.ones(norms.size)
    if not np.isfinite(norms).all() or (norms < 0).any():
        raise ValueError(f"update norms must be finite and >= 0, got {norms.tolist()}")
    bound = factor * np.sort(norms)[(norms.size - 1) // 2]
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > bound, bound / safe, 1.0)


def clip_weights(weights: Sequence[float], factor: float) -> np.ndarray:
    """Aggregation weights (example counts) capped at ``factor`` times their lower median.

    ``num-examples`` is self-reported: without a cap, one client claiming 10^7 examples
    takes a weighted average over itself. With the cap, one client's weight is at most
    ``factor`` times a typical client's, so with K typical clients its share is at most
    ``factor / (K + factor)``. ``factor <= 0`` means no cap. Returns float64 weights;
    a capped weight is floored to an integer (>= 1) when all inputs are integers.

    Examples
    --------
    >>> clip_weights([100, 120, 10_000_000], 5.0).tolist()
    [100.0, 120.0, 600.0]
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or factor <= 0:
        return w
    bound = factor * np.sort(w)[(w.size - 1) // 2]
    if np.all(np.mod(w, 1) == 0):
        bound = max(1.0, np.floor(bound))
    return np.minimum(w, bound)


def scale_state(state: Mapping[str, np.ndarray], scale: float) -> LoraState:
    """Every array of ``state`` times ``scale``, dtypes kept."""
    return OrderedDict((k, (v * scale).astype(v.dtype)) for k, v in state.items())
