"""Weight quantization in Atom's mixed layout, round-to-nearest (RTN); scale helpers shared by GPTQ.

A weight [N, K] has its input columns reordered so the `outliers` outlier columns are the last k.
Normal columns: `bits`, groups of `group_size` columns (0: one group per row), clip, symmetric
(or asymmetric). `channel_group` adjacent output rows share one scale per group (Atom's
weight_channel_group = 2: the scale covers the absmax over both rows). Outlier columns: INT8 with
one scale per output row, or FP8 / FP16 (outlier_bits).

When the result fits formats.MixedQuantized (bits <= 4, symmetric, INT8 outliers) the packed codes
are returned too: the GEMM kernels consume those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atom_lab.config import QuantConfig
from atom_lab.formats import MixedQuantized, outlier_spec, pack_nibbles
from atom_lab.primitives import IntSpec, compute_scales, dequantize, fp_fake_quant, quantize, quantize_with


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    group_size: int = 0
    clip: float = 1.0
    symmetric: bool = True
    outliers: int = 0
    outlier_bits: str = "int8"
    channel_group: int = 1

    @classmethod
    def from_config(cls, qcfg: QuantConfig, outliers: int | None = None) -> "WeightSpec":
        return cls(bits=qcfg.w_bits, group_size=qcfg.group_size, clip=qcfg.w_clip,
                   symmetric=qcfg.w_sym, outliers=qcfg.outliers if outliers is None else outliers,
                   outlier_bits=qcfg.outlier_bits, channel_group=qcfg.w_channel_group)

    @property
    def normal(self) -> IntSpec:
        return IntSpec(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size,
                       clip=self.clip)

    @property
    def packable(self) -> bool:
        return self.bits <= 4 and self.symmetric and (self.outliers == 0 or
                                                      self.outlier_bits == "int8")

    def check(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        if not 0 <= self.outliers < k:
            raise ValueError(f"quant.outliers={self.outliers} for a weight with {k} input columns")
        if n % self.channel_group:
            raise ValueError(f"quant.w_channel_group={self.channel_group} does not divide the "
                             f"{n} output rows of a weight")
        if self.packable and (k - self.outliers) % 2:
            raise ValueError(f"{k - self.outliers} normal columns: the packed format needs an even "
                             f"count (quant.outliers={self.outliers})")


def shared_scales(w: torch.Tensor, spec: IntSpec, channel_group: int):
    """compute_scales(w, spec) with `channel_group` adjacent rows sharing each group's range.

    Rows r..r+cg-1 are interleaved column by column, so group g of the interleaved row holds
    exactly the cg x G block of group g of those rows (the partial last group included).
    """
    if channel_group == 1:
        return compute_scales(w, spec)
    n, k = w.shape
    blocks = w.reshape(n // channel_group, channel_group, k).transpose(1, 2)
    wide = blocks.reshape(n // channel_group, k * channel_group)
    group = spec.group_size * channel_group if spec.group_size > 0 else spec.group_size
    wide_spec = IntSpec(spec.bits, spec.symmetric, group, spec.clip, spec.scale_dtype)
    scale, zero = compute_scales(wide, wide_spec)
    repeat = lambda t: None if t is None else t.repeat_interleave(channel_group, dim=0)
    return repeat(scale), repeat(zero)


def quantize_outlier_columns(w_out: torch.Tensor, outlier_bits: str):
    """Outlier block [N, k] -> (dequantized float32, int8 codes or None, fp16 scales or None)."""
    if outlier_bits != "int8":
        return fp_fake_quant(w_out.float(), outlier_bits), None, None
    codes, scales, _ = quantize(w_out.float(), outlier_spec())
    return dequantize(codes, scales, None, outlier_spec()), codes, scales


def assemble(normal_codes, normal_scales, normal_zeros, outlier_block, spec: WeightSpec):
    """Dequantized weight [N, K] float32 and its MixedQuantized packing (or None).

    outlier_block = quantize_outlier_columns(...) of the last k columns.
    """
    normal = dequantize(normal_codes, normal_scales, normal_zeros, spec.normal)
    o_deq, o_codes, o_scales = outlier_block
    w_hat = torch.cat([normal, o_deq], dim=-1) if spec.outliers else normal
    if not spec.packable:
        return w_hat, None
    n = normal_codes.shape[0]
    if not spec.outliers:
        o_codes = torch.zeros(n, 0, dtype=torch.int8, device=w_hat.device)
        o_scales = torch.ones(n, 1, dtype=torch.float16, device=w_hat.device)
    packed = MixedQuantized(pack_nibbles(normal_codes), normal_scales, o_codes, o_scales,
                            spec.bits, spec.group_size)
    return w_hat, packed


def rtn_quantize_weight(weight: torch.Tensor, spec: WeightSpec):
    """RTN: weight [N, K] (outliers last) -> (dequantized float32 [N, K], MixedQuantized | None)."""
    spec.check(weight)
    w = weight.detach().float()
    kn = w.shape[1] - spec.outliers
    scale, zero = shared_scales(w[:, :kn], spec.normal, spec.channel_group)
    codes = quantize_with(w[:, :kn], scale, zero, spec.normal)
    outlier_block = quantize_outlier_columns(w[:, kn:], spec.outlier_bits) if spec.outliers \
        else (None, None, None)
    return assemble(codes, scale, zero, outlier_block, spec)
