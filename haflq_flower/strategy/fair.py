"""LoRA-FAIR (ICCV 2025): FedIT's averages with a server-side correction of B."""

from __future__ import annotations

from ..lora.aggregate import fair_correction
from ..lora.components import ClientUpdate
from ..lora.state import LoraState
from .hetlora import FedITTruncated

# lam = FAIR_REGULARIZER x mean eigenvalue of A_bar A_bar^T: our choice (docs/algorithms.md)
FAIR_REGULARIZER = 0.01


class LoRAFAIR(FedITTruncated):
    """The server averages A and B (FedAvg weights; zero-padded when client ranks differ,
    as FedIT-trunc) and corrects the averaged B so that ``(B_bar + dB) A_bar`` comes
    close to the clients' average product, with a ridge term that keeps dB small
    (:func:`~haflq_flower.lora.aggregate.fair_correction`). No extra communication:
    clients receive the corrected (B, A) as usual.
    """

    supports_dp = False  # not an average of the updates: noise on sums does not apply

    regularizer = FAIR_REGULARIZER

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return fair_correction(global_state, updates, self.regularizer)
