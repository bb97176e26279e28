"""What a run leaves behind: results.json (rewritten after every round), plots, adapter."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from .durable import replace_durably
from .report import (
    WIDTHS,
    client_rows,
    human_bytes,
    pattern_counts,
    round_rows,
    run_outcome,
    tier_rows,
)

log = logging.getLogger(__name__)

__all__ = ["RunRecorder", "human_bytes", "plot_results", "write_json_atomic"]


def _jsonable(value: Any) -> Any:
    """NaN and Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    replace_durably(tmp, path)  # fsync the file, rename, fsync the directory


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def evaluated_accuracies(rounds: list[dict]) -> list[float]:
    """The accuracies of the rounds the server evaluated (``eval.every`` skips some)."""
    return [r["accuracy"] for r in rounds if r.get("accuracy") is not None]


class RunRecorder:
    """Collects per-round results and keeps ``results.json`` current on disk.

    A resumed run passes the checkpoint's results as ``previous`` and its elapsed
    seconds as ``elapsed_s``: rounds continue the list, wall time continues the clock,
    and ``resumed_after`` lists the rounds after which the run was resumed.
    """

    def __init__(
        self,
        output_dir: Path,
        config: dict[str, Any],
        num_rounds: int,
        previous: dict[str, Any] | None = None,
        elapsed_s: float = 0.0,
    ) -> None:
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = num_rounds
        self.start = time.perf_counter() - elapsed_s
        self.data: dict[str, Any] = {"config": config, "rounds": [], "final": None}
        if previous is not None:
            self.data["rounds"] = list(previous["rounds"])
            resumed = list(previous.get("resumed_after", []))
            self.data["resumed_after"] = [*resumed, self.data["rounds"][-1]["round"]]

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    @property
    def results_path(self) -> Path:
        return self.output_dir / "results.json"

    def record_round(
        self, server_round: int, accuracy: float | None, loss: float | None, stats: dict | None
    ) -> dict:
        """Add one round (round 0 is the initial global adapter) and rewrite the file.
        ``accuracy`` and ``loss`` are None for a round the server did not evaluate
        (``eval.every``)."""
        stats = stats or {}
        entry = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "bytes_up": stats.get("bytes_up", 0),
            "bytes_down": stats.get("bytes_down", 0),
            "wall_s": time.perf_counter() - self.start,
            "control_bytes": stats.get("control_bytes", 0),
            "strategy_s": stats.get("strategy_s", 0.0),
            "clients": stats.get("clients", []),
            "rejected": stats.get("rejected", []),
            # peak RSS so far of the process that runs the ServerApp (in a simulation it
            # also holds Flower's simulation engine)
            "server_peak_rss_bytes": peak_rss_bytes(),
            **stats.get("extra", {}),
        }
        self.data["rounds"].append(entry)
        write_json_atomic(self.results_path, self.data)
        up = sum(r["bytes_up"] for r in self.data["rounds"])
        scores = "not evaluated" if accuracy is None else f"accuracy {accuracy:.4f} loss {loss:.4f}"
        log.info(
            "[round %d/%d] %s | up %s down %s (total up %s) | %.1f s elapsed",
            server_round,
            self.num_rounds,
            scores,
            human_bytes(entry["bytes_up"]),
            human_bytes(entry["bytes_down"]),
            human_bytes(up),
            entry["wall_s"],
        )
        return entry

    def finish(self, adapter_dir: str | None, **extra: Any) -> dict:
        """Write the ``final`` block (last-round figures, totals, and ``extra``)."""
        rounds = self.data["rounds"]
        last = rounds[-1] if rounds else {}
        statuses: dict[str, int] = {}
        for r in rounds:
            for c in r["clients"]:
                statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        status, reason = run_outcome(rounds)
        self.data["final"] = {
            # "completed", or "no-update-applied" when every training round was skipped
            "status": status,
            "status_reason": reason,
            "rounds_applied": [r["round"] for r in rounds if r.get("update") == "applied"],
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "best_accuracy": max(evaluated_accuracies(rounds), default=None),
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "wall_s": time.perf_counter() - self.start,
            "adapter_dir": adapter_dir,
            # client replies over the run by outcome (ok, rejected, error, no reply)
            "replies": statuses,
            "rounds_skipped": [
                r["round"] for r in rounds if str(r.get("update", "")).startswith("skipped")
            ],
            **extra,
        }
        write_json_atomic(self.results_path, self.data)
        return self.data["final"]


def plot_results(results: dict, output_dir: Path) -> list[Path]:
    """The run's plots; returns the paths written.

    - ``accuracy.png``: test accuracy against round (integer ticks; skipped rounds
      hollow) and against cumulative uplink bytes;
    - ``memory.png``: per tier, the base weights against the tier's weight budget, and
      the peak training memory measured on its clients;
    - ``uplink.png``: each client's uplink per round against its channel budget;
    - ``bits.png``: the bit widths the adaptive uplink gave each client's components,
      and the base model's bits per transformer block in each tier (when the run had
      them).

    Every number comes from :mod:`haflq_flower.report` (the same as ``report.md``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results.get("rounds"):
        return []
    paths = [_plot_accuracy(plt, results, output_dir / "accuracy.png")]
    tiers = tier_rows(results)
    if tiers:
        paths.append(_plot_memory(plt, results, tiers, output_dir / "memory.png"))
    clients = client_rows(results)
    if clients:
        paths.append(_plot_uplink(plt, results, clients, output_dir / "uplink.png"))
    if any(c.widths for c in clients) or any(t.block_bits for t in tiers):
        paths.append(_plot_bits(plt, clients, tiers, output_dir / "bits.png"))
    return paths


def _title(results: dict) -> str:
    config = results["config"]
    return f"{config.get('strategy.name', '')} on {config.get('data.name', '')}"


def _tier_colors(names: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    n = max(len(names), 1)
    return {name: cmap(0.15 + 0.7 * i / max(n - 1, 1)) for i, name in enumerate(names)}


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_accuracy(plt, results: dict, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    rows = round_rows(results)
    xs = [r.round for r in rows]
    acc = [r.accuracy if r.accuracy is not None else float("nan") for r in rows]
    cum = [r.cumulative_up / 1e6 for r in rows]
    skipped = [i for i, r in enumerate(rows) if r.update.startswith("skipped")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, label in ((ax1, xs, "round"), (ax2, cum, "cumulative uplink (MB)")):
        ax.plot(x, acc, marker="o", label="test accuracy")
        if skipped:
            ax.plot(
                [x[i] for i in skipped],
                [acc[i] for i in skipped],
                "o",
                markerfacecolor="white",
                color="C3",
                label="round skipped (no update)",
            )
            ax.legend(loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("accuracy after each round (0 = before training)")
    ax2.set_title("accuracy against the uplink spent")
    fig.suptitle(_title(results))
    return _save(plt, fig, path)


def _budget_lines(ax, points: list[tuple[int, float]], label: str) -> None:
    """A red budget line across each bar ``x`` at height ``value``, for (x, value) pairs."""
    if points:
        ax.hlines(
            [v for _, v in points],
            [x - 0.4 for x, _ in points],
            [x + 0.4 for x, _ in points],
            colors="C3",
            linewidths=3,
            label=label,
            zorder=3,
        )


def _plot_memory(plt, results: dict, tiers: list, path: Path) -> Path:
    names = [t.tier for t in tiers]
    colors = _tier_colors(names)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(tiers))
    weights = [t.weight_bytes / 2**20 for t in tiers]
    ax1.bar(xs, weights, color=[colors[n] for n in names], label="base weights (measured)")
    budgets = [t.weight_budget_bytes for t in tiers]
    shown = [(x, b / 2**20) for x, b in zip(xs, budgets, strict=True) if b is not None]
    _budget_lines(ax1, shown, "weight budget (tiers.memory-mb)")
    for x, w in zip(xs, weights, strict=True):
        ax1.annotate(f"{w:.1f}", (x, w), ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("base model weights (MiB)")
    ax1.set_title(
        "base precision: weights against the budget"
        if shown
        else "base weights (no tiers.memory-mb: no budget)"
    )
    ax1.set_ylim(0, 1.2 * max([*weights, *(b for _, b in shown)], default=1) or 1)
    if shown:
        ax1.legend(loc="upper left", fontsize=8)
    peaks = [t.peak_mem_bytes / 1e6 for t in tiers]
    ax2.bar(xs, peaks, color=[colors[n] for n in names])
    for x, p in zip(xs, peaks, strict=True):
        ax2.annotate(f"{p:.0f}", (x, p), ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("peak training memory (MB)")
    ax2.set_title("peak training memory (incl. runtime)")
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), [f"{t.tier}\nr={t.lora_rank}" for t in tiers])
        ax.set_xlabel("tier (LoRA rank)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(_title(results) + ": memory per tier")
    return _save(plt, fig, path)


def _plot_uplink(plt, results: dict, clients: list, path: Path) -> Path:
    tiers = list(dict.fromkeys(c.tier for c in clients))
    colors = _tier_colors(tiers)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(clients) + 2), 4))
    xs = range(len(clients))
    sent = [c.uplink_bytes_per_round / 1e3 for c in clients]
    ax.bar(xs, sent, color=[colors[c.tier] for c in clients])
    budget = [(x, c.channel_budget_bytes) for x, c in zip(xs, clients, strict=True)]
    budget = [(x, b / 1e3) for x, b in budget if b]
    payload = [(x, c.payload_bytes_per_round) for x, c in zip(xs, clients, strict=True)]
    payload = [(x, p / 1e3) for x, p in payload if p is not None]
    if payload:
        ax.scatter(
            [x for x, _ in payload],
            [p for _, p in payload],
            marker="o",
            color="black",
            label="budgeted payload (LoRA deltas + head)",
            zorder=4,
        )
    _budget_lines(ax, budget, "channel budget per round")
    if budget or payload:
        ax.legend(loc="upper left", fontsize=8)
    top = max([*sent, *(b for _, b in budget)], default=1)
    ax.set_ylim(0, 1.25 * top if top > 0 else 1)
    ax.set_xticks(list(xs), [f"{c.partition}\n{c.tier}" for c in clients])
    ax.set_xlabel("client (partition, tier)")
    ax.set_ylabel("uplink per round (kB, whole reply)")
    ax.set_title("uplink per client and round vs. its channel budget")
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)


def _plot_bits(plt, clients: list, tiers: list, path: Path) -> Path:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    has_widths = any(c.widths for c in clients)
    has_blocks = any(t.block_bits for t in tiers)
    panels = int(has_widths) + int(has_blocks)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if has_widths:
        ax = axes.pop(0)
        xs = range(len(clients))
        bottom = [0.0] * len(clients)
        for i, width in enumerate(WIDTHS):
            counts = [c.widths.get(width, 0) for c in clients]
            ax.bar(xs, counts, bottom=bottom, label=f"{width}-bit", color=f"C{i}")
            bottom = [b + n for b, n in zip(bottom, counts, strict=True)]
        ax.set_xticks(list(xs), [f"{c.partition}\n{c.tier}" for c in clients])
        ax.set_xlabel("client (partition, tier)")
        ax.set_ylabel("components uploaded (all rounds)")
        ax.set_title("uplink bit width per rank-1 component")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    if has_blocks:
        ax = axes.pop(0)
        shown = [t for t in tiers if t.block_bits]
        grid = [[int(b) for b in t.block_bits.split(",")] for t in shown]
        cmap = ListedColormap(["#fde725", "#21918c", "#440154"])
        norm = BoundaryNorm([0, 6, 12, 32], cmap.N)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm)
        labels = []
        for t in shown:
            counts = pattern_counts(t.block_bits)
            labels.append(f"{t.tier} ({', '.join(f'{n}x{b}' for b, n in counts.items())})")
        ax.set_yticks(range(len(shown)), labels)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("transformer block")
        ax.set_title("base model bits per block (4 = NF4, 8 = LLM.int8, 16)")
        bar = fig.colorbar(image, ax=ax, ticks=[3, 9, 22])
        bar.ax.set_yticklabels(["4", "8", "16"])
    return _save(plt, fig, path)
