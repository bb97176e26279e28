"""Does the server's cost stay flat in the number of virtual clients? (issue 23)

For each number of simulated SuperNodes N (default 100, 1,000, 10,000) and each
strategy (HAFLQ, FedIT), one run through the real launcher (`flwr run` on a private
SuperLink, Ray simulation) with the tiny model, 10 clients sampled per round
(``strategy.fraction-train = 10 / N``), label skew for every client
(``data.partitioner="inner-dirichlet"``: the size-rejecting Dirichlet split cannot draw
1,000 non-empty partitions of Rotten Tomatoes). Measured from each run's results.json:
wall time per round (rounds 2.., after the actors warmed up), the strategy's own time
per round, control bytes (profile queries), the peak RSS of the process that runs the
ServerApp, and the size of results.json; and the launcher's wall time.

    .venv/bin/python benchmarks/scale.py --out outputs/bench-scale
    .venv/bin/python benchmarks/scale.py --out outputs/bench-scale --nodes 100,1000 --rounds 3

Writes ``scale.json`` and ``scale.md`` (the table in docs/benchmarks.md, "Scale").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from haflq_flower import compare, launch

ROOT = Path(__file__).resolve().parents[1]


def run_config(strategy: str, nodes: int, sampled: int, rounds: int) -> dict:
    return {
        "model.name": "tiny",
        "strategy.name": strategy,
        "num-server-rounds": rounds,
        "strategy.fraction-train": min(1.0, sampled / nodes),
        "strategy.min-train-nodes": sampled,
        "data.partitioner": "inner-dirichlet",
        "data.dirichlet-alpha": 0.5,
        "data.test-per-class": 20,
        "train.local-steps": 2,
        "train.head-learning-rate": 2e-3,
        "output.plots": False,
    }


def measure(results_path: Path, launcher_s: float) -> dict:
    results = json.loads(results_path.read_text())
    rounds = results["rounds"]
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip(rounds, rounds[1:], strict=False)]
    trained = rounds[1:]
    return {
        "launcher_s": launcher_s,
        "round_s": walls,
        "round_s_after_first": statistics.fmean(walls[1:]) if len(walls) > 1 else walls[0],
        "strategy_s": statistics.fmean(r["strategy_s"] for r in trained),
        "control_bytes": sum(r["control_bytes"] for r in trained),
        "clients_per_round": statistics.fmean(len(r["clients"]) for r in trained),
        "server_peak_rss_mb": max(r.get("server_peak_rss_bytes", 0) for r in rounds) / 2**20,
        "results_json_kb": results_path.stat().st_size / 1024,
        "status": results["final"]["status"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| strategy | nodes | clients per round | launcher (s) | s per round (rounds 2..) "
        "| strategy s per round | control bytes | ServerApp peak RSS (MiB) | results.json (KiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['nodes']:,} | {r['clients_per_round']:.0f} | "
            f"{r['launcher_s']:.0f} | {r['round_s_after_first']:.1f} | {r['strategy_s']:.3f} | "
            f"{r['control_bytes']:,} | {r['server_peak_rss_mb']:.0f} | "
            f"{r['results_json_kb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--nodes", default="100,1000,10000")
    parser.add_argument("--strategies", default="haflq,fedit")
    parser.add_argument("--sampled", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-cpus", type=int, default=1)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        for strategy in args.strategies.split(","):
            run_dir = out / f"{strategy}-{nodes}"
            config = run_config(strategy, nodes, args.sampled, args.rounds)
            start = time.perf_counter()
            code = launch.main(
                [
                    "--app",
                    str(ROOT),
                    "--num-supernodes",
                    str(nodes),
                    "--client-cpus",
                    str(args.client_cpus),
                    "--output-dir",
                    str(run_dir),
                    "--run-config",
                    compare.config_string(config),
                ]
            )
            elapsed = time.perf_counter() - start
            if code != 0:
                print(f"[scale] {strategy} at {nodes} nodes FAILED (exit {code})", flush=True)
                continue
            row = {
                "strategy": strategy,
                "nodes": nodes,
                **measure(run_dir / "results.json", elapsed),
            }
            rows.append(row)
            print(f"[scale] {json.dumps(row)}", flush=True)
            (out / "scale.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "scale.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
