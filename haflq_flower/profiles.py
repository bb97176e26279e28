"""Client profiles: what a device can do (its tier and LoRA rank budget, later memory
and channel), from run-config tiers in simulation or from a SuperNode's node config.

One type, :class:`ClientProfile`, and one parser, :meth:`ClientProfile.from_mapping`,
serve every source: the run config's tier table, ``--node-config`` of a SuperNode, and
the ``profile`` record a node sends back to the server's ``query.profile`` message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from .quant.channel import spread_distances
from .untrusted import printable

DEFAULT_TIER = "default"


class ProfileError(ValueError):
    """A profile field is missing, of the wrong type, or out of range."""


# Hard limits of what a profile may claim at all (beyond them a profile is refused as
# absurd); the server additionally caps claimed uplink and memory by its own settings
# (:meth:`ClientProfile.capped`, run config ``profile.max-uplink-bps``/``max-memory-mb``).
MIN_DISTANCE_KM = 1e-3  # 1 m; 0 means "the run's default distance"
MAX_DISTANCE_KM = 1e4
MAX_UPLINK_BPS = 1e15
MAX_MEMORY_MB = 1e9
MAX_LORA_RANK = 1_000_000
MAX_TIER_CHARS = 64


def _bounded(
    data: Mapping[str, Any], key: str, source: str, upper: float, lower: float = 0.0
) -> float:
    """``data[key]`` as a float that is 0 (unset) or lies in ``[lower, upper]``."""
    value = data.get(key, 0.0)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if isinstance(value, bool) or not (number == 0.0 or lower <= number <= upper):
        low = f"{lower:g}" if lower > 0 else "0"
        raise ProfileError(
            f"{source}: '{key}' must be a finite number >= 0: 0 (unset) or in "
            f"[{low}, {upper:g}], "
            f"got {printable(repr(value), 80)}"
        )
    return number


@dataclass(frozen=True)
class ClientProfile:
    """What one client can do.

    Attributes
    ----------
    tier : str
        A label for reports and plots (e.g. ``low``, ``mid``, ``high``).
    lora_rank : int
        The client's LoRA budget r_k: how many rank-1 components per module it trains.
        0 means "the global rank R".
    distance_km : float
        Distance to the base station for the channel model; 0 = the run's default.
    uplink_bps : float
        A measured uplink rate in bit/s; when > 0 it replaces the channel model.
    memory_mb : float
        Budget for the base model's weights in MiB (block-wise precision); 0 = unlimited.
    """

    tier: str = DEFAULT_TIER
    lora_rank: int = 0
    distance_km: float = 0.0
    uplink_bps: float = 0.0
    memory_mb: float = 0.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "profile") -> ClientProfile:
        """Parse ``tier``, ``lora-rank``, ``distance-km``, ``uplink-bps``, ``memory-mb``
        (other keys are ignored), each range-checked.

        Raises
        ------
        ProfileError
            Naming the field, the allowed range and (escaped) what was given: a tier of
            1-64 printable characters; ``lora-rank`` an integer in [0, 1e6];
            ``distance-km`` 0 or in [0.001, 1e4]; ``uplink-bps`` 0 or in [0, 1e15];
            ``memory-mb`` 0 or in [0, 1e9].
        """
        tier = data.get("tier", DEFAULT_TIER)
        if (
            not isinstance(tier, str)
            or not 0 < len(tier) <= MAX_TIER_CHARS
            or not tier.isprintable()
        ):
            raise ProfileError(
                f"{source}: 'tier' must be a non-empty printable string of at most "
                f"{MAX_TIER_CHARS} characters, got {printable(repr(tier), 80)}"
            )
        rank = data.get("lora-rank", 0)
        if isinstance(rank, str) and rank.strip().isdigit() and len(rank.strip()) <= 9:
            rank = int(rank)
        if isinstance(rank, float) and rank.is_integer() and abs(rank) <= MAX_LORA_RANK:
            rank = int(rank)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= MAX_LORA_RANK:
            raise ProfileError(
                f"{source}: 'lora-rank' must be an integer in [0, {MAX_LORA_RANK}], "
                f"got {printable(repr(rank), 80)}"
            )
        return cls(
            tier=tier,
            lora_rank=rank,
            distance_km=_bounded(data, "distance-km", source, MAX_DISTANCE_KM, MIN_DISTANCE_KM),
            uplink_bps=_bounded(data, "uplink-bps", source, MAX_UPLINK_BPS),
            memory_mb=_bounded(data, "memory-mb", source, MAX_MEMORY_MB),
        )

    def capped(self, max_uplink_bps: float, max_memory_mb: float) -> tuple[ClientProfile, str]:
        """This profile with ``uplink-bps`` and ``memory-mb`` capped at the server's limits
        (a limit of 0 = no cap), and a note saying what was capped ("" if nothing)."""
        uplink, memory, notes = self.uplink_bps, self.memory_mb, []
        if max_uplink_bps > 0 and uplink > max_uplink_bps:
            notes.append(f"uplink-bps {uplink:g} capped at {max_uplink_bps:g}")
            uplink = max_uplink_bps
        if max_memory_mb > 0 and memory > max_memory_mb:
            notes.append(f"memory-mb {memory:g} capped at {max_memory_mb:g}")
            memory = max_memory_mb
        if not notes:
            return self, ""
        return replace(self, uplink_bps=uplink, memory_mb=memory), "; ".join(notes)

    def to_record(self) -> dict[str, str | int]:
        """Flat fields for a Flower ConfigRecord (the keys :meth:`from_mapping` reads)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def memory_budget_bytes(self) -> float:
        """The weight-memory budget in bytes (``inf`` when unlimited)."""
        return self.memory_mb * 2**20 if self.memory_mb > 0 else float("inf")

    def budget(self, global_rank: int) -> int:
        """r_k: the rank budget clipped to [1, R]; 0 means R."""
        return global_rank if self.lora_rank == 0 else max(1, min(self.lora_rank, global_rank))


@dataclass(frozen=True)
class TierTable:
    """Simulated tiers from the run config, and which partition falls in which tier."""

    profiles: tuple[ClientProfile, ...]
    fractions: tuple[float, ...]

    @classmethod
    def from_lists(
        cls,
        names: Sequence[str],
        ranks: Sequence[int],
        fractions: Sequence[float] = (),
        distances_km: Sequence[float] = (),
        memory_mb: Sequence[float] = (),
    ) -> TierTable:
        if not names:
            raise ProfileError("tiers.names names no tier")
        if len(ranks) != len(names):
            raise ProfileError(
                f"tiers.lora-ranks has {len(ranks)} value(s) for {len(names)} tier(s)"
            )
        if len(set(names)) != len(names):
            raise ProfileError(f"tiers.names has duplicates: {list(names)}")
        fractions = tuple(fractions) or tuple(1.0 for _ in names)
        if len(fractions) != len(names) or any(f <= 0 for f in fractions):
            raise ProfileError(
                f"tiers.fractions must give one positive value per tier, got {list(fractions)}"
            )
        distances = tuple(distances_km) or tuple(spread_distances(len(names)))
        if len(distances) != len(names):
            raise ProfileError(
                f"tiers.distances-km has {len(distances)} value(s) for {len(names)} tier(s)"
            )
        memory = tuple(memory_mb) or tuple(0.0 for _ in names)
        if len(memory) != len(names):
            raise ProfileError(
                f"tiers.memory-mb has {len(memory)} value(s) for {len(names)} tier(s)"
            )
        profiles = tuple(
            ClientProfile.from_mapping(
                {"tier": n, "lora-rank": r, "distance-km": d, "memory-mb": m},
                source=f"tier '{n}'",
            )
            for n, r, d, m in zip(names, ranks, distances, memory, strict=True)
        )
        total = sum(fractions)
        return cls(profiles=profiles, fractions=tuple(f / total for f in fractions))

    def by_name(self, name: str) -> ClientProfile | None:
        return next((p for p in self.profiles if p.tier == name), None)

    def for_partition(self, partition_id: int, num_partitions: int) -> ClientProfile:
        """Tiers take contiguous blocks of partition ids, sized by their fractions."""
        if not 0 <= partition_id < num_partitions:
            raise ProfileError(f"partition-id {partition_id} outside [0, {num_partitions})")
        bound = 0.0
        for profile, fraction in zip(self.profiles, self.fractions, strict=True):
            bound += fraction
            if partition_id < round(bound * num_partitions):
                return profile
        return self.profiles[-1]


def resolve_profile(node_config: Mapping[str, Any], tiers: TierTable) -> ClientProfile:
    """This node's profile: explicit node-config fields win, else its partition's tier.

    A SuperNode describes itself with ``--node-config "tier='edge' lora-rank=4"``; a
    ``tier`` that names a run-config tier inherits that tier's fields. A simulated node
    only has ``partition-id`` and ``num-partitions`` and takes the tier of its partition.
    """
    if any(k in node_config for k in ("tier", "lora-rank", "memory-mb")):
        base = tiers.by_name(str(node_config.get("tier", "")))
        merged = {**(base.to_record() if base else {}), **dict(node_config)}
        return ClientProfile.from_mapping(merged, source="node config")
    if "partition-id" in node_config and "num-partitions" in node_config:
        return tiers.for_partition(
            int(node_config["partition-id"]), int(node_config["num-partitions"])
        )
    return ClientProfile()
