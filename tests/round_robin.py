"""The worked example of docs/extending.md, importable by path: under `flwr run` the
ServerApp and the ClientApps load it with ``strategy.name="tests.round_robin:RoundRobinSelection"``
(this file travels in the app's FAB; Flower leaves out only ``test_*.py`` files)."""

from dataclasses import dataclass

import numpy as np

from haflq_flower.settings import positive, setting
from haflq_flower.strategy import HAFLQStrategy


@dataclass(frozen=True)
class RoundRobinOptions:
    """The strategy's own run-config key: ``round-robin.offset``."""

    offset: int = setting("round-robin.offset", 0, positive(allow_zero=True))


class RoundRobinSelection(HAFLQStrategy):
    """Round t trains components [o + (t-1)*r_k, o + t*r_k) mod R in every module
    (o = ``round-robin.offset``)."""

    options = RoundRobinOptions

    def __init__(self, offset: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset

    @classmethod
    def run_config_kwargs(cls, cfg):
        return {**super().run_config_kwargs(cfg), "offset": cfg.options.offset}

    def select_components(self, server_round, node_id, budget):
        start = (self.offset + (server_round - 1) * budget) % self.global_rank
        idx = np.sort((start + np.arange(budget)) % self.global_rank)
        return {module: idx for module in self.importance.modules}
