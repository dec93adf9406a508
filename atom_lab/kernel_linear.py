"""Kernel backend for quantized models: QuantLinear layers -> the CUDA W4A4 kernels.

`convert_to_kernel_backend(model, qcfg)` replaces, per decoder layer and per linear input (q/k/v,
o, gate/up, down), the fake-quant QuantLinear modules by KernelLinear modules that run the
activation-quantize kernel (once per input, shared by q/k/v and by gate/up) and the W4A4 GEMM
on the packed weights the quantizer already produced (QuantLinear.packed_weight). Where the
reordering added a run-time gather (GatheredNorm, InputGather) the gather moves into the quantize
kernel (the module's `fused` flag). Every quantize kernel gathers, through the index reordered
within groups for fewer shared-memory bank conflicts (gather_plan: the same groups, so the same
outputs; the packed weights follow), also where the input comes in order (down_proj).
Everything else (norms, attention, KV cache) stays in torch.

Requirements: an FP16 model on a CUDA device; dynamic activation quantization, a_bits <= 4,
w_bits <= 4 symmetric with a packed weight, INT8 outliers, and the kernel shapes of kernel_ops
(group 64/128, K - k a multiple of the group and of 64, k a multiple of 16). SmolLM2-135M does not
fit them (K - k = 448): its linears stay on the fake-quant path (strict=False) or raise (strict).
"""
from __future__ import annotations

import torch
from torch import nn

from atom_lab import kernel_ops
from atom_lab.calibration import LINEAR_INPUTS
from atom_lab.config import QuantConfig
from atom_lab.cuda import require_kernel_backend
from atom_lab.formats import MixedQuantized
from atom_lab.gather_plan import bank_aware_order, permute_packed_columns
from atom_lab.models import decoder_layers
from atom_lab.qlinear import QuantLinear
from atom_lab.reorder import GatheredNorm, InputGather, NORM_OF_INPUT


class KernelActQuant(nn.Module):
    """Dynamic per-token activation quantization on the GPU kernel (reorder gather fused when
    `index` is set). The linears reading one input share it: the last result is reused while the
    same tensor comes back, so each input is quantized once per forward."""

    def __init__(self, bits: int, group_size: int, clip: float, outliers: int,
                 index: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group_size, self.clip, self.outliers = bits, group_size, clip, outliers
        self.register_buffer("index", None if index is None else index.to(torch.int32).clone())
        self.consumers = 0
        self._cache = None  # (input, its version, result, uses left)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, group_size={self.group_size}, clip={self.clip}, "
                f"outliers={self.outliers}, gather_fused={self.index is not None}")

    def forward(self, x: torch.Tensor) -> MixedQuantized:
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == x._version:
            left = cache[3] - 1
            self._cache = (x, x._version, cache[2], left) if left > 0 else None
            return cache[2]
        q = kernel_ops.quantize_mixed(x.half(), self.outliers, self.bits, self.group_size,
                                      self.clip, self.index)
        self._cache = (x, x._version, q, self.consumers - 1) if self.consumers > 1 else None
        return q


class KernelLinear(nn.Module):
    """y = W4A4 GEMM(quantize(x), packed weight) + bias on the CUDA kernels; FP16 in and out."""

    def __init__(self, packed: MixedQuantized, bias: torch.Tensor | None, act: KernelActQuant):
        super().__init__()
        self.out_features = packed.normal.shape[0]
        self.in_features = packed.k_normal + packed.k_outliers
        self.packed = packed
        self.bias = None if bias is None else nn.Parameter(bias.detach().half(), requires_grad=False)
        self.act = act
        act.consumers += 1

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernel_ops.mixed_gemm(self.act(x), self.packed, self.bias, static_weights=True)
        return y.reshape(*x.shape[:-1], self.out_features)


def unsupported_reason(linear: nn.Module, qcfg: QuantConfig) -> str | None:
    """Why a module cannot run on the kernels, or None if it can."""
    if not isinstance(linear, QuantLinear):
        return f"{type(linear).__name__} is not a QuantLinear"
    if linear.packed_weight is None:
        return "no packed weight (w_bits > 4, asymmetric weights or non-INT8 outliers)"
    act = linear.act_quantizer
    if act is None or act.bits > 4:
        return f"activations are not quantized to <= 4 bits (a_bits={qcfg.a_bits})"
    if not act.dynamic:
        return "static activation scales (the kernels compute dynamic per-token scales)"
    if act.outliers and act.outlier_bits != "int8":
        return f"outlier_bits={act.outlier_bits!r} (the kernels keep INT8 outliers)"
    if linear.weight.dtype != torch.float16 or not linear.weight.is_cuda:
        return f"weights are {linear.weight.dtype} on {linear.weight.device}, need float16 on CUDA"
    packed = linear.packed_weight
    if (packed.k_outliers, packed.group_size) != (act.outliers, act.group_size):
        return (f"weight (k={packed.k_outliers}, G={packed.group_size}) and activation "
                f"(k={act.outliers}, G={act.group_size}) layouts differ")
    try:
        kernel_ops.check_mixed_layout(linear.in_features, act.outliers, act.group_size, act.bits)
    except kernel_ops.KernelShapeError as exc:
        return str(exc)
    return None


def _gather_module(layer: nn.Module, input_name: str) -> GatheredNorm | InputGather | None:
    if input_name in NORM_OF_INPUT:
        norm = getattr(layer, NORM_OF_INPUT[input_name])
        return norm if isinstance(norm, GatheredNorm) else None
    if input_name == "o":
        gather = getattr(layer.self_attn, "o_proj_gather", None)
        return gather if isinstance(gather, InputGather) else None
    return None  # down_proj: the permutation lives in the gate/up rows


def convert_to_kernel_backend(model: nn.Module, qcfg: QuantConfig, strict: bool = True) -> dict:
    """Swap supported QuantLinear groups for KernelLinear; returns {'converted': [...],
    'skipped': {path: reason}}. strict=True raises KernelShapeError on the first unsupported one."""
    require_kernel_backend()
    converted, skipped = [], {}
    for i, layer in enumerate(decoder_layers(model)):
        for input_name, paths in LINEAR_INPUTS.items():
            linears = [layer.get_submodule(p) for p in paths]
            reasons = {p: unsupported_reason(m, qcfg) for p, m in zip(paths, linears)}
            bad = {f"layers.{i}.{p}": r for p, r in reasons.items() if r is not None}
            if bad:
                if strict:
                    path, reason = next(iter(bad.items()))
                    raise kernel_ops.KernelShapeError(f"{path} cannot run on the W4A4 kernels: "
                                                      f"{reason}")
                skipped.update(bad)
                continue
            act_q = linears[0].act_quantizer
            gather = _gather_module(layer, input_name)
            # The bank-aware order within groups (same groups, same outputs), also where the
            # input arrives in order (down_proj): in-order columns gather with 8-way conflicts.
            index = (gather.index if gather is not None
                     else torch.arange(linears[0].in_features, device=linears[0].weight.device))
            perm = bank_aware_order(index, act_q.outliers, act_q.group_size)
            index = index[perm.to(index.device)]
            act = KernelActQuant(act_q.bits, act_q.group_size, act_q.clip, act_q.outliers, index)
            for path, linear in zip(paths, linears):
                parent, _, attr = path.rpartition(".")
                packed = permute_packed_columns(linear.packed_weight, perm)
                setattr(layer.get_submodule(parent), attr, KernelLinear(packed, linear.bias, act))
                converted.append(f"layers.{i}.{path}")
            if gather is not None:
                gather.fused = True  # the quantize kernel gathers; the module passes x through
    return {"converted": converted, "skipped": skipped}
