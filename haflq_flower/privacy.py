"""Client-level differential privacy: clipping, Gaussian noise and the privacy accountant.

Pure numpy (the accountant is Google's ``dp_accounting``, imported when used). The
mechanism (docs/privacy.md):

- every client clips its whole update (the deltas of every component it trained, and of
  the head) to L2 norm ``C`` before quantizing it (:func:`clip_update`);
- ``central``: the server, trusted, clips every decoded update to ``C`` again (the
  stochastic quantizer may have lengthened it a little), weighs clients equally and adds
  ``N(0, (z C)^2)`` to each coordinate's *sum* over the clients that contributed to it,
  then divides by that coordinate's number of contributors (:func:`noisy_average_std`).
  One client's contribution to the vector of sums is at most ``C`` whatever the
  selection, so the per-component denominators of adaptive rank-1 aggregation cost no
  privacy: they are public (the server assigned the components) and applied after the
  noise;
- ``local``: each client adds ``N(0, (z C)^2)`` to its clipped update itself, before
  quantization (:func:`add_noise`); the server never sees an un-noised update.

Quantization after clipping and noise is post-processing. The accountant composes one
sampled Gaussian mechanism per round (Rényi DP, ``dp_accounting.rdp``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .lora.robust import state_norm
from .settings import choice, setting

OFF, CENTRAL, LOCAL = "off", "central", "local"
DP_MODES = (OFF, CENTRAL, LOCAL)


@dataclass(frozen=True)
class DPConfig:
    """``dp.mode``, ``dp.clip`` (C), ``dp.noise-multiplier`` (z) and ``dp.delta``."""

    mode: str = setting("dp.mode", OFF, choice(DP_MODES))
    clip: float = setting("dp.clip", 1.0)
    noise_multiplier: float = setting("dp.noise-multiplier", 1.0)
    delta: float = setting("dp.delta", 1e-5)

    @property
    def enabled(self) -> bool:
        return self.mode != OFF

    def check(self) -> None:
        """Raise ValueError naming the bad setting."""
        if self.mode not in DP_MODES:
            raise ValueError(f"dp.mode must be one of {DP_MODES}, got {self.mode!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp.clip must be a finite number > 0 (an L2 norm), got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"dp.noise-multiplier must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"dp.delta must lie in (0, 1), got {self.delta}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on a sum of clipped updates: ``z C``."""
        return self.noise_multiplier * self.clip


def clip_update(
    update: Mapping[str, np.ndarray], clip: float
) -> tuple[OrderedDict[str, np.ndarray], float]:
    """``update * min(1, C / ||update||)`` (whole-update L2 clipping) and the norm before."""
    norm = state_norm(update)
    scale = 1.0 if norm <= clip else clip / norm
    return OrderedDict(
        (k, (np.asarray(v) * scale).astype(np.asarray(v).dtype)) for k, v in update.items()
    ), norm


def add_noise(
    update: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> OrderedDict[str, np.ndarray]:
    """Every coordinate plus independent ``N(0, std^2)`` (local DP on the device)."""
    return OrderedDict(
        (k, (np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v))).astype(np.float32))
        for k, v in update.items()
    )


def noisy_average_std(
    counts: Mapping[str, np.ndarray], std_sum: float
) -> OrderedDict[str, np.ndarray]:
    """Per coordinate, the noise std on an average of ``counts`` clipped updates whose
    sum got ``N(0, std_sum^2)``: ``std_sum / count`` (0 where no client contributed:
    such a coordinate is not released, it stays as it was)."""
    out = OrderedDict()
    for key, count in counts.items():
        count = np.asarray(count, np.float64)
        with np.errstate(divide="ignore"):
            out[key] = np.where(count > 0, std_sum / np.maximum(count, 1.0), 0.0)
    return out


def add_average_noise(
    state: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray],
    std_sum: float,
    rng: np.random.Generator,
) -> OrderedDict[str, np.ndarray]:
    """``state`` (an average of clipped updates applied to the old global) plus the
    Gaussian noise of the sums divided by each coordinate's contributors. ``counts``
    broadcast against each array (e.g. one count per component of A's rows)."""
    stds = noisy_average_std(counts, std_sum)
    out = OrderedDict()
    for key, value in state.items():
        if key not in stds:
            out[key] = value
            continue
        std = np.broadcast_to(stds[key], np.shape(value))
        noise = rng.standard_normal(np.shape(value)) * std
        out[key] = (np.asarray(value, np.float64) + noise).astype(np.float32)
    return out


@dataclass
class PrivacyAccountant:
    """Rényi-DP accounting of one sampled Gaussian mechanism per round.

    ``rates``: each finished round's sampling rate (central: sampled nodes / connected
    nodes, treated as Poisson sampling; local: 1, each device's own mechanism every round
    it takes part in). ``epsilon()`` is the epsilon at ``delta`` after all of them.
    """

    noise_multiplier: float
    delta: float
    rates: list[float] = field(default_factory=list)

    def add_round(self, rate: float) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sampling rate must lie in (0, 1], got {rate}")
        self.rates.append(float(rate))

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` after every recorded round (``inf`` without noise)."""
        if not self.rates:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        for rate, rounds in _runs(self.rates):
            event = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            if rate < 1.0:
                event = dp_accounting.PoissonSampledDpEvent(rate, event)
            accountant.compose(event, rounds)
        return float(accountant.get_epsilon(self.delta))


def _runs(values: Sequence[float]) -> list[tuple[float, int]]:
    """Consecutive equal values as (value, count): equal rounds compose in one step."""
    out: list[tuple[float, int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out
