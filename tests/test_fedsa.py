"""FedSA-LoRA: A shared and averaged, each B kept by its client, personal evaluation."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from haflq_flower.config import ConfigError
from haflq_flower.lora.aggregate import aggregate_fedsa
from haflq_flower.lora.state import to_array_record
from haflq_flower.predictions import Predictions, load, save
from haflq_flower.strategy import FedSALoRA
from haflq_flower.wire import METRICS_KEY, PARTITION_ID, PREDICTIONS_KEY

A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "score.weight"


def _state(a: float, b: float, head: float) -> OrderedDict:
    return OrderedDict(
        [
            (A, np.full((2, 3), a, np.float32)),
            (B, np.full((4, 2), b, np.float32)),
            (HEAD, np.full(2, head, np.float32)),
        ]
    )


def test_fedsa_averages_a_and_the_head_and_leaves_the_global_b():
    glob = _state(0.0, 0.0, 0.0)
    ups = [
        OrderedDict((k, v) for k, v in _state(a, 99.0, h).items() if k != B)
        for a, h in ((1.0, 2.0), (4.0, 8.0))
    ]
    out = aggregate_fedsa(glob, ups, [1, 2])  # p = 1/3, 2/3
    np.testing.assert_allclose(out[A], np.full((2, 3), 3.0))
    np.testing.assert_allclose(out[HEAD], np.full(2, 6.0))
    np.testing.assert_array_equal(out[B], glob[B])
    assert list(out) == list(glob)


def test_personal_residual_known_answer():
    from haflq_flower.lora.residual import personal_residual, personal_residual_terms

    b = {"m.lora_B.weight": np.array([[1.0], [2.0]])}  # ||b||^2 = 5
    a_k = {"m.lora_A.weight": np.array([[3.0, 0.0, 4.0]])}  # ||a_k||^2 = 25
    a_new = {"m.lora_A.weight": np.array([[3.0, 0.0, 1.0]])}  # a_k - a_new = (0, 0, 3)
    num, den = personal_residual_terms(b, a_k, a_new)
    assert (num, den) == pytest.approx((5 * 9, 5 * 25))
    assert personal_residual_terms(b, a_k, a_k)[0] == 0.0  # nothing moved
    # two clients, weights 1 and 3: sqrt((1*45 + 3*0) / (1*125 + 3*125))
    assert personal_residual([(45.0, 125.0), (0.0, 125.0)], [1, 3]) == pytest.approx(
        (45 / 500) ** 0.5
    )


class PersonalGrid:
    """Answers personal evaluations with fixed predictions per node (and bogus metrics)."""

    def __init__(self, answers: dict[int, np.ndarray | None]):
        self.answers = answers
        self.asked: list[int] = []

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            predicted = self.answers[node]
            content = RecordDict(
                {
                    # a claimed accuracy is ignored: the server scores the predictions
                    METRICS_KEY: MetricRecord(
                        {"loss": 0.5 + node, "accuracy": 1.0, PARTITION_ID: 10 - node}
                    ),
                    PREDICTIONS_KEY: ArrayRecord({PREDICTIONS_KEY: Array(predicted)}),
                }
            )
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_personal_evaluation_scores_every_client_on_the_same_rows_and_rejects_bad_ones():
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=np.int64)
    grid = PersonalGrid(
        {
            1: labels.copy(),  # every row right
            2: np.array([0, 0, 0, 0, 0, 0], dtype=np.int64),  # half right
            3: np.array([0, 1, 0, 1, 1, 7], dtype=np.int64),  # label 7 of 2: rejected
            4: np.array([0, 1, 0], dtype=np.int64),  # too few rows: rejected
        }
    )
    strategy = FedSALoRA()
    arrays = to_array_record(_state(1.0, 0.0, 0.0))
    assert strategy.evaluate_on_clients(grid, 0, arrays, labels, 2, 10.0) is None
    assert grid.asked == []  # round 0: every B is zero, the server evaluates
    found = strategy.evaluate_on_clients(grid, 1, arrays, labels, 2, 10.0)
    assert sorted(grid.asked) == [1, 2, 3, 4]
    assert found.accuracy == pytest.approx((1.0 + 0.5) / 2)
    assert found.loss == pytest.approx((1.5 + 2.5) / 2)
    # partition order (10 - node): node 2 first
    assert found.partitions == [8, 9]
    np.testing.assert_array_equal(found.predictions, np.stack([grid.answers[2], labels]))
    # the message carries A and the head, never B
    grid.answers = {1: None}
    sent = {}

    def capture(messages, *, timeout=None):
        sent["content"] = messages[0].content
        return []

    grid.send_and_receive = capture
    empty = strategy.evaluate_on_clients(grid, 2, arrays, labels, 2, 10.0)
    assert empty.accuracy is None and empty.predictions is None
    assert set(sent["content"].array_records["arrays"]) == {A, HEAD}


def test_per_client_predictions_score_the_fraction_of_clients_right(tmp_path):
    labels = np.array([0, 1, 1, 0])
    found = Predictions(labels=labels)
    found.add(0, np.array([0, 1, 0, 0]))
    found.add(1, np.array([[0, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        found.add(2, np.zeros((2, 3), dtype=np.int64))
    np.testing.assert_array_equal(found.correct(0), [True, True, False, True])
    np.testing.assert_allclose(found.correct(1), [0.5, 1.0, 0.5, 0.5])
    assert found.accuracy(1) == pytest.approx(0.625)
    save(tmp_path, found)
    back = load(tmp_path)
    np.testing.assert_array_equal(back.rounds[1], found.rounds[1])


def test_fedsa_cannot_resume(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="cannot resume"):
        tiny_config(strategy__name="fedsa-lora", resume=str(tmp_path))


@pytest.mark.slow
def test_fedsa_lora_keeps_each_b_on_its_client_and_evaluates_personal_models(tmp_path):
    """Three clients, two rounds, in Flower's simulation engine: B starts at zero and is
    the client's own from round 2 (kept in its Context.state), the server's B never
    changes, uploads carry A and the head only, and the final accuracy is the mean of
    the clients' own models on the test rows."""
    from haflq_flower.checkpoint import load_checkpoint
    from haflq_flower.lora.state import record_dict_bytes

    from .conftest import TINY
    from .test_simulation import _simulate

    overrides = {**TINY, "strategy.name": "fedsa-lora", "output.dir": str(tmp_path)}
    results = _simulate(overrides, 3)
    rounds = results["rounds"]
    assert all(v == 0.0 for v in rounds[1]["b_start_norm"].values())
    assert len(rounds[2]["b_start_norm"]) == 3
    assert all(v > 0.0 for v in rounds[2]["b_start_norm"].values())
    ckpt = load_checkpoint(tmp_path)
    b_keys = [k for k in ckpt.global_state if k.endswith(".lora_B.weight")]
    assert b_keys and not any(ckpt.global_state[k].any() for k in b_keys)
    shared = OrderedDict((k, v) for k, v in ckpt.global_state.items() if k not in b_keys)
    shared_bytes = record_dict_bytes(RecordDict({"arrays": to_array_record(shared)}))
    full_bytes = record_dict_bytes(RecordDict({"arrays": to_array_record(ckpt.global_state)}))
    for client in rounds[2]["clients"]:
        assert shared_bytes <= client["bytes_up"] < full_bytes
        assert shared_bytes <= client["bytes_down"] < full_bytes
    personal = rounds[2]["personal_eval"]
    assert len(personal) == 3
    assert rounds[2]["accuracy"] == pytest.approx(np.mean([c["accuracy"] for c in personal]))
    found = load(tmp_path)
    assert found.rounds[0].ndim == 1 and found.rounds[2].shape == (3, len(found.labels))
    assert found.accuracy(2) == pytest.approx(rounds[2]["accuracy"])
    assert rounds[2]["personal_eval_bytes"] > 0
    # the residual comes from the clients every round: A moved, so > 0, and well below 1
    for r in rounds[1:]:
        assert 0.0 < r["aggregation_residual"] < 1.0
        assert r["residual_query_bytes"] > 0
