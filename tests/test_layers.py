"""The layer contract of pyproject.toml ([tool.importlinter]): the math modules import
no torch, PEFT, transformers, bitsandbytes, Flower or Ray, directly or through anything
they import (import-linter reads every import statement, lazy ones included)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_math_is_free_of_torch_peft_and_flower():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout
