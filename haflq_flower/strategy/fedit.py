"""FedIT: FedAvg of LoRA factors with homogeneous ranks (the FlowerTune/OpenFedLLM baseline)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from ..lora.aggregate import weighted_average
from ..lora.state import LoraState
from ..privacy import CENTRAL
from .base import ClientUpdate, LoRAStrategy


class FedIT(LoRAStrategy):
    """Every client trains the full rank-R adapter; the server averages A, B and the head.

    ``A = sum_k p_k A_k`` and ``B = sum_k p_k B_k`` with ``p_k = n_k / sum_j n_j``.
    The product of the averaged factors differs from the average of the products by the
    cross-term ``-sum_{k<l} p_k p_l (B_k - B_l)(A_k - A_l)`` (tested, documented).

    Under central DP (``dp.mode="central"``) FedIT uses Flower's own pieces, since a FedIT
    reply is one whole adapter, as they expect: the round goes through Flower's
    ``DifferentialPrivacyClientSideFixedClipping`` wrapper (it puts the clipping norm in
    the config and adds noise of std ``z C / sampled clients`` to the aggregate) and the
    ClientApp clips with Flower's ``fixedclipping_mod`` (docs/privacy.md).
    """

    # whether central DP runs through Flower's wrapper and mod (FedIT's own replies only:
    # subclasses that send part of the adapter do not fit the mod)
    flower_dp = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._flower_wrapper = None
        if self.dp.mode == CENTRAL and type(self).flower_dp:
            self._flower_wrapper = DifferentialPrivacyClientSideFixedClipping(
                _Unwrapped(self), self.dp.noise_multiplier, self.dp.clip, num_sampled_clients=1
            )

    @property
    def adds_own_noise(self) -> bool:
        return self._flower_wrapper is None and super().adds_own_noise

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._flower_wrapper is None:
            return super().configure_train(server_round, arrays, config, grid)
        messages = list(self._flower_wrapper.configure_train(server_round, arrays, config, grid))
        # the wrapper's noise divides by the clients sampled this round
        self._flower_wrapper.num_sampled_clients = max(len(messages), 1)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._flower_wrapper is None:
            return super().aggregate_train(server_round, replies)
        return self._flower_wrapper.aggregate_train(server_round, replies)

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        return weighted_average([u.arrays for u in updates], [u.num_examples for u in updates])


class _Unwrapped:
    """What Flower's DP wrapper wraps: the strategy's own round steps (the wrapper calls
    them between its clipping-norm config and its noise)."""

    def __init__(self, strategy: LoRAStrategy) -> None:
        self._strategy = strategy

    def configure_train(self, server_round, arrays, config, grid):
        return LoRAStrategy.configure_train(self._strategy, server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return LoRAStrategy.aggregate_train(self._strategy, server_round, replies)
