"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a shared initialization, B averaged."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..lora.aggregate import aggregate_ffa
from ..lora.components import A_SUFFIX, without_factor
from ..lora.state import LoraState, check_state, from_array_record
from ..wire import FREEZE_A
from .base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ClientRoundStats,
    ClientUpdate,
    ReplyError,
    check_record_bytes,
    state_record_limit,
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

    def decode_reply(self, node_id: int, content: RecordDict, stats: ClientRoundStats):
        if ARRAYS_KEY not in content.array_records:
            raise ReplyError(f"reply lacks the '{ARRAYS_KEY}' record")
        expected = trainable_part(self._global)
        record = content.array_records[ARRAYS_KEY]
        check_record_bytes(record, state_record_limit(expected), ARRAYS_KEY)
        state = from_array_record(record)
        check_state(expected, state, self.value_limit())
        return OrderedDict((k, v.astype(np.float32)) for k, v in state.items())

    def client_factors(self, global_state: LoraState, update: ClientUpdate) -> LoraState:
        """The client's B and the shared, frozen A."""
        return OrderedDict(
            (k, global_state[k] if k.endswith(A_SUFFIX) else update.payload[k])
            for k in global_state
        )

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return aggregate_ffa(
            global_state, [u.payload for u in updates], [u.num_examples for u in updates]
        )


def trainable_part(state: LoraState) -> LoraState:
    """The state without its A factors: what an FFA-LoRA client trains and uploads."""
    return without_factor(state, A_SUFFIX)
