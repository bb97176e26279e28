#!/usr/bin/env bash
# Issue 4's CUDA checks as one run on a lent GPU machine: a session gets 15 minutes of
# device time, the machine's start included; this stays inside one 600 s call.
#
#   1. benchmarks/gpu_smoke.py at SmolLM2-135M's shape: NF4 through transformers, and the
#      block-wise bases uniform 4, 8, 16 and a 4/8/16 mix built by quant.mixed: the
#      bitsandbytes module types per pattern, exact weight bytes, peak
#      torch.cuda.max_memory_allocated, and non-zero LoRA gradients after an evaluation
#      pass, at every level.
#   2. benchmarks/block_memory.py at a 1.1B Llama shape: uniform 16/8/4 and the low/mid/high
#      tier patterns (influence salience), checkpointing off and on, every figure from the
#      CUDA allocator: the -31% against uniform-8 measured where the runtime is not in it.
#
# Both use random-initialized models (memory, module types and gradients do not depend on
# the weights' values). Prepare here, then run with the device tool:
#
#   bash scripts/device_bundle.sh        # .device/: bitsandbytes, task file, config
#   run(command="bash benchmarks/device_blocks.sh", carry=[".device"], timeout_s=600)
#
# The files come back from $OUT (at most 8): env.txt, smoke.json, smoke.log,
# memory.json, memory.md, memory.png, memory.log. A dry run on this machine:
#   PYTHON=.venv/bin/python OUT=outputs/device-dry SHAPE="num_hidden_layers=4" \
#       bash benchmarks/device_blocks.sh
set -uo pipefail
OUT="${OUT:-outputs/device-blocks}"
PY="${PYTHON:-python3}"
SHAPE="${SHAPE:-hidden_size=2048 intermediate_size=5632 num_hidden_layers=22 num_attention_heads=32 num_key_value_heads=4 tie_word_embeddings=False}"
ROOT="$(pwd)"
export PYTHONPATH="$ROOT/.device/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HAFLQ_CACHE_DIR="$ROOT/.device/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ ! -f .device/texts.csv ]; then
    echo "error: .device/ is missing: run 'bash scripts/device_bundle.sh' here first and" \
        "carry .device" >&2
    exit 2
fi
MODEL_DIR="$(ls -d "$ROOT"/.device/cache/smollm2-*/ | head -1)"
mkdir -p "$OUT"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import bitsandbytes, peft, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU {gpu}, "
      f"bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

echo "== 1. CUDA path: NF4 and block-wise bases at SmolLM2-135M's shape" | tee "$OUT/smoke.log"
timeout 180 "$PY" benchmarks/gpu_smoke.py --config "$MODEL_DIR/config.json" \
    --tokenizer "$MODEL_DIR" --texts .device/texts.csv --steps 10 --quantizations nf4 \
    --block-patterns 4,8,16,mixed --out "$OUT/smoke.json" 2>&1 | tee -a "$OUT/smoke.log"

echo "== 2. Memory per pattern at the 1.1B shape ($SHAPE)" | tee "$OUT/memory.log"
WORK="$(mktemp -d)"
timeout 380 "$PY" benchmarks/block_memory.py --out "$WORK" --steps 4 --metric influence \
    --checkpointing both --override "$SHAPE" 2>&1 | tee -a "$OUT/memory.log"
# memory.json grows row by row: a run cut short still leaves its table and plot.
if [ -f "$WORK/memory.json" ]; then
    "$PY" benchmarks/block_memory.py --out "$WORK" --steps 4 --override "$SHAPE" --replot \
        >/dev/null 2>&1
    cp "$WORK"/memory.json "$WORK"/memory.md "$WORK"/memory.png "$OUT"/ 2>/dev/null
fi
ls -la "$OUT"
