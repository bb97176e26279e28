"""Client-side component importance: AdaLoRA-style smoothed sensitivity (torch).

Per LoRA element ``w`` at every local step::

    I = |w * dL/dw|
    I_bar = beta1 * I_bar + (1 - beta1) * I
    U_bar = beta2 * U_bar + (1 - beta2) * |I - I_bar|
    s = I_bar * U_bar

and the score of component ``i`` of a module is ``mean_j s(A[i, j]) + mean_j s(B[j, i])``.
The server folds these scores into its :class:`~haflq_flower.lora.importance.
GlobalImportance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sensitivity:
    """Smoothed sensitivity of one tensor (``I_bar`` and ``U_bar`` element-wise)."""

    beta1: float = 0.85
    beta2: float = 0.85
    i_bar: torch.Tensor | None = None
    u_bar: torch.Tensor | None = None

    def update(self, weight: torch.Tensor, grad: torch.Tensor | None) -> None:
        """One step: fold ``|w * g|`` into the moving averages (no-op without a gradient)."""
        if grad is None:
            return
        sens = (weight.detach() * grad.detach()).abs().float()
        if self.i_bar is None:
            self.i_bar = torch.zeros_like(sens)
            self.u_bar = torch.zeros_like(sens)
        self.i_bar.mul_(self.beta1).add_(sens, alpha=1 - self.beta1)
        self.u_bar.mul_(self.beta2).add_((sens - self.i_bar).abs(), alpha=1 - self.beta2)

    def score(self, shape: torch.Size) -> torch.Tensor:
        """Element scores ``I_bar * U_bar`` (zeros if never updated)."""
        if self.i_bar is None:
            return torch.zeros(shape)
        return self.i_bar * self.u_bar


def component_scores(score_a: torch.Tensor, score_b: torch.Tensor) -> np.ndarray:
    """Per component ``mean_j s(A[i, j]) + mean_j s(B[j, i])``.

    ``score_a`` is (r, d_in) and ``score_b`` is (d_out, r), components in the same order.
    """
    if score_a.shape[0] != score_b.shape[1]:
        raise ValueError(f"A has {score_a.shape[0]} components, B has {score_b.shape[1]}")
    return (score_a.mean(dim=1) + score_b.mean(dim=0)).double().cpu().numpy()
