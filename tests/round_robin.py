"""The worked example of docs/extending.md, importable by path: under `flwr run` the
ServerApp and the ClientApps load it with ``strategy.name="tests.round_robin:RoundRobinSelection"``
(this file travels in the app's FAB; Flower leaves out only ``test_*.py`` files)."""

import numpy as np

from haflq_flower.strategy import HAFLQStrategy


class RoundRobinSelection(HAFLQStrategy):
    """Round t trains components [(t-1)*r_k, t*r_k) mod R in every module."""

    def select_components(self, server_round, node_id, budget):
        start = (server_round - 1) * budget % self.global_rank
        idx = np.sort((start + np.arange(budget)) % self.global_rank)
        return {module: idx for module in self.importance.modules}
