"""FlexLoRA (Bai et al., NeurIPS 2024) as a baseline on the shared client path."""

from __future__ import annotations

from ..lora.aggregate import aggregate_flexlora
from ..lora.components import ClientUpdate
from ..lora.state import LoraState
from .hetlora import HetLoRA


class FlexLoRA(HetLoRA):
    """Clients of rank r_k train the first r_k components of the global adapter; the
    server sums every client's full-size product ``p_k B_k A_k`` per module and
    re-factors the sum by SVD (:func:`~haflq_flower.lora.aggregate.aggregate_flexlora`),
    so component i of the global adapter is the i-th singular direction and a client of
    rank r_k receives the top r_k of them.

    The aggregation is exact up to the rank-R truncation of the SVD. The SVD goes
    through QR of the stacked client factors and the SVD of a small core of size
    q = sum_k r_k (:func:`~haflq_flower.lora.aggregate.svd_of_product`), never forming the
    d_out x d_in matrix. Uploads are fp32 (the paper's setting).
    """

    supports_dp = False  # not an average of the updates: noise on sums does not apply

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return aggregate_flexlora(global_state, updates)
