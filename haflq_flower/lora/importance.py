"""Component importance on the server, and top-r selection (pure numpy).

Clients score each component they train (:mod:`haflq_flower.lora.sensitivity`).
:class:`GlobalImportance` keeps one score per (module, component): the example-weighted
mean of what the clients that trained it reported, smoothed across rounds; a component
nobody trained keeps its score. :func:`top_components` picks each client's set, ties
broken by ``importance.tie-break`` (:data:`TIE_BREAKS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .components import ClientUpdate

TIE_BREAKS = ("index", "seed")


def top_components(scores: np.ndarray, r: int, tie_order: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``r`` highest scores, ascending; ties go to the earlier ``tie_order``.

    ``tie_order`` is a permutation rank per component (default: the index itself).
    """
    scores = np.asarray(scores, dtype=np.float64)
    r = max(0, min(int(r), len(scores)))
    order = np.arange(len(scores)) if tie_order is None else np.asarray(tie_order)
    ranked = np.lexsort((order, -scores))  # last key is primary: highest score first
    return np.sort(ranked[:r]).astype(np.int64)


def clip_scores(
    reports: Sequence[ClientUpdate], factor: float, reference: float = 0.0
) -> list[ClientUpdate]:
    """The updates with every importance score (``scores`` of ``trained``) capped at
    ``factor`` times a typical maximum.

    The typical maximum is the lower median of each report's largest score, together
    with ``reference`` (the current global maximum) when it is > 0. So one client cannot
    lift a component far above what the others (or the run so far) report: its excess
    is at most ``factor`` times, and the smoothing halves it (at the default 0.5) every
    round in which honest clients report that component. ``factor <= 0``: unchanged.

    Examples
    --------
    >>> reps = [ClientUpdate({}, trained={"m": np.array([0])}, scores={"m": np.array([x])})
    ...         for x in (1.0, 2.0, 1e30)]
    >>> [float(r.scores["m"][0]) for r in clip_scores(reps, 10.0)]
    [1.0, 2.0, 20.0]
    """
    if factor <= 0 or not reports:
        return list(reports)
    peaks = [
        max((float(np.max(v, initial=0.0)) for v in rep.scores.values()), default=0.0)
        for rep in reports
    ]
    if reference > 0:
        peaks.append(reference)
    bound = factor * sorted(peaks)[(len(peaks) - 1) // 2]
    return [
        replace(
            rep,
            scores={
                m: np.minimum(np.asarray(v, dtype=np.float64), bound) for m, v in rep.scores.items()
            },
        )
        for rep in reports
    ]


@dataclass
class GlobalImportance:
    """The server's importance of every (module, component).

    ``smoothing`` is the weight of the previous round's score: after a round,
    ``S = smoothing * S_old + (1 - smoothing) * S_round`` for components reported this
    round and seen before; a component reported for the first time takes ``S_round``;
    an unreported component keeps its score.
    """

    modules: Sequence[str]
    rank: int
    smoothing: float = 0.5
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    seen: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        for m in self.modules:
            self.scores.setdefault(m, np.zeros(self.rank, dtype=np.float64))
            self.seen.setdefault(m, np.zeros(self.rank, dtype=bool))

    def update(self, reports: Sequence[ClientUpdate]) -> None:
        """Fold in the scores of the components each update trained (n_k weights)."""
        for m in self.modules:
            num = np.zeros(self.rank, dtype=np.float64)
            den = np.zeros(self.rank, dtype=np.float64)
            for rep in reports:
                idx = np.asarray(rep.trained[m], dtype=np.int64)
                num[idx] += rep.num_examples * np.asarray(rep.scores[m], dtype=np.float64)
                den[idx] += rep.num_examples
            hit = den > 0
            fresh = num[hit] / den[hit]
            old = self.scores[m][hit]
            was_seen = self.seen[m][hit]
            self.scores[m][hit] = np.where(
                was_seen, self.smoothing * old + (1 - self.smoothing) * fresh, fresh
            )
            self.seen[m] |= hit

    def select(self, r: int, tie_order: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every module's top-``r`` components."""
        return {m: top_components(self.scores[m], r, tie_order) for m in self.modules}
