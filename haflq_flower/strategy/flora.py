"""FLoRA (Wang et al., NeurIPS 2024): stacking, merged into a 16-bit base every round."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..config import ConfigError, RunConfig
from ..lora.aggregate import fedavg_head, stack_flora
from ..lora.components import ClientUpdate, a_key, b_key, lora_modules
from ..lora.state import LoraState, to_array_record
from ..untrusted import FLOAT32_MAX
from ..wire import MERGE_KEY
from .base import ARRAYS_KEY, CONFIG_KEY, check_global
from .hetlora import HetLoRA


class FLoRA(HetLoRA):
    """Clients of rank r_k train the first r_k components of a fresh adapter; the server
    stacks the clients' factors, ``A_stack = [p_1 A_1; ...; p_K A_K]`` and
    ``B_stack = [B_1 ... B_K]`` (:func:`~haflq_flower.lora.aggregate.stack_flora`), so
    ``B_stack A_stack = sum_k p_k B_k A_k`` exactly, and every client merges
    ``s B_stack A_stack`` into its base weights before the next round, which starts from
    the same fresh adapter (the server's initial A, B = 0).

    "Fresh" is the same every round (the server's initial A, B = 0): a re-initialization
    that every client shares, drawn once from the run's seed.

    Clients here keep no state between rounds (a simulated node's process serves many
    clients, a deployed node may restart), so every training message carries the stacks
    of *all* past rounds in the ``merge`` record: the downlink grows by sum_k r_k
    components per round. The base must be 16-bit: merging into a 4-bit or int8 base
    would re-quantize it every round, so a quantized base is refused.

    The global adapter this strategy returns is the fresh adapter plus the FedAvg'd head;
    the model it describes is the base with :meth:`base_merge` merged in.
    """

    supports_dp = False  # not an average of the updates: noise on sums does not apply

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stacks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.fresh: LoraState | None = None
        self._record_cache: tuple[int, ArrayRecord | None] | None = None

    @classmethod
    def check_run_config(cls, cfg: RunConfig) -> None:
        if cfg.model.quantization != "none" or cfg.strategy.blocks.enabled:
            raise ConfigError(
                f"{cls.__name__} merges every round's factors into the base "
                "weights, so it needs a 16-bit base: a quantized base would be re-quantized "
                f"every round (model.quantization={cfg.model.quantization!r}, "
                f"blocks.precision={cfg.strategy.blocks.precision!r}). Set "
                'model.quantization="none" and blocks.precision="off".'
            )

    def applied_pairs(
        self, server_round: int, new_state: LoraState
    ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """The next round's adapter plus what this round merged into the base."""
        pairs = super().applied_pairs(server_round, new_state)
        for m, stack in self.stacks.items():
            pairs[m] = [*pairs.get(m, []), stack[-1]]
        return pairs

    def base_merge(self) -> LoraState | None:
        """All stacks so far, concatenated per module (B: d_out x H, A: H x d_in)."""
        if not self.stacks:
            return None
        merged: LoraState = OrderedDict()
        for m, pairs in self.stacks.items():
            merged[b_key(m)] = np.concatenate([b for b, _ in pairs], axis=1).astype(np.float32)
            merged[a_key(m)] = np.concatenate([a for _, a in pairs]).astype(np.float32)
        return merged

    def _merge_record(self) -> ArrayRecord | None:
        """The ``merge`` record, built once per round (the same for every node)."""
        rounds = len(next(iter(self.stacks.values()), []))
        if self._record_cache is None or self._record_cache[0] != rounds:
            merged = self.base_merge()
            self._record_cache = (rounds, None if merged is None else to_array_record(merged))
        return self._record_cache[1]

    def _with_merge(self, records: dict[str, Any]) -> dict[str, Any]:
        record = self._merge_record()
        return records if record is None else {**records, MERGE_KEY: record}

    def train_records(
        self, server_round: int, node_id: int, global_state: LoraState
    ) -> dict[str, ArrayRecord | ConfigRecord]:
        if self.fresh is None:  # the first round's adapter is the fresh one (B = 0)
            self.fresh = OrderedDict(
                (k, global_state[k].copy())
                for m in lora_modules(global_state)
                for k in (a_key(m), b_key(m))
            )
        return self._with_merge(super().train_records(server_round, node_id, global_state))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        record = self._merge_record()
        if record is None:
            return messages
        out = []
        for msg in messages:
            content = RecordDict(
                {
                    ARRAYS_KEY: msg.content.array_records[ARRAYS_KEY],
                    CONFIG_KEY: msg.content.config_records[CONFIG_KEY],
                    MERGE_KEY: record,
                }
            )
            out.append(
                Message(
                    content=content,
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=MessageType.EVALUATE,
                )
            )
        return out

    def aggregate_lora(
        self, server_round: int, global_state: LoraState, updates: list[ClientUpdate]
    ) -> LoraState:
        pairs = stack_flora(global_state, updates)
        # Checked before the stacks change: a rejected round leaves the strategy as it was.
        check_global({m: v for m, pair in pairs.items() for v in pair}, FLOAT32_MAX)
        for m, pair in pairs.items():
            self.stacks.setdefault(m, []).append(pair)
        # The next round starts from the fresh adapter; the head is FedAvg'd.
        fresh = OrderedDict((k, v.copy()) for k, v in self.fresh.items())
        return fedavg_head(global_state, updates, fresh)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super().state_dict()
        merged = self.base_merge() or {}
        meta["flora_rounds"] = {m: len(p) for m, p in self.stacks.items()}
        meta["flora_ranks"] = {m: [a.shape[0] for _, a in p] for m, p in self.stacks.items()}
        arrays.update({f"flora/merge/{k}": v for k, v in merged.items()})
        arrays.update({f"flora/fresh/{k}": v for k, v in (self.fresh or {}).items()})
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().load_state_dict(meta, arrays)
        self.stacks = {}
        self._record_cache = None
        for m, ranks in meta.get("flora_ranks", {}).items():
            b_all, a_all = arrays[f"flora/merge/{b_key(m)}"], arrays[f"flora/merge/{a_key(m)}"]
            edges = np.cumsum([0, *ranks])
            self.stacks[m] = [
                (b_all[:, lo:hi].copy(), a_all[lo:hi].copy())
                for lo, hi in zip(edges[:-1], edges[1:], strict=True)
            ]
        fresh = {
            k[len("flora/fresh/") :]: v for k, v in arrays.items() if k.startswith("flora/fresh/")
        }
        self.fresh = OrderedDict(fresh) if fresh else None
