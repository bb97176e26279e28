"""The decided head-to-head (issue 18): HAFLQ against the bounds and every peer, on one
task, in a regime where only LoRA factors learn, with paired per-row tests.

The regime (docs/benchmarks.md, "Decided head-to-head", says how it was chosen): the
model answers with a label word through its own LM head (``model.head-init=label-words``
behind a prompt, head frozen with ``train.head-learning-rate=0``), so every accuracy
difference comes from the LoRA factors and their aggregation. 6 clients (two per tier,
r_k = 2, 4, 8 of R = 8), Dirichlet(0.5) label skew, a validation split held out of
training (rounds are chosen on it, never on the test split: Rotten Tomatoes' 4 rounds x 8
steps were; 20 Newsgroups' 6 rounds are not yet confirmed), the server's evaluation on the
test split after the last round only, with every row's prediction saved, so that
``compare`` can decide each "HAFLQ vs X" with McNemar's exact test (Holm over the arms),
after checking that ``bound-high`` and ``bound-low`` are decided apart.

    python benchmarks/head_to_head.py --out outputs/h2h-rt --task rotten-tomatoes
    python benchmarks/head_to_head.py --out outputs/h2h-20ng --task 20newsgroups
    # more seeds for the headline arms, into the same directory (finished runs skipped,
    # interrupted ones resumed from their checkpoints):
    python benchmarks/head_to_head.py --out outputs/h2h-rt --task rotten-tomatoes \\
        --arms haflq,bound-high,bound-low,paper-baseline --seeds 0,1

Every argument after the preset goes to ``haflq_flower.compare`` and wins (e.g.
``--parallel 6 --client-gpus 1`` per task on one GPU, both tasks at once:
``benchmarks/gpu_grid.sh``).
20 Newsgroups needs ``make install-20newsgroups`` first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_precision import memory_mb  # noqa: E402

from haflq_flower import compare  # noqa: E402
from haflq_flower.prompts import PROMPTS  # noqa: E402

# bounds first: the table is void unless they are decided apart
ARMS = (
    "bound-high,bound-low,haflq,haflq-fp32,freeze-zeropad,hetlora,flexlora,fedit-trunc,"
    "flora,ffa-lora,fedex-lora,lora-fair,fedsa-lora,paper-baseline,haflq-full"
)

# The paper's claims pair (memory, bytes, accuracy of haflq-full against paper-baseline)
CLAIMS = "haflq-full:paper-baseline"

# Run config shared by every arm, per task (the arms add their own overrides).
COMMON = {
    "data.partitioner": "dirichlet",
    "data.dirichlet-alpha": 0.5,
    "model.head-init": "label-words",
    "train.head-learning-rate": 0.0,
    # the pilot's LoRA learning rate, pinned: the default job's may change
    "train.learning-rate": 5e-4,
    "train.local-steps": 8,
    "eval.split": "test",
    # decisions are on the final round: skip the intermediate test evaluations
    "eval.every": 0,
}
TASKS: dict[str, dict] = {
    "rotten-tomatoes": {
        # chosen on the validation split: bound-high's first round within 0.01 of its
        # best (0.543, 0.703, 0.647, 0.780, 0.797, 0.807, 0.800 after rounds 0-6)
        "rounds": 4,
        "config": {
            "model.label-words": ",".join(PROMPTS["rotten-tomatoes"].label_words),
            "data.template": PROMPTS["rotten-tomatoes"].template,
            "data.validation-per-class": 150,
            "data.test-per-class": 300,
        },
    },
    "20newsgroups": {
        "rounds": 6,
        "config": {
            # one word per newsgroup in label order (haflq_flower/prompts.py)
            "model.label-words": ",".join(PROMPTS["20newsgroups"].label_words),
            "data.template": PROMPTS["20newsgroups"].template,
            "model.max-length": 128,
            "data.validation-per-class": 20,
            "data.test-per-class": 40,
        },
    },
}


def defaults(task: str, budgets: str, arms: str = ARMS) -> list[str]:
    """The preset's compare arguments; the claims pair only when both of its arms run."""
    preset = TASKS[task]
    config = {
        **COMMON,
        **preset["config"],
        "data.name": task,
        "tiers.memory-mb": budgets,
    }
    claims = ["--claims", CLAIMS] if set(CLAIMS.split(":")) <= set(arms.split(",")) else []
    return [
        "--arms",
        arms,
        "--rounds",
        str(preset["rounds"]),
        "--num-supernodes",
        "6",
        "--reference",
        "haflq",
        *claims,
        "--run-config",
        compare.config_string(config),
    ]


def _flag(argv: list[str], flag: str) -> str | None:
    """The last value given for ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def model_name(argv: list[str]) -> str:
    """The model named in the user's ``--run-config`` (budgets follow its layout)."""
    overrides: dict = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--run-config":
            overrides.update(compare._parse_overrides([value]))
    return str(overrides.get("model.name", "smollm2-135m"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--task", choices=sorted(TASKS), default="rotten-tomatoes")
    args, rest = parser.parse_known_args(argv)
    budgets = memory_mb(model_name(rest))
    print(f"[head_to_head] task {args.task}; tiers.memory-mb = {budgets}", flush=True)
    arms = _flag(rest, "--arms") or ARMS
    return compare.main(defaults(args.task, budgets, arms) + rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
