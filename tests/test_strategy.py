from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from haflq_flower.lora.state import from_array_record, record_dict_bytes, to_array_record
from haflq_flower.strategy import FedIT


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _state(value: float) -> OrderedDict:
    return OrderedDict(a=np.full((2, 3), value, np.float32), b=np.full((4, 2), value, np.float32))


def _reply(msg: Message, state, num_examples=10, loss=0.5) -> Message:
    content = RecordDict(
        {
            "arrays": to_array_record(state),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


def test_configure_train_sends_one_message_per_node_and_counts_bytes():
    strategy = FedIT(seed=3)
    msgs = list(
        strategy.configure_train(
            1, to_array_record(_state(0.0)), ConfigRecord(), FakeGrid([5, 7, 9])
        )
    )
    assert sorted(m.metadata.dst_node_id for m in msgs) == [5, 7, 9]
    stats = strategy.stats[1]
    assert stats.bytes_down == sum(record_dict_bytes(m.content) for m in msgs)
    assert all(m.content["config"]["server-round"] == 1 for m in msgs)


def test_sampling_is_seeded():
    def sample(seed):
        s = FedIT(fraction_train=0.5, seed=seed)
        msgs = s.configure_train(
            2, to_array_record(_state(0.0)), ConfigRecord(), FakeGrid(range(10))
        )
        return sorted(m.metadata.dst_node_id for m in msgs)

    assert sample(1) == sample(1)
    assert len(sample(1)) == 5
    assert any(sample(1) != sample(s) for s in range(2, 6))


def test_aggregate_is_example_weighted_and_excludes_bad_replies():
    strategy = FedIT()
    msgs = list(
        strategy.configure_train(
            1, to_array_record(_state(0.0)), ConfigRecord(), FakeGrid([1, 2, 3, 4, 5])
        )
    )
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    bad_shape = OrderedDict(a=np.zeros((3, 3), np.float32), b=np.zeros((4, 2), np.float32))
    replies = [
        _reply(by_node[1], _state(1.0), num_examples=10),
        _reply(by_node[2], _state(4.0), num_examples=30),
        _reply(by_node[3], bad_shape, num_examples=10),
        _reply(by_node[4], _state(100.0), num_examples=0),
        Message(Error(code=1, reason="boom"), reply_to=by_node[5]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_array_record(arrays)
    np.testing.assert_allclose(out["a"], np.full((2, 3), (10 * 1 + 30 * 4) / 40))
    assert metrics["num-examples"] == 40
    stats = strategy.stats[1]
    assert sorted(r["node"] for r in stats.rejected) == [3, 4, 5]
    assert stats.bytes_up == sum(record_dict_bytes(r.content) for r in replies[:2])
    assert stats.clients[1].status == "ok" and stats.clients[3].status == "rejected"


def test_no_usable_reply_leaves_global_unchanged():
    strategy = FedIT()
    msgs = list(
        strategy.configure_train(1, to_array_record(_state(0.0)), ConfigRecord(), FakeGrid([1]))
    )
    arrays, metrics = strategy.aggregate_train(
        1, [Message(Error(code=1, reason="x"), reply_to=msgs[0])]
    )
    assert arrays is None and metrics is None


def test_array_record_type():
    assert isinstance(to_array_record(_state(1.0)), ArrayRecord)


def test_start_evaluates_round_0_only_for_a_fresh_run():
    """A run resumed after round 0 already has round 0's evaluation: no second record."""
    arrays = to_array_record(OrderedDict(w=np.zeros(2, np.float32)))
    for kwargs, expected in (
        ({}, [0]),
        ({"evaluate_initial": False}, []),
        ({"first_round": 2}, []),
    ):
        seen = []
        FedIT().start(
            grid=None,
            initial_arrays=arrays,
            num_rounds=0,
            evaluate_fn=lambda rnd, _arrays, seen=seen: seen.append(rnd),
            **kwargs,
        )
        assert seen == expected, kwargs


def test_mean_train_loss_skips_missing_losses_instead_of_counting_zero():
    from haflq_flower.lora.components import ClientUpdate
    from haflq_flower.strategy.base import mean_train_loss

    def update(n, metrics):
        return ClientUpdate({}, num_examples=n, node_id=n, metrics=metrics)

    ups = [update(1, {"train-loss": 2.0}), update(3, {"train-loss": 1.0}), update(4, {})]
    assert mean_train_loss(ups) == (1 * 2.0 + 3 * 1.0) / 4
    assert np.isnan(mean_train_loss([update(2, {"train-loss": float("nan")})]))


def test_block_planner_defaults_to_the_run_configs_salience_metric():
    from haflq_flower.config import DEFAULTS
    from haflq_flower.strategy import BlockPlanner

    assert BlockPlanner().metric == DEFAULTS["blocks.salience-metric"]
