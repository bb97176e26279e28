"""Issue 6's head-to-head: HAFLQ against FedIT (homogeneous and truncated), HetLoRA,
FlexLoRA, FLoRA and FFA-LoRA on one task, plus the paper's claims (``haflq-full``
against ``paper-baseline``).

Defaults: the embedded default task (Rotten Tomatoes, SmolLM2-135M NF4), 10 clients in
three tiers (r_k = 2, 4, 8 of R = 8; weight budgets for the block-precision arms from
the model's layout, as in ``block_precision.py``), Dirichlet(0.5) label skew, 3 rounds of
4 local steps, 200 held-out test rows, full-precision (fp32) downloads for the peers.
Sized for about an hour on a 2-core CPU. Every argument after the defaults goes to
``haflq_flower.compare`` and wins, e.g. more seeds for the headline rows into the same
directory (finished runs are skipped)::

    python benchmarks/head_to_head.py --out outputs/h2h
    python benchmarks/head_to_head.py --out outputs/h2h \\
        --arms haflq-full,paper-baseline --seeds 0,1,2
    # 20 Newsgroups (make install-20newsgroups first):
    python benchmarks/head_to_head.py --out outputs/h2h-20ng --run-config 'data.name="20newsgroups"'

On a GPU, the same command with ``--run-config 'model.name="..."'`` and more rounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_precision import memory_mb  # noqa: E402

from haflq_flower import compare  # noqa: E402

ARMS = "fedit,fedit-trunc,hetlora,flexlora,flora,ffa-lora,haflq-quant,haflq-full,paper-baseline"


def defaults(budgets: str) -> list[str]:
    return [
        "--arms",
        ARMS,
        "--rounds",
        "3",
        "--num-supernodes",
        "10",
        "--target",
        "0.55",
        "--claims",
        "haflq-full:paper-baseline",
        "--run-config",
        'data.partitioner="dirichlet" data.dirichlet-alpha=0.5 train.local-steps=4 '
        f'data.test-per-class=100 payload.downlink-bits=32 tiers.memory-mb="{budgets}"',
    ]


def model_name(argv: list[str]) -> str:
    """The model named in the user's ``--run-config`` (budgets follow its layout)."""
    overrides: dict = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--run-config":
            overrides.update(compare._parse_overrides([value]))
    return str(overrides.get("model.name", "smollm2-135m"))


if __name__ == "__main__":
    budgets = memory_mb(model_name(sys.argv[1:]))
    print(f"[head_to_head] tiers.memory-mb = {budgets}", flush=True)
    sys.exit(compare.main(defaults(budgets) + sys.argv[1:]))
