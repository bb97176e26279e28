"""HAFLQ's heterogeneous LoRA strategy: importance-based selection, freezing or
truncation, adaptive rank-1 aggregation and the bandwidth-adaptive uplink.

:class:`HAFLQStrategy` is the neutral :class:`~.heterogeneous.HeterogeneousLoRA` with
HAFLQ's own decisions: each node's components are the top r_k by global importance
(:meth:`select_components`), the clients' importance scores are folded into that global
importance after every round (:meth:`update_importance`), and the defaults are freezing,
adaptive aggregation and the adaptive uplink.

Subclass and override the hooks to change a decision; see docs/extending.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp import Grid

from ..config import RunConfig
from ..lora.aggregate import ADAPTIVE
from ..lora.components import ClientUpdate, Selection
from ..lora.importance import TIE_BREAKS, GlobalImportance, clip_scores
from ..lora.view import FREEZE
from .heterogeneous import UPLINKS, Assignment, HeterogeneousLoRA

__all__ = ["Assignment", "HAFLQStrategy", "UPLINKS"]


class HAFLQStrategy(HeterogeneousLoRA):
    """Heterogeneous federated LoRA with importance-based freezing/truncation.

    Parameters
    ----------
    mode : str (default: "freeze")
        See :class:`~.heterogeneous.HeterogeneousLoRA`.
    aggregation : str (default: "adaptive")
        See :class:`~.heterogeneous.HeterogeneousLoRA`.
    uplink : str (default: "adaptive")
        See :class:`~.heterogeneous.HeterogeneousLoRA`.
    importance_smoothing : float (default: 0.5)
        Weight of the previous round's global importance when new scores arrive.
    tie_break : str (default: "index")
        Equal scores (round 1: all zero) go to the lower index, or to a seeded order.
    score_clip : float (default: 0.0)
        If > 0, every reported importance score is capped at ``score_clip`` times the
        lower median of the round's per-reply maximum scores and the current global
        maximum (:func:`~haflq_flower.lora.importance.clip_scores`). The run config's
        default is 10 (``importance.score-clip``).
    **kwargs
        Passed to :class:`~.heterogeneous.HeterogeneousLoRA` (profiles, downlink, channel,
        blocks) and :class:`LoRAStrategy` (fractions, minimum nodes, seed, DP).
    """

    def __init__(
        self,
        mode: str = FREEZE,
        aggregation: str = ADAPTIVE,
        uplink: str = "adaptive",
        importance_smoothing: float = 0.5,
        tie_break: str = "index",
        score_clip: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(mode=mode, aggregation=aggregation, uplink=uplink, **kwargs)
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
        if not (score_clip >= 0 and np.isfinite(score_clip)):
            raise ValueError(f"score_clip must be a finite number >= 0, got {score_clip}")
        self.score_clip = score_clip
        self.importance_smoothing = importance_smoothing
        self.tie_break = tie_break
        self.importance: GlobalImportance | None = None
        self._tie_order: np.ndarray | None = None

    @classmethod
    def run_config_kwargs(cls, cfg: RunConfig) -> dict[str, Any]:
        """The heterogeneous base's, plus the importance settings."""
        kwargs = super().run_config_kwargs(cfg)
        kwargs.update(
            importance_smoothing=cfg.strategy.importance.smoothing,
            tie_break=cfg.strategy.importance.tie_break,
            score_clip=cfg.strategy.score_clip,
        )
        return kwargs

    def select_components(self, server_round: int, node_id: int, budget: int) -> Selection:
        """The node's components per module: the top ``budget`` by global importance."""
        return self.importance.select(budget, self._tie_order)

    def update_importance(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Fold the clients' reported scores into the global importance (n_k-weighted),
        each first capped by :attr:`score_clip` (when > 0)."""
        reports = updates
        if self.score_clip > 0:
            scores = self.importance.scores
            reference = max((float(v.max(initial=0.0)) for v in scores.values()), default=0.0)
            reports = clip_scores(reports, self.score_clip, reference)
        self.importance.update(reports)

    def prepare_round(self, server_round: int, grid: Grid, node_ids: list[int]) -> None:
        self._init_importance()
        super().prepare_round(server_round, grid, node_ids)

    def _init_importance(self) -> None:
        rank = self.global_rank
        if self.importance is None:
            self.importance = GlobalImportance(self.modules, rank, self.importance_smoothing)
        if self._tie_order is None and self.tie_break == "seed":
            perm = np.random.default_rng(self.seed).permutation(rank)
            self._tie_order = np.argsort(perm)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The base's (profiles, block salience) and the global importance (scores and
        which components were ever reported)."""
        meta, arrays = super().state_dict()
        meta["importance_modules"] = list(self.importance.modules) if self.importance else None
        if self.importance is not None:
            for m in self.importance.modules:
                arrays[f"importance/scores/{m}"] = self.importance.scores[m]
                arrays[f"importance/seen/{m}"] = self.importance.seen[m]
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().load_state_dict(meta, arrays)
        modules = meta.get("importance_modules")
        if modules:
            rank = len(arrays[f"importance/scores/{modules[0]}"])
            self.importance = GlobalImportance(
                modules,
                rank,
                self.importance_smoothing,
                scores={m: arrays[f"importance/scores/{m}"].astype(np.float64) for m in modules},
                seen={m: arrays[f"importance/seen/{m}"].astype(bool) for m in modules},
            )
