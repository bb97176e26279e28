"""FedSA-LoRA (Guo et al., ICLR 2025): A shared and averaged, every B kept by its client."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..config import ConfigError, RunConfig
from ..lora.aggregate import aggregate_fedsa
from ..lora.components import B_SUFFIX, without_factor
from ..lora.residual import personal_residual
from ..lora.state import (
    LoraState,
    from_array_record,
    record_dict_bytes,
    to_array_record,
)
from ..untrusted import printable
from ..wire import (
    ARRAYS_KEY,
    B_START_NORM,
    CONFIG_KEY,
    KEEP_B,
    METRICS_KEY,
    PARTITION_ID,
    PERSONAL_EVAL,
    PERSONAL_RESIDUAL,
    PREDICTIONS_KEY,
    RESIDUAL_DEN,
    RESIDUAL_NUM,
    record_to_arrays,
)
from .base import (
    STATUS_OK,
    ReplyError,
    check_record_bytes,
)
from .fedit import FedIT

log = logging.getLogger(__name__)


@dataclass
class PersonalEvaluation:
    """Every client's own model (shared A, its own B) on the run's evaluation rows.

    ``predictions`` is (clients, rows), in partition order; ``accuracy`` and ``loss``
    are the means over clients (every client sees the same rows, so equal weights);
    all three are ``None`` when no usable answer came back (the round has no accuracy).
    """

    loss: float | None
    accuracy: float | None
    predictions: np.ndarray | None
    partitions: list[int] = field(default_factory=list)
    per_client: list[dict] = field(default_factory=list)


class FedSALoRA(FedIT):
    """Every client trains A and B of the rank-R adapter and shares only A (and the
    head): the server averages ``A = sum_k p_k A_k``; each client keeps its own B
    between rounds in Flower's ``Context.state``, which the simulation engine and a
    deployed SuperNode both keep for the length of a run. B starts at PEFT's zero
    initialization on every client and never travels, so the uplink and the downlink
    carry A and the head only (60% of FedIT's bytes on SmolLM2-135M). Ranks are homogeneous.

    There is no single global model: the model of client k is ``B_k A``. It is evaluated
    as the paper reports it, per client (personalized), on the run's evaluation rows:
    after every evaluated round the server asks every node to evaluate its own model on
    those rows and to return each row's prediction; the run's accuracy is the mean over
    clients (:class:`PersonalEvaluation`). Before training every B is zero, so round 0 is
    the server's evaluation of the shared model, which every client then holds.

    The aggregation residual comes from the clients: the server never sees a B, so after
    every round each client that trained reports ``||B_k (A_k - A_new)||_F^2`` and
    ``||B_k A_k||_F^2`` summed over modules (its model goes from ``B_k A_k`` to
    ``B_k A_new``), through Flower's federated-evaluation slot of the round.
    """

    reports_residual = False  # not from the server's factors: the clients report it
    flower_dp = False  # the server's B is not the clients': noise there would be noise only

    @classmethod
    def check_run_config(cls, cfg: RunConfig) -> None:
        super().check_run_config(cfg)
        if cfg.resume is not None:
            raise ConfigError(
                "strategy.name=fedsa-lora cannot resume: each client keeps its own B in the "
                "node's context of one run, and a resumed run is a new run whose clients "
                "would restart B at zero. Start the run again instead."
            )

    # ----------------------------------------------------------------- train
    def train_records(
        self, server_round: int, node_id: int, global_state: LoraState
    ) -> dict[str, ArrayRecord | ConfigRecord]:
        shared = without_factor(global_state, B_SUFFIX)
        return {ARRAYS_KEY: to_array_record(shared), CONFIG_KEY: ConfigRecord({KEEP_B: True})}

    def expected_reply(self) -> LoraState:
        """A and the head (B stays on the client)."""
        return without_factor(self._global, B_SUFFIX)

    def aggregate(self, server_round: int, global_state: LoraState, updates) -> LoraState:
        # results.json: the norm of the own B each client started from (0 in its first
        # round; > 0 after, which shows the B it kept between rounds)
        self.stats[server_round].extra["b_start_norm"] = {
            str(int(u.metrics.get(PARTITION_ID, -1))): u.metrics.get(B_START_NORM) for u in updates
        }
        return aggregate_fedsa(
            global_state, [u.arrays for u in updates], [u.num_examples for u in updates]
        )

    # -------------------------------------------------------------- residual
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's federated-evaluation slot of every round asks the nodes that trained
        for their residual terms against the new shared A (a small message each: the
        shared A and head out, two numbers back; counted in ``residual_query_bytes``)."""
        stats = self.stats.get(server_round)
        if stats is None:
            return []
        nodes = sorted(n for n, c in stats.clients.items() if c.status == STATUS_OK)
        self._eval_nodes = set(nodes)
        shared = without_factor(from_array_record(arrays), B_SUFFIX)
        content = RecordDict(
            {
                ARRAYS_KEY: to_array_record(shared),
                CONFIG_KEY: ConfigRecord({"server-round": server_round, PERSONAL_RESIDUAL: True}),
            }
        )
        stats.extra["residual_query_bytes"] = record_dict_bytes(content) * len(nodes)
        return [
            Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in nodes
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        """The round's aggregation residual from the clients' terms
        (:func:`~haflq_flower.lora.residual.personal_residual`, weights n_k as in the
        round's aggregation); malformed or unasked replies are ignored."""
        stats = self.stats.get(server_round)
        if stats is None:
            return None
        terms, weights, seen = [], [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() or node not in self._eval_nodes or node in seen:
                continue
            seen.add(node)
            metrics = dict(msg.content.metric_records.get(METRICS_KEY, {}))
            num, den = metrics.get(RESIDUAL_NUM), metrics.get(RESIDUAL_DEN)
            if not all(isinstance(v, float) and 0.0 <= v < 3.4e38 for v in (num, den)):
                continue
            terms.append((num, den))
            weights.append(float(stats.clients[node].num_examples))
            stats.extra["residual_query_bytes"] += record_dict_bytes(msg.content)
        if terms:
            stats.extra["aggregation_residual"] = personal_residual(terms, weights)
        return None

    # -------------------------------------------------------------- evaluate
    def evaluate_on_clients(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        labels: np.ndarray,
        num_labels: int,
        timeout: float,
    ) -> PersonalEvaluation | None:
        """Every node's own model on the evaluation rows (``labels``: their true labels,
        so the server scores the returned predictions itself); ``None`` for round 0 (no
        client has a B of its own yet: the server's evaluation is every client's)."""
        if server_round == 0:
            return None
        shared = without_factor(from_array_record(arrays), B_SUFFIX)
        nodes = sorted(grid.get_node_ids())
        content = RecordDict(
            {
                ARRAYS_KEY: to_array_record(shared),
                CONFIG_KEY: ConfigRecord(
                    {"server-round": server_round, KEEP_B: True, PERSONAL_EVAL: True}
                ),
            }
        )
        messages = [
            Message(
                content=content,
                dst_node_id=n,
                message_type=MessageType.EVALUATE,
                group_id=f"personal-{server_round}",
            )
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        # evaluation traffic, apart from the training payload
        sent = record_dict_bytes(content) * len(nodes)
        received = sum(record_dict_bytes(m.content) for m in replies if not m.has_error())
        found = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                found.append(_personal_reply(msg, nodes, labels, num_labels))
            except ReplyError as err:
                log.warning(
                    "round %d: personal evaluation of node %d rejected: %s",
                    server_round,
                    node,
                    printable(str(err)),
                )
        if len({r["node"] for r in found}) != len(found):
            log.warning("round %d: a node answered the personal evaluation twice", server_round)
            found = []
        if not found:
            log.warning("round %d: no usable personal evaluation came back", server_round)
            return PersonalEvaluation(None, None, None)
        found.sort(key=lambda r: (r["partition"], r["node"]))
        outcome = PersonalEvaluation(
            loss=float(np.mean([r["loss"] for r in found])),
            accuracy=float(np.mean([r["accuracy"] for r in found])),
            predictions=np.stack([r.pop("predictions") for r in found]),
            partitions=[r["partition"] for r in found],
            per_client=found,
        )
        if server_round in self.stats:  # results.json: each client's own accuracy
            self.stats[server_round].extra["personal_eval_bytes"] = sent + received
            self.stats[server_round].extra["personal_eval"] = [
                {k: r[k] for k in ("node", "partition", "accuracy", "loss")} for r in found
            ]
        log.info(
            "round %d: personal accuracy %.4f (mean of %d clients, from %.4f to %.4f)",
            server_round,
            outcome.accuracy,
            len(found),
            min(r["accuracy"] for r in found),
            max(r["accuracy"] for r in found),
        )
        return outcome


def _personal_reply(msg: Message, nodes: list[int], labels: np.ndarray, num_labels: int) -> dict:
    """One node's personal evaluation, validated and scored against ``labels``: an answer
    from an asked node, with a prediction in ``[0, num_labels)`` for every row."""
    num_rows = len(labels)
    node = msg.metadata.src_node_id
    if msg.has_error():
        raise ReplyError(f"client error: {msg.error.reason}")
    if node not in nodes or msg.metadata.message_type != MessageType.EVALUATE:
        raise ReplyError("not an answer to a personal evaluation")
    content = msg.content
    if PREDICTIONS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        raise ReplyError(f"reply lacks '{PREDICTIONS_KEY}' or '{METRICS_KEY}'")
    record = content.array_records[PREDICTIONS_KEY]
    check_record_bytes(record, 8 * num_rows + 1024, PREDICTIONS_KEY)
    arrays = record_to_arrays(record)
    predicted = arrays.get(PREDICTIONS_KEY)
    if predicted is None or predicted.shape != (num_rows,) or predicted.dtype.kind not in "iu":
        raise ReplyError(f"predictions must be {num_rows} integers")
    predicted = predicted.astype(np.int64)
    if predicted.min(initial=0) < 0 or predicted.max(initial=0) >= num_labels:
        raise ReplyError(f"a prediction lies outside [0, {num_labels})")
    metrics = dict(content.metric_records[METRICS_KEY])
    loss = metrics.get("loss")
    if not isinstance(loss, float) or not 0.0 <= loss < 3.4e38:
        raise ReplyError(f"bad loss {loss!r}")
    partition = metrics.get(PARTITION_ID, -1)
    return {
        "node": node,
        "partition": int(partition) if isinstance(partition, int) else -1,
        "accuracy": float(np.mean(predicted == labels)),
        "loss": loss,
        "predictions": predicted,
    }
