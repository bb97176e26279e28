"""Server side of block-wise base precision: salience from calibration nodes, and each
node's bit pattern from its memory budget.

:class:`BlockPlanner` is used by :class:`~haflq_flower.strategy.heterogeneous.HeterogeneousLoRA`
(and its subclasses). The allocation math lives in :mod:`haflq_flower.quant.blocks`;
this module only gathers what it needs (the model's layout, the salience) and talks to
the nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..lora.state import array_to_numpy, record_dict_bytes
from ..profiles import ClientProfile
from ..quant.blocks import (
    BLOCK_PRECISIONS,
    BlockLayout,
    BudgetError,
    allocate_block_bits,
    combine_salience,
    random_salience,
    uniform_pattern,
)
from ..untrusted import FLOAT32_MAX, printable, within
from ..wire import SALIENCE_KEY, SALIENCE_QUERY
from .base import CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES

log = logging.getLogger(__name__)


class SalienceError(RuntimeError):
    """No calibration node returned a usable salience vector."""


class BlockPlanner:
    """Decides each node's block bit pattern.

    Parameters
    ----------
    precision : str
        ``off`` (the base is quantized as ``model.quantization`` says, no pattern is
        sent), ``uniform-4|8|16``, ``salience`` or ``random``.
    metric : str
        Salience metric the calibration nodes compute.
    calibration_rows, calibration_clients : int
        Rows of local data per calibration node, and how many nodes calibrate (those
        with the largest memory budgets: they can hold the unquantized model).
    seed : int
        Seeds the random order of the ``random`` arm.
    """

    def __init__(
        self,
        precision: str = "off",
        metric: str = "recovery",
        calibration_rows: int = 16,
        calibration_clients: int = 2,
        seed: int = 0,
    ) -> None:
        if precision not in BLOCK_PRECISIONS:
            raise ValueError(
                f"block precision must be one of {BLOCK_PRECISIONS}, got {precision!r}"
            )
        self.precision = precision
        self.metric = metric
        self.calibration_rows = calibration_rows
        self.calibration_clients = calibration_clients
        self.seed = seed
        self.layout: BlockLayout | None = None
        self.salience: np.ndarray | None = None

    @property
    def enabled(self) -> bool:
        return self.precision != "off"

    @property
    def needs_salience(self) -> bool:
        return self.precision in ("salience", "random")

    def _require_layout(self) -> BlockLayout:
        if self.layout is None:
            raise RuntimeError(
                "block precision needs the model's block layout: set strategy.blocks.layout "
                "(the ServerApp does this with quant.mixed.block_layout(model))"
            )
        return self.layout

    def pattern_for(self, node_id: int, profile: ClientProfile) -> tuple[int, ...] | None:
        """The node's bits per block, or ``None`` when block precision is off."""
        if not self.enabled:
            return None
        layout = self._require_layout()
        if self.precision.startswith("uniform-"):
            return uniform_pattern(layout.num_blocks, int(self.precision.split("-")[1]))
        if self.salience is None:
            raise RuntimeError("salience is not known yet; call plan() first")
        try:
            return allocate_block_bits(self.salience, layout, profile.memory_budget_bytes)
        except BudgetError as err:
            log.warning(
                "node %d (%s): %s. It gets every block at 4 bits.", node_id, profile.tier, err
            )
            return uniform_pattern(layout.num_blocks, 4)

    def plan(
        self,
        grid: Grid,
        profiles: Mapping[int, ClientProfile],
        server_round: int,
        timeout: float,
    ) -> int:
        """Get the salience once (random, or from calibration nodes); returns the control
        bytes spent."""
        if not self.needs_salience or self.salience is not None:
            return 0
        layout = self._require_layout()
        if self.precision == "random":
            self.salience = random_salience(layout.num_blocks, self.seed)
            log.info("block precision: random order %s", np.argsort(-self.salience).tolist())
            return 0
        ranked = sorted(profiles, key=lambda n: (-profiles[n].memory_budget_bytes, n))
        chosen = ranked[: self.calibration_clients]
        config = ConfigRecord(
            {"server-round": server_round, "metric": self.metric, "rows": self.calibration_rows}
        )
        messages = [
            Message(
                content=RecordDict({CONFIG_KEY: config}),
                dst_node_id=n,
                message_type=SALIENCE_QUERY,
            )
            for n in chosen
        ]
        spent = sum(record_dict_bytes(m.content) for m in messages)
        log.info("block salience (%s): asking node(s) %s", self.metric, chosen)
        vectors, weights, problems = [], [], []
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        senders = [r.metadata.src_node_id for r in replies]
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                if node not in chosen or senders.count(node) > 1:
                    raise ValueError("not asked, or answered more than once")
                vector, rows = self._parse(reply, layout.num_blocks)
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"node {node}: {printable(err, 120)}")
                log.warning("block salience from node %d rejected: %s", node, printable(err))
                continue
            rows = min(rows, float(self.calibration_rows))  # the weight asked for, no more
            spent += record_dict_bytes(reply.content)
            vectors.append(vector)
            weights.append(rows)
        if not vectors:
            raise SalienceError(
                "no calibration node returned block salience "
                f"({'; '.join(problems) or 'no reply in time'}). Check the nodes' logs, "
                "raise strategy.round-timeout, or use blocks.precision=random|uniform-N."
            )
        self.salience = combine_salience(vectors, weights)
        order = np.argsort(-self.salience, kind="stable").tolist()
        log.info(
            "block salience from %d node(s); most salient blocks first: %s", len(vectors), order
        )
        return spent

    @staticmethod
    def _parse(reply: Message, num_blocks: int) -> tuple[np.ndarray, float]:
        if reply.has_error():
            raise ValueError(f"client error: {reply.error.reason}")
        if reply.metadata.message_type != SALIENCE_QUERY:
            raise ValueError(f"reply of type {printable(reply.metadata.message_type, 40)!r}")
        vector = array_to_numpy(reply.content.array_records[SALIENCE_KEY][SALIENCE_KEY])
        if vector.shape != (num_blocks,) or not within(vector, FLOAT32_MAX):
            raise ValueError(
                f"salience must be {num_blocks} values finite in float32, got shape {vector.shape}"
            )
        vector = vector.astype(np.float64)
        rows = reply.content.metric_records[METRICS_KEY][NUM_EXAMPLES]
        if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
            raise ValueError(f"bad '{NUM_EXAMPLES}': {rows!r}")
        return vector, float(rows)
