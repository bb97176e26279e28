"""Block-wise mixed precision of the base model: weight costs and bit allocation.

Pure functions, no torch: a transformer block's linear layers are stored at 4 bits
(bitsandbytes NF4), 8 bits (LLM.int8) or 16 bits; everything outside the blocks'
linear layers (embeddings, norms, head) is a fixed cost. :func:`allocate_block_bits`
turns per-block salience and a client's weight-memory budget into a bit pattern.

Exact byte costs (they match what bitsandbytes allocates, see tests/test_blocks.py):

- 4-bit: ``ceil(n/2)`` packed codes + one fp32 absmax per 64 weights (no double quant);
- 8-bit: ``n`` int8 codes + one fp32 scale per output row (``SCB``);
- 16-bit: ``2n`` (bf16/fp16 storage);
- a bias is counted at 4 bytes per value at every level (fp32; with bf16 compute
  bitsandbytes holds it in 2, so a biased model is over-counted: on the safe side of a
  budget). Llama-family blocks have no biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVELS = (4, 8, 16)
# The classification head is trained (and federated) in full precision: never quantized
# (modules matched by name part)
HEAD_MODULES = ("score", "classifier")
# Block salience metrics (quant/salience.py implements them; named here so that parsing a
# run config needs no torch or bitsandbytes)
SALIENCE_METRICS = ("gradient", "influence", "quantization", "recovery")
# The base model's precision (model.quantization; bitsandbytes' NF4/FP4/LLM.int8 in
# model.py and quant/mixed.py) and the block-wise schemes (blocks.precision;
# strategy/blocks.py), named here for the same reason.
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
BLOCK_PRECISIONS = ("off", "uniform-4", "uniform-8", "uniform-16", "salience", "random", "auto")
NF4_BLOCKSIZE = 64
BIAS_BYTES = 4
_LADDER = ((4, 8), (8, 16))


class BudgetError(ValueError):
    """A client's memory budget cannot hold the model even with every block at 4 bits."""


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a block: ``out_features x in_features`` (+ bias)."""

    out_features: int
    in_features: int
    bias: bool = False


def linear_bytes(shape: LinearShape, bits: int) -> int:
    """Bytes of one linear layer's weight (and bias) stored at ``bits``."""
    n = shape.out_features * shape.in_features
    bias = shape.out_features * BIAS_BYTES if shape.bias else 0
    if bits == 4:
        return math.ceil(n / 2) + math.ceil(n / NF4_BLOCKSIZE) * 4 + bias
    if bits == 8:
        return n + shape.out_features * 4 + bias
    if bits == 16:
        return 2 * n + bias
    raise ValueError(f"block bits must be one of {LEVELS}, got {bits}")


@dataclass(frozen=True)
class BlockLayout:
    """What allocation needs to know about a model: its blocks' linear layers and the
    bytes that do not depend on the pattern.

    Attributes
    ----------
    blocks : tuple of tuple of LinearShape
        The linear layers of each transformer block, in depth order.
    fixed_bytes : int
        Embeddings, norms, head and every other base weight outside the blocks' linear
        layers, in their stored dtype.
    """

    blocks: tuple[tuple[LinearShape, ...], ...]
    fixed_bytes: int

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_bytes(self, index: int, bits: int) -> int:
        return sum(linear_bytes(s, bits) for s in self.blocks[index])

    def weight_bytes(self, pattern: Sequence[int]) -> int:
        """Total base-model weight bytes under ``pattern`` (one level per block)."""
        if len(pattern) != self.num_blocks:
            raise ValueError(f"pattern has {len(pattern)} levels for {self.num_blocks} blocks")
        return self.fixed_bytes + sum(self.block_bytes(i, b) for i, b in enumerate(pattern))


def upgrade_order(salience: Sequence[float]) -> list[int]:
    """Block indices by descending salience; ties go to the shallower block."""
    values = np.asarray(salience, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise ValueError("salience must be a finite 1-D sequence")
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def allocate_block_bits(
    salience: Sequence[float], layout: BlockLayout, budget_bytes: float
) -> tuple[int, ...]:
    """Bits per block under a weight-memory budget.

    Every block starts at 4 bits. Upgrades follow a fixed ladder: first each block
    4 -> 8 in descending salience, then each block 8 -> 16 in the same order. The
    longest prefix of the ladder that keeps the total weight bytes within the budget is
    applied. Because the ladder does not depend on the budget, a larger budget never
    lowers any block (monotone), and the result stops only where the next upgrade would
    not fit (greedy). ``budget_bytes = inf`` gives every block 16 bits.

    Raises
    ------
    BudgetError
        When even the all-4-bit model exceeds the budget.
    """
    if len(salience) != layout.num_blocks:
        raise ValueError(f"{len(salience)} salience values for {layout.num_blocks} blocks")
    pattern = [4] * layout.num_blocks
    used = layout.weight_bytes(pattern)
    if used > budget_bytes:
        raise BudgetError(
            f"memory budget {budget_bytes / 2**20:.2f} MiB is below the all-4-bit model "
            f"({used / 2**20:.2f} MiB of weights); raise the tier's memory-mb to at least "
            f"{math.ceil(used / 2**20 * 100) / 100}"
        )
    order = upgrade_order(salience)
    for low, high in _LADDER:
        for i in order:
            step = layout.block_bytes(i, high) - layout.block_bytes(i, low)
            if used + step > budget_bytes:
                return tuple(pattern)
            pattern[i] = high
            used += step
    return tuple(pattern)


def random_salience(num_blocks: int, seed: int) -> np.ndarray:
    """A random ranking of the blocks: the control arm for salience (same budget)."""
    return np.random.default_rng(seed).permutation(num_blocks).astype(np.float64)


def uniform_pattern(num_blocks: int, bits: int) -> tuple[int, ...]:
    if bits not in LEVELS:
        raise ValueError(f"block bits must be one of {LEVELS}, got {bits}")
    return (bits,) * num_blocks


def pattern_to_str(pattern: Sequence[int]) -> str:
    return ",".join(str(int(b)) for b in pattern)


def pattern_from_str(text: str, num_blocks: int | None = None) -> tuple[int, ...]:
    """Parse ``"4,8,16,..."`` (the form sent in a train message); validates levels."""
    try:
        pattern = tuple(int(p) for p in str(text).split(","))
    except ValueError as err:
        raise ValueError(f"block-bits must be comma-separated integers, got {text!r}") from err
    if any(b not in LEVELS for b in pattern):
        raise ValueError(f"block-bits levels must be in {LEVELS}, got {text!r}")
    if num_blocks is not None and len(pattern) != num_blocks:
        raise ValueError(f"block-bits has {len(pattern)} levels for {num_blocks} blocks")
    return pattern


def combine_salience(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of per-client salience, each first scaled to sum 1 over |values|,
    so that a client's loss scale does not decide the ranking."""
    if not vectors:
        raise ValueError("no salience to combine")
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.float64))
    weight_sum = 0.0
    for vec, w in zip(vectors, weights, strict=True):
        vec = np.asarray(vec, dtype=np.float64)
        if vec.shape != total.shape or not np.all(np.isfinite(vec)):
            raise ValueError("salience vectors must be finite and of equal length")
        scale = np.abs(vec).sum()
        total += w * (vec / scale if scale > 0 else vec)
        weight_sum += w
    return total / weight_sum if weight_sum > 0 else total
