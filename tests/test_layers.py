"""The contracts of pyproject.toml ([tool.importlinter]): the math modules import no
torch, PEFT, transformers, bitsandbytes, Flower or Ray, directly or through anything they
import; and the layers (apps > strategies > model/data > config > quant > lora) have no
import pointing up, so no cycle (import-linter reads every import statement, lazy ones
included)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_math_is_pure_and_the_layers_have_no_cycle():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_parsing_a_run_config_imports_no_strategy_torch_or_flower():
    """config.py stands below the strategies: parsing needs none of the heavy stack
    (the strategy-dependent checks are strategy.load_run_config's)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from haflq_flower.config import parse_run_config\n"
        "parse_run_config({'model.compute-dtype': 'float32', 'strategy.name': 'flora'})\n"
        "heavy = [m for m in ('torch', 'flwr', 'bitsandbytes', 'peft', 'transformers',\n"
        "         'haflq_flower.strategy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
