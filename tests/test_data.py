import numpy as np
import pandas as pd
import pytest

from haflq_flower.config import parse_run_config
from haflq_flower.data import balanced_test_split, client_partition, load_task
from haflq_flower.splits import DataLoadError, equal_sizes, partition_indices


def test_rotten_tomatoes_split_is_balanced_and_disjoint():
    cfg = parse_run_config({"data.test-per-class": 100}).data
    task = load_task(cfg)
    assert task.label_names == ("rotten", "fresh")
    assert task.test["label"].value_counts().to_dict() == {0: 100, 1: 100}
    assert len(task.train) + len(task.test) == 7403 + 5405


def test_test_split_depends_on_seed_only():
    frame = pd.DataFrame(
        {"text": [f"t{i}" for i in range(100)], "label": [i % 2 for i in range(100)]}
    )
    a = balanced_test_split(frame, 10, seed=1)[1]
    b = balanced_test_split(frame, 10, seed=1)[1]
    c = balanced_test_split(frame, 10, seed=2)[1]
    assert a.equals(b) and not a.equals(c)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "inner-dirichlet"])
def test_partitions_are_reproducible_and_disjoint(partitioner):
    labels = np.array([i % 3 for i in range(600)])
    first = partition_indices(labels, 5, partitioner, 0.5, seed=7)
    second = partition_indices(labels, 5, partitioner, 0.5, seed=7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    flat = np.concatenate(first)
    assert len(flat) == len(set(flat.tolist())) == 600
    other = partition_indices(labels, 5, partitioner, 0.5, seed=8)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(first, other, strict=True))


def test_dirichlet_skews_labels_iid_does_not():
    labels = np.array([i % 2 for i in range(2000)])
    iid = partition_indices(labels, 4, "iid", 0.5, seed=0)
    skew = partition_indices(labels, 4, "dirichlet", 0.1, seed=0)
    iid_share = [labels[p].mean() for p in iid]
    skew_share = [labels[p].mean() for p in skew]
    assert max(abs(s - 0.5) for s in iid_share) < 0.1
    assert max(abs(s - 0.5) for s in skew_share) > 0.3


def test_inner_dirichlet_gives_label_skew_to_thousands_of_clients():
    """Rotten Tomatoes' size (12,500 training rows, 2 labels): the size-rejecting
    Dirichlet split cannot draw 1,000 non-empty partitions, the inner Dirichlet split
    draws 1,000 and 10,000, every row used once, sizes equal, labels skewed."""
    labels = np.array([i % 2 for i in range(12_500)])
    with pytest.raises(DataLoadError, match="inner-dirichlet"):
        partition_indices(labels, 1_000, "dirichlet", 0.5, seed=0)
    for clients in (1_000, 10_000):
        parts = partition_indices(labels, clients, "inner-dirichlet", 0.5, seed=0)
        sizes = {len(p) for p in parts}
        assert sizes == {12_500 // clients, -(-12_500 // clients)}
        flat = np.concatenate(parts)
        assert len(flat) == len(set(flat.tolist())) == 12_500
    parts = partition_indices(labels, 1_000, "inner-dirichlet", 0.5, seed=0)
    iid = partition_indices(labels, 1_000, "iid", 0.5, seed=0)
    # 12-13 rows each: a label share's spread is ~0.14 under iid sampling and ~0.35
    # under Beta(0.5, 0.5) (the two-label Dirichlet)
    skew = np.std([labels[p].mean() for p in parts])
    flat_share = np.std([labels[p].mean() for p in iid])
    assert skew > 0.25 > 0.2 > flat_share


def test_equal_sizes():
    assert equal_sizes(10, 3) == [4, 3, 3] and equal_sizes(6, 6) == [1] * 6


def test_client_partition_matches_across_calls():
    cfg = parse_run_config({}).data
    a = client_partition(cfg, 1, 3)
    b = client_partition(cfg, 1, 3)
    assert a.equals(b) and len(a) > 0


def test_local_csv_with_custom_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame(
        {
            "review": [f"good {i}" for i in range(30)] + [f"bad {i}" for i in range(30)],
            "sentiment": ["pos"] * 30 + ["neg"] * 30,
        }
    ).to_csv(path, index=False)
    cfg = parse_run_config(
        {
            "data.name": "local",
            "data.files": str(path),
            "data.text-column": "review",
            "data.label-column": "sentiment",
            "data.test-per-class": 5,
        }
    ).data
    task = load_task(cfg)
    assert task.label_names == ("neg", "pos")
    assert len(task.test) == 10 and len(task.train) == 50


def test_missing_file_and_column_errors(tmp_path):
    with pytest.raises(DataLoadError, match="not found"):
        load_task(
            parse_run_config({"data.name": "local", "data.files": str(tmp_path / "x.csv")}).data
        )
    path = tmp_path / "d.csv"
    pd.DataFrame({"a": ["x"] * 10, "b": [0, 1] * 5}).to_csv(path, index=False)
    with pytest.raises(DataLoadError, match="data.text-column"):
        load_task(parse_run_config({"data.name": "local", "data.files": str(path)}).data)


def test_too_few_examples_for_test_split():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 1]})
    with pytest.raises(DataLoadError, match="Lower it"):
        balanced_test_split(frame, 1, seed=0)


def test_device_data_files_keep_the_task_label_ids(tmp_path):
    """A device's own file maps labels by the run's label names, even with a class missing."""
    from flwr.app import Context, RecordDict

    from haflq_flower.client_app import _client_data
    from haflq_flower.config import parse_run_config
    from haflq_flower.data import DataLoadError, device_frame

    cfg = parse_run_config({"data.text-column": "review", "data.label-column": "verdict"})
    names = ("rotten", "fresh")
    only_fresh = tmp_path / "fresh.csv"
    pd.DataFrame({"review": ["great", "superb"], "verdict": ["fresh", "fresh"]}).to_csv(
        only_fresh, index=False
    )
    frame = device_frame(cfg.data, str(only_fresh), names)
    # the run's prompt (the packaged dataset's, data.template="auto") wraps device texts too
    prompt = cfg.data.template
    assert "{text}" in prompt and frame["label"].tolist() == [1, 1]
    assert frame["text"].tolist() == [prompt.replace("{text}", t) for t in ("great", "superb")]
    ints = tmp_path / "ints.csv"
    pd.DataFrame({"review": ["a", "b"], "verdict": [0, 1]}).to_csv(ints, index=False)
    both = device_frame(cfg.data, f"{only_fresh}, {ints}", names)
    assert sorted(both["label"].tolist()) == [0, 1, 1, 1]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"review": ["x"], "verdict": ["meh"]}).to_csv(bad, index=False)
    with pytest.raises(DataLoadError, match="meh"):
        device_frame(cfg.data, str(bad), names)
    with pytest.raises(DataLoadError, match="not found"):
        device_frame(cfg.data, str(tmp_path / "nope.csv"), names)

    context = Context(
        run_id=1,
        node_id=5,
        node_config={"data-files": str(only_fresh), "partition-id": 3},
        state=RecordDict(),
        run_config={},
    )
    pid, rows = _client_data(context, cfg)
    assert pid == 3 and rows["label"].tolist() == [1, 1]
