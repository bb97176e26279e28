"""The neutral base of heterogeneous-rank federated LoRA: profiles, per-node assignments,
component uploads, the downlink and block-wise base precision.

Each round a :class:`HeterogeneousLoRA`

1. asks every node it has not met yet for its profile (a ``query.profile`` message; a
   node that answers nothing usable gets the default profile and a warning);
2. turns each sampled node's profile into a rank budget r_k (:meth:`client_budget`) and
   picks its components per LoRA module (:meth:`select_components`; default: the first
   r_k, HetLoRA's truncation);
3. sends each node its own message: in ``freeze`` mode the whole rank-R adapter plus
   the selection, in ``truncate`` mode only the selected components;
4. receives, per node, the deltas of the components it trained, their indices and
   their importance scores, validates them, aggregates them per component
   (:meth:`aggregate_lora`) and hands the scores to :meth:`update_importance` (default:
   unused).

HAFLQ, HetLoRA, FlexLoRA, FLoRA and FedIT-trunc are its subclasses; a new method with
heterogeneous ranks starts here and overrides the hooks (docs/extending.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..config import ChannelConfig, RunConfig
from ..lora.aggregate import (
    ADAPTIVE,
    AGGREGATIONS,
    ZERO_PAD,
    aggregate_components,
    apply_deltas,
    client_values,
    component_counts,
)
from ..lora.components import (
    ClientUpdate,
    Selection,
    a_key,
    b_key,
    first_selection,
    lora_modules,
    module_rank,
    other_keys,
)
from ..lora.robust import scale_state
from ..lora.state import (
    LoraState,
    record_dict_bytes,
)
from ..lora.view import MODES, TRUNCATE
from ..profiles import ClientProfile, ProfileError
from ..quant.blocks import pattern_to_str
from ..quant.channel import round_budget_bits, shannon_rate_bps
from ..quant.payload import (
    DOWNLINK_BITS,
    UPLINKS,
    WIDTHS,
    Layout,
    bound_budget,
    fixed_payload_bytes,
    layout_of,
    max_payload_bytes,
)
from ..untrusted import FLOAT16_MAX, FLOAT32_MAX, printable
from ..wire import (
    PAYLOAD_KEY,
    PROFILE_KEY,
    PROFILE_QUERY,
    UploadTerms,
    decode_upload,
    encode_download,
)
from .base import (
    CONFIG_KEY,
    ClientRoundStats,
    LoRAStrategy,
    ReplyError,
    check_global,
)
from .blocks import BlockPlanner

log = logging.getLogger(__name__)


@dataclass
class Assignment:
    """What one node was asked to do this round."""

    profile: ClientProfile
    rank: int
    selection: Selection
    budget_bytes: int = 0
    block_bits: tuple[int, ...] | None = None


class HeterogeneousLoRA(LoRAStrategy):
    """Federated LoRA where each node trains the r_k of R components its profile allows.

    Parameters
    ----------
    mode : str (default: "truncate")
        ``freeze``: clients hold all R components and train their r_k selected ones;
        ``truncate``: clients hold only their r_k selected components.
    aggregation : str (default: "zero-pad")
        ``adaptive``: each component's delta is averaged over the clients that uploaded
        it; ``zero-pad``: over all participants (missing counts as zero).
    default_profile : ClientProfile
        Used for a node that reports no usable profile.
    query_timeout : float (default: 300.0)
        Seconds to wait for profile replies.
    uplink : str (default: "fp32")
        ``adaptive``: importance-aware bit widths under each client's channel budget,
        bit-packed; ``fp16``/``fp32``: every trained component at that precision.
    widths : tuple of int (default: (16, 8, 4, 2))
        Widths the adaptive uplink may use.
    downlink_bits : int (default: 16)
        Precision of the adapter sent to clients: 32, 16 (float16) or 8 (per-vector 8-bit
        codes, stochastic rounding, head in float16).
    channel : ChannelConfig, optional
        Bandwidth, transmit power and upload deadline of the channel model (defaults:
        1 MHz, 0.1 W, 3 s).
    blocks : BlockPlanner, optional
        Block-wise base precision per node (default: off, the base is quantized as
        ``model.quantization`` says). Its ``layout`` must be set before the run.
    max_uplink_bps : float (default: 1e9)
        Server-side cap on a profile's self-reported ``uplink-bps`` (0 = no cap).
    max_memory_mb : float (default: 262144)
        Server-side cap on a profile's self-reported ``memory-mb`` (0 = no cap).
    **kwargs
        Passed to :class:`LoRAStrategy` (fractions, minimum nodes, seed, DP).
    """

    def __init__(
        self,
        mode: str = TRUNCATE,
        aggregation: str = ZERO_PAD,
        default_profile: ClientProfile | None = None,
        query_timeout: float = 300.0,
        uplink: str = "fp32",
        widths: tuple[int, ...] = WIDTHS,
        downlink_bits: int = 16,
        channel: ChannelConfig | None = None,
        blocks: BlockPlanner | None = None,
        max_uplink_bps: float = 1e9,
        max_memory_mb: float = 262_144.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if uplink not in UPLINKS:
            raise ValueError(f"uplink must be one of {UPLINKS}, got {uplink!r}")
        if downlink_bits not in DOWNLINK_BITS:
            raise ValueError(f"downlink_bits must be one of {DOWNLINK_BITS}, got {downlink_bits}")
        for name, value in (("max_uplink_bps", max_uplink_bps), ("max_memory_mb", max_memory_mb)):
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.max_uplink_bps = max_uplink_bps
        self.max_memory_mb = max_memory_mb
        self.mode = mode
        self.aggregation = aggregation
        self.uplink = uplink
        self.widths = tuple(widths)
        self.downlink_bits = downlink_bits
        self.channel = channel or ChannelConfig(bandwidth_hz=1e6, power_w=0.1, deadline_s=3.0)
        self.default_profile = default_profile or ClientProfile()
        self.blocks = blocks or BlockPlanner(seed=self.seed)
        self.query_timeout = query_timeout
        self.profiles: dict[int, ClientProfile] = {}
        self.assignments: dict[int, Assignment] = {}

    # ------------------------------------------------------------ user hooks
    @classmethod
    def run_config_kwargs(cls, cfg: RunConfig) -> dict[str, Any]:
        """The base's, plus mode, aggregation, payload, channel, profile caps and blocks;
        ``payload.uplink="auto"`` leaves the class's own default uplink."""
        payload = cfg.strategy.payload
        kwargs = super().run_config_kwargs(cfg)
        kwargs.update(
            mode=cfg.strategy.mode,
            aggregation=cfg.strategy.aggregation,
            downlink_bits=payload.downlink_bits,
            widths=payload.widths,
            channel=cfg.strategy.channel,
            max_uplink_bps=cfg.strategy.max_uplink_bps,
            # profile and block-salience queries wait as long as a training round
            query_timeout=cfg.strategy.round_timeout,
            max_memory_mb=cfg.strategy.max_memory_mb,
            blocks=BlockPlanner(
                precision=cfg.strategy.blocks.precision,
                metric=cfg.strategy.blocks.salience_metric,
                calibration_rows=cfg.strategy.blocks.calibration_rows,
                calibration_clients=cfg.strategy.blocks.calibration_clients,
                seed=cfg.seed,
            ),
        )
        if payload.uplink != "auto":
            kwargs["uplink"] = payload.uplink
        return kwargs

    @classmethod
    def check_run_config(cls, cfg: RunConfig) -> None:
        """Every setting is allowed: block precision is assigned per node."""

    def client_budget(self, node_id: int, profile: ClientProfile, global_rank: int) -> int:
        """r_k for a node: its profile's LoRA rank, clipped to [1, R]."""
        return profile.budget(global_rank)

    def uplink_budget_bytes(self, node_id: int, profile: ClientProfile) -> int:
        """C_k / 8: the node's measured rate, or the Shannon rate at its distance (1.5 km,
        the middle of the default spread, when the profile gives none), times the upload
        deadline."""
        rate = profile.uplink_bps or shannon_rate_bps(
            self.channel.bandwidth_hz, self.channel.power_w, profile.distance_km or 1.5
        )
        return round_budget_bits(rate, self.channel.deadline_s) // 8

    def block_bits(self, node_id: int, profile: ClientProfile) -> tuple[int, ...] | None:
        """The node's base precision per transformer block (``None``: block precision
        is off). Default: :meth:`BlockPlanner.pattern_for` (salience-ordered upgrades
        4 -> 8 -> 16 bits within the profile's ``memory-mb``)."""
        return self.blocks.pattern_for(node_id, profile)

    def select_components(self, server_round: int, node_id: int, budget: int) -> Selection:
        """The node's components per module (default: the first ``budget``, truncation)."""
        return first_selection(self._global, budget)

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        """Combine the uploaded component deltas (rule: ``self.aggregation``)."""
        return aggregate_components(global_state, updates, self.aggregation)

    def update_importance(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """What the clients' importance scores change (``u.scores`` of the
        components each trained); default: nothing (HAFLQ folds them into its global
        importance)."""

    def value_limit(self) -> float:
        """float16's range when the global is sent as float16 (16-bit downlink, and the
        head of the 8-bit one), else float32's."""
        return FLOAT16_MAX if self.downlink_bits in (8, 16) else FLOAT32_MAX

    # -------------------------------------------------------------- profiles
    def query_profiles(self, grid: Grid, node_ids: list[int], server_round: int) -> None:
        """Ask nodes without a known profile for theirs (one ``query.profile`` each)."""
        unknown = [n for n in node_ids if n not in self.profiles]
        if not unknown:
            return
        messages = [
            Message(
                content=RecordDict({CONFIG_KEY: ConfigRecord({"server-round": server_round})}),
                dst_node_id=n,
                message_type=PROFILE_QUERY,
            )
            for n in unknown
        ]
        stats = self.stats[server_round]
        stats.control_bytes += sum(record_dict_bytes(m.content) for m in messages)
        replies: dict[int, list[Message]] = {}
        for m in grid.send_and_receive(messages, timeout=self.query_timeout):
            replies.setdefault(m.metadata.src_node_id, []).append(m)
        for node_id in unknown:
            answers = replies.get(node_id, [])
            try:
                if not answers:
                    raise ProfileError("no reply")
                if len(answers) > 1:
                    raise ProfileError(f"{len(answers)} replies to one query")
                reply = answers[0]
                if reply.has_error():
                    raise ProfileError(f"client error: {reply.error.reason}")
                if reply.metadata.message_type != PROFILE_QUERY:
                    raise ProfileError(f"reply of type {reply.metadata.message_type!r}")
                stats.control_bytes += record_dict_bytes(reply.content)
                if PROFILE_KEY not in reply.content.config_records:
                    raise ProfileError(f"reply lacks the '{PROFILE_KEY}' record")
                record = reply.content.config_records[PROFILE_KEY]
                profile = ClientProfile.from_mapping(dict(record))
                profile, note = profile.capped(self.max_uplink_bps, self.max_memory_mb)
                if note:
                    log.warning("node %d: profile %s", node_id, note)
                self.profiles[node_id] = profile
            except (ProfileError, KeyError, TypeError) as err:
                log.warning(
                    "node %d: no usable profile (%s); using the default %s",
                    node_id,
                    printable(err),
                    self.default_profile,
                )
                self.profiles[node_id] = self.default_profile
        log.info(
            "profiles: %s",
            ", ".join(
                f"node {n}: {printable(self.profiles[n].tier, 64)}/r={self.profiles[n].lora_rank}"
                for n in unknown
            ),
        )

    # ------------------------------------------------------------ checkpoints
    # True where the aggregate divides every component by all the round's clients
    # (FedIT-trunc's zero-padded average), whatever ``aggregation`` says
    padded_average: bool = False

    def dp_counts(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
        """Adaptive: each component's average divides by the clients that uploaded it
        (the server assigned the components, so the counts are public); zero-padding:
        by every client of the round. The head: by every client."""
        total = float(len(updates))
        counts: dict[str, np.ndarray] = {}
        for module in lora_modules(self._global):
            rank = module_rank(self._global, module)
            if self.aggregation == ADAPTIVE and not self.padded_average:
                per = np.zeros(rank)
                for u in updates:
                    per[u.selection[module]] += 1.0
            else:
                per = np.full(rank, total)
            counts[a_key(module)] = per[:, None]
            counts[b_key(module)] = per[None, :]
        for key in other_keys(self._global):
            counts[key] = np.asarray(total)
        return counts

    def update_delta(self, update: ClientUpdate) -> LoraState:
        return update.arrays

    def scale_update(self, update: ClientUpdate, scale: float) -> None:
        update.arrays = scale_state(update.arrays, scale)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Profiles by node and the block salience."""
        meta: dict[str, Any] = {
            "profiles": {str(n): p.to_record() for n, p in self.profiles.items()},
        }
        arrays: dict[str, np.ndarray] = {}
        if self.blocks.salience is not None:
            arrays["blocks/salience"] = self.blocks.salience
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.profiles = {
            int(n): ClientProfile.from_mapping(rec) for n, rec in meta.get("profiles", {}).items()
        }
        if "blocks/salience" in arrays:
            self.blocks.salience = arrays["blocks/salience"].astype(np.float64)

    # ---------------------------------------------------------- Flower glue
    @property
    def modules(self) -> list[str]:
        """The LoRA modules of the global adapter, in its order."""
        modules = lora_modules(self._global)
        if not modules:
            raise ValueError("the global state has no LoRA module")
        return modules

    @property
    def global_rank(self) -> int:
        return module_rank(self._global, self.modules[0])

    def prepare_round(self, server_round: int, grid: Grid, node_ids: list[int]) -> None:
        self.query_profiles(grid, node_ids, server_round)
        stats = self.stats[server_round]
        stats.control_bytes += self.blocks.plan(
            grid, self.profiles, server_round, self.query_timeout
        )
        self.assignments = {}
        for node_id in node_ids:
            profile = self.profiles.get(node_id, self.default_profile)
            rank = self.client_budget(node_id, profile, self.global_rank)
            selection = self.select_components(server_round, node_id, rank)
            budget, channel_budget, note = 0, 0, ""
            if self.uplink == "adaptive":
                channel_budget = int(self.uplink_budget_bytes(node_id, profile))
                budget, note = self._bound_budget(channel_budget, selection)
                if note.startswith("raised"):
                    log.warning(
                        "round %d: node %d: uplink budget of %d bytes %s (%d bytes: meta, "
                        "empty arrays and the head), so that its head delta and scores "
                        "still arrive; it uploads no component",
                        server_round,
                        node_id,
                        channel_budget,
                        note,
                        budget,
                    )
            bits = self.block_bits(node_id, profile)
            self.assignments[node_id] = Assignment(profile, rank, selection, budget, bits)
            client = stats.clients.setdefault(node_id, ClientRoundStats(node=node_id))
            client.tier, client.rank, client.budget_bytes = profile.tier, rank, budget
            client.channel_budget_bytes, client.budget_note = channel_budget, note
            if bits is not None:
                client.block_bits = pattern_to_str(bits)

    def _bound_budget(self, budget: int, selection: Selection) -> tuple[int, str]:
        """The channel budget kept within [fixed part, largest payload of ``selection``]
        (:func:`~haflq_flower.quant.payload.bound_budget`)."""
        layout = self._layout()
        dims = dict(zip(self.modules, layout.module_dims, strict=True))
        lengths = [sum(dims[m]) for m in self.modules for _ in selection[m]]
        fixed = fixed_payload_bytes(layout.head_shapes)
        largest = max_payload_bytes(lengths, layout.head_shapes, self.widths)
        return bound_budget(budget, fixed, largest)

    def train_records(
        self, server_round: int, node_id: int, global_state: LoraState
    ) -> dict[str, ArrayRecord | ConfigRecord]:
        job = self.assignments[node_id]
        rng = self._downlink_rng(server_round, node_id)
        records = encode_download(global_state, job.selection, self.mode, self.downlink_bits, rng)
        config = {
            "mode": self.mode,
            "rank": job.rank,
            "tier": job.profile.tier,
            "uplink": self.uplink,
            "uplink-budget-bytes": job.budget_bytes,
            "uplink-widths": ",".join(str(w) for w in self.widths),
        }
        if job.block_bits is not None:
            config["block-bits"] = pattern_to_str(job.block_bits)
        return {**records, CONFIG_KEY: ConfigRecord(config)}

    def _downlink_rng(self, server_round: int, node_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, server_round, node_id % (2**32)])

    def decode_reply(
        self, node_id: int, content: RecordDict, stats: ClientRoundStats
    ) -> ClientUpdate:
        """The node's component upload, checked against its assignment
        (:func:`~haflq_flower.wire.decode_upload`)."""
        job = self.assignments.get(node_id)
        if job is None:
            raise ReplyError("reply from a node that was not asked to train this round")
        terms = UploadTerms(
            assigned=job.selection,
            uplink=self.uplink,
            budget_bytes=job.budget_bytes,
            global_rank=self.global_rank,
            widths=self.widths,
            value_limit=self.value_limit(),
        )
        update, bits = decode_upload(content, terms, self._global, self._layout())
        if bits is not None:
            stats.bits = bits
            stats.payload_bytes = content.array_records[PAYLOAD_KEY].count_bytes()
        stats.components_up = int(sum(len(idx) for idx in update.selection.values()))
        return update

    def _layout(self) -> Layout:
        return layout_of(self._global, self.modules)

    def received_global(self, global_state: LoraState) -> LoraState:
        """The global state as a client decoded it: rounded to float16 with the 16-bit
        downlink (with the 8-bit downlink the float32 global approximates it)."""
        if self.downlink_bits != 16:
            return global_state
        return OrderedDict(
            (k, v.astype(np.float16).astype(np.float32)) for k, v in global_state.items()
        )

    def client_factors(self, global_state: LoraState, update: ClientUpdate) -> LoraState:
        """freeze: all R global components with the trained ones moved by their deltas;
        truncate: the r_k components the client held (both from the global as received)."""
        global_state = self.received_global(global_state)
        if self.mode == TRUNCATE:
            return client_values(global_state, update)
        return apply_deltas(global_state, update)

    def aggregate(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        new_state = self.aggregate_lora(server_round, global_state, updates)
        check_global(new_state, self.value_limit())  # before any strategy state changes
        self.update_importance(server_round, updates)
        counts = component_counts(self.global_rank, self.modules, updates)
        mean_counts = np.mean(np.stack(list(counts.values())), axis=0)
        log.info(
            "round %d: clients per component (mean over modules): %s",
            server_round,
            " ".join(f"{c:.1f}" for c in mean_counts),
        )
        self.stats[server_round].extra["clients_per_component"] = mean_counts.tolist()
        return new_state
