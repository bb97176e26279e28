"""FedIT: FedAvg of LoRA factors with homogeneous ranks (the FlowerTune/OpenFedLLM baseline)."""

from __future__ import annotations

from ..lora.aggregate import weighted_average
from ..lora.state import LoraState
from .base import ClientUpdate, LoRAStrategy


class FedIT(LoRAStrategy):
    """Every client trains the full rank-R adapter; the server averages A, B and the head.

    ``A = sum_k p_k A_k`` and ``B = sum_k p_k B_k`` with ``p_k = n_k / sum_j n_j``.
    The product of the averaged factors differs from the average of the products by the
    cross-term ``-sum_{k<l} p_k p_l (B_k - B_l)(A_k - A_l)`` (tested, documented).
    """

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return weighted_average([u.payload for u in updates], [u.num_examples for u in updates])
