"""The end-of-run report: what each tier of devices got and did, computed from results.json.

Every number in ``report.md`` comes from a pure function of the results dict (the
content of ``results.json``), so the report can be rebuilt from any finished run and
tested against the file it summarizes::

    python -m haflq_flower.report <run directory>

The tiers are the run's device classes (``tiers.names``; a SuperNode's own ``tier``
in deployment). For each tier the report gives the LoRA rank r_k of the global R, the
base model's precision per transformer block and its weight bytes against the tier's
weight budget (``tiers.memory-mb``), the peak training memory measured on the clients,
the uplink per client and round against the channel budget, and the bit widths the
adaptive uplink used.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# results.json ``final.status`` values (derived from the rounds' ``update`` records).
STATUS_COMPLETED = "completed"
STATUS_NO_UPDATE = "no-update-applied"
WIDTHS = ("16", "8", "4", "2")
NO_TIER = "all clients"


def run_outcome(rounds: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The run's status and a one-line reason, from the per-round ``update`` records.

    Parameters
    ----------
    rounds : sequence of mapping
        ``results["rounds"]``; round 0 (the initial adapter) has no ``update``.

    Returns
    -------
    (str, str)
        ``("completed", ...)`` when at least one training round applied an update,
        else ``("no-update-applied", reason)``: the global adapter is the initial one.
    """
    trained = [r for r in rounds if int(r.get("round", 0)) >= 1]
    applied = [r["round"] for r in trained if r.get("update") == "applied"]
    if applied:
        skipped = len(trained) - len(applied)
        return STATUS_COMPLETED, (
            f"{len(applied)} of {len(trained)} training round(s) applied an update"
            + (f" ({skipped} skipped)" if skipped else "")
        )
    if not trained:
        return STATUS_NO_UPDATE, "no training round was recorded"
    reasons = sorted({str(r.get("update") or "no update recorded") for r in trained})
    return STATUS_NO_UPDATE, (
        f"no update was applied in any of {len(trained)} training round(s): "
        + "; ".join(reasons[:3])
        + " -- the adapter is the initial one"
    )


def _csv(value: Any) -> list[str]:
    return [part.strip() for part in str(value or "").split(",") if part.strip()]


def tier_order(config: Mapping[str, Any]) -> list[str]:
    """The tiers named in the run config, in their configured order."""
    return _csv(config.get("tiers.names", ""))


def weight_budgets(config: Mapping[str, Any]) -> dict[str, float]:
    """Each tier's base-weight budget in bytes (``tiers.memory-mb`` in MiB); empty when
    the run config sets none."""
    names, budgets = tier_order(config), _csv(config.get("tiers.memory-mb", ""))
    if len(names) != len(budgets):
        return {}
    return {n: float(b) * 2**20 for n, b in zip(names, budgets, strict=True) if float(b) > 0}


def pattern_counts(block_bits: str) -> dict[int, int]:
    """Blocks per bit width of a pattern string such as ``"4,4,8,16"``."""
    out: dict[int, int] = {}
    for bits in _csv(block_bits):
        out[int(bits)] = out.get(int(bits), 0) + 1
    return dict(sorted(out.items(), reverse=True))


@dataclass
class TierRow:
    """What one tier of clients got and did over the run (all numbers from results.json).

    Byte and memory figures are over the tier's clients' ``ok`` replies; ``None`` where
    the run recorded nothing (e.g. no channel budget with a fixed-precision uplink).
    """

    tier: str
    partitions: list[int] = field(default_factory=list)
    lora_rank: int = 0
    global_rank: int = 0
    block_bits: str = ""
    weight_bytes: int = 0
    weight_budget_bytes: float | None = None
    peak_mem_bytes: int = 0
    uplink_bytes_per_round: float = 0.0
    payload_bytes_per_round: float | None = None
    channel_budget_bytes: int | None = None
    widths: dict[str, int] = field(default_factory=dict)
    replies_ok: int = 0
    accuracy_own_base: float | None = None

    @property
    def bits_per_block(self) -> dict[int, int]:
        return pattern_counts(self.block_bits)

    @property
    def weights_within_budget(self) -> bool | None:
        if self.weight_budget_bytes is None or not self.weight_bytes:
            return None
        return self.weight_bytes <= self.weight_budget_bytes

    @property
    def payload_within_budget(self) -> bool | None:
        if self.channel_budget_bytes is None or self.payload_bytes_per_round is None:
            return None
        return self.payload_bytes_per_round <= self.channel_budget_bytes


def _tier_of(client: Mapping[str, Any]) -> str:
    return str(client.get("tier") or NO_TIER)


def _ok_clients(rounds: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    for r in rounds:
        if int(r.get("round", 0)) < 1:
            continue
        for c in r.get("clients", []):
            if c.get("status") == "ok":
                yield c


def tier_rows(results: Mapping[str, Any]) -> list[TierRow]:
    """One :class:`TierRow` per tier, in the configured tier order (then others, sorted).

    Rank, block pattern and weight bytes are the tier's largest (they are equal within a
    tier of simulated clients); peak memory is the largest over its clients and rounds;
    uplink and payload bytes are means per client and round; widths are summed.
    """
    config = results.get("config", {})
    budgets = weight_budgets(config)
    rows: dict[str, TierRow] = {}
    payloads: dict[str, list[int]] = {}
    uplinks: dict[str, list[int]] = {}
    global_rank = int(config.get("lora.rank", 0) or 0)
    for c in _ok_clients(results.get("rounds", [])):
        tier = _tier_of(c)
        row = rows.setdefault(tier, TierRow(tier=tier, global_rank=global_rank))
        row.replies_ok += 1
        part = int(c.get("partition", -1))
        if part >= 0 and part not in row.partitions:
            row.partitions.append(part)
        row.lora_rank = max(row.lora_rank, int(c.get("rank") or 0))
        if c.get("block_bits") and not row.block_bits:
            row.block_bits = str(c["block_bits"])
        row.weight_bytes = max(row.weight_bytes, int(c.get("weight_bytes") or 0))
        row.peak_mem_bytes = max(row.peak_mem_bytes, int(c.get("peak_mem_bytes") or 0))
        uplinks.setdefault(tier, []).append(int(c.get("bytes_up") or 0))
        if c.get("budget_bytes"):
            row.channel_budget_bytes = max(row.channel_budget_bytes or 0, int(c["budget_bytes"]))
            payloads.setdefault(tier, []).append(int(c.get("payload_bytes") or 0))
        for width, count in (c.get("bits") or {}).items():
            row.widths[str(width)] = row.widths.get(str(width), 0) + int(count)
    by_tier_acc = (results.get("final") or {}).get("accuracy_by_tier") or {}
    for tier, row in rows.items():
        row.partitions.sort()
        row.uplink_bytes_per_round = _mean(uplinks.get(tier, []))
        if tier in payloads:
            row.payload_bytes_per_round = _mean(payloads[tier])
        if row.block_bits and tier in budgets:
            row.weight_budget_bytes = budgets[tier]
        row.accuracy_own_base = by_tier_acc.get(tier)
        if not row.lora_rank:
            row.lora_rank = global_rank  # FedIT and peers without tiers: the full rank
    order = tier_order(config)
    return sorted(
        rows.values(),
        key=lambda r: (order.index(r.tier) if r.tier in order else len(order), r.tier),
    )


@dataclass
class ClientRow:
    """One client (partition) over the run: its uplink per round against its budget and
    the bit widths its adaptive payload used (summed over rounds)."""

    partition: int
    tier: str
    rounds_ok: int = 0
    uplink_bytes_per_round: float = 0.0
    payload_bytes_per_round: float | None = None
    channel_budget_bytes: int | None = None
    widths: dict[str, int] = field(default_factory=dict)


def client_rows(results: Mapping[str, Any]) -> list[ClientRow]:
    """One :class:`ClientRow` per partition (or node, where no partition is known),
    sorted by partition."""
    rows: dict[int, ClientRow] = {}
    ups: dict[int, list[int]] = {}
    payloads: dict[int, list[int]] = {}
    for c in _ok_clients(results.get("rounds", [])):
        key = int(c.get("partition", -1))
        if key < 0:
            key = int(c.get("node", 0))
        row = rows.setdefault(key, ClientRow(partition=key, tier=_tier_of(c)))
        row.rounds_ok += 1
        ups.setdefault(key, []).append(int(c.get("bytes_up") or 0))
        if c.get("budget_bytes"):
            row.channel_budget_bytes = int(c["budget_bytes"])
            payloads.setdefault(key, []).append(int(c.get("payload_bytes") or 0))
        for width, count in (c.get("bits") or {}).items():
            row.widths[str(width)] = row.widths.get(str(width), 0) + int(count)
    for key, row in rows.items():
        row.uplink_bytes_per_round = _mean(ups.get(key, []))
        if key in payloads:
            row.payload_bytes_per_round = _mean(payloads[key])
    return [rows[k] for k in sorted(rows)]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


@dataclass(frozen=True)
class RoundRow:
    """One round of the run: the test accuracy after it and what it cost."""

    round: int
    accuracy: float | None
    loss: float | None
    bytes_up: int
    bytes_down: int
    cumulative_up: int
    wall_s: float
    update: str


def round_rows(results: Mapping[str, Any]) -> list[RoundRow]:
    """Accuracy, loss, bytes and the update outcome of every recorded round."""
    out, total = [], 0
    for r in results.get("rounds", []):
        total += int(r.get("bytes_up") or 0)
        out.append(
            RoundRow(
                round=int(r["round"]),
                accuracy=r.get("accuracy"),
                loss=r.get("loss"),
                bytes_up=int(r.get("bytes_up") or 0),
                bytes_down=int(r.get("bytes_down") or 0),
                cumulative_up=total,
                wall_s=float(r.get("wall_s") or 0.0),
                update="initial adapter" if int(r["round"]) == 0 else str(r.get("update", "")),
            )
        )
    return out


def human_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), as the round log lines print them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _check(ok: bool | None) -> str:
    return "" if ok is None else (" (within)" if ok else " (OVER)")


def describe_strategy(config: Mapping[str, Any], rows: Sequence[TierRow]) -> str:
    """One sentence: which mechanisms this run had on (from its config and records)."""
    name = str(config.get("strategy.name", "?"))
    parts = [f"strategy `{name}`"]
    if name in ("haflq", "hetlora", "fedit-trunc"):
        mode, agg = config.get("strategy.mode", ""), config.get("strategy.aggregation", "")
        parts.append(f"LoRA {mode} + {agg} aggregation")
    if any(r.channel_budget_bytes for r in rows):
        parts.append("bandwidth-adaptive uplink")
    if any(r.block_bits for r in rows):
        parts.append(f"block precision `{config.get('blocks.precision', '')}`")
    else:
        parts.append(f"base `{config.get('model.quantization', '')}` for every client")
    parts.append(f"data split `{config.get('data.partitioner', '')}`")
    return ", ".join(parts)


def adapter_lines(base_model: str, adapter_dir: str, num_labels: int) -> list[str]:
    """The two lines (after the imports) that load the run's adapter with PEFT."""
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f"base = AutoModelForSequenceClassification.from_pretrained({base_model!r}, "
        f"num_labels={num_labels})",
        f"model = PeftModel.from_pretrained(base, {adapter_dir!r})",
    ]


def render_report(results: Mapping[str, Any], run_dir: str | Path) -> str:
    """``report.md`` of a run: status, per-tier table, accuracy per round, the adapter.

    Parameters
    ----------
    results : mapping
        The content of ``results.json``.
    run_dir : str or Path
        The run directory (shown; the adapter path is taken from ``final.adapter_dir``).
    """
    config = results.get("config", {})
    final = results.get("final") or {}
    status, reason = run_outcome(results.get("rounds", []))
    status = str(final.get("status", status))
    tiers = tier_rows(results)
    rounds = round_rows(results)
    clients = sum(len(r.partitions) or 1 for r in tiers)
    lines = [
        "# HAFLQ-Flower run report",
        "",
        f"Run directory: `{run_dir}`",
        "",
        f"**Status: {status}** ({final.get('status_reason', reason)}).",
        f"Final test accuracy **{_fmt(final.get('accuracy'))}** "
        f"(best {_fmt(final.get('best_accuracy'))}) on {config.get('data.name', '?')}, "
        f"{len(rounds) - 1 if rounds else 0} round(s), {clients} client(s), "
        f"wall time {float(final.get('wall_s') or 0):.0f} s; "
        f"uplink {human_bytes(final.get('bytes_up') or 0)}, "
        f"downlink {human_bytes(final.get('bytes_down') or 0)} in total.",
        "",
        describe_strategy(config, tiers) + ".",
        "",
        "## Per tier",
        "",
        "| tier | clients (partitions) | LoRA rank r_k / R | base bits per block | "
        "base weights / budget | peak training memory | uplink per client and round | "
        "payload / channel budget | uplink bit widths (16/8/4/2: components) | "
        "accuracy on own base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tiers:
        bits = t.bits_per_block
        pattern = (
            " + ".join(f"{n} x {b}-bit" for b, n in bits.items())
            if bits
            else f"all {config.get('model.quantization', '?')}"
        )
        weights = _mib(t.weight_bytes) if t.weight_bytes else "-"
        if t.weight_budget_bytes is not None:
            weights += f" / {_mib(t.weight_budget_bytes)}{_check(t.weights_within_budget)}"
        payload = "-"
        if t.channel_budget_bytes is not None and t.payload_bytes_per_round is not None:
            payload = (
                f"{human_bytes(t.payload_bytes_per_round)} / "
                f"{human_bytes(t.channel_budget_bytes)}{_check(t.payload_within_budget)}"
            )
        widths = " / ".join(str(t.widths.get(w, 0)) for w in WIDTHS) if t.widths else "-"
        parts = ", ".join(str(p) for p in t.partitions) or "-"
        lines.append(
            f"| {t.tier} | {len(t.partitions) or '-'} ({parts}) | {t.lora_rank} / "
            f"{t.global_rank} | {pattern} | {weights} | {t.peak_mem_bytes / 1e6:.0f} MB | "
            f"{human_bytes(t.uplink_bytes_per_round)} | {payload} | {widths} | "
            f"{_fmt(t.accuracy_own_base)} |"
        )
    lines += [
        "",
        "Base weights: the bytes of the client's quantized base model, measured; the budget is "
        "the tier's `tiers.memory-mb`, which bounds the base weights only. Peak training "
        "memory is measured on the client (process RSS on a CPU, the CUDA allocator's peak on "
        "a GPU) and also holds the runtime, activations, LoRA and optimizer state. Uplink per "
        "client and round is the whole reply as sent; the payload is its budgeted part (the "
        "bit-packed LoRA deltas and the head), against the channel budget (Shannon rate at the "
        "tier's distance x `channel.deadline-s`). Accuracy on own base: the final adapter "
        "on the tier's own quantized base.",
        "",
        "## Accuracy per round",
        "",
        "| round | test accuracy | loss | uplink | cumulative uplink | downlink | elapsed "
        "| update |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        lines.append(
            f"| {r.round} | {_fmt(r.accuracy)} | {_fmt(r.loss)} | {human_bytes(r.bytes_up)} | "
            f"{human_bytes(r.cumulative_up)} | {human_bytes(r.bytes_down)} | {r.wall_s:.0f} s | "
            f"{r.update} |"
        )
    adapter = final.get("adapter_dir")
    lines += ["", "## The adapter", ""]
    if adapter:
        base = str(final.get("base_model") or "<base model directory or hub id>")
        blocks = any(t.block_bits for t in tiers)
        quant = str(config.get("model.quantization", "none"))
        measured = (
            "the server measured the test accuracy above on the 16-bit base"
            if blocks or quant == "none"
            else f"the server measured the test accuracy above with the base in {quant}; "
            "pass `quantization_config=BitsAndBytesConfig(...)` to `from_pretrained` for "
            "the same base"
        )
        lines += [
            f"A standard PEFT adapter with the classification head, in `{adapter}`. These "
            f"lines load it on the unquantized base ({measured}):",
            "",
            "```python",
            *adapter_lines(base, str(adapter), int(final.get("num_labels") or 2)),
            "```",
        ]
    else:
        lines.append("No adapter was saved.")
    plots = [p for p in ("accuracy.png", "memory.png", "uplink.png", "bits.png")]
    lines += ["", "Plots in the run directory: " + ", ".join(f"`{p}`" for p in plots) + "."]
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Any], run_dir: Path) -> Path:
    """Write ``report.md`` into ``run_dir`` and return its path."""
    path = Path(run_dir) / "report.md"
    path.write_text(render_report(results, run_dir))
    return path


def main(argv: list[str] | None = None) -> int:
    """Rebuild (and print) ``report.md`` of a finished run directory."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m haflq_flower.report <run directory>", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    results = json.loads((run_dir / "results.json").read_text())
    print(write_report(results, run_dir).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
