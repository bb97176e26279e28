"""How a task's rows are split: the held-out evaluation splits and the clients'
training partitions (numpy; flwr-datasets' partitioners are imported when used).

The names here are the allowed values of ``eval.split`` and ``data.partitioner``;
:mod:`haflq_flower.data` loads the rows and applies these splits.
"""

from __future__ import annotations

import warnings

import numpy as np

# eval.split: what the server evaluates on (data.validation-per-class rows per label are
# held out of the training pool for "validation").
EVAL_SPLITS = ("test", "validation")
# data.partitioner
PARTITIONERS = ("iid", "dirichlet", "inner-dirichlet")


class DataLoadError(RuntimeError):
    """The configured dataset could not be found, read or split."""


# What to change when the clients' partitions cannot be drawn (start-up errors).
_PARTITION_FIX = (
    "Use fewer clients (--num-supernodes of the launcher, num-supernodes of the "
    "federation), more data (data.max-train-examples=0 keeps every row), or"
)
# flwr-datasets' DirichletPartitioner redraws this many times for a non-empty partition.
DIRICHLET_ATTEMPTS = 10


def partition_indices(
    labels: np.ndarray, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Row indices of every client's partition (flwr-datasets partitioners, seeded).

    Raises
    ------
    DataLoadError
        When the split cannot give every partition at least one row: more partitions
        than rows, or a Dirichlet split that flwr-datasets cannot draw (it gives up after
        10 attempts, e.g. 1,000 partitions of 12.5k rows at alpha 0.5). The message names
        the run-config keys and what to change.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions < 1:
        raise DataLoadError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise DataLoadError(
            f"{num_partitions} client partitions of {len(labels)} training rows leave some "
            f"clients without data. {_PARTITION_FIX} at most {len(labels)} clients."
        )
    if partitioner == "inner-dirichlet":
        return inner_dirichlet(labels, num_partitions, alpha, seed)
    dataset = Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner splits in order; shuffle first with our seed.
        dataset = dataset.shuffle(seed=seed)
    else:
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            seed=seed,
        )
    part.dataset = dataset
    try:
        with warnings.catch_warnings():
            # one multi-kilobyte UserWarning per failed Dirichlet draw; the error says it all
            warnings.filterwarnings("ignore", category=UserWarning, module="flwr_datasets")
            parts = [
                np.asarray(part.load_partition(pid)["row"], dtype=np.int64)
                for pid in range(num_partitions)
            ]
    except ValueError as err:  # DirichletPartitioner: "max number of attempts ... reached"
        if partitioner != "dirichlet":
            raise
        raise DataLoadError(
            f"data.partitioner='dirichlet' could not draw {num_partitions} non-empty "
            f"partitions of {len(labels)} rows with data.dirichlet-alpha={alpha} and seed "
            f"{seed} ({DIRICHLET_ATTEMPTS} attempts; about {len(labels) / num_partitions:.1f} "
            f"rows per client). {_PARTITION_FIX} a larger data.dirichlet-alpha (less skew), "
            "data.partitioner='inner-dirichlet' (equal sizes, each client's label mix "
            f"from Dirichlet(alpha); made for many clients) or data.partitioner='iid'. "
            f"flwr-datasets said: {err}"
        ) from err
    empty = [pid for pid, rows in enumerate(parts) if len(rows) == 0]
    if empty:
        raise DataLoadError(
            f"data.partitioner={partitioner!r} left {len(empty)} of {num_partitions} "
            f"partitions empty (e.g. partition {empty[0]}). {_PARTITION_FIX} "
            "data.partitioner='iid'."
        )
    return parts


def equal_sizes(num_rows: int, num_partitions: int) -> list[int]:
    """``num_partitions`` sizes that differ by at most one and sum to ``num_rows``."""
    base, extra = divmod(num_rows, num_partitions)
    return [base + 1 if pid < extra else base for pid in range(num_partitions)]


def inner_dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew for any number of clients: sizes fixed and equal, each client's label
    mix drawn from Dirichlet(alpha) (the model of flwr-datasets' InnerDirichletPartitioner,
    which samples row by row: docs/benchmarks.md, "Scale", has both timed).

    Each partition's class counts are a multinomial draw from its mix; the rows that the
    draws ask of a class beyond its supply are taken back (from the partitions that asked,
    in proportion) and filled with the classes left over, so every row is used exactly once
    and every partition keeps its size. Nothing is redrawn, so it cannot fail.
    """
    rng = np.random.default_rng(seed)
    _, y = np.unique(labels, return_inverse=True)
    num_classes = int(y.max()) + 1
    supply = np.bincount(y, minlength=num_classes)
    sizes = np.asarray(equal_sizes(len(labels), num_partitions), dtype=np.int64)
    mix = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_partitions)
    counts = rng.multinomial(sizes, mix)  # partitions x classes
    excess = counts.sum(axis=0) - supply
    freed = np.zeros(num_partitions, dtype=np.int64)
    for c in np.flatnonzero(excess > 0):
        taken = rng.multivariate_hypergeometric(counts[:, c], int(excess[c]))
        counts[:, c] -= taken
        freed += taken
    for c in np.flatnonzero(excess < 0):
        given = rng.multivariate_hypergeometric(freed, int(-excess[c]))
        counts[:, c] += given
        freed -= given
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in range(num_classes):
        rows = rng.permutation(np.flatnonzero(y == c))
        for pid, part in enumerate(np.split(rows, np.cumsum(counts[:, c])[:-1])):
            chunks[pid].append(part)
    return [rng.permutation(np.concatenate(parts)).astype(np.int64) for parts in chunks]
