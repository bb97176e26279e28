"""Uplink channel model: Shannon rate with distance-based path loss, and the per-round bit
budget ``C_k = rate_k * tau`` (DESIGN.md, "Channel and bit budget").

    PL(d) = 128.1 + 37.6 * log10(d / km)   [dB]
    g     = 10 ** (-PL / 10)
    rate  = W * log2(1 + P * g / (N0 * W)),   N0 = -174 dBm/Hz
"""

from __future__ import annotations

import math

NOISE_DBM_PER_HZ = -174.0


def path_loss_db(distance_km: float) -> float:
    """Macro-cell path loss (3GPP TR 36.814) at ``distance_km``."""
    if distance_km <= 0:
        raise ValueError(f"distance must be > 0 km, got {distance_km}")
    return 128.1 + 37.6 * math.log10(distance_km)


def channel_gain(distance_km: float) -> float:
    """Linear power gain ``10^(-PL/10)``."""
    return 10.0 ** (-path_loss_db(distance_km) / 10.0)


def shannon_rate_bps(
    bandwidth_hz: float,
    power_w: float,
    distance_km: float,
    noise_dbm_per_hz: float = NOISE_DBM_PER_HZ,
) -> float:
    """Achievable uplink rate in bit/s."""
    if bandwidth_hz <= 0 or power_w <= 0:
        raise ValueError("bandwidth and transmit power must be > 0")
    n0_w_per_hz = 10.0 ** ((noise_dbm_per_hz - 30.0) / 10.0)
    snr = power_w * channel_gain(distance_km) / (n0_w_per_hz * bandwidth_hz)
    return bandwidth_hz * math.log2(1.0 + snr)


def round_budget_bits(rate_bps: float, deadline_s: float) -> int:
    """Bits a client can upload within the round's deadline."""
    if rate_bps < 0 or deadline_s <= 0:
        raise ValueError("rate must be >= 0 and the deadline > 0")
    return int(rate_bps * deadline_s)


def spread_distances(num_tiers: int, low_km: float = 1.1, high_km: float = 2.0) -> list[float]:
    """Distances spread evenly over [low, high]; tier 0 (the weakest) is the farthest."""
    if num_tiers == 1:
        return [high_km]
    step = (high_km - low_km) / (num_tiers - 1)
    return [high_km - i * step for i in range(num_tiers)]
