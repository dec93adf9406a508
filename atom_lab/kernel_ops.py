"""Python bindings of the W4A4 kernels: activation quantization and the mixed-precision GEMM.

kernels/quantize.cu turns FP16 activations into formats.MixedQuantized (the reorder gather fused,
optionally RMSNorm or SiLU(gate) * up fused in front); kernels/w4a4_gemm.cu multiplies two
MixedQuantized operands on INT8 tensor cores into FP16. Operands are torch CUDA tensors; kernels
launch on torch's current stream with raw device pointers (no copies).

What the kernels support (anything else raises KernelShapeError, a ValueError, naming the numbers):
  group size G in {64, 128}; K - k a multiple of G and of 64; k (outliers) a multiple of 16, at
  most 256; K a multiple of 8; N even; any M >= 1; bits 2..4 (codes in 4-bit containers).
  SmolLM2-135M (K = 576 with 128 outliers: K - k = 448 is not a multiple of 128) is NOT supported:
  its layers stay on the fake-quant path.

The shape checks need no GPU; everything else needs CuPy and a CUDA device (atom_lab.cuda).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from atom_lab.cuda import get_kernel, require_kernel_backend, torch_current_stream
from atom_lab.formats import MixedQuantized

SUPPORTED_GROUPS = (64, 128)
KN_ALIGN = 64  # normal columns: whole 32-byte halves of a 64-byte K-tile
OUTLIER_ALIGN = 16  # outlier columns: whole 16-byte cp.async chunks
MAX_OUTLIERS = 256  # the quantize kernel keeps 8 outliers a lane in registers
K_ALIGN = 8  # 16-byte vector loads of FP16 rows
QUANT_THREADS = 256
DEFAULT_SMEM = 48 * 1024

TC_BN, TC_STAGES, TILE_BYTES = 128, 4, 64
SKINNY_WARPS = 8
# variant -> (rows of a CTA tile, columns of a CTA tile, threads)
GEMM_VARIANTS = {
    "tc_m128": (128, TC_BN, 256),
    "tc_m64": (64, TC_BN, 128),
    "tc1_m128": (128, TC_BN, 256),  # first version (per-half fragments, ordered mma): comparison
    "skinny_m16n16": (16, 16, 32 * SKINNY_WARPS),
    "skinny_m16n32": (16, 32, 32 * SKINNY_WARPS),
    "skinny_m32n16": (32, 16, 32 * SKINNY_WARPS),
    "skinny_m64n16": (64, 16, 32 * SKINNY_WARPS),
    # round 2: fragment words streamed through a per-thread cp.async ring (depth 4, or 3)
    "ring_m16n16": (16, 16, 32 * SKINNY_WARPS),
    "ring3_m16n16": (16, 16, 32 * SKINNY_WARPS),
    "ring_m16n32": (16, 32, 32 * SKINNY_WARPS),
    "ring_m32n16": (32, 16, 32 * SKINNY_WARPS),
}
RING_DEPTH = {"ring_m16n16": 4, "ring3_m16n16": 3, "ring_m16n32": 4, "ring_m32n16": 4}

# Quantize kernels: "row" (round 1) = one block a row, load then quantize; "ring" = persistent
# blocks, each row staged by cp.async into one of two buffers while the previous one is quantized.
# The suffix caps resident blocks a SM in the persistent grid (the default is the occupancy limit).
QUANT_VARIANTS = {"row": None, "ring": 8, "ring_b4": 4, "ring_b2": 2, "ring_b1": 1}
QUANT_RING_MAX_ROWS = 256  # "auto": ring up to here (10% faster), row above (0-12% faster)


def choose_quant_variant(m: int) -> str:
    """The quantize kernel for M rows (same-run timings in experiments/results/gemm_h100_round2.md)."""
    return "ring" if m <= QUANT_RING_MAX_ROWS else "row"
SMEM_PER_SM = 227 * 1024
REGS_PER_SM = 65536


class KernelShapeError(ValueError):
    """A shape or setting the CUDA kernels do not support (the fake-quant path still does)."""


def check_mixed_layout(k_total: int, k_outliers: int, group_size: int, bits: int = 4) -> None:
    """Raise KernelShapeError unless a [rows, K] operand with these settings fits the kernels."""
    if group_size not in SUPPORTED_GROUPS:
        raise KernelShapeError(f"group_size={group_size}: the W4A4 kernels support groups "
                               f"{SUPPORTED_GROUPS} (per-row scales, group 0, are not supported)")
    if not 2 <= bits <= 4:
        raise KernelShapeError(f"bits={bits}: the W4A4 kernels hold codes of 2..4 bits")
    if not 0 <= k_outliers <= MAX_OUTLIERS or k_outliers % OUTLIER_ALIGN:
        raise KernelShapeError(f"outliers={k_outliers}: the kernels need 0..{MAX_OUTLIERS} outlier "
                               f"channels in multiples of {OUTLIER_ALIGN}")
    kn = k_total - k_outliers
    if kn <= 0 or kn % group_size or kn % KN_ALIGN:
        raise KernelShapeError(
            f"K={k_total} with outliers={k_outliers} leaves K-k={kn} normal channels: the kernels "
            f"need a positive multiple of group_size={group_size} and of {KN_ALIGN}")
    if k_total % K_ALIGN:
        raise KernelShapeError(f"K={k_total}: the quantize kernels need K a multiple of {K_ALIGN}")


def check_gemm_operands(a: MixedQuantized, w: MixedQuantized) -> tuple[int, int, int, int]:
    """Validate two MixedQuantized operands for mixed_gemm; return (M, N, K - k, k)."""
    for name, q in (("activation", a), ("weight", w)):
        rows = q.normal.shape[0]
        want = {"normal": (torch.uint8, 2), "normal_scales": (torch.float16, 2),
                "outlier": (torch.int8, 2), "outlier_scales": (torch.float16, 2)}
        for field, (dtype, ndim) in want.items():
            t = getattr(q, field)
            if t.dtype != dtype or t.dim() != ndim or t.shape[0] != rows:
                raise KernelShapeError(f"{name}.{field}: expected {dtype} [{rows}, ...], got "
                                       f"{t.dtype} {list(t.shape)}")
        check_mixed_layout(q.k_normal + q.k_outliers, q.k_outliers, q.group_size, q.bits)
        if q.normal_scales.shape[1] != q.k_normal // q.group_size:
            raise KernelShapeError(f"{name}.normal_scales has {q.normal_scales.shape[1]} groups, "
                                   f"expected (K-k)/G = {q.k_normal // q.group_size}")
    if (a.k_normal, a.k_outliers, a.group_size) != (w.k_normal, w.k_outliers, w.group_size):
        raise KernelShapeError(
            f"operands disagree: activation (K-k={a.k_normal}, k={a.k_outliers}, G={a.group_size}) vs "
            f"weight (K-k={w.k_normal}, k={w.k_outliers}, G={w.group_size})")
    n = w.normal.shape[0]
    if n % 2:
        raise KernelShapeError(f"N={n} weight rows: the GEMM writes column pairs, N must be even")
    return a.normal.shape[0], n, a.k_normal, a.k_outliers


def choose_gemm_variant(m: int) -> str:
    """The GEMM kernel for M rows (thresholds from experiments/results/gemm_h100.md)."""
    if m <= 16:  # round 2's ring_m16n16 measured 3-13% slower (gemm_h100_round2.md)
        return "skinny_m16n16"
    if m <= 64:
        return "skinny_m32n16"
    return "tc_m64"


def gemm_flops(m: int, n: int, k_total: int) -> int:
    return 2 * m * n * k_total


def mixed_bytes(rows: int, kn: int, k: int, group_size: int) -> int:
    """Bytes of one MixedQuantized operand: packed codes, group scales, outliers, outlier scales."""
    return rows * (kn // 2 + 2 * (kn // group_size) + k + 2)


# ------------------------------------------------------------- references of the fused producers


def rmsnorm_fp16_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm on fp16 input, as transformers computes it: the fused kernel's contract."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).half()
    return (weight.float() * normed.float()).half()


def silu_mul_fp16_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of an fp16 Llama MLP (each op rounds to fp16): the fused kernel's contract."""
    act = torch.nn.functional.silu(gate.float()).half()
    return (act.float() * up.float()).half()


def mixed_agreement(q: MixedQuantized, ref: MixedQuantized) -> dict:
    """How closely two MixedQuantized tensors agree: fractions of equal codes and scales, and the
    largest code difference (normal codes compared unpacked)."""
    from atom_lab.formats import unpack_nibbles

    qc = unpack_nibbles(q.normal.cpu(), signed=True).int()
    rc = unpack_nibbles(ref.normal.cpu(), signed=True).int()
    oc, orc = q.outlier.cpu().int(), ref.outlier.cpu().int()
    same = lambda a, b: (a.view(torch.int16) == b.view(torch.int16)).float().mean().item()
    code_diff = torch.cat([(qc - rc).abs().flatten(), (oc - orc).abs().flatten()])
    return {
        "codes_equal": (qc == rc).float().mean().item(),
        "outliers_equal": (oc == orc).float().mean().item() if oc.numel() else 1.0,
        "scales_equal": same(q.normal_scales.cpu(), ref.normal_scales.cpu()),
        "outlier_scales_equal": same(q.outlier_scales.cpu(), ref.outlier_scales.cpu()),
        "max_code_diff": int(code_diff.max().item()) if code_diff.numel() else 0,
    }


# ---------------------------------------------------------------------------------------- launch


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


@functools.lru_cache(maxsize=None)
def _kernel(module: str, name: str, smem: int):
    kernel = get_kernel(module, name)
    if smem:  # above 48 KB a kernel must opt in to its dynamic shared memory
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


def _launch(module: str, name: str, grid, block, args, smem: int, device: torch.device) -> None:
    import cupy

    kernel = _kernel(module, name, smem if smem > DEFAULT_SMEM // 2 else 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch_current_stream(index)
    with cupy.cuda.Device(index), stream:
        kernel(grid, block, args, shared_mem=smem)


def _require_cuda(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor for the kernel backend, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    _require_cuda(name, x, torch.float16)
    x = x.reshape(-1, x.shape[-1])
    return x if x.is_contiguous() else x.contiguous()


def _index(reorder_index: torch.Tensor | None, k_total: int, device) -> torch.Tensor | None:
    if reorder_index is None:
        return None
    if reorder_index.dim() != 1 or reorder_index.numel() != k_total:
        raise ValueError(f"reorder_index must be a vector of K={k_total} column indices, got shape "
                         f"{list(reorder_index.shape)}")
    return reorder_index.to(device=device, dtype=torch.int32).contiguous()


# ---------------------------------------------------------------------------------- quantization


def _check_out(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or t.device != device or not t.is_contiguous():
        raise ValueError(f"out.{name} must be a contiguous {dtype} {list(shape)} on {device}, got "
                         f"{t.dtype} {list(t.shape)} on {t.device}")


def _mixed_out(out: MixedQuantized | None, m: int, kn: int, k: int, group_size: int, bits: int,
               device) -> MixedQuantized:
    """The result buffers of a quantize launch: fresh, or the caller's after checking them."""
    layout = {"normal": ((m, kn // 2), torch.uint8),
              "normal_scales": ((m, kn // group_size), torch.float16),
              "outlier": ((m, k), torch.int8),
              "outlier_scales": ((m, 1), torch.float16)}
    if out is None:
        return MixedQuantized(**{f: torch.empty(shape, dtype=dt, device=device)
                                 for f, (shape, dt) in layout.items()},
                              bits=bits, group_size=group_size)
    for f, (shape, dt) in layout.items():
        _check_out(f, getattr(out, f), shape, dt, device)
    out.bits, out.group_size = bits, group_size
    return out


def _quantize(kind: str, x, up, norm_weight, eps, k_outliers, bits, group_size, clip,
              reorder_index, out: MixedQuantized | None, variant: str = "auto") -> MixedQuantized:
    if variant != "auto" and variant not in QUANT_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed 'auto' or {sorted(QUANT_VARIANTS)}")
    require_kernel_backend()
    rows = _rows(x, "x")
    m, k_total = rows.shape
    check_mixed_layout(k_total, k_outliers, group_size, bits)
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip={clip}: clip ratio must lie in (0, 1]")
    if up is not None:
        up = _rows(up, "up")
        if up.shape != rows.shape:
            raise ValueError(f"gate {list(rows.shape)} and up {list(up.shape)} must have one shape")
    if norm_weight is not None:
        _require_cuda("norm_weight", norm_weight, torch.float16)
        if norm_weight.shape != (k_total,):
            raise ValueError(f"norm_weight must be [{k_total}], got {list(norm_weight.shape)}")
        norm_weight = norm_weight.contiguous()
    idx = _index(reorder_index, k_total, rows.device)
    kn = k_total - k_outliers
    out = _mixed_out(out, m, kn, k_outliers, group_size, bits, rows.device)
    if m == 0:
        return out
    qmax = 2 ** (bits - 1) - 1
    args = (_ptr(rows), _ptr(up), _ptr(norm_weight), np.float32(eps), _ptr(idx), np.int32(k_total),
            np.int32(k_outliers), np.float32(clip), np.int32(qmax), _ptr(out.normal),
            _ptr(out.normal_scales), _ptr(out.outlier), _ptr(out.outlier_scales))
    name = f"{kind}_g{group_size}"
    if variant == "auto":
        variant = choose_quant_variant(m)
    if variant == "row":
        _launch("quantize", name, (m,), (QUANT_THREADS,), args, 2 * k_total, rows.device)
        return out
    smem = 2 * 2 * k_total * (2 if up is not None else 1)  # two buffers of the row (gate and up)
    grid = min(m, _resident_blocks("quantize", f"{name}_ring", smem, QUANT_THREADS,
                                   QUANT_VARIANTS[variant], rows.device))
    _launch("quantize", f"{name}_ring", (grid,), (QUANT_THREADS,), args + (np.int32(m),), smem,
            rows.device)
    return out


def _resident_blocks(module: str, name: str, smem: int, threads: int, cap: int, device) -> int:
    """Blocks of a persistent grid: SMs x the blocks a SM holds (registers, shared memory, cap)."""
    kernel = _kernel(module, name, smem if smem > DEFAULT_SMEM // 2 else 0)
    regs = max(getattr(kernel, "num_regs", 64), 1)
    regs_per_block = ((regs + 7) // 8 * 8) * threads
    per_sm = min(cap, REGS_PER_SM // regs_per_block, SMEM_PER_SM // max(smem + 1024, 1),
                 2048 // threads)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(per_sm, 1) * torch.cuda.get_device_properties(index).multi_processor_count


def quantize_mixed(x: torch.Tensor, k_outliers: int, bits: int = 4, group_size: int = 128,
                   clip: float = 1.0, reorder_index: torch.Tensor | None = None,
                   out: MixedQuantized | None = None, variant: str = "auto") -> MixedQuantized:
    """FP16 x [..., K] -> MixedQuantized of rows x.reshape(-1, K)[:, reorder_index].

    Bit-exact with formats.encode_mixed(x[..., reorder_index], k_outliers, bits, group_size, clip).
    reorder_index (output column c takes input column idx[c]) must be a permutation of 0..K-1.
    out: preallocated result tensors (written in place), e.g. poisoned by tests.
    variant: "auto" or a QUANT_VARIANTS key (kernel organisation; all give the same bits).
    """
    return _quantize("quantize_mixed", x, None, None, 0.0, k_outliers, bits, group_size, clip,
                     reorder_index, out, variant)


def rmsnorm_quantize_mixed(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, k_outliers: int,
                           bits: int = 4, group_size: int = 128, clip: float = 1.0,
                           reorder_index: torch.Tensor | None = None,
                           out: MixedQuantized | None = None, variant: str = "auto") -> MixedQuantized:
    """Fused LlamaRMSNorm (fp16 semantics: weight * (x * rsqrt(mean x^2 + eps)).half()) + reorder
    + quantize. norm_weight is in the input (un-reordered) channel order."""
    return _quantize("rmsnorm_quantize_mixed", x, None, norm_weight, eps, k_outliers, bits,
                     group_size, clip, reorder_index, out, variant)


def silu_mul_quantize_mixed(gate: torch.Tensor, up: torch.Tensor, k_outliers: int, bits: int = 4,
                            group_size: int = 128, clip: float = 1.0,
                            reorder_index: torch.Tensor | None = None,
                            out: MixedQuantized | None = None, variant: str = "auto") -> MixedQuantized:
    """Fused silu(gate).half() * up (fp16, as a Llama MLP computes it) + quantize."""
    return _quantize("silu_mul_quantize_mixed", gate, up, None, 0.0, k_outliers, bits, group_size,
                     clip, reorder_index, out, variant)


# ------------------------------------------------------------------------------------------ GEMM


def gemm_smem_bytes(variant: str, group_size: int, k_normal: int = 0) -> int:
    bm, bn, threads = GEMM_VARIANTS[variant]
    if variant in RING_DEPTH:  # ring [S][2*MT + NT][threads][G/8 bytes] + scales [groups][bm + bn]
        loads = 2 * (bm // 16) + bn // 8
        return (RING_DEPTH[variant] * loads * threads * group_size // 8
                + 2 * (k_normal // group_size) * (bm + bn))
    if not variant.startswith("tc"):
        return 0  # static shared memory only
    groups_per_tile = 128 // group_size
    return TC_STAGES * (bm + bn) * (TILE_BYTES + 2 * groups_per_tile)


def mixed_gemm(a: MixedQuantized, w: MixedQuantized, bias: torch.Tensor | None = None,
               variant: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """FP16 Y [M, N] = decode(a) @ decode(w)^T (+ bias), as formats.mixed_gemm_reference."""
    require_kernel_backend()
    m, n, kn, k = check_gemm_operands(a, w)
    if variant == "auto":
        variant = choose_gemm_variant(m)
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed 'auto' or {sorted(GEMM_VARIANTS)}")
    tensors = [a.normal, a.normal_scales, a.outlier, a.outlier_scales,
               w.normal, w.normal_scales, w.outlier, w.outlier_scales]
    for i, t in enumerate(tensors):
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError(f"mixed_gemm operands must be contiguous CUDA tensors (operand {i}: "
                             f"{t.device}, contiguous={t.is_contiguous()})")
    if bias is not None:
        _require_cuda("bias", bias, torch.float16)
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
        bias = bias.contiguous()
    dev = a.normal.device
    if out is None:
        y = torch.empty(m, n, dtype=torch.float16, device=dev)
    else:
        _check_out("y", out, (m, n), torch.float16, dev)
        y = out
    if m == 0:
        return y
    bm, bn, threads = GEMM_VARIANTS[variant]
    grid = ((n + bn - 1) // bn, (m + bm - 1) // bm)
    args = tuple(_ptr(t) for t in tensors) + (_ptr(bias), _ptr(y), np.int32(m), np.int32(n),
                                              np.int32(kn), np.int32(k))
    _launch("w4a4_gemm", f"w4a4_gemm_{variant}_g{a.group_size}", grid, (threads,), args,
            gemm_smem_bytes(variant, a.group_size, kn), dev)
    return y


def quantized_linear(x: torch.Tensor, w: MixedQuantized, clip: float = 1.0,
                     reorder_index: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp16 -> quantize (gather fused) -> W4A4 GEMM -> [..., N] fp16."""
    a = quantize_mixed(x, w.k_outliers, w.bits, w.group_size, clip, reorder_index)
    y = mixed_gemm(a, w, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def mma_s8_peak_tops(iters: int = 4096, blocks_per_sm: int = 4, warps: int = 8) -> float:
    """Measured INT8 mma.sync m16n8k32 rate (TOPS) of the current GPU, register resident."""
    require_kernel_backend()
    dev = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    seed = torch.randint(1, 2**31 - 1, (32,), dtype=torch.int64, device=dev).to(torch.int32)
    blocks, threads = sms * blocks_per_sm, 32 * warps
    out = torch.empty(blocks * threads, dtype=torch.int32, device=dev)
    args = (_ptr(seed), np.int32(iters), _ptr(out))
    launch = lambda: _launch("w4a4_gemm_peak", "mma_s8_peak", (blocks,), (threads,), args, 0, dev)
    launch()
    torch.cuda.synchronize()
    ops = 2 * 16 * 8 * 32 * 8 * iters * blocks * warps  # 8 chains a warp
    rates = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        rates.append(ops / (start.elapsed_time(end) * 1e-3) / 1e12)
    return sorted(rates)[1]
