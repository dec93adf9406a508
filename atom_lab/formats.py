"""Packed formats: the contract between fake-quant and the CUDA kernels.

Each format is defined once here, with a CPU reference encoder and decoder. The kernels in
`kernels/` must produce (quantize kernels) or consume (GEMM, attention) exactly these tensors.

Nibble packing (`pack_nibbles`): along the last dim, byte j holds element 2j in bits 0..3 (low
nibble) and element 2j+1 in bits 4..7. Signed codes are 4-bit two's complement; unsigned codes
0..15. Codes of fewer than 4 bits (W3A3) use the same 4-bit containers.

MixedQuantized (W4A4 + outliers, Atom): a [rows, K] matrix whose columns are ALREADY REORDERED so
that the k outlier channels are the last k columns. Rows are tokens (activations) or output
channels (weights).
  normal          uint8   [rows, (K - k) / 2]   symmetric `bits`-bit codes, nibble-packed
  normal_scales   float16 [rows, ceil((K - k) / G)]  one scale per (row, group of G columns);
                                                the last group is shorter if G does not divide K-k
  outlier         int8    [rows, k]             symmetric INT8 codes (qmin -128, qmax 127)
  outlier_scales  float16 [rows, 1]             one scale per row for the outlier block
Dequantized value of column c < K-k: code * normal_scales[row, c // G]; of column K-k+j:
outlier[row, j] * outlier_scales[row]. A GEMM of activations A and weights W in this format is
  Y[m, n] = sum_g sa[m, g] sw[n, g] (sum_{c in g} qa[m, c] qw[n, c]) + so_a[m] so_w[n] (qa_o . qw_o)
K - k must be even (two codes a byte).

KVQuantized (4-bit KV cache, Atom): [..., head_dim] per token per head, asymmetric.
  codes   uint8   [..., head_dim / 2]   unsigned codes 0..2^bits-1, nibble-packed
  scales  float16 [..., head_dim / G]   G = kv group size (head_dim by default)
  zeros   float16 [..., head_dim / G]   integer-valued zero points
Dequantized value: (code - zero) * scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atom_lab.primitives import IntSpec, dequantize, quantize

OUTLIER_SPEC_BITS = 8


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 (-8..7) or uint8 (0..15) codes [..., 2n] -> uint8 [..., n]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"nibble packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 [..., n] -> codes [..., 2n]: int8 in -8..7 if signed, else uint8 in 0..15."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    out = torch.stack([lo, hi], dim=-1).flatten(-2)
    if signed:
        return torch.where(out >= 8, out - 16, out).to(torch.int8)
    return out.to(torch.uint8)


@dataclass
class MixedQuantized:
    normal: torch.Tensor
    normal_scales: torch.Tensor
    outlier: torch.Tensor
    outlier_scales: torch.Tensor
    bits: int
    group_size: int

    @property
    def k_outliers(self) -> int:
        return self.outlier.shape[-1]

    @property
    def k_normal(self) -> int:
        return self.normal.shape[-1] * 2


def normal_spec(bits: int, group_size: int, clip: float) -> IntSpec:
    return IntSpec(bits=bits, symmetric=True, group_size=group_size, clip=clip)


def outlier_spec() -> IntSpec:
    return IntSpec(bits=OUTLIER_SPEC_BITS, symmetric=True, group_size=0, clip=1.0)


def encode_mixed(x: torch.Tensor, k_outliers: int, bits: int = 4, group_size: int = 128,
                 clip: float = 1.0) -> MixedQuantized:
    """Reference encoder: x [rows, K] (outliers already the last k columns) -> MixedQuantized."""
    if bits > 4:
        raise ValueError(f"bits={bits}: the packed mixed format holds codes of at most 4 bits")
    K = x.shape[-1]
    if not 0 <= k_outliers <= K:
        raise ValueError(f"k_outliers={k_outliers} must lie in 0..{K}")
    kn = K - k_outliers
    codes, scales, _ = quantize(x[..., :kn], normal_spec(bits, group_size, clip))
    if k_outliers:
        o_codes, o_scales, _ = quantize(x[..., kn:], outlier_spec())
    else:  # an empty outlier block: no codes, unit scales (nothing to reduce over)
        o_codes = torch.zeros(x.shape[:-1] + (0,), dtype=torch.int8, device=x.device)
        o_scales = torch.ones(x.shape[:-1] + (1,), dtype=torch.float16, device=x.device)
    return MixedQuantized(pack_nibbles(codes), scales, o_codes, o_scales, bits, group_size)


def decode_mixed(q: MixedQuantized, dtype=torch.float32) -> torch.Tensor:
    """Reference decoder: MixedQuantized -> dequantized [rows, K]."""
    spec = normal_spec(q.bits, q.group_size, 1.0)
    normal = dequantize(unpack_nibbles(q.normal, signed=True), q.normal_scales, None, spec, dtype)
    outlier = dequantize(q.outlier, q.outlier_scales, None, outlier_spec(), dtype)
    return torch.cat([normal, outlier], dim=-1)


def mixed_gemm_reference(a: MixedQuantized, w: MixedQuantized, dtype=torch.float16) -> torch.Tensor:
    """Y = A_hat @ W_hat^T in float64 from the two packed operands (the GEMM kernel's contract)."""
    ya = decode_mixed(a, torch.float64)
    yw = decode_mixed(w, torch.float64)
    return (ya @ yw.T).to(dtype)


@dataclass
class KVQuantized:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int


def kv_spec(bits: int, group_size: int, clip: float) -> IntSpec:
    return IntSpec(bits=bits, symmetric=False, group_size=group_size, clip=clip)


def encode_kv(x: torch.Tensor, bits: int = 4, group_size: int = 0, clip: float = 1.0) -> KVQuantized:
    """Reference KV encoder: x [..., head_dim] -> asymmetric per (token, head[, group]) codes.

    group_size 0 means one group per head (group = head_dim).
    """
    if bits > 4:
        raise ValueError(f"bits={bits}: the packed KV format holds codes of at most 4 bits")
    codes, scales, zeros = quantize(x, kv_spec(bits, group_size, clip))
    return KVQuantized(pack_nibbles(codes), scales, zeros, bits, group_size)


def decode_kv(q: KVQuantized, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_nibbles(q.codes, signed=False)
    return dequantize(codes, q.scales, q.zeros, kv_spec(q.bits, q.group_size, 1.0), dtype)


def kv_bytes_per_token(head_dim: int, kv_heads: int, bits: int = 4, group_size: int = 0) -> int:
    """Bytes one cached token takes (K and V, codes + scales + zeros) in the KV format."""
    groups = 1 if group_size <= 0 else -(-head_dim // group_size)
    per_head = head_dim // 2 + groups * 2 * 2  # 4-bit containers whatever the code width
    return 2 * kv_heads * per_head
