"""Every evaluated row's predicted label, per round: ``predictions.npz`` in the run directory.

Two runs evaluated on the same split (same data config and seed) can then be compared row
by row (McNemar's test, a paired bootstrap: :mod:`haflq_flower.stats`). The file holds
``labels`` (the true label of every row, in evaluation order), ``split`` (``test`` or
``validation``) and one ``round_<n>`` int array per evaluated round (round 0 = before
training): one prediction per row, or a (clients, rows) array where every client has its
own model (FedSA-LoRA). It is rewritten atomically after every round, so a resumed run
keeps the rounds it had.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .durable import write_npz_durably

FILENAME = "predictions.npz"
_ROUND = re.compile(r"round_(\d+)")


class PredictionsError(ValueError):
    """A predictions file is missing, malformed or does not match another run's rows."""


@dataclass
class Predictions:
    """True labels and the predicted label of every row after each round."""

    labels: np.ndarray
    split: str = "test"
    rounds: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, server_round: int, predicted: np.ndarray) -> None:
        """One round's predictions: one per row, or (clients, rows) for a method evaluated
        per client (FedSA-LoRA's personal models)."""
        predicted = np.asarray(predicted, dtype=np.int64)
        if predicted.ndim not in (1, 2) or predicted.shape[-1] != self.labels.shape[0]:
            raise PredictionsError(
                f"round {server_round}: predictions of shape {predicted.shape} for "
                f"{self.labels.shape[0]} rows"
            )
        self.rounds[int(server_round)] = predicted

    def correct(self, server_round: int | None = None) -> np.ndarray:
        """Per row after ``server_round`` (default: the last round): right or not (bool),
        or, for per-client predictions, the fraction of clients right (float)."""
        if not self.rounds:
            raise PredictionsError("no evaluated round")
        key = max(self.rounds) if server_round is None else server_round
        if key not in self.rounds:
            raise PredictionsError(f"no predictions for round {key}; have {sorted(self.rounds)}")
        right = self.rounds[key] == self.labels
        return right if right.ndim == 1 else right.mean(axis=0)

    def accuracy(self, server_round: int | None = None) -> float:
        return float(self.correct(server_round).mean())


def save(run_dir: Path, predictions: Predictions) -> Path:
    """Write ``predictions.npz`` atomically and durably."""
    arrays = {"labels": predictions.labels, "split": np.array(predictions.split)}
    arrays.update({f"round_{r}": p for r, p in sorted(predictions.rounds.items())})
    return write_npz_durably(Path(run_dir) / FILENAME, arrays)


def load(run_dir: Path) -> Predictions:
    """Read a run's ``predictions.npz``."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise PredictionsError(
            f"{path} not found: the run was made without eval.predictions or before it existed"
        )
    with np.load(path, allow_pickle=False) as data:
        if "labels" not in data.files:
            raise PredictionsError(f"{path} has no 'labels' array")
        out = Predictions(
            labels=data["labels"].astype(np.int64),
            split=str(data["split"]) if "split" in data.files else "test",
        )
        for name in data.files:
            match = _ROUND.fullmatch(name)
            if match:
                out.add(int(match.group(1)), data[name])
    return out


def load_or_new(run_dir: Path, labels: np.ndarray, split: str) -> Predictions:
    """The run's existing predictions (a resumed run) if they are for these rows, else
    an empty record."""
    try:
        found = load(run_dir)
    except PredictionsError:
        return Predictions(labels=np.asarray(labels, dtype=np.int64), split=split)
    if found.split != split or not np.array_equal(found.labels, labels):
        return Predictions(labels=np.asarray(labels, dtype=np.int64), split=split)
    return found
