"""How far an aggregation rule is from the clients' average model (pure numpy).

The aggregation residual of a round (issue 22) is

    ||sum_k p_k B_k A_k - B_new A_new||_F / ||sum_k p_k B_k A_k||_F

with the Frobenius norms taken over all LoRA modules at once (the block-diagonal stack of
the modules' updates), ``B_k, A_k`` the factors each client ended the round with (what its
own model applied, frozen components included), ``p_k = n_k / sum n_j``, and
``B_new A_new`` the update the new global model applies (for FLoRA and FedEx-LoRA also
this round's factors merged into the base). 0 = the global model is exactly the average
of the clients' models; FedIT's cross-term, truncation and dilution make it positive.
The global scale ``s = alpha / R`` multiplies both sides and cancels.

Norms come from r x r Gram matrices (``||L R||_F^2 = sum((L^T L) * (R R^T))``), never
from the d_out x d_in products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .components import LoraState, a_key, b_key, lora_modules

Pairs = Sequence[tuple[np.ndarray, np.ndarray]]


def _product_sq_norm(pairs: Pairs) -> float:
    """``||sum_j B_j A_j||_F^2`` from the stacked factors' Gram matrices."""
    if not pairs:
        return 0.0
    left = np.concatenate([np.asarray(b, np.float64) for b, _ in pairs], axis=1)
    right = np.concatenate([np.asarray(a, np.float64) for _, a in pairs])
    return float(np.sum((left.T @ left) * (right @ right.T)))


def aggregation_residual(
    clients: Sequence[LoraState],
    weights: Sequence[float],
    new_pairs: Mapping[str, Pairs],
) -> float:
    """The relative residual above; ``clients`` hold each client's factors per module
    (``lora_A``/``lora_B`` keys, any rank), ``new_pairs`` per module the (B, A) pairs whose
    products sum to the new global update. NaN when every client product is zero."""
    w = np.asarray(weights, dtype=np.float64)
    if len(clients) != len(w) or not len(w) or w.sum() <= 0:
        raise ValueError(f"{len(clients)} client states for {len(w)} weights")
    p = w / w.sum()
    num = den = 0.0
    for m in lora_modules(clients[0]):
        target = [(pk * c[b_key(m)], c[a_key(m)]) for pk, c in zip(p, clients, strict=True)]
        new = [(-np.asarray(b, np.float64), a) for b, a in new_pairs.get(m, [])]
        den += _product_sq_norm(target)
        num += max(_product_sq_norm(target + new), 0.0)
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def global_pairs(state: LoraState) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per module, the global adapter's own (B, A) pair."""
    return {m: [(state[b_key(m)], state[a_key(m)])] for m in lora_modules(state)}


def personal_residual_terms(
    own_b: Mapping[str, np.ndarray],
    own_a: Mapping[str, np.ndarray],
    new_a: Mapping[str, np.ndarray],
) -> tuple[float, float]:
    """FedSA-LoRA on one client: ``(sum_m ||B_k (A_k - A_new)||_F^2, sum_m ||B_k A_k||_F^2)``
    over its modules, where ``A_k`` is the A it trained and ``A_new`` the shared average
    that replaces it (the client keeps ``B_k``). Keys are the state's ``.lora_B`` /
    ``.lora_A`` names; modules missing any of the three are skipped."""
    num = den = 0.0
    for key_b, b in own_b.items():
        key_a = key_b.replace(".lora_B.", ".lora_A.")
        if key_a not in own_a or key_a not in new_a:
            continue
        b64 = np.asarray(b, np.float64)
        a_k = np.asarray(own_a[key_a], np.float64)
        num += float(np.sum(np.square(b64 @ (a_k - np.asarray(new_a[key_a], np.float64)))))
        den += float(np.sum(np.square(b64 @ a_k)))
    return num, den


def personal_residual(terms: Sequence[tuple[float, float]], weights: Sequence[float]) -> float:
    """The clients' residual terms combined: ``sqrt(sum_k p_k num_k / sum_k p_k den_k)``,
    FedSA-LoRA's counterpart of :func:`aggregation_residual` (each client's model after
    aggregation is ``B_k A_new``, so the distance is to each client's own product)."""
    w = np.asarray(weights, np.float64)
    num = float(np.dot(w, [t[0] for t in terms]))
    den = float(np.dot(w, [t[1] for t in terms]))
    return math.sqrt(num / den) if den > 0 else 0.0
