"""What this machine computes fast: the compute dtype behind ``model.compute-dtype=auto``.

bfloat16 is only fast where the hardware has it: CUDA GPUs with bf16 support, and CPUs
with AVX512-BF16 or AMX. On other CPUs (e.g. AVX2-only) PyTorch emulates bf16 matmuls,
far slower than float32 on our AVX2 machines (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import functools

# model.compute-dtype: ``auto`` resolves with :func:`auto_compute_dtype`
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def auto_compute_dtype() -> str:
    """``bfloat16`` on a bf16-capable GPU or CPU; ``float16`` on an older GPU; else
    ``float32`` (a CPU without fast bf16 emulates it, much slower)."""
    import torch  # here, not at import: parsing a run config needs no torch otherwise

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"
