"""Issue 4's benchmark: uniform 16/8/4-bit bases against random-mixed and salience-mixed
bases at equal per-tier memory budgets, federated on the embedded default task.

Three memory tiers (low, mid, high; two clients each); their weight-memory budgets are
computed from the model's own layout (``block_salience.TIER_POSITIONS``: low = 1/4 of
the way from all-4 to all-8 bits, mid = 3/4, high = halfway from all-8 to all-16) and
passed as ``tiers.memory-mb``. Uniform arms ignore the budgets (the baseline that does
not adapt). Every arm is the HAFL strategy (freeze + adaptive aggregation) with the same
seed and data; each is a real ``flwr run``. Extra arguments go to
``haflq_flower.compare`` (e.g. ``--seeds 0,1,2``, ``--rounds 5``).

    python benchmarks/block_precision.py --out outputs/bench-blocks
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_salience import tier_budgets  # noqa: E402

from haflq_flower import compare  # noqa: E402
from haflq_flower.config import parse_run_config  # noqa: E402
from haflq_flower.data import load_task  # noqa: E402
from haflq_flower.model import count_blocks, load_base_model  # noqa: E402
from haflq_flower.quant.mixed import block_layout  # noqa: E402


def memory_mb(model_name: str = "smollm2-135m") -> str:
    """``tiers.memory-mb`` for the low/mid/high tiers of ``model_name``."""
    cfg = parse_run_config({"model.name": model_name})
    task = load_task(cfg.data)
    bits = (16,) * count_blocks(cfg.model, task.num_labels)
    model, _ = load_base_model(cfg.model, task.num_labels, torch.device("cpu"), bits)
    return ",".join(f"{b / 2**20:.2f}" for b in tier_budgets(block_layout(model)).values())


if __name__ == "__main__":
    budgets = memory_mb()
    print(f"[block_precision] tiers.memory-mb = {budgets}", flush=True)
    defaults = [
        "--arms",
        "blocks-16,blocks-8,blocks-4,blocks-random,blocks-salience",
        "--rounds",
        "3",
        "--num-supernodes",
        "6",
        "--run-config",
        f'train.local-steps=8 data.test-per-class=100 tiers.memory-mb="{budgets}"',
    ]
    sys.exit(compare.main(defaults + sys.argv[1:]))
