"""Apply a block bit pattern to a loaded model with real bitsandbytes modules, and
measure what the model's weights take.

Every ``nn.Linear`` inside transformer block ``i`` becomes ``bnb.nn.Linear4bit`` (NF4 or
FP4, fp32 absmax per 64 weights), :class:`Linear8bitFrozen` (bitsandbytes'
``Linear8bitLt``: LLM.int8 storage, outlier threshold 6.0, like transformers'
``load_in_8bit``) or :class:`Linear16` (16-bit storage). The rest of the model stays as
loaded. Call this before PEFT wraps the model: PEFT then
dispatches its bnb-aware LoRA layers onto the quantized modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import bitsandbytes as bnb
import torch
from torch import nn
from torch.nn import functional as F

from .blocks import HEAD_MODULES, BlockLayout, LinearShape

INT8_THRESHOLD = 6.0
_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "block")


class _UpcastLinear(torch.autograd.Function):
    """``x @ w.T + b`` with a 16-bit frozen ``w`` upcast to ``x``'s dtype on the fly.

    Plain ``F.linear(x, w.to(x.dtype))`` would keep the upcast copy alive for backward:
    a full-precision copy of every 16-bit layer during training (measured: +420 MiB on
    SmolLM2-135M). Here only the 16-bit weight is kept and upcast again in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class Linear16(nn.Linear):
    """A frozen linear layer stored in 16 bits and computed in the input's dtype.

    On a GPU with bf16 compute this is a plain bf16 linear layer. On a CPU without bf16
    instructions, where bf16 matmuls are emulated (much slower), the weight is stored
    in bf16 (the memory of a 16-bit model) and upcast per call, like bitsandbytes does
    when it dequantizes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return _UpcastLinear.apply(x, self.weight, self.bias)


class _FrozenInt8Linear(torch.autograd.Function):
    """``x W^T + b`` with ``W = CB * SCB / 127`` (int8 rows, frozen), saving no activation.

    The numbers are bitsandbytes' CPU training path (``MatMul8bitFp``: dequantize to the
    input's dtype, then a float matmul), but only the int8 weight is kept for backward:
    ``MatMul8bitFp`` keeps every layer's input on ``ctx``, outside autograd's saved
    tensors, which also defeats gradient checkpointing.
    """

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)
        ctx.x_shape = x.shape
        weight = cb.to(x.dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        cb, scb = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = cb.to(grad.dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
            grad_x = grad.reshape(-1, grad.shape[-1]).matmul(weight).view(ctx.x_shape)
        return grad_x, None, None, None


class Linear8bitFrozen(bnb.nn.Linear8bitLt):
    """bitsandbytes' ``Linear8bitLt`` (LLM.int8 storage) whose CPU training forward keeps
    no layer input for backward (:class:`_FrozenInt8Linear`).

    Evaluation and CUDA use bitsandbytes' own kernels unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu" and torch.is_grad_enabled()):
            return super().forward(x)
        self.state.is_training = True
        if self.weight.CB is not None:
            self.init_8bit_state()
        if self.state.CB is None or self.state.SCB is None:
            return super().forward(x)
        bias = self.bias
        if bias is not None and bias.requires_grad:
            return super().forward(x)  # a trainable bias needs bitsandbytes' own backward
        if bias is not None and bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        return _FrozenInt8Linear.apply(x, self.state.CB, self.state.SCB, bias)


class Embedding16(nn.Embedding):
    """An embedding table stored in 16 bits whose output is in the compute dtype.

    A lookup only copies rows, so 16-bit storage costs no bf16 arithmetic on a CPU.
    """

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def store_embeddings_16bit(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep the input embeddings in 16 bits (they dominate the non-block weights).

    A no-op when the compute dtype is already 16-bit; skipped for tied embeddings (the
    output head would change with them).
    """
    embeddings = model.get_input_embeddings()
    if compute_dtype != torch.float32 or type(embeddings) is not nn.Embedding:
        return
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is embeddings.weight:
        return
    embeddings.__class__ = Embedding16
    embeddings.compute_dtype = compute_dtype
    embeddings.weight.data = embeddings.weight.data.to(torch.bfloat16)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the longest ``layers``/``h``/``blocks``)."""
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES:
            if best is None or len(module) > len(best):
                best = module
    if best is None or len(best) == 0:
        raise ValueError(
            f"{type(model).__name__}: found no transformer block list (a ModuleList named "
            f"one of {_BLOCK_LIST_NAMES}); block-wise quantization cannot be applied"
        )
    return best


def block_linears(block: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The base linear layers of a block (LoRA's own layers excluded)."""
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and "lora_" not in name:
            yield name, module


def _replace(parent: nn.Module, dotted: str, new: nn.Module) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, new)


def _quantized_linear(
    old: nn.Linear,
    bits: int,
    compute_dtype: torch.dtype,
    four_bit_type: str,
    device: torch.device,
) -> nn.Module:

    has_bias = old.bias is not None
    weight = old.weight.data
    if bits == 16:
        store = torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
        new = Linear16(old.in_features, old.out_features, bias=has_bias, device="meta")
        new.weight = nn.Parameter(weight.to(store), requires_grad=False)
    elif bits == 4:
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=False,
            quant_type=four_bit_type,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.float(), requires_grad=False, compress_statistics=False, quant_type=four_bit_type
        )
    elif bits == 8:
        new = Linear8bitFrozen(
            old.in_features,
            old.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"block bits must be 4, 8 or 16, got {bits}")
    if has_bias:
        new.bias = nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes 4/8-bit weights when they are moved


def apply_block_bits(
    model: nn.Module,
    pattern: Sequence[int],
    compute_dtype: torch.dtype,
    device: torch.device,
    four_bit_type: str = "nf4",
) -> None:
    """Replace every base linear layer of block ``i`` by a ``pattern[i]``-bit module.

    ``model`` must be unquantized (loaded in a float dtype); layers are converted one at
    a time so that peak memory stays near the unquantized model.
    """
    blocks = transformer_blocks(model)
    if len(pattern) != len(blocks):
        raise ValueError(f"block-bits has {len(pattern)} levels for {len(blocks)} blocks")
    for block, bits in zip(blocks, pattern, strict=True):
        for name, old in list(block_linears(block)):
            if type(old) is not nn.Linear:
                raise ValueError(
                    f"block-wise quantization needs an unquantized model; found "
                    f"{type(old).__name__} at {name}"
                )
            _replace(
                block, name, _quantized_linear(old, bits, compute_dtype, four_bit_type, device)
            )


def block_bits_of(model: nn.Module) -> tuple[int, ...]:
    """The storage level of each block, read back from its modules (4, 8 or 16)."""

    levels = []
    for block in transformer_blocks(model):
        kinds = set()
        for _, linear in block_linears(block):
            if isinstance(linear, bnb.nn.Linear4bit):
                kinds.add(4)
            elif isinstance(linear, bnb.nn.Linear8bitLt):
                kinds.add(8)
            else:
                kinds.add(8 * linear.weight.element_size())
        if len(kinds) != 1:
            raise ValueError(f"a block mixes storage levels {sorted(kinds)}")
        levels.append(kinds.pop())
    return tuple(levels)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter really holds, with bitsandbytes' quantization statistics."""
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # Params4bit: absmax per 64 weights
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested and state.state2 is not None:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    scb = getattr(tensor, "SCB", None)  # Int8Params: one scale per output row
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total


def _is_base(name: str) -> bool:
    """Frozen base weights: not LoRA, not the trained head."""

    parts = name.split(".")
    return not any(p.startswith("lora_") for p in parts) and not any(
        h in parts for h in HEAD_MODULES
    )


def base_weight_bytes(model: nn.Module) -> int:
    """Exact bytes of the frozen base weights (LoRA and the head excluded)."""
    total = sum(tensor_bytes(p) for n, p in model.named_parameters() if _is_base(n))
    return total + sum(tensor_bytes(b) for n, b in model.named_buffers() if _is_base(n))


def _linear_bytes(linear: nn.Linear) -> int:
    bias = 0 if linear.bias is None else tensor_bytes(linear.bias)
    return tensor_bytes(linear.weight) + bias


def block_layout(model: nn.Module) -> BlockLayout:
    """Shapes of the blocks' linear layers, and the measured bytes of everything else."""
    blocks = []
    block_linear_bytes = 0
    for block in transformer_blocks(model):
        shapes = []
        for _, linear in block_linears(block):
            shapes.append(
                LinearShape(linear.out_features, linear.in_features, linear.bias is not None)
            )
            block_linear_bytes += _linear_bytes(linear)
        blocks.append(tuple(shapes))
    return BlockLayout(
        blocks=tuple(blocks), fixed_bytes=base_weight_bytes(model) - block_linear_bytes
    )
