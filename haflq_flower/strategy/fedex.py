"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's averages plus an exact residual in the base."""

from __future__ import annotations

from ..lora.aggregate import fedex_residual
from ..lora.components import ClientUpdate
from ..lora.state import LoraState
from ..untrusted import FLOAT32_MAX
from .base import check_global
from .flora import FLoRA


class FedExLoRA(FLoRA):
    """The server averages A and B as FedIT does (zero-padded, n_k weights, when ranks
    differ) and sends every client the residual ``sum_k p_k B_k A_k - B_bar A_bar``,
    which it adds (scaled by alpha/R) to its base weights: the global model is then
    exactly the average of the clients' models
    (:func:`~haflq_flower.lora.aggregate.fedex_residual`).

    The residual travels in factored form (``[B_1 ... B_K B_bar]`` and
    ``[p_1 A_1; ...; p_K A_K; -A_bar]``, rank ``sum_k r_k + R`` per round), through FLoRA's
    ``merge`` record: exact, and smaller than the dense d_out x d_in residual until the
    accumulated rank reaches ``d_out d_in / (d_out + d_in)`` (288 for SmolLM2's 576 x 576
    projections). Like FLoRA it needs a 16-bit base, and every training message carries
    all past rounds' residuals (counted in the downlink bytes). Unlike FLoRA, the next
    round starts from the averaged adapter, not a fresh one.
    """

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        averaged, residual = fedex_residual(global_state, updates)
        # checked before the stacks change: a rejected round leaves the strategy as it was
        check_global({m: v for m, pair in residual.items() for v in pair}, FLOAT32_MAX)
        for m, pair in residual.items():
            self.stacks.setdefault(m, []).append(pair)
        return averaged
