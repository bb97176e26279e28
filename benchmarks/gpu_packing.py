"""How many simulated SmolLM2 clients share one GPU? (issue 23, part 4; needs a GPU)

For k = 1, 2, 4, 8, 16, ... clients per GPU (``--client-gpus 1/k``: Ray places k actors
on the GPU at once, each capped at its share of CUDA memory by the client), one round of
the default job with k clients, every client sampled. A packing works when every client
replied ``ok``; the table gives each k's slowest client, its peak CUDA memory
(``torch.cuda.max_memory_allocated``, per client) and the round's wall time.

    .venv/bin/python benchmarks/gpu_packing.py --out outputs/bench-gpu-packing
    .venv/bin/python benchmarks/gpu_packing.py --out outputs/bench-gpu-packing --ks 1,4,16,32

Writes ``packing.json`` and ``packing.md``. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from haflq_flower import compare, launch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument("--local-steps", type=int, default=6)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; this benchmark measures GPU packing", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        run_dir = out / f"k{k}"
        config = {"num-server-rounds": 1, "train.local-steps": args.local_steps}
        start = time.perf_counter()
        code = launch.main(
            [
                "--app",
                str(ROOT),
                "--num-supernodes",
                str(k),
                "--client-cpus",
                "1",
                "--client-gpus",
                f"{1.0 / k:.6f}",
                "--output-dir",
                str(run_dir),
                "--run-config",
                compare.config_string(config),
            ]
        )
        row: dict = {"k": k, "exit": code, "launcher_s": time.perf_counter() - start}
        results = run_dir / "results.json"
        if results.exists():
            clients = json.loads(results.read_text())["rounds"][-1]["clients"]
            row |= {
                "ok": sum(c["status"] == "ok" for c in clients),
                "peak_mib": max((c["peak_mem_bytes"] for c in clients), default=0) / 2**20,
                "slowest_train_s": max((c["train_s"] for c in clients), default=0.0),
            }
        rows.append(row)
        print(f"[packing] {json.dumps(row)}", flush=True)
        (out / "packing.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"GPU: {torch.cuda.get_device_name(0)}, "
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
        "",
        "| clients per GPU | replied ok | peak CUDA memory per client (MiB) | slowest client (s) "
        "| launcher (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r.get('ok', 0)} of {r['k']} | {r.get('peak_mib', 0):.0f} | "
            f"{r.get('slowest_train_s', 0):.1f} | {r['launcher_s']:.0f} |"
        )
    (out / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
