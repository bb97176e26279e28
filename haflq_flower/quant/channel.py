"""Uplink channel model: Shannon rate with distance-based path loss, and the per-round bit
budget ``C_k = rate_k * tau`` (docs/algorithms.md, "Channel and uplink budget").

    PL(d) = 128.1 + 37.6 * log10(d / km)   [dB]
    g     = 10 ** (-PL / 10)
    rate  = W * log2(1 + P * g / (N0 * W)),   N0 = -174 dBm/Hz

Every function here is total on finite inputs: the SNR is handled in decibels (no
``10 ** x`` overflow for a device that claims a distance of 1e-100 km), and a budget is
an ``int`` saturated at :data:`MAX_BUDGET_BITS`, so it always fits the int64 of a Flower
ConfigRecord.
"""

from __future__ import annotations

import math

NOISE_DBM_PER_HZ = -174.0
# The largest budget any function here returns (bits): fits an int64, with room to spare.
MAX_BUDGET_BITS = 2**62
# Above this SNR (dB), log2(1 + snr) equals log2(snr) to double precision.
_LINEAR_SNR_DB = 300.0


def path_loss_db(distance_km: float) -> float:
    """Macro-cell path loss (3GPP TR 36.814) at ``distance_km`` (finite, > 0)."""
    if not (math.isfinite(distance_km) and distance_km > 0):
        raise ValueError(f"distance must be a finite number > 0 km, got {distance_km}")
    return 128.1 + 37.6 * math.log10(distance_km)


def channel_gain(distance_km: float) -> float:
    """Linear power gain ``10^(-PL/10)`` (0.0 or ``inf`` where a float cannot hold it)."""
    exponent = -path_loss_db(distance_km) / 10.0
    return math.inf if exponent > 308 else 10.0**exponent


def shannon_rate_bps(
    bandwidth_hz: float,
    power_w: float,
    distance_km: float,
    noise_dbm_per_hz: float = NOISE_DBM_PER_HZ,
) -> float:
    """Achievable uplink rate in bit/s (``inf`` only if the result exceeds a float).

    Computed as ``W * log2(1 + 10^(snr_dB / 10))`` with the SNR in decibels, which does not
    overflow for any finite distance, bandwidth or power.
    """
    if not all(math.isfinite(x) for x in (bandwidth_hz, power_w, noise_dbm_per_hz)):
        raise ValueError("bandwidth, transmit power and noise density must be finite")
    if bandwidth_hz <= 0 or power_w <= 0:
        raise ValueError("bandwidth and transmit power must be > 0")
    power_dbm = 10.0 * math.log10(power_w) + 30.0
    noise_dbm = noise_dbm_per_hz + 10.0 * math.log10(bandwidth_hz)
    snr_db = power_dbm - path_loss_db(distance_km) - noise_dbm
    if snr_db > _LINEAR_SNR_DB:
        bits_per_hz = snr_db / 10.0 * math.log2(10.0)
    else:
        bits_per_hz = math.log2(1.0 + 10.0 ** (snr_db / 10.0))
    return bandwidth_hz * bits_per_hz


def round_budget_bits(rate_bps: float, deadline_s: float) -> int:
    """Bits a client can upload within the round's deadline, saturated at
    :data:`MAX_BUDGET_BITS` (an ``inf`` rate gives the saturated budget)."""
    if math.isnan(rate_bps) or rate_bps < 0:
        raise ValueError(f"rate must be a number >= 0, got {rate_bps}")
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"the deadline must be a finite number > 0, got {deadline_s}")
    bits = rate_bps * deadline_s
    return MAX_BUDGET_BITS if bits >= MAX_BUDGET_BITS else int(bits)


def spread_distances(num_tiers: int, low_km: float = 1.1, high_km: float = 2.0) -> list[float]:
    """Distances spread evenly over [low, high]; tier 0 (the weakest) is the farthest."""
    if num_tiers == 1:
        return [high_km]
    step = (high_km - low_km) / (num_tiers - 1)
    return [high_km - i * step for i in range(num_tiers)]
