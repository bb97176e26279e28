"""Train only some rank-1 components of a PEFT LoRA model: freezing and truncation.

:func:`component_view` temporarily replaces every ``lora_A[adapter]`` / ``lora_B[adapter]``
linear of a PEFT model with a :class:`ComponentFactor` that holds

- the selected components as a trainable ``nn.Parameter`` (r_k rows of A, columns of B),
- in **freeze** mode, the other R - r_k components as a plain buffer: they take part in
  the forward pass but get no gradient and, since they are no parameter, no optimizer
  state;
- in **truncate** mode, nothing else: the module computes with r_k components only.

PEFT's scale ``alpha / R`` is untouched, so a component means the same thing in every
mode. Components of a LoRA product are order-free (``B A = sum_i b_i a_i^T``), so the
factor simply concatenates trainable then frozen components for both A and B. On exit,
the trained values are written back into PEFT's own weights at their global indices and
the original modules are restored, so PEFT saving and loading keep working.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from .components import FREEZE, MODES, TRUNCATE
from .sensitivity import Sensitivity, component_scores

__all__ = ["FREEZE", "MODES", "TRUNCATE", "ComponentView", "component_view", "frozen_a"]


class ComponentFactor(nn.Module):
    """One LoRA factor (A: components are rows; B: columns) split by component.

    Parameters
    ----------
    weight : torch.Tensor
        The factor's full weight, (R, d_in) for A or (d_out, R) for B.
    trainable_idx : torch.Tensor
        Global indices of the components to train.
    frozen_idx : torch.Tensor or None
        Global indices kept frozen in the forward pass; ``None`` drops them (truncation).
    dim : int
        The component axis: 0 for A, 1 for B.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        trainable_idx: torch.Tensor,
        frozen_idx: torch.Tensor | None,
        dim: int,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("trainable_idx", trainable_idx, persistent=False)
        self.trainable = nn.Parameter(weight.detach().index_select(dim, trainable_idx).clone())
        frozen = None if frozen_idx is None else weight.detach().index_select(dim, frozen_idx)
        self.register_buffer("frozen", frozen, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The factor PEFT multiplies with: trainable components, then frozen ones."""
        if self.frozen is None or self.frozen.numel() == 0:
            return self.trainable
        return torch.cat([self.trainable, self.frozen], dim=self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every LoRA layer; ``name`` is the state-dict module prefix."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


class ComponentView:
    """The swapped-in factors of a model, with their importance trackers."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.factors: dict[str, tuple[ComponentFactor, ComponentFactor]] = {}
        self.sensitivity: dict[str, tuple[Sensitivity, Sensitivity]] = {}
        self.beta1, self.beta2 = beta1, beta2

    def add(self, module: str, fa: ComponentFactor, fb: ComponentFactor) -> None:
        self.factors[module] = (fa, fb)
        self.sensitivity[module] = (
            Sensitivity(self.beta1, self.beta2),
            Sensitivity(self.beta1, self.beta2),
        )

    def track_importance(self) -> None:
        """Fold the current gradients into the sensitivity of every trainable component.

        Call after ``backward()`` and before ``optimizer.step()``.
        """
        for module, (fa, fb) in self.factors.items():
            sa, sb = self.sensitivity[module]
            sa.update(fa.trainable, fa.trainable.grad)
            sb.update(fb.trainable, fb.trainable.grad)

    def scores(self) -> dict[str, np.ndarray]:
        """Per module, the score of each trained component (selection order)."""
        out = {}
        for module, (fa, fb) in self.factors.items():
            sa, sb = self.sensitivity[module]
            out[module] = component_scores(
                sa.score(fa.trainable.shape).cpu(), sb.score(fb.trainable.shape).cpu()
            )
        return out


@contextmanager
def component_view(
    model: nn.Module,
    selection: Mapping[str, np.ndarray],
    mode: str = FREEZE,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> Iterator[ComponentView]:
    """Train only the selected components of every LoRA module of ``model``.

    Inside the block, the selected components are the only LoRA parameters (other
    trainable parameters such as the head are untouched). On exit the trained values are
    copied back into PEFT's weights and PEFT's modules are restored, even on error.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {MODES}")
    view = ComponentView(beta1, beta2)
    swapped: list[tuple[nn.ModuleDict, str, nn.Module, nn.ModuleDict, nn.Module]] = []
    layers = dict(lora_layers(model))
    missing = sorted(set(selection) - set(layers))
    if missing:
        raise ValueError(f"selection names modules the model lacks, e.g. {missing[:1]}")
    try:
        for name, layer in layers.items():
            if name not in selection:
                raise ValueError(f"selection lacks LoRA module {name}")
            adapter = layer.active_adapters[0]
            lin_a, lin_b = layer.lora_A[adapter], layer.lora_B[adapter]
            rank = lin_a.weight.shape[0]
            device = lin_a.weight.device
            train_idx = torch.as_tensor(np.asarray(selection[name]), dtype=torch.long)
            frozen_idx = None
            if mode == FREEZE:
                mask = np.ones(rank, dtype=bool)
                mask[np.asarray(selection[name], dtype=np.int64)] = False
                frozen_idx = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=device)
            train_idx = train_idx.to(device)
            fa = ComponentFactor(lin_a.weight, train_idx, frozen_idx, dim=0)
            fb = ComponentFactor(lin_b.weight, train_idx, frozen_idx, dim=1)
            layer.lora_A[adapter], layer.lora_B[adapter] = fa, fb
            swapped.append((layer.lora_A, adapter, lin_a, layer.lora_B, lin_b))
            view.add(name, fa, fb)
        yield view
    finally:
        for dict_a, adapter, lin_a, dict_b, lin_b in swapped:
            fa, fb = dict_a[adapter], dict_b[adapter]
            with torch.no_grad():
                lin_a.weight.index_copy_(0, fa.trainable_idx, fa.trainable.to(lin_a.weight.dtype))
                lin_b.weight.index_copy_(1, fb.trainable_idx, fb.trainable.to(lin_b.weight.dtype))
            dict_a[adapter], dict_b[adapter] = lin_a, lin_b


@contextmanager
def frozen_a(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, no ``lora_A`` weight of ``model`` gets a gradient or optimizer
    state (FFA-LoRA trains B only); yields how many tensors were frozen."""
    frozen = []
    if enabled:
        for name, param in model.named_parameters():
            if ".lora_A." in name and param.requires_grad:
                param.requires_grad_(False)
                frozen.append(param)
    try:
        yield len(frozen)
    finally:
        for param in frozen:
            param.requires_grad_(True)
