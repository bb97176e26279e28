"""HetLoRA (Cho et al., EMNLP 2024) and FedIT-trunc on the neutral heterogeneous base."""

from __future__ import annotations

from ..lora.aggregate import aggregate_hetlora, aggregate_padded_values
from ..lora.components import ClientUpdate
from ..lora.state import LoraState
from ..lora.view import TRUNCATE
from .heterogeneous import HeterogeneousLoRA


class HetLoRA(HeterogeneousLoRA):
    """Each client trains the first r_k components (truncation); the server zero-pads every
    client's factors to R and averages the values with weights
    ``w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F`` per module; the head is FedAvg'd.

    Uploads are full precision (fp32) unless ``uplink`` says otherwise. The paper's
    optional local rank self-pruning is not implemented.
    """

    # norm-based weights: one client's weight depends on its own update (docs/privacy.md)
    supports_dp = False

    def __init__(self, **kwargs) -> None:
        kwargs["mode"] = TRUNCATE
        kwargs.setdefault("uplink", "fp32")
        super().__init__(**kwargs)

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        """Aggregate values, not deltas: a client's values are what it *received* plus its
        deltas, so with the 16-bit downlink the global is rounded to float16 first (with
        the 8-bit downlink the float32 global is used: an approximation of what the
        client decoded)."""
        return super().aggregate(server_round, self.received_global(global_state), updates)

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return aggregate_hetlora(global_state, updates)


class FedITTruncated(HetLoRA):
    """FedIT with heterogeneous ranks by truncation: each client trains the first r_k
    components; the server zero-pads and averages the *values* with FedAvg's weights
    ``p_k = n_k / sum_j n_j`` (so a component only some clients hold is diluted by the
    others' zeros). HetLoRA with n_k weights in place of its norm weights."""

    supports_dp = True  # an average (equal weights under DP) divided by every client
    padded_average = True

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return aggregate_padded_values(global_state, updates, "examples")
