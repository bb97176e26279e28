"""What a run leaves behind: results.json (rewritten after every round), plots, adapter."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
    os.replace(tmp, path)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


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
        self, server_round: int, accuracy: float, loss: float, stats: dict | None
    ) -> dict:
        """Add one round (round 0 is the initial global adapter) and rewrite the file."""
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
            **stats.get("extra", {}),
        }
        self.data["rounds"].append(entry)
        write_json_atomic(self.results_path, self.data)
        up = sum(r["bytes_up"] for r in self.data["rounds"])
        log.info(
            "[round %d/%d] accuracy %.4f loss %.4f | up %s down %s (total up %s) | %.1f s elapsed",
            server_round,
            self.num_rounds,
            accuracy,
            loss,
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
        self.data["final"] = {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "best_accuracy": max((r["accuracy"] for r in rounds), default=None),
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
    """accuracy.png (vs round and vs cumulative uplink bytes) and memory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    if not rounds:
        return []
    xs = [r["round"] for r in rounds]
    acc = [r["accuracy"] for r in rounds]
    cum_up, total = [], 0
    for r in rounds:
        total += r["bytes_up"]
        cum_up.append(total / 1e6)
    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, acc, marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(cum_up, acc, marker="o")
    ax2.set_xlabel("cumulative uplink (MB)")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    fig.suptitle(results["config"].get("strategy.name", ""))
    fig.tight_layout()
    paths.append(output_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    peaks: dict[str, float] = {}
    for r in rounds:
        for c in r["clients"]:
            # one bar per tier where there are tiers, else per partition (or node)
            part = c.get("partition", -1)
            key = str(c.get("tier") or (f"client {part}" if part >= 0 else c["node"]))
            peaks[key] = max(peaks.get(key, 0.0), c.get("peak_mem_bytes", 0) / 1e9)
    if peaks:
        fig, ax = plt.subplots(figsize=(max(4, len(peaks)), 4))
        ax.bar(list(peaks), list(peaks.values()))
        ax.set_ylabel("peak training memory (GB)")
        ax.set_xlabel(
            "tier" if any(r_c.get("tier") for r in rounds for r_c in r["clients"]) else "client"
        )
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        paths.append(output_dir / "memory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
