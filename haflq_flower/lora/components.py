"""The rank-1 view of a LoRA adapter state: gather, scatter and index components.

A LoRA module ``m`` holds ``A_m`` (R x d_in) and ``B_m`` (d_out x R); its update is
``s * B_m A_m = s * sum_i b_{m,i} a_{m,i}^T`` with ``b_{m,i} = B_m[:, i]`` and
``a_{m,i} = A_m[i, :]`` and one global scale ``s = alpha / R``. Component ``i`` of ``m``
is the pair ``(b_{m,i}, a_{m,i})``. These functions work on :data:`LoraState` dicts
(PEFT state-dict keys -> numpy arrays) and know nothing of Flower or models.

A *selection* maps every LoRA module to the global indices of its chosen components.
A *sub-state* has the same keys as the full state, but each module keeps only the
selected components, in selection order: ``A[idx, :]`` and ``B[:, idx]``. Non-LoRA
entries (the classification head) are carried whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# An adapter state: PEFT state-dict keys -> numpy arrays (defined here, free of torch,
# PEFT and Flower, so that the pure math can name it; lora/state.py converts it).
LoraState = dict[str, np.ndarray]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

Selection = dict[str, np.ndarray]

# How a client holds the components it does not train: ``freeze`` keeps all R (the
# others frozen), ``truncate`` keeps only its r_k (strategy.mode).
FREEZE = "freeze"
TRUNCATE = "truncate"
MODES = (FREEZE, TRUNCATE)


@dataclass
class ClientUpdate:
    """One client's validated contribution to a round: the single update type that
    every aggregation rule, the importance estimate, clipping and DP read.

    Attributes
    ----------
    arrays : LoraState
        With ``selection``: the deltas of the uploaded components (``A[idx, :]`` rows and
        ``B[:, idx]`` columns in selection order) and whole deltas of the non-LoRA
        parameters (the head). Without: the arrays the client sent whole (FedIT: its
        adapter; FFA-LoRA: B and the head; FedSA-LoRA: A and the head).
    num_examples : int
        The client's aggregation weight n_k (its local dataset size; 1 under DP).
    selection : Selection or None
        Per LoRA module, the global indices of the uploaded components; None when
        ``arrays`` holds whole tensors.
    trained : Selection or None
        Every component the client trained (a component dropped from the upload for
        lack of bandwidth is still reported), with its importance in ``scores``.
    scores : dict
        Per module, the importance of each ``trained`` component, in that order.
    node_id : int
        The Flower node that sent it (0 outside a run).
    metrics : dict
        The reply's numeric training metrics.
    """

    arrays: LoraState
    num_examples: int = 1
    selection: Selection | None = None
    trained: Selection | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    node_id: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def a_key(module: str) -> str:
    return module + A_SUFFIX


def b_key(module: str) -> str:
    return module + B_SUFFIX


def lora_modules(state: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the LoRA modules in ``state``, in state order."""
    return [key[: -len(A_SUFFIX)] for key in state if key.endswith(A_SUFFIX)]


def other_keys(state: Mapping[str, np.ndarray]) -> list[str]:
    """Keys that are not LoRA factors (e.g. the classification head)."""
    return [k for k in state if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))]


def without_factor(state: Mapping[str, np.ndarray], suffix: str) -> LoraState:
    """The state without one factor of every module (``A_SUFFIX`` or ``B_SUFFIX``): what
    an FFA-LoRA client sends (no A) or a FedSA-LoRA client shares (no B)."""
    return OrderedDict((k, v) for k, v in state.items() if not k.endswith(suffix))


def only_factor(state: Mapping[str, np.ndarray], suffix: str) -> LoraState:
    """Only one factor of every module (e.g. a FedSA-LoRA client's own B)."""
    return OrderedDict((k, v) for k, v in state.items() if k.endswith(suffix))


def module_rank(state: Mapping[str, np.ndarray], module: str) -> int:
    return int(state[a_key(module)].shape[0])


def full_selection(state: Mapping[str, np.ndarray]) -> Selection:
    """Every component of every module."""
    return {m: np.arange(module_rank(state, m), dtype=np.int64) for m in lora_modules(state)}


def first_selection(state: Mapping[str, np.ndarray], rank: int) -> Selection:
    """The first ``rank`` components of every module (HetLoRA's truncation)."""
    return {
        m: np.arange(min(rank, module_rank(state, m)), dtype=np.int64) for m in lora_modules(state)
    }


def gather(state: Mapping[str, np.ndarray], selection: Selection) -> LoraState:
    """The sub-state holding only the selected components (copies)."""
    out: LoraState = OrderedDict()
    modules = set(lora_modules(state))
    if set(selection) != modules:
        raise ValueError(f"selection names {len(selection)} modules, the state has {len(modules)}")
    for key, value in state.items():
        if key.endswith(A_SUFFIX):
            out[key] = value[selection[key[: -len(A_SUFFIX)]], :].copy()
        elif key.endswith(B_SUFFIX):
            out[key] = value[:, selection[key[: -len(B_SUFFIX)]]].copy()
        else:
            out[key] = value.copy()
    return out


def scatter(state: Mapping[str, np.ndarray], sub: Mapping[str, np.ndarray], selection: Selection):
    """A copy of ``state`` with the selected components (and other keys) taken from ``sub``."""
    out: LoraState = OrderedDict((k, v.copy()) for k, v in state.items())
    for key, value in sub.items():
        if key.endswith(A_SUFFIX):
            out[key][selection[key[: -len(A_SUFFIX)]], :] = value
        elif key.endswith(B_SUFFIX):
            out[key][:, selection[key[: -len(B_SUFFIX)]]] = value
        else:
            out[key] = value.copy()
    return out


def component_delta(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> LoraState:
    """``after - before`` key by key (both sub-states of the same selection)."""
    return OrderedDict(
        (k, (np.asarray(after[k], np.float32) - np.asarray(v, np.float32)))
        for k, v in before.items()
    )


def check_selection(
    selection: Mapping[str, np.ndarray], modules: list[str], rank: int
) -> Selection:
    """Validate indices from the wire: known modules, integers in [0, rank), no duplicates.

    Raises ``ValueError`` with the first problem found.
    """
    unknown = sorted(set(selection) - set(modules))
    missing = sorted(set(modules) - set(selection))
    if unknown or missing:
        raise ValueError(
            f"selection modules differ: {len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(unknown)} unknown (e.g. {unknown[:1]})"
        )
    out: Selection = {}
    for module in modules:
        idx = np.asarray(selection[module])
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{module}: indices must be a 1-d integer array, got {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= rank):
            raise ValueError(f"{module}: component index out of range [0, {rank})")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"{module}: duplicated component index")
        out[module] = idx.astype(np.int64)
    return out
