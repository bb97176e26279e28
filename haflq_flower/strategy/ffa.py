"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a shared initialization, B averaged."""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import ArrayRecord, ConfigRecord

from ..lora.aggregate import aggregate_ffa
from ..lora.components import A_SUFFIX, without_factor
from ..lora.state import LoraState
from ..wire import FREEZE_A
from .base import (
    CONFIG_KEY,
    ClientUpdate,
)
from .fedit import FedIT


class FFALoRA(FedIT):
    """Every client trains B (and the head) of the rank-R adapter; A stays at the
    server's initial value, which every client receives (one seed, one A). The server
    averages ``B = sum_k p_k B_k``; because A is shared, ``B A = sum_k p_k B_k A`` is the
    exact average of the clients' products. Clients upload B and the head only (about
    half of FedIT's upload). Ranks are homogeneous (every client at R).
    """

    flower_dp = False  # its reply lacks A: Flower's fixedclipping_mod needs every key

    def train_records(
        self, server_round: int, node_id: int, global_state: LoraState
    ) -> dict[str, ArrayRecord | ConfigRecord]:
        records = super().train_records(server_round, node_id, global_state)
        return {**records, CONFIG_KEY: ConfigRecord({FREEZE_A: True})}

    def expected_reply(self) -> LoraState:
        """B and the head (A stays frozen)."""
        return trainable_part(self._global)

    def client_factors(self, global_state: LoraState, update: ClientUpdate) -> LoraState:
        """The client's B and the shared, frozen A."""
        return OrderedDict(
            (k, global_state[k] if k.endswith(A_SUFFIX) else update.arrays[k]) for k in global_state
        )

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return aggregate_ffa(
            global_state, [u.arrays for u in updates], [u.num_examples for u in updates]
        )


def trainable_part(state: LoraState) -> LoraState:
    """The state without its A factors: what an FFA-LoRA client trains and uploads."""
    return without_factor(state, A_SUFFIX)
