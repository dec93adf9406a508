"""GPTQ (Frantar et al., 2022) in Atom's mixed layout.

Columns are quantized one at a time in blocks of `block_size`; each column's rounding error is
fed back into the not-yet-quantized columns through the inverse Hessian (its upper Cholesky
factor), with lazy batch updates between blocks. Group scales of the normal columns are computed
when a group starts, from the error-updated weights, in the same way as RTN (fp16-rounded, shared
by `channel_group` rows). The outlier columns (the last k) receive the feedback of all normal
columns and are then quantized per row (INT8 RTN, or FP8/FP16), as Atom does.

act_order (off by default, as in Atom) processes the normal columns by decreasing Hessian
diagonal; groups then stay the consecutive column groups of the original order, with their
scales fixed up front ("static groups"), so the packed format is unchanged.
"""
from __future__ import annotations

import torch

from atom_lab.primitives import PER_ROW, IntSpec
from atom_lab.weights import WeightSpec, assemble, quantize_outlier_columns, shared_scales


class HessianAccumulator:
    """H = 2/n sum_t x_t x_t^T over calibration tokens, accumulated in float32 on `device`."""

    def __init__(self, columns: int, device=None):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.hessian.shape[0]).to(self.hessian.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian.mul_(self.tokens / (self.tokens + m))
        self.tokens += m
        self.hessian.addmm_(x.T, x, alpha=2.0 / self.tokens)


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H); more if needed."""
    h = hessian.clone()
    damp = percdamp * torch.mean(torch.diag(h))
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + torch.diag_embed(damp.expand(h.shape[0])))
        if info == 0:
            break
        damp = damp * 10 if damp > 0 else torch.mean(torch.diag(h)) * 1e-4 + 1e-8
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even after damping")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True)


def _quantize_column(w, scale, zero, spec):
    s = scale.float()
    q = torch.round(w / s)
    if zero is not None:
        q = q + zero.float()
    q = q.clamp(spec.qmin, spec.qmax)
    dq = (q - zero.float()) * s if zero is not None else q * s
    return q, dq


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec,
                         percdamp: float = 0.01, block_size: int = 128, act_order: bool = False):
    """GPTQ of weight [N, K] (outliers last) with Hessian [K, K] of its input.

    Returns (dequantized float32 weight [N, K] on the Hessian's device, MixedQuantized | None).
    """
    spec.check(weight)
    device = hessian.device
    w = weight.detach().to(device, torch.float32).clone()
    n, k = w.shape
    kn = k - spec.outliers
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    nspec = spec.normal
    g = spec.group_size if 0 < spec.group_size < kn else kn  # columns per group
    n_groups = -(-kn // g)
    scales = torch.empty(n, n_groups, dtype=nspec.scale_dtype, device=device)
    zeros = None if spec.symmetric else torch.empty_like(scales)
    perm = torch.arange(k, device=device)
    if act_order:
        perm[:kn] = torch.argsort(torch.diag(h)[:kn], descending=True)
        _set_static_group_scales(w[:, :kn], nspec, g, spec.channel_group, scales, zeros)
        w, h = w[:, perm], h[perm][:, perm]
    group_of = (perm[:kn] // g).tolist()

    hinv = inverse_hessian_cholesky(h, percdamp)
    codes = torch.empty(n, kn, dtype=nspec.code_dtype, device=device)
    for i1 in range(0, kn, block_size):
        i2 = min(i1 + block_size, kn)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            grp = group_of[col]
            if not act_order and col == grp * g:  # a group starts: scales from updated weights
                end = min(col + g, kn)
                src = w1[:, j : j + end - col]
                if end > i2:  # the group runs past this block
                    src = torch.cat([src, w[:, i2:end]], dim=1)
                s, z = shared_scales(src, _with_group(nspec, PER_ROW), spec.channel_group)
                scales[:, grp] = s[:, 0]
                if zeros is not None:
                    zeros[:, grp] = z[:, 0]
            z = None if zeros is None else zeros[:, grp]
            q, dq = _quantize_column(w1[:, j], scales[:, grp], z, nspec)
            codes[:, col] = q.to(codes.dtype)
            e = (w1[:, j] - dq) / hinv1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * hinv1[j, j:].unsqueeze(0)
            err1[:, j] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm[:kn])]
    outlier_block = quantize_outlier_columns(w[:, kn:], spec.outlier_bits) if spec.outliers \
        else (None, None, None)
    return assemble(codes, scales, zeros, outlier_block, spec)


def _with_group(spec: IntSpec, group_size: int) -> IntSpec:
    return IntSpec(spec.bits, spec.symmetric, group_size, spec.clip, spec.scale_dtype)


def _set_static_group_scales(w_normal, nspec, g, channel_group, scales, zeros):
    """act_order: every group's scale from the weights before any feedback."""
    s, z = shared_scales(w_normal, _with_group(nspec, g), channel_group)
    scales.copy_(s)
    if zeros is not None:
        zeros.copy_(z)
