"""Payload codec throughput: MB/s of fp32 input for encode and decode at each width.

Input: the rank-1 components of SmolLM2-135M's LoRA (R = 8 on q/k/v/o of 30 blocks:
960 components, 3.69 MB of fp32 deltas), random normal values.

    python benchmarks/codec_throughput.py --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from haflq_flower.quant.payload import ComponentSet, Layout, decode, encode, record_bytes

# (d_in, d_out) of q, k, v, o in SmolLM2-135M; 30 blocks
MODULE_DIMS = [(576, 576), (576, 192), (576, 192), (576, 576)] * 30
RANK = 8


def components(rng: np.random.Generator) -> ComponentSet:
    keys, a, b = [], [], []
    for m, (d_in, d_out) in enumerate(MODULE_DIMS):
        for i in range(RANK):
            keys.append((m, i))
            a.append(rng.normal(size=d_in).astype(np.float32))
            b.append(rng.normal(size=d_out).astype(np.float32))
    return ComponentSet(np.array(keys), a, b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    comps = components(rng)
    fp32_bytes = 4 * sum(len(x) + len(y) for x, y in zip(comps.a, comps.b, strict=True))
    layout = Layout(tuple(MODULE_DIMS), RANK, {})
    print(f"input: {len(comps.keys)} components, {fp32_bytes / 1e6:.2f} MB fp32")
    print("| width | encode MB/s | decode MB/s | payload MB | vs fp32 |")
    print("|---|---|---|---|---|")
    for bits in (16, 8, 4, 2):
        widths = np.full(len(comps.keys), bits)
        enc, dec = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            arrays = encode(comps, widths, {}, rng)
            enc.append(time.perf_counter() - start)
            start = time.perf_counter()
            decode(arrays, layout)
            dec.append(time.perf_counter() - start)
        size = record_bytes(arrays)
        print(
            f"| {bits} | {fp32_bytes / 1e6 / min(enc):.0f} | {fp32_bytes / 1e6 / min(dec):.0f} "
            f"| {size / 1e6:.3f} | {size / fp32_bytes:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
