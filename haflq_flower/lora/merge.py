"""Merge stacked LoRA factors into a model's 16-bit base weights (FLoRA).

FLoRA's clients add ``s * B_stack @ A_stack`` of every past round to the base weight of
each LoRA-wrapped linear layer and start a fresh adapter. A simulated node's process
serves many clients with one cached model, so the merge is never applied on top of
itself: the first merge keeps a copy of the pristine base weights of the wrapped layers,
and every call sets ``W = W_0 + s * B_stack @ A_stack`` from that copy (computed in
float32, stored in the base's dtype). ``None`` restores ``W_0``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .components import a_key, b_key
from .view import lora_layers

_PRISTINE = "_haflq_pristine_base"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MergeError(ValueError):
    """Stacked factors do not fit the model, or its base cannot take a merge."""


def _base_weight(layer: nn.Module) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    # bitsandbytes stores 4-bit and int8 weights as uint8/int8 tensors.
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_DTYPES:
        raise MergeError(
            f"{type(base).__name__} has no plain 16/32-bit weight: FLoRA merges into the base "
            'and needs model.quantization="none" (a quantized base would be re-quantized '
            "every round)"
        )
    return weight


def merge_stacks(model: nn.Module, stacks: Mapping[str, np.ndarray] | None) -> int:
    """Set every LoRA-wrapped base weight to ``W_0 + s * B @ A`` with this module's
    ``stacks[b_key(m)]`` (d_out x H) and ``stacks[a_key(m)]`` (H x d_in); ``s`` is the
    layer's own LoRA scale (alpha / R). ``None`` or an empty mapping restores ``W_0``.

    Returns the stacked rank H (0 when restored). Raises :class:`MergeError` if a module
    is missing or a shape does not fit.
    """
    pristine: dict[str, torch.Tensor] = getattr(model, _PRISTINE, None) or {}
    layers = dict(lora_layers(model))
    if not stacks:
        with torch.no_grad():
            for name, saved in pristine.items():
                _base_weight(layers[name]).copy_(saved)
        return 0
    # Check every module before changing any weight: a half-applied merge would leave
    # merged weights with no pristine copy.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = None
    for name, layer in layers.items():
        ak, bk = a_key(name), b_key(name)
        if ak not in stacks or bk not in stacks:
            raise MergeError(f"merge lacks the factors of LoRA module {name}")
        weight = _base_weight(layer)
        a = torch.as_tensor(np.asarray(stacks[ak], dtype=np.float32))
        b = torch.as_tensor(np.asarray(stacks[bk], dtype=np.float32))
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise MergeError(f"{name}: stacked shapes {tuple(b.shape)} x {tuple(a.shape)}")
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise MergeError(
                f"{name}: merge of shape {(b.shape[0], a.shape[1])} for a base weight of "
                f"shape {tuple(weight.shape)}"
            )
        if rank is not None and a.shape[0] != rank:
            raise MergeError(f"{name}: stacked rank {a.shape[0]}, others {rank}")
        rank = a.shape[0]
        factors[name] = (b, a)
    setattr(model, _PRISTINE, pristine)
    with torch.no_grad():
        for name, layer in layers.items():
            weight = _base_weight(layer)
            b, a = factors[name]
            if name not in pristine:
                pristine[name] = weight.detach().clone()
            adapter = layer.active_adapters[0]
            scale = float(layer.scaling[adapter])
            merged = pristine[name].float() + scale * (b.to(weight.device) @ a.to(weight.device))
            weight.copy_(merged.to(weight.dtype))
    return int(rank or 0)


def expanded_adapter(state: Mapping[str, np.ndarray], stacks: Mapping[str, np.ndarray]):
    """One LoRA adapter equal to "merge ``stacks``, then apply ``state``": per module,
    ``B' = [B_stack | B]`` and ``A' = [A_stack; A]`` (rank H + R), other keys as they are.
    With the scale kept at ``s`` (``lora_alpha' = s * (H + R)``), ``s B' A' = s B_stack
    A_stack + s B A``, so a base loaded without any merge plus this adapter is the model.
    """
    from .components import A_SUFFIX, B_SUFFIX

    out = {}
    for key, value in state.items():
        if key.endswith(A_SUFFIX):
            out[key] = np.concatenate([stacks[key], value]).astype(np.float32)
        elif key.endswith(B_SUFFIX):
            out[key] = np.concatenate([stacks[key], value], axis=1).astype(np.float32)
        else:
            out[key] = value
    return out


def save_expanded_adapter(model, state, stacks, out_dir) -> int:
    """Write :func:`expanded_adapter` as a PEFT adapter directory (``adapter_config.json``
    with the rank and alpha that keep the scale, ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads onto the unmerged base. Returns the new rank."""
    import copy
    from pathlib import Path

    from safetensors.torch import save_file

    adapter = model.active_adapter
    config = copy.deepcopy(model.peft_config[adapter])
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise MergeError("cannot expand an adapter with per-module rank or alpha patterns")
    extra = next(v.shape[0] for k, v in stacks.items() if k.endswith(".lora_A.weight"))
    scale = config.lora_alpha / config.r
    config.r = config.r + extra
    config.lora_alpha = scale * config.r
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in expanded_adapter(state, stacks).items()
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return config.r
