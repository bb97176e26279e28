"""Aggregation math on adapter states, free of Flower, Ray and models.

- :func:`weighted_average`: FedIT's factor averaging (homogeneous ranks).
- :func:`aggregate_components`: HAFLQ's rank-1 aggregation of component *deltas*, either
  adaptive (each component averaged over the clients that uploaded it) or zero-padded
  (missing components count as a zero delta over every participant: the dilution
  baseline).
- :func:`aggregate_padded_values`: zero-padded average of truncated client *values*,
  with HetLoRA's norm weights (:func:`aggregate_hetlora`) or FedAvg's n_k weights
  (FedIT with heterogeneous ranks by truncation).
- :func:`aggregate_flexlora`: FlexLoRA's SVD of the aggregated full-size update.
- :func:`stack_flora`: FLoRA's stacking of client factors (exact).
- :func:`aggregate_ffa`: FFA-LoRA's average of B with A frozen (exact).
- :func:`fedex_residual`: FedEx-LoRA's averaged factors plus the residual merged into
  the base (exact).
- :func:`fair_correction`: LoRA-FAIR's server-side correction of the averaged B.

Every function computes in float64 and returns float32 arrays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .components import (
    A_SUFFIX,
    B_SUFFIX,
    ClientUpdate,
    LoraState,
    Selection,
    a_key,
    b_key,
    lora_modules,
    other_keys,
)

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


def aggregate_components(
    global_state: LoraState, updates: Sequence[ClientUpdate], rule: str = ADAPTIVE
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
    if not updates:
        raise ValueError("aggregate_components needs at least one upload")
    weights = np.array([u.num_examples for u in updates], dtype=np.float64)
    _normalized(weights)  # validates
    total = weights.sum()
    out: LoraState = OrderedDict((k, v.astype(np.float64)) for k, v in global_state.items())
    for module in lora_modules(global_state):
        ak, bk = a_key(module), b_key(module)
        num_a = np.zeros_like(out[ak])
        num_b = np.zeros_like(out[bk])
        den = np.zeros(out[ak].shape[0], dtype=np.float64)
        for w, up in zip(weights, updates, strict=True):
            idx = up.selection[module]
            num_a[idx, :] += w * up.arrays[ak]
            num_b[:, idx] += w * up.arrays[bk]
            den[idx] += w
        if rule == ADAPTIVE:
            hit = den > 0
            out[ak][hit, :] += num_a[hit, :] / den[hit, None]
            out[bk][:, hit] += num_b[:, hit] / den[None, hit]
        else:
            out[ak] += num_a / total
            out[bk] += num_b / total
    for key in other_keys(global_state):
        out[key] += sum(w * up.arrays[key] for w, up in zip(weights, updates, strict=True)) / total
    return OrderedDict((k, v.astype(np.float32)) for k, v in out.items())


def component_counts(rank: int, modules: list[str], updates: Sequence[ClientUpdate]):
    """Per module, how many clients uploaded each component (for logs and results)."""
    counts = {m: np.zeros(rank, dtype=np.int64) for m in modules}
    for up in updates:
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


def client_values(global_state: LoraState, up: ClientUpdate) -> LoraState:
    """The LoRA factors a client ended with: the global components it received plus its
    deltas, in selection order (``A_k``: r_k x d_in, ``B_k``: d_out x r_k), float64."""
    v: LoraState = OrderedDict()
    for m in lora_modules(global_state):
        idx = up.selection[m]
        v[a_key(m)] = global_state[a_key(m)][idx, :].astype(np.float64) + up.arrays[a_key(m)]
        v[b_key(m)] = global_state[b_key(m)][:, idx].astype(np.float64) + up.arrays[b_key(m)]
    return v


def apply_deltas(global_state: LoraState, up: ClientUpdate) -> LoraState:
    """The client's full-rank LoRA factors: every global component, the uploaded ones
    moved by their deltas (HAFLQ's freeze mode: the rest stayed frozen), float64."""
    v: LoraState = OrderedDict()
    for m in lora_modules(global_state):
        idx = up.selection[m]
        a = global_state[a_key(m)].astype(np.float64)
        b = global_state[b_key(m)].astype(np.float64)
        a[idx, :] += up.arrays[a_key(m)]
        b[:, idx] += up.arrays[b_key(m)]
        v[a_key(m)], v[b_key(m)] = a, b
    return v


def fedavg_head(
    global_state: LoraState, updates: Sequence[ClientUpdate], out: LoraState
) -> LoraState:
    """FedAvg (n_k weights) of the non-LoRA parameters' deltas into ``out``; returns
    ``out`` in the global state's key order, float32."""
    p = _normalized([u.num_examples for u in updates])
    for key in other_keys(global_state):
        delta = sum(pk * up.arrays[key] for pk, up in zip(p, updates, strict=True))
        out[key] = global_state[key] + delta
    return OrderedDict((k, np.asarray(out[k], dtype=np.float32)) for k in global_state)


def aggregate_hetlora(global_state: LoraState, updates: Sequence[ClientUpdate]) -> LoraState:
    """HetLoRA: zero-pad every client's truncated factors to R and average the *values*.

    ``A = sum_k w_k pad(A_k)``, ``B = sum_k w_k pad(B_k)`` per module with the norm-based
    weights of :func:`hetlora_weights`; a component no client holds becomes zero (the
    dilution the paper criticizes). Client values are the global components they
    received plus their deltas. The head is FedAvg'd with ``n_k`` weights.
    """
    return aggregate_padded_values(global_state, updates, "norm")


def aggregate_padded_values(
    global_state: LoraState, updates: Sequence[ClientUpdate], weighting: str
) -> LoraState:
    """Zero-padded average of the clients' truncated factor *values*, per module.

    ``A = sum_k w_k pad(A_k)``, ``B = sum_k w_k pad(B_k)`` with ``weighting`` = ``norm``
    (HetLoRA: ``w_k ~ ||B_k A_k||_F``) or ``examples`` (FedIT with truncated ranks:
    ``w_k = n_k / sum_j n_j``). A component held by some clients only is diluted by the
    others' zeros. The head is FedAvg'd with ``n_k`` weights.
    """
    if not updates:
        raise ValueError("aggregate_padded_values needs at least one upload")
    if weighting not in ("norm", "examples"):
        raise ValueError(f"weighting must be 'norm' or 'examples', got {weighting!r}")
    out: LoraState = OrderedDict()
    modules = lora_modules(global_state)
    values = [client_values(global_state, up) for up in updates]
    p = _normalized([u.num_examples for u in updates])
    for m in modules:
        w = hetlora_weights(values, m) if weighting == "norm" else p
        ak, bk = a_key(m), b_key(m)
        acc_a = np.zeros(global_state[ak].shape, dtype=np.float64)
        acc_b = np.zeros(global_state[bk].shape, dtype=np.float64)
        for wk, up, v in zip(w, updates, values, strict=True):
            acc_a[up.selection[m], :] += wk * v[ak]
            acc_b[:, up.selection[m]] += wk * v[bk]
        out[ak], out[bk] = acc_a, acc_b
    return fedavg_head(global_state, updates, out)


def aggregate_flexlora(global_state: LoraState, updates: Sequence[ClientUpdate]) -> LoraState:
    """FlexLoRA: the weighted sum of every client's full-size LoRA product, re-factored by
    SVD to the global rank R.

    Per module, ``M = sum_k p_k B_k A_k`` (d_out x d_in; the scale ``s = alpha/R`` is the
    same for every client, so ``s M`` is the aggregated weight update), ``U, S, V^T =
    svd(M)`` (of M itself, not of its transpose), then ``B = U[:, :R] diag(S[:R])`` and
    ``A = V^T[:R, :]``, so ``s B A`` is the best rank-R approximation of ``s M``. A client
    of rank r_k then receives the first r_k components (:func:`first_selection`): its
    share of the top singular directions. The head is FedAvg'd.
    """
    if not updates:
        raise ValueError("aggregate_flexlora needs at least one upload")
    out: LoraState = OrderedDict()
    for m, (b_stack, a_stack) in stack_flora(global_state, updates).items():
        ak, bk = a_key(m), b_key(m)
        rank = global_state[ak].shape[0]
        u, sv, vt = svd_of_product(b_stack, a_stack)
        keep = min(rank, len(sv))
        b_new = np.zeros(global_state[bk].shape)
        a_new = np.zeros(global_state[ak].shape)
        b_new[:, :keep] = u[:, :keep] * sv[None, :keep]
        a_new[:keep, :] = vt[:keep, :]
        out[ak], out[bk] = a_new, b_new
    return fedavg_head(global_state, updates, out)


def svd_of_product(left: np.ndarray, right: np.ndarray):
    """The thin SVD ``U, S, V^T`` of ``M = left @ right`` (d_out x q times q x d_in) without
    forming M: QR of both factors, then the SVD of the small q x q core, so the cost
    grows with q = sum_k r_k, not with d_out x d_in. Singular values descending.

    LAPACK's divide-and-conquer SVD can fail to converge (numpy raises ``LinAlgError``;
    seen once on a FlexLoRA round); the core then goes through ``eigh`` of
    ``core^T core``, which always converges (small singular values lose precision,
    the leading ones that FlexLoRA keeps do not).
    """
    q_left, r_left = np.linalg.qr(left)
    q_right, r_right = np.linalg.qr(right.T)
    core = r_left @ r_right.T
    try:
        u_core, sv, vt_core = np.linalg.svd(core, full_matrices=False)
    except np.linalg.LinAlgError:
        evals, vecs = np.linalg.eigh(core.T @ core)
        order = np.argsort(evals)[::-1]
        sv = np.sqrt(np.clip(evals[order], 0.0, None))
        vt_core = vecs[:, order].T
        safe = np.where(sv > sv[0] * 1e-12, sv, np.inf) if sv.size and sv[0] > 0 else sv
        u_core = (core @ vt_core.T) / safe[None, :]
    return q_left @ u_core, sv, vt_core @ q_right.T


def stack_flora(
    global_state: LoraState, updates: Sequence[ClientUpdate]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FLoRA's stacking, per module: ``(B_stack, A_stack)`` with
    ``A_stack = [p_1 A_1; ...; p_K A_K]`` (sum r_k x d_in) and ``B_stack = [B_1 ... B_K]``
    (d_out x sum r_k), so that ``B_stack A_stack = sum_k p_k B_k A_k`` exactly. Clients
    merge ``s B_stack A_stack`` into their base weights. Float64."""
    if not updates:
        raise ValueError("stack_flora needs at least one upload")
    p = _normalized([u.num_examples for u in updates])
    values = [client_values(global_state, up) for up in updates]
    stacks = {}
    for m in lora_modules(global_state):
        a_stack = np.concatenate([pk * v[a_key(m)] for pk, v in zip(p, values, strict=True)])
        b_stack = np.concatenate([v[b_key(m)] for v in values], axis=1)
        stacks[m] = (b_stack, a_stack)
    return stacks


def fedex_residual(
    global_state: LoraState, updates: Sequence[ClientUpdate]
) -> tuple[LoraState, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """FedEx-LoRA (Singhal et al., ACL 2025): FedIT's averaged factors and the residual
    that makes the global model exact.

    Returns the averaged state (``A_bar = sum_k p_k A_k``, ``B_bar = sum_k p_k B_k``, the
    head FedAvg'd) and, per module, the residual ``sum_k p_k B_k A_k - B_bar A_bar`` in
    factored form ``(B_res, A_res)`` with ``B_res = [B_1 ... B_K  B_bar]`` and
    ``A_res = [p_1 A_1; ...; p_K A_K; -A_bar]``, so that
    ``B_bar A_bar + B_res A_res = sum_k p_k B_k A_k`` exactly. Clients merge
    ``s B_res A_res`` into their base weights. The paper's clients all hold rank R; with
    heterogeneous ranks (client k trains the first r_k components) the averages are
    zero-padded, as in FedIT-trunc, and the identity still holds exactly.
    """
    if not updates:
        raise ValueError("fedex_residual needs at least one upload")
    averaged = aggregate_padded_values(global_state, updates, "examples")
    residual = {}
    for m, (b_stack, a_stack) in stack_flora(global_state, updates).items():
        b_bar = averaged[b_key(m)].astype(np.float64)
        a_bar = averaged[a_key(m)].astype(np.float64)
        residual[m] = (np.concatenate([b_stack, b_bar], axis=1), np.concatenate([a_stack, -a_bar]))
    return averaged, residual


def fair_correction(
    global_state: LoraState, updates: Sequence[ClientUpdate], regularizer: float
) -> LoraState:
    """LoRA-FAIR (ICCV 2025): FedIT's averaged factors with B corrected on the server.

    Per module, with ``P = sum_k p_k B_k A_k`` and the averages ``A_bar``, ``B_bar``:
    ``dB = argmin ||(B_bar + dB) A_bar - P||_F^2 + lam ||dB||_F^2``
    ``= (P - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1``, and the global B is
    ``B_bar + dB`` (A stays ``A_bar``; no extra communication). ``lam`` is
    ``regularizer`` times the mean eigenvalue of ``A_bar A_bar^T`` (scale-free; 0 = plain
    least squares, whose corrected product is P projected onto A_bar's row space).
    ``P A_bar^T = sum_k p_k B_k (A_k A_bar^T)`` is formed without the d_out x d_in P.
    """
    if regularizer < 0:
        raise ValueError(f"regularizer must be >= 0, got {regularizer}")
    averaged = aggregate_padded_values(global_state, updates, "examples")
    p = _normalized([u.num_examples for u in updates])
    values = [client_values(global_state, up) for up in updates]
    out = OrderedDict(averaged)
    for m in lora_modules(global_state):
        a_bar = averaged[a_key(m)].astype(np.float64)
        b_bar = averaged[b_key(m)].astype(np.float64)
        rank = a_bar.shape[0]
        # B_k A_k needs no padding: the components a client did not hold add nothing
        pa = sum(
            pk * v[b_key(m)] @ (v[a_key(m)] @ a_bar.T) for pk, v in zip(p, values, strict=True)
        )
        gram = a_bar @ a_bar.T
        lam = regularizer * np.trace(gram) / rank
        rhs = pa - b_bar @ gram  # (P - B_bar A_bar) A_bar^T
        system = gram + lam * np.eye(rank)
        # lstsq: a rank-deficient A_bar (e.g. zero rows before training) stays finite
        delta_b = np.linalg.lstsq(system.T, rhs.T, rcond=None)[0].T
        out[b_key(m)] = (b_bar + delta_b).astype(np.float32)
    return out


def _average_except(
    global_state: LoraState, states: Sequence[LoraState], weights: Sequence[float], kept: str
) -> LoraState:
    """The weighted average of every array the clients sent; the factor ending in
    ``kept`` (never sent) stays as in ``global_state``."""
    if not states:
        raise ValueError("aggregation needs at least one state")
    averaged = weighted_average(states, weights)
    return OrderedDict(
        (k, v.astype(np.float32) if k.endswith(kept) else averaged[k])
        for k, v in global_state.items()
    )


def aggregate_ffa(
    global_state: LoraState, states: Sequence[LoraState], weights: Sequence[float]
) -> LoraState:
    """FFA-LoRA: ``B = sum_k p_k B_k`` with every A frozen at the shared initial value
    (kept from ``global_state``), so ``B A = sum_k p_k B_k A`` exactly. ``states`` hold
    each client's B factors and head (no A: it is never sent). The head is FedAvg'd."""
    return _average_except(global_state, states, weights, A_SUFFIX)


def aggregate_fedsa(
    global_state: LoraState, states: Sequence[LoraState], weights: Sequence[float]
) -> LoraState:
    """FedSA-LoRA: ``A = sum_k p_k A_k`` (and the head FedAvg'd); every B stays on its
    client, so the global B is left as it is (PEFT's zero initialization: the server's B
    never changes). ``states`` hold each client's A factors and head."""
    return _average_except(global_state, states, weights, B_SUFFIX)


__all__ = [
    "A_SUFFIX",
    "ADAPTIVE",
    "AGGREGATIONS",
    "B_SUFFIX",
    "ClientUpdate",
    "Selection",
    "ZERO_PAD",
    "aggregate_components",
    "apply_deltas",
    "aggregate_ffa",
    "aggregate_fedsa",
    "aggregate_flexlora",
    "aggregate_hetlora",
    "aggregate_padded_values",
    "client_values",
    "component_counts",
    "fair_correction",
    "fedex_residual",
    "hetlora_weights",
    "stack_flora",
    "svd_of_product",
    "weighted_average",
]
