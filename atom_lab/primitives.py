"""Quantizer primitives: uniform integer (2..8 bits) and floating-point (FP8, FP16) quantization.

`quantize` returns the integer codes and the scales (and zero points for asymmetric specs);
`dequantize` maps them back; `fake_quant` is their composition. Statistics are reduced along the
LAST dimension (the reduction dimension of a GEMM): per tensor, per row (per output channel of a
weight, per token of an activation), or in groups of `group_size` consecutive elements.
A row whose length is not a multiple of the group size ends in one shorter group.

Scales are computed in float32 and rounded to `scale_dtype` (float16 by default, the dtype the CUDA
kernels read) BEFORE the codes are computed, so fake-quant and the kernels see the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PER_TENSOR = -1
PER_ROW = 0
MIN_SCALE = 1e-5  # keeps all-zero groups from dividing by zero; representable in fp16

FP_FORMATS = {
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class IntSpec:
    """A uniform integer quantizer.

    group_size: PER_TENSOR (-1), PER_ROW (0) or G > 0 consecutive elements of the last dim.
    clip: the range is clip * absmax (symmetric) or clip * [min, max] (asymmetric).
    """

    bits: int
    symmetric: bool = True
    group_size: int = PER_ROW
    clip: float = 1.0
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}: integer quantization supports 2..8 bits")
        if self.group_size < PER_TENSOR:
            raise ValueError(f"group_size={self.group_size}: use -1 (tensor), 0 (row) or G > 0")
        if not 0.0 < self.clip <= 1.0:
            raise ValueError(f"clip={self.clip}: clip ratio must lie in (0, 1]")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8


def group_sizes(length: int, group_size: int) -> list[int]:
    """Sizes of the groups a row of `length` splits into (the last one may be shorter)."""
    if group_size <= 0 or group_size >= length:
        return [length]
    full, tail = divmod(length, group_size)
    return [group_size] * full + ([tail] if tail else [])


def _reduce_groups(x: torch.Tensor, group_size: int, op) -> torch.Tensor:
    """Apply `op(t, dim=-1)` to each group of the last dim -> [..., n_groups] (float32)."""
    x = x.float()
    if group_size == PER_TENSOR:
        return op(x.reshape(-1), dim=-1).reshape([1] * x.dim())
    sizes = group_sizes(x.shape[-1], group_size)
    if len(sizes) == 1:
        return op(x, dim=-1).unsqueeze(-1)
    g = sizes[0]
    n_full = x.shape[-1] // g
    full = op(x[..., : n_full * g].unflatten(-1, (n_full, g)), dim=-1)
    if len(sizes) == n_full:
        return full
    return torch.cat([full, op(x[..., n_full * g :], dim=-1).unsqueeze(-1)], dim=-1)


def expand_groups(stat: torch.Tensor, length: int, group_size: int) -> torch.Tensor:
    """Broadcast per-group values [..., n_groups] back to [..., length]."""
    if stat.shape[-1] == 1:
        return stat
    sizes = torch.tensor(group_sizes(length, group_size), device=stat.device)
    return stat.repeat_interleave(sizes, dim=-1)


def _amax(t, dim):
    return t.amax(dim=dim)


def _amin(t, dim):
    return t.amin(dim=dim)


def _absmax(t, dim):
    return t.abs().amax(dim=dim)


def compute_scales(x: torch.Tensor, spec: IntSpec):
    """Scales (and zero points, asymmetric only) of x under spec: shapes [..., n_groups]."""
    if spec.symmetric:
        absmax = _reduce_groups(x, spec.group_size, _absmax)
        scale = (absmax * spec.clip / spec.qmax).clamp_min(MIN_SCALE).to(spec.scale_dtype)
        return scale, None
    # The range always contains 0 (as GPTQ's quantizer does): a group of one sign would otherwise
    # need a zero point outside 0..qmax, which the kernels' 4-bit zero cannot hold.
    xmax = _reduce_groups(x, spec.group_size, _amax).clamp_min(0) * spec.clip
    xmin = _reduce_groups(x, spec.group_size, _amin).clamp_max(0) * spec.clip
    scale = ((xmax - xmin) / spec.qmax).clamp_min(MIN_SCALE).to(spec.scale_dtype)
    zero = torch.round(-xmin / scale.float()).clamp(0, spec.qmax).to(spec.scale_dtype)
    return scale, zero


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero, spec: IntSpec) -> torch.Tensor:
    """Integer codes of x for given (e.g. static, calibrated) scales and zero points."""
    length = x.shape[-1]
    s = expand_groups(scale.float(), length, spec.group_size)
    q = torch.round(x.float() / s)
    if zero is not None:
        q = q + expand_groups(zero.float(), length, spec.group_size)
    return q.clamp(spec.qmin, spec.qmax).to(spec.code_dtype)


def quantize(x: torch.Tensor, spec: IntSpec):
    """x -> (codes, scales, zeros); zeros is None for symmetric specs."""
    scale, zero = compute_scales(x, spec)
    return quantize_with(x, scale, zero, spec), scale, zero


def dequantize(codes, scale, zero, spec: IntSpec, dtype=torch.float32) -> torch.Tensor:
    length = codes.shape[-1]
    q = codes.float()
    if zero is not None:
        q = q - expand_groups(zero.float(), length, spec.group_size)
    return (q * expand_groups(scale.float(), length, spec.group_size)).to(dtype)


def fake_quant(x: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Quantize then dequantize, returning x's dtype."""
    return dequantize(*quantize(x, spec), spec, dtype=x.dtype)


def fake_quant_static(x: torch.Tensor, scale, zero, spec: IntSpec) -> torch.Tensor:
    """Fake-quant with fixed scales (static activation quantization)."""
    return dequantize(quantize_with(x, scale, zero, spec), scale, zero, spec, dtype=x.dtype)


def fp_quantize(x: torch.Tensor, fmt: str):
    """FP8/FP16 quantization with one float32 scale per row (FP16 needs none: scale is 1)."""
    if fmt not in FP_FORMATS:
        raise ValueError(f"float format {fmt!r}: allowed {sorted(FP_FORMATS)}")
    dtype = FP_FORMATS[fmt]
    if fmt == "fp16":
        return x.to(torch.float16), torch.ones(x.shape[:-1] + (1,), device=x.device)
    fmax = torch.finfo(dtype).max
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / fmax).clamp_min(1e-12)
    return (x.float() / scale).to(dtype), scale


def fp_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def fp_fake_quant(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return fp_dequantize(*fp_quantize(x, fmt), dtype=x.dtype)
