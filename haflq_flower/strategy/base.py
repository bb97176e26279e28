"""A Message-API strategy for federated LoRA, with per-node messages and byte accounting.

:class:`LoRAStrategy` does the Flower plumbing every LoRA method here shares: seeded
node sampling, one message per node (so subclasses can send each node its own arrays
and config), validation of replies (a bad reply is logged and excluded, never fatal),
and exact byte counts of every record sent and received. Subclasses implement the
method itself in :meth:`LoRAStrategy.aggregate`, and may override the documented
hooks :meth:`prepare_round`, :meth:`train_records` and :meth:`decode_reply`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..config import ConfigError, RunConfig
from ..lora.components import ClientUpdate
from ..lora.residual import aggregation_residual, global_pairs
from ..lora.robust import clip_scales, clip_weights, state_norm
from ..lora.state import (
    LoraState,
    check_state,
    from_array_record,
    record_dict_bytes,
    to_array_record,
)
from ..privacy import CENTRAL, DPConfig, PrivacyAccountant, add_average_noise
from ..untrusted import FLOAT32_MAX, all_within, printable
from ..wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LOAD_S,
    METRICS_KEY,
    NUM_EXAMPLES,
    OPTIMIZER_STATE_BYTES,
    PARTITION_ID,
    PEAK_MEM_BYTES,
    RAY_NODE,
    TRAIN_LOSS,
    TRAIN_S,
    TRAINABLE_PARAMS,
    WEIGHT_BYTES,
    ReplyError,
    check_record_bytes,
    state_record_limit,
)

log = logging.getLogger(__name__)

# Client statuses in results.json (``sent`` until the round's replies are in).
STATUS_OK, STATUS_REJECTED, STATUS_ERROR, STATUS_NO_REPLY = "ok", "rejected", "error", "no reply"


@dataclass
class ClientRoundStats:
    node: int
    partition: int = -1
    tier: str = ""
    rank: int = 0
    num_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    train_s: float = 0.0
    # Seconds the client spent loading its model for this message (0 = reused in memory).
    load_s: float = 0.0
    train_loss: float = float("nan")
    peak_mem_bytes: int = 0
    trainable_params: int = 0
    optimizer_state_bytes: int = 0
    components_up: int = 0
    # Adaptive uplink: the enforced budget, the payload's bytes, components per bit width.
    budget_bytes: int = 0
    # The channel's budget before it was kept within [fixed part, largest payload], and
    # what was done to it ("raised to the fixed part", "capped at the largest payload").
    channel_budget_bytes: int = 0
    budget_note: str = ""
    payload_bytes: int = 0
    bits: dict[str, int] = field(default_factory=dict)
    # Block-wise base precision: the assigned pattern and the measured weight bytes.
    block_bits: str = ""
    weight_bytes: int = 0
    status: str = "sent"
    # Simulation on Ray: the first 12 hex digits of the Ray node id that trained it.
    ray_node: str = ""


@dataclass
class RoundStats:
    round: int
    bytes_up: int = 0
    bytes_down: int = 0
    # Profile queries and other control messages, counted apart from the training payload.
    control_bytes: int = 0
    # Seconds the strategy itself spent (configure + aggregate), not waiting for clients.
    strategy_s: float = 0.0
    clients: dict[int, ClientRoundStats] = field(default_factory=dict)
    rejected: list[dict[str, str | int]] = field(default_factory=list)
    # Strategy-specific per-round facts (e.g. how many clients updated each component).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["clients"] = [asdict(c) for c in self.clients.values()]
        return out


class LoRAStrategy(Strategy):
    """Base class of the federated LoRA strategies.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of connected nodes sampled for training each round.
    min_train_nodes : int (default: 1)
        Minimum number of nodes sampled for training; the round waits for them.
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked for federated evaluation on their local data.
        Centralized evaluation on the held-out test split happens in the ServerApp.
    seed : int (default: 0)
        Seeds node sampling, so a run samples the same nodes every time.
    min_replies : int (default: 1)
        A round with fewer usable replies leaves the global adapter unchanged (the
        reason is logged and recorded); with 1, the round proceeds with whoever answered.
    max_examples : int (default: 10_000_000)
        A reply claiming more local examples than this is rejected: ``num-examples`` is
        the aggregation weight, and an absurd one would let one client take the average.
    clip_factor : float (default: 0.0)
        Robust aggregation: if > 0, each update's norm is clipped to ``clip_factor``
        times the round's lower median update norm (:mod:`haflq_flower.lora.robust`).
        The run config's default is 5 (``strategy.clip-factor``).
    weight_clip : float (default: 0.0)
        If > 0, each reply's aggregation weight ``num-examples`` is capped at
        ``weight_clip`` times the round's lower median
        (:func:`~haflq_flower.lora.robust.clip_weights`).
        The run config's default is 5 (``strategy.weight-clip``).

    Replies are accepted only as answers to this round's training instructions: from a
    node sampled this round, of message type ``train``, carrying this round's group id
    and the instruction's message id, once per node (a node that answers twice has all
    its replies rejected). Every number in an accepted reply is range-checked
    (docs/reliability.md).
    """

    # Whether the aggregation residual can be computed (FedSA-LoRA: the server never sees
    # the clients' B factors).
    reports_residual: bool = True
    # Whether client-level DP applies (docs/privacy.md): the aggregate must be an average
    # of the clients' updates, per coordinate, so that noise on the sums bounds one client.
    supports_dp: bool = True
    # The strategy's own run-config keys: a frozen dataclass whose fields are declared
    # with :func:`haflq_flower.settings.setting`; parsed into ``RunConfig.options``
    # (docs/extending.md). None: the strategy has no keys of its own.
    options: ClassVar[type | None] = None

    def __init__(
        self,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        seed: int = 0,
        min_replies: int = 1,
        max_examples: int = 10_000_000,
        clip_factor: float = 0.0,
        weight_clip: float = 0.0,
        dp: DPConfig | None = None,
    ) -> None:
        if not 0.0 <= fraction_train <= 1.0 or not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError("fractions must lie in [0, 1]")
        if min_train_nodes < 1:
            raise ValueError("min_train_nodes must be >= 1")
        if min_replies < 1 or max_examples < 1:
            raise ValueError("min_replies and max_examples must be >= 1")
        for name, value in (("clip_factor", clip_factor), ("weight_clip", weight_clip)):
            if not (value >= 0.0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.min_replies = min_replies
        self.max_examples = max_examples
        self.clip_factor = clip_factor
        self.weight_clip = weight_clip
        self.dp = dp or DPConfig()
        self.dp.check()
        if self.dp.enabled and not self.supports_dp:
            raise ValueError(f"{type(self).__name__} does not support dp.mode={self.dp.mode}")
        self.accountant = PrivacyAccountant(self.dp.noise_multiplier, self.dp.delta)
        # DP noise from the OS, not from the run's seed: noise anyone can regenerate from
        # the run config could be subtracted again (DP runs do not repeat bit for bit)
        self._dp_rng = np.random.default_rng()
        self.stats: dict[int, RoundStats] = {}
        self._global: LoraState | None = None
        # This round's training instructions by node (their message ids are set when the
        # grid pushes them): a reply must answer one of these.
        self._round = 0
        self._sent: dict[int, Message] = {}
        self._eval_nodes: set[int] = set()
        self._sampling_rate = 1.0

    # ------------------------------------------------------------------ hooks
    @classmethod
    def run_config_kwargs(cls, cfg: RunConfig) -> dict[str, Any]:
        """The constructor arguments this class takes from the run config (a subclass
        adds its own to ``super().run_config_kwargs(cfg)``)."""
        return dict(
            fraction_train=cfg.strategy.fraction_train,
            min_train_nodes=cfg.strategy.min_train_nodes,
            fraction_evaluate=cfg.strategy.fraction_evaluate,
            seed=cfg.seed,
            min_replies=cfg.strategy.min_replies,
            max_examples=cfg.strategy.max_examples,
            clip_factor=cfg.strategy.clip_factor,
            weight_clip=cfg.strategy.weight_clip,
            dp=cfg.dp,
        )

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> LoRAStrategy:
        """This strategy with every knob from the run config."""
        return cls(**cls.run_config_kwargs(cfg))

    @classmethod
    def check_run_config(cls, cfg: RunConfig) -> None:
        """Raise :class:`~haflq_flower.config.ConfigError` if the run config asks for
        something this strategy cannot do (checked when the run config is parsed).
        Default: no per-client block precision (only HeterogeneousLoRA and its
        subclasses assign it)."""
        if cfg.strategy.blocks.enabled:
            raise ConfigError(
                f"run config 'blocks.precision={cfg.strategy.blocks.precision}' needs a "
                "strategy that assigns per-client block precision (haflq, hetlora or a "
                f"subclass); strategy.name is {cfg.strategy.name!r}. Use "
                "blocks.precision=off with it, or model.quantization for a uniform base."
            )

    def value_limit(self) -> float:
        """The largest magnitude a value of the global state may take: the range of the
        float type the global is kept and sent in (float32 here). Replies whose values,
        or whose global + delta, exceed it are rejected."""
        return FLOAT32_MAX

    def base_merge(self) -> LoraState | None:
        """Stacked factors that clients and the server's evaluation merge into the base
        weights before using the global adapter (FLoRA); ``None`` for methods that keep
        the base as loaded."""
        return None

    def evaluate_on_clients(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        labels: np.ndarray,
        num_labels: int,
        timeout: float,
    ) -> Any:
        """Evaluate on the clients instead of on the server, for methods without one
        global model (FedSA-LoRA's per-client B); ``None`` (the default) lets the
        ServerApp evaluate the global adapter itself. Otherwise an object with ``loss``,
        ``accuracy``, ``predictions`` (clients x rows) and ``per_client``."""
        return None

    def prepare_round(self, server_round: int, grid: Grid, node_ids: list[int]) -> None:
        """Called once per round with the sampled nodes, before any message is built."""

    def train_records(
        self, server_round: int, node_id: int, global_state: LoraState
    ) -> dict[str, ArrayRecord | ConfigRecord]:
        """The records sent to ``node_id`` for training (default: the whole adapter).

        A ``config`` record returned here is merged into the round's config.
        """
        return {ARRAYS_KEY: to_array_record(global_state)}

    def decode_reply(
        self, node_id: int, content: RecordDict, stats: ClientRoundStats
    ) -> ClientUpdate:
        """Turn a reply into the :class:`ClientUpdate` that :meth:`aggregate` consumes
        (its ``arrays``, and ``selection``/``trained``/``scores`` where the method has
        them); the caller fills in the node, ``num_examples`` and the metrics.

        Raise :class:`ReplyError` (or ``ValueError``) to reject it. Default: the arrays
        of :meth:`expected_reply` with their keys and shapes, no larger than float64
        values of them, every value within :meth:`value_limit`; returned as float32.
        """
        if ARRAYS_KEY not in content.array_records:
            raise ReplyError(f"reply lacks the '{ARRAYS_KEY}' record")
        expected = self.expected_reply()
        record = content.array_records[ARRAYS_KEY]
        check_record_bytes(record, state_record_limit(expected), ARRAYS_KEY)
        state = from_array_record(record)
        check_state(expected, state, self.value_limit())
        return ClientUpdate(OrderedDict((k, v.astype(np.float32)) for k, v in state.items()))

    def expected_reply(self) -> LoraState:
        """The part of the global adapter a client sends back whole (default: all of it,
        FedIT); :meth:`decode_reply` checks a reply's keys and shapes against it."""
        return self._global

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        """Combine validated client updates into the next global state."""
        raise NotImplementedError

    @property
    def adds_own_noise(self) -> bool:
        """Central DP with our noise on the sums (FedIT uses Flower's wrapper instead)."""
        return self.dp.mode == CENTRAL

    def dp_counts(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
        """Per array (broadcastable), how many clients' updates its average divides by:
        the noise on a sum of clipped updates, divided by this, is the noise on the
        average (:func:`~haflq_flower.privacy.add_average_noise`). Default: every array
        a client sent, averaged over all the round's updates (FedIT, FFA-LoRA,
        FedSA-LoRA)."""
        keys = {k for u in updates for k in u.arrays}
        return {k: np.asarray(float(sum(k in u.arrays for u in updates))) for k in keys}

    def update_delta(self, update: ClientUpdate) -> LoraState:
        """The client's change to the global state (default: each array it sent minus the
        global one, in float64 so that it cannot overflow); its norm is what
        :attr:`clip_factor` bounds."""
        return OrderedDict(
            (k, v.astype(np.float64) - self._global[k]) for k, v in update.arrays.items()
        )

    def scale_update(self, update: ClientUpdate, scale: float) -> None:
        """Multiply the client's change to the global state by ``scale`` (in [0, 1]), in
        place; the result lies between the global and the reply, so stays in range."""
        update.arrays = OrderedDict(
            (k, (g + scale * (v.astype(np.float64) - g)).astype(v.dtype))
            for k, v in update.arrays.items()
            for g in (self._global[k].astype(np.float64),)
        )

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What the strategy keeps between rounds, for checkpoints: JSON-able facts and
        named arrays. The global adapter and the results are saved by the ServerApp;
        the base class keeps nothing else. Subclasses with state override both methods."""
        return {}, {}

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (when a run resumes)."""

    # --------------------------------------------------------------- sampling
    def _sample(self, grid: Grid, server_round: int, fraction: float, minimum: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        wanted = max(int(len(nodes) * fraction), minimum)
        while len(nodes) < wanted:
            log.info("Waiting for nodes: %d connected, %d wanted", len(nodes), wanted)
            time.sleep(1.0)
            nodes = sorted(grid.get_node_ids())
        rng = random.Random(self.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, wanted))

    # ------------------------------------------------------------ Flower API
    def summary(self) -> None:
        log.info(
            "%s: fraction_train=%.2f min_train_nodes=%d fraction_evaluate=%.2f seed=%d",
            type(self).__name__,
            self.fraction_train,
            self.min_train_nodes,
            self.fraction_evaluate,
            self.seed,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = from_array_record(arrays)
        stats = self.stats.setdefault(server_round, RoundStats(round=server_round))
        node_ids = self._sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        self._sampling_rate = len(node_ids) / max(len(grid.get_node_ids()), len(node_ids), 1)
        self._round, self._sent = server_round, {}
        self.prepare_round(server_round, grid, node_ids)
        start = time.perf_counter()
        messages = []
        for node_id in node_ids:
            records = dict(self.train_records(server_round, node_id, self._global))
            node_cfg = ConfigRecord(
                {
                    **dict(config),
                    **dict(records.pop(CONFIG_KEY, ConfigRecord())),
                    "server-round": server_round,
                }
            )
            content = RecordDict({**records, CONFIG_KEY: node_cfg})
            sent = record_dict_bytes(content)
            client = stats.clients.setdefault(node_id, ClientRoundStats(node=node_id))
            client.bytes_down = sent
            stats.bytes_down += sent
            message = Message(
                content=content,
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            self._sent[node_id] = message
            messages.append(message)
        stats.strategy_s += time.perf_counter() - start
        log.info("round %d: training on %d node(s)", server_round, len(messages))
        return messages

    def _reject(self, stats: RoundStats, node_id: int, reason: str) -> None:
        """Log and record a rejection; the reason may carry device text, so it is escaped
        and cut (:func:`~haflq_flower.untrusted.printable`)."""
        reason = printable(reason)
        log.warning("round %d: reply from node %d rejected: %s", stats.round, node_id, reason)
        stats.rejected.append({"node": node_id, "reason": reason})
        if node_id in stats.clients:
            stats.clients[node_id].status = STATUS_REJECTED

    def _reply_node(self, msg: Message) -> int:
        """The node a reply is about: its sender, or, for an error the SuperLink wrote on a
        node's behalf (sender = the SuperLink), the node the answered instruction went to."""
        node_id = msg.metadata.src_node_id
        if node_id in self._sent or not msg.has_error():
            return node_id
        answered = msg.metadata.reply_to_message_id
        for dst, instruction in self._sent.items():
            if answered and instruction.metadata.message_id == answered:
                return dst
        return node_id

    def _wrong_instruction(self, msg: Message) -> str | None:
        """Why ``msg`` is not an answer to this round's instruction to its sender (None
        if it is): the node was not sampled, or type, round or message id differ."""
        node_id = msg.metadata.src_node_id
        instruction = self._sent.get(node_id)
        if instruction is None:
            return f"reply from node {node_id}, which was not sent a training instruction"
        if msg.metadata.message_type != MessageType.TRAIN:
            return (
                f"reply of message type {printable(msg.metadata.message_type, 40)!r}, "
                f"expected {MessageType.TRAIN!r}"
            )
        if msg.metadata.group_id != instruction.metadata.group_id:
            return (
                f"reply for round {printable(msg.metadata.group_id, 40)!r}, "
                f"this is round {self._round}"
            )
        if msg.metadata.reply_to_message_id != instruction.metadata.message_id:
            return "reply does not answer this round's instruction to the node"
        return None

    def parse_reply(self, msg: Message, stats: RoundStats) -> ClientUpdate | None:
        """Validate one training reply; ``None`` (and a logged reason) if unusable."""
        node_id = self._reply_node(msg)
        if msg.has_error():
            self._reject(stats, node_id, f"client error: {msg.error.reason}")
            if node_id in self._sent:
                stats.clients.setdefault(node_id, ClientRoundStats(node=node_id))
                stats.clients[node_id].status = STATUS_ERROR
            return None
        wrong = self._wrong_instruction(msg)
        if wrong is not None:
            self._reject(stats, node_id, wrong)
            return None
        content = msg.content
        if METRICS_KEY not in content.metric_records:
            self._reject(stats, node_id, f"reply lacks the '{METRICS_KEY}' record")
            return None
        metrics = dict(content.metric_records[METRICS_KEY])
        num_examples = metrics.get(NUM_EXAMPLES)
        if (
            not isinstance(num_examples, int)
            or isinstance(num_examples, bool)
            or not 0 < num_examples <= self.max_examples
        ):
            self._reject(
                stats,
                node_id,
                f"bad '{NUM_EXAMPLES}': {num_examples!r} (an integer in [1, "
                f"{self.max_examples}] is required)",
            )
            return None
        client = stats.clients.setdefault(node_id, ClientRoundStats(node=node_id))
        try:
            update = self.decode_reply(node_id, content, client)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
            self._reject(stats, node_id, f"{type(err).__name__}: {err}")
            return None
        client.bytes_up = record_dict_bytes(content)
        client.num_examples = num_examples
        # Informational metrics: a malformed one is recorded as missing, never fatal.
        client.train_s = _number(metrics, TRAIN_S, float, 0.0)
        client.load_s = _number(metrics, LOAD_S, float, 0.0)
        client.train_loss = _number(metrics, TRAIN_LOSS, float, float("nan"))
        client.peak_mem_bytes = _number(metrics, PEAK_MEM_BYTES, int, 0)
        client.trainable_params = _number(metrics, TRAINABLE_PARAMS, int, 0)
        client.partition = _number(metrics, PARTITION_ID, int, -1)
        client.optimizer_state_bytes = _number(metrics, OPTIMIZER_STATE_BYTES, int, 0)
        client.weight_bytes = _number(metrics, WEIGHT_BYTES, int, 0)
        tag = _number(metrics, RAY_NODE, int, 0)
        client.ray_node = f"{tag:012x}" if 0 < tag < 2**48 else ""
        client.status = STATUS_OK
        stats.bytes_up += client.bytes_up
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        update.node_id, update.num_examples, update.metrics = node_id, num_examples, numeric
        return update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats(round=server_round))
        replies = list(replies)
        start = time.perf_counter()
        updates = self._usable_updates(replies, stats)
        if self._round != server_round:  # aggregate without configure: nothing was asked
            updates = []
        for client in stats.clients.values():
            if client.status == "sent":
                client.status = STATUS_NO_REPLY
        counts: dict[str, int] = {}
        for client in stats.clients.values():
            counts[client.status] = counts.get(client.status, 0) + 1
        stats.extra["replies"] = counts
        if len(updates) < self.min_replies:
            reason = (
                f"{len(updates)} usable repl{'y' if len(updates) == 1 else 'ies'} "
                f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}), fewer than "
                f"min_replies={self.min_replies}"
            )
            log.warning("round %d: %s; the global adapter is unchanged", server_round, reason)
            stats.extra["update"] = f"skipped: {reason}"
            stats.strategy_s += time.perf_counter() - start
            return None, None
        self._clip(updates, stats)
        try:
            if not updates:
                raise AggregationError("no update left after clipping")
            new_state = self.aggregate(server_round, self._global, updates)
            if self.adds_own_noise:
                new_state = add_average_noise(
                    new_state, self.dp_counts(updates), self.dp.noise_std, self._dp_rng
                )
            check_global(new_state, self.value_limit())
        except AggregationError as err:
            log.warning("round %d: %s; the global adapter is unchanged", server_round, err)
            stats.extra["update"] = f"skipped: {err}"
            stats.strategy_s += time.perf_counter() - start
            return None, None
        stats.extra["update"] = "applied"
        if self.dp.enabled:
            self._account(server_round, stats)
        stats.strategy_s += time.perf_counter() - start
        # a diagnostic, timed apart from the strategy: how far the new global model is
        # from the average of the clients' models (docs/algorithms.md)
        stats.extra["aggregation_residual"] = self._residual(server_round, updates, new_state)
        total = sum(u.num_examples for u in updates)
        loss = mean_train_loss(updates)
        metrics = MetricRecord({TRAIN_LOSS: loss, NUM_EXAMPLES: total, "clients": len(updates)})
        return to_array_record(new_state), metrics

    def client_factors(self, global_state: LoraState, update: ClientUpdate) -> LoraState:
        """The LoRA factors the client's own model ended the round with (frozen
        components included), for the aggregation residual. Default: the reply is the
        client's whole adapter (FedIT)."""
        return update.arrays

    def applied_pairs(
        self, server_round: int, new_state: LoraState
    ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Per module, the (B, A) pairs whose products make the new global update: the
        global adapter's own factors; FLoRA and FedEx-LoRA add what they merge into the
        base this round."""
        return global_pairs(new_state)

    def _residual(
        self, server_round: int, updates: list[ClientUpdate], new_state: LoraState
    ) -> float | None:
        if not self.reports_residual:
            return None
        try:
            clients = [self.client_factors(self._global, u) for u in updates]
            value = aggregation_residual(
                clients,
                [float(u.num_examples) for u in updates],
                self.applied_pairs(server_round, new_state),
            )
        except Exception as err:  # a diagnostic never ends a round, whatever the payload
            log.warning("round %d: no aggregation residual (%s)", server_round, err)
            return None
        return value if np.isfinite(value) else None

    def _usable_updates(self, replies: list[Message], stats: RoundStats) -> list[ClientUpdate]:
        """Validated updates in a fixed order (partition, then node): floating-point sums
        depend on order, and arrival order does not repeat between runs. A node that
        answers more than once has every reply rejected (which one is genuine cannot be
        told), before any of them is parsed."""
        senders: dict[int, int] = {}
        for msg in replies:
            if not msg.has_error():
                senders[msg.metadata.src_node_id] = senders.get(msg.metadata.src_node_id, 0) + 1
        updates = []
        for msg in replies:
            if not msg.has_error() and senders[msg.metadata.src_node_id] > 1:
                node_id = msg.metadata.src_node_id
                self._reject(stats, node_id, f"node {node_id} answered {senders[node_id]} times")
                continue
            try:
                update = self.parse_reply(msg, stats)
            except Exception as err:  # a hook that fails on one reply must not end the run
                node_id = msg.metadata.src_node_id
                log.exception("round %d: reply from node %d broke validation", stats.round, node_id)
                self._reject(stats, node_id, f"validation failed: {type(err).__name__}: {err}")
                continue
            if update is not None:
                updates.append(update)
        return sorted(updates, key=lambda u: (stats.clients[u.node_id].partition, u.node_id))

    def _clip(self, updates: list[ClientUpdate], stats: RoundStats) -> None:
        """Cap weights (:attr:`weight_clip`) and update norms (:attr:`clip_factor`). Norms
        are taken in float64 of validated (finite, in-range) values, so they are finite;
        an update whose norm is not (impossible after validation) is dropped, not fatal.
        Under DP every client weighs the same, and (central) every decoded update is
        clipped to ``dp.clip`` again: the device clipped it before quantizing, and the
        stochastic quantizer may have lengthened it a little."""
        if self.dp.enabled:
            for update in updates:
                update.num_examples = 1
        if self.dp.mode == CENTRAL:
            for update in updates:
                norm = state_norm(self.update_delta(update))
                if norm > self.dp.clip:
                    self.scale_update(update, self.dp.clip / norm)
        if self.weight_clip > 0 and not self.dp.enabled:
            weights = clip_weights([u.num_examples for u in updates], self.weight_clip)
            capped = {}
            for update, weight in zip(updates, weights, strict=True):
                if weight < update.num_examples:
                    capped[str(update.node_id)] = int(weight)
                    update.num_examples = int(weight)
            stats.extra["weight_clipped"] = capped
        if self.clip_factor <= 0:
            return
        norms = [state_norm(self.update_delta(u)) for u in updates]
        for update, norm in zip(list(updates), norms, strict=True):
            if not np.isfinite(norm):
                self._reject(stats, update.node_id, "update norm is not finite")
                updates.remove(update)
        norms = [n for n in norms if np.isfinite(n)]
        scales = clip_scales(norms, self.clip_factor)
        clipped = {}
        for update, norm, scale in zip(updates, norms, scales, strict=True):
            if scale < 1.0:
                self.scale_update(update, float(scale))
                clipped[update.node_id] = round(float(scale), 6)
                log.info(
                    "round %d: node %d update norm %.4g clipped by %.3g",
                    stats.round,
                    update.node_id,
                    norm,
                    scale,
                )
        stats.extra["clipped"] = {str(k): v for k, v in clipped.items()}

    def _account(self, server_round: int, stats: RoundStats) -> None:
        """One more sampled Gaussian mechanism: central, at this round's sampling rate
        (sampled nodes / connected nodes); local, rate 1 (each device's own mechanism)."""
        rate = 1.0 if self.dp.mode != CENTRAL else self._sampling_rate
        self.accountant.add_round(rate)
        stats.extra["dp_rate"] = rate
        stats.extra["dp_epsilon"] = self.accountant.epsilon()
        log.info(
            "round %d: DP (%s, z=%.3g, C=%.3g): epsilon %.3f at delta %.1e after %d round(s)",
            server_round,
            self.dp.mode,
            self.dp.noise_multiplier,
            self.dp.clip,
            stats.extra["dp_epsilon"],
            self.dp.delta,
            len(self.accountant.rates),
        )

    def restore_privacy(self, rounds: list[dict[str, Any]]) -> None:
        """A resumed run's accountant: the sampling rates its results recorded."""
        self.accountant.rates = [float(r["dp_rate"]) for r in rounds if r.get("dp_rate")]

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
        evaluate_initial: bool | None = None,
    ) -> Result:
        """Flower's :meth:`Strategy.start` (its loop and its log lines) for a fresh run.

        The one addition is a resumed run's start: ``first_round`` > 1 continues after
        the checkpoint's round, and ``evaluate_initial=False`` skips the round-0
        evaluation it already has (default: evaluate only when ``first_round`` is 1).
        That continuation runs :meth:`continue_rounds`, the same loop from
        ``first_round`` on.
        """
        if evaluate_initial is None:
            evaluate_initial = first_round == 1
        if first_round == 1 and evaluate_initial:
            result = super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
            if len(result.arrays) == 0:  # Flower's Result starts empty: no round applied
                result.arrays = initial_arrays
            return result
        return self.continue_rounds(
            grid,
            initial_arrays,
            first_round,
            num_rounds,
            timeout,
            train_config or ConfigRecord(),
            evaluate_config or ConfigRecord(),
            evaluate_fn,
        )

    def continue_rounds(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        first_round: int,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> Result:
        """Rounds ``first_round`` to ``num_rounds`` of a resumed run, in the order and
        with the log lines of Flower's loop (train, federated evaluation, centralized
        evaluation)."""
        log.info("Resuming %s: rounds %d to %d", type(self).__name__, first_round, num_rounds)
        self.summary()
        result = Result(arrays=arrays)
        for current_round in range(first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", current_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(current_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                log.info("\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[current_round] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            eval_metrics = self.aggregate_evaluate(current_round, replies)
            if eval_metrics is not None:
                log.info("\t└──> Aggregated MetricRecord: %s", eval_metrics)
                result.evaluate_metrics_clientapp[current_round] = eval_metrics
            if evaluate_fn:
                log.info("Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log.info("\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        content = RecordDict(
            {
                ARRAYS_KEY: arrays,
                CONFIG_KEY: ConfigRecord({**dict(config), "server-round": server_round}),
            }
        )
        nodes = self._sample(grid, server_round, self.fraction_evaluate, 1)
        self._eval_nodes = set(nodes)
        return [
            Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in nodes
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted accuracy and loss of the nodes' local evaluations. Only one
        ``evaluate`` reply per node asked this round counts; counts, accuracies and losses
        out of range ([1, max_examples], [0, 1], [0, 3.4e38]) are ignored."""
        total, acc, loss = 0, 0.0, 0.0
        replies = [m for m in replies if not m.has_error()]
        senders = [m.metadata.src_node_id for m in replies]
        asked = self._eval_nodes
        for msg in replies:
            node = msg.metadata.src_node_id
            if (
                node not in asked
                or senders.count(node) > 1
                or msg.metadata.message_type != MessageType.EVALUATE
                or METRICS_KEY not in msg.content.metric_records
            ):
                continue
            m = dict(msg.content.metric_records[METRICS_KEY])
            n = _number(m, NUM_EXAMPLES, int, 0)
            accuracy = _number(m, "accuracy", float, -1.0)
            node_loss = _number(m, "loss", float, 0.0)
            if 0 < n <= self.max_examples and 0.0 <= accuracy <= 1.0:
                total += n
                acc += n * accuracy
                loss += n * (node_loss if 0.0 <= node_loss <= FLOAT32_MAX else 0.0)
        if total == 0:
            return None
        return MetricRecord({"accuracy": acc / total, "loss": loss / total, NUM_EXAMPLES: total})


class AggregationError(ValueError):
    """The aggregate of a round's validated updates cannot be used (e.g. it leaves the
    range of :meth:`LoRAStrategy.value_limit`); the round is skipped, nothing changes."""


def check_global(state: LoraState, limit: float) -> None:
    """Raise :class:`AggregationError` unless every value of ``state`` is finite and
    within ``limit``: the last check before a new global state is accepted."""
    if not all_within(state.values(), limit):
        raise AggregationError(
            f"the aggregate leaves the range +-{limit:.4g} of the global state's float type"
        )


def mean_train_loss(updates: list[ClientUpdate]) -> float:
    """The n_k-weighted mean of the clients' reported training losses, over the clients
    that reported a finite one (a missing loss is not a loss of 0); NaN if none did."""
    known = [
        (u.num_examples, u.metrics[TRAIN_LOSS])
        for u in updates
        if np.isfinite(u.metrics.get(TRAIN_LOSS, float("nan")))
    ]
    weight = sum(n for n, _ in known)
    return sum(n * loss for n, loss in known) / weight if weight > 0 else float("nan")


def _number(metrics: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """``metrics[key]`` as ``kind`` if it is a finite number, else ``default``."""
    value = metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        return default
    try:
        return kind(value)
    except (OverflowError, ValueError):
        return default
