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

from atom_lab.cuda import get_kernel, launch_early, require_kernel_backend, torch_current_stream
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
# Round 3, small M (kernels/w4a4_gemv.cu, sm_90): one CTA a SM streams its weight-row octets
# through a ring of bulk copies; 15 consumer warps split K, activation fragments in registers.
# variant -> (token tile, weight rows a ring slot, threads)
# gemv2: weights as the mma A operand (two octets an mma), tokens as B; groups in pairs.
GEMV_VARIANTS = {"gemv_m8": (8, 8, 512), "gemv_m16": (16, 8, 512),
                 "gemv2_m8": (8, 8, 512), "gemv2_m16": (16, 8, 512)}
GEMM_VARIANTS.update(GEMV_VARIANTS)
GEMV_CONSUMERS, GEMV_MAX_SLOTS, GEMV_BARRIER_BYTES = 15, 8, 256  # as in the .cu file
GEMV_PARTIAL_BYTES = GEMV_CONSUMERS * 32 * 16  # a slot's partial sums: one float4 a lane
GEMV_GROUPS_PER_WARP = {("gemv_m8", 128): 8, ("gemv_m8", 64): 16,
                        ("gemv_m16", 128): 8, ("gemv_m16", 64): 14,
                        ("gemv2_m8", 128): 8, ("gemv2_m8", 64): 16,
                        ("gemv2_m16", 128): 7, ("gemv2_m16", 64): 12}
# Round 4, small M (kernels/w4a4_gemv.cu, "stream"): a CTA of 8 warps a 16-row weight tile, the
# warps split K and request their weights (two register chunks of 2 groups) before any arithmetic;
# no shared-memory ring, one barrier. "_pdl": the same kernel launched with programmatic stream
# serialization (cuLaunchKernelEx): it requests its weights while the previous kernel finishes and
# waits for it (griddepcontrol.wait) before reading the activations. The weights must therefore
# not be written by the kernel launched just before it (true of a model's weights).
# "streamt": the persistent form for (K-k)/G <= STREAMT_MAX_GROUPS (a warp's K-slice fits its two
# register chunks): STREAM_CTAS_PER_SM CTAs a SM walk the 16-row tiles, the token fragments stay in
# shared memory for every tile, the next tile's weights are requested while the current one is
# multiplied and reduced.
# variant -> (token tile, weight rows a CTA tile, threads)
STREAM_VARIANTS = {f"{form}_m{tile}{launch}": (tile, 16, 256) for form in ("stream", "streamt")
                   for tile in (8, 16) for launch in ("", "_pdl")}
GEMM_VARIANTS.update(STREAM_VARIANTS)
STREAM_WARPS, STREAM_GROUPS, STREAM_CTAS_PER_SM = 8, 2, 2  # as the .cu file (__launch_bounds__)
STREAMT_MAX_GROUPS = STREAM_WARPS * 2 * STREAM_GROUPS
# streamt dispatched from this N up (round 5, H100, gemm_h100_notes.md): with more 16-row weight
# tiles than one wave of CTAs (N = 11008, 12288) walking them is faster; at N = 4096 (one tile a
# CTA) the one-shot stream is faster
STREAMT_MIN_N = 8192
# Large M on Hopper (sm_90a, kernels/w4a4_gemm_sm90.cu): wgmma s8 with activations from
# registers, a producer warpgroup unpacking the weight tile into shared memory, two consumer
# warpgroups. wg: each consumer folds one 64-column half while the other half's wgmmas run;
# wgs: one m64n128 sum a group, folded after it completes (comparison).
# wg1: round 3's v3 (one packed activation buffer instead of two): the dispatched one (round 4,
# experiments/results/gemm_h100_notes.md: fastest on 11 of 12 rows with M >= 256, 2-3% over wg).
# Round 4 attempts, kept for comparison: wgc: wg1 whose consumer threads stream their own
# activation words and scales through a private shared-memory ring (cp.async, 3 stages ahead);
# wgp*: persistent grid, the producer also copies the activation codes and both operands' scales
# into shared memory (cp.async), any K fits; wgp: two consumer warpgroups, pipelined halves;
# wgp3: three consumer warpgroups (tile 192 x 128), serial halves (issue, wait, fold).
WG_VARIANTS = {"wg_m128": (128, 128, 384), "wgs_m128": (128, 128, 384),
               "wg1_m128": (128, 128, 384), "wgc_m128": (128, 128, 384),
               "wgp_m128": (128, 128, 384), "wgp3_m192": (192, 128, 512)}
WG_DEFAULT = "wg1_m128"  # choose_gemm_variant's wgmma kernel
GEMM_VARIANTS.update(WG_VARIANTS)
WG_STAGES, WG_RING, WG_STAGE_K = 8, 4, 128  # as STAGES, RING, STAGE_K in the .cu file
# round-3 family: variant -> (unpacked stages, producer ring, consumer activation ring), as DEFINE_WG
WG_LAYOUT = {"wg_m128": (WG_STAGES, WG_RING, 0), "wgs_m128": (WG_STAGES, WG_RING, 0),
             "wg1_m128": (WG_STAGES, WG_RING, 0), "wgc_m128": (6, 4, 4)}
WGP_STAGES = {"wgp_m128": 6, "wgp3_m192": 6}  # as DEFINE_WGP
WGP_RING, WGP_SCALE_WORDS = 4, 2  # as WGP_RING, SCALE_WORDS in the .cu file
WG_MIN_M = 128  # wgmma from here up: 1.2-1.4x tc_m64 at M = 256 (gemm_h100.md); 65..255 unmeasured

# Quantize kernels: "row" (round 1) = one block a row, load then quantize; "ring" = persistent
# blocks, each row staged by cp.async into one of two buffers while the previous one is quantized.
# The suffix caps resident blocks a SM in the persistent grid (the default is the occupancy limit).
# "wide" (round 3) = the ring's persistent blocks with 16 columns a lane (a group's per-group work
# shared by 4-8 groups a warp instruction), gather offsets staged once a block, half2 max/clamp.
# "wide4": the same with 3 rows a block in flight instead of 1.
# "pipe" (round 10, plain quantize, sm_90): the wide kernel's warp tasks fed by producer lanes'
# bulk row copies through a ring of staged rows (full / empty barriers, no block barrier), one block
# a SM, one warp a task of the row (replicas over the rows, up to PIPE_MAX_WARPS warps).
QUANT_VARIANTS = {"row": None, "ring": 8, "ring_b4": 4, "ring_b2": 2, "ring_b1": 1, "wide": 8,
                  "wide4": 8, "pipe": 1}
WIDE_COLS = 512  # columns of one warp task in the wide kernel (32 lanes x 16)
WIDE_BUFFERS = {"wide": 2, "wide4": 4}  # staged rows a block (as NBUF in the .cu file)
PIPE_MAX_BUFFERS, PIPE_MAX_WARPS = 16, 27  # as in the .cu file
PIPE_BUFFERS = 3  # about this many staged rows a block (round 11, --quant-diag: 3 beat 2, 4, 6, 8)
QUANT_RING_MAX_ROWS = 256  # "auto": ring up to here (10% faster), pipe (plain) or row / wide above
QUANT_WIDE_MIN_K = 8192  # above 256 rows, wide from this K (3-4% faster at K = 11008), else row


def choose_quant_variant(m: int, k_total: int | None = None, plain: bool = True) -> str:
    """The quantize kernel for M rows of K columns (same-run graph timings, round 3:
    experiments/results/gemm_h100_round3_small.csv; "pipe" from round 10, gemm_h100_notes.md);
    without K, as for K = 4096. plain: no fused producer (RMSNorm, SiLU * up)."""
    if m <= QUANT_RING_MAX_ROWS:
        return "ring"
    if plain:
        return "pipe"
    return "wide" if k_total is not None and k_total >= QUANT_WIDE_MIN_K else "row"
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


def choose_gemm_variant(m: int, n: int | None = None, k_total: int | None = None,
                        static_weights: bool = True) -> str:
    """The GEMM kernel for M rows (thresholds from experiments/results/gemm_h100.md).

    M <= 16: the register-streaming GEMV, persistent ("streamt") for N >= STREAMT_MIN_N, one CTA a
    weight tile ("stream") below; for static weights (a model's) launched with programmatic
    dependent launch ("_pdl": weights fetched while the previous kernel finishes). mixed_gemm falls
    back to stream where a warp's K-slice exceeds streamt's registers (K - k > 4096 at G = 128),
    and to skinny without sm_90 or with misaligned operands. N unknown: stream."""
    if m <= 16:
        tile = "m8" if m <= 8 else "m16"
        form = "streamt" if n is not None and n >= STREAMT_MIN_N else "stream"
        return f"{form}_{tile}_pdl" if static_weights else f"{form}_{tile}"
    if m <= 64:
        return "skinny_m32n16"
    return WG_DEFAULT if m >= WG_MIN_M and has_wgmma() else "tc_m64"


def auto_gemm_variant(m: int, n: int, k_total: int, static_weights: bool) -> str:
    """mixed_gemm's "auto": an early-starting "_pdl" kernel only for static weights (it reads them
    while the previous kernel may still write)."""
    return choose_gemm_variant(m, n, k_total, static_weights)


@functools.lru_cache(maxsize=1)
def has_wgmma() -> bool:
    """True on a Hopper GPU (sm_90: wgmma needs the sm_90a target) with the kernel backend."""
    from atom_lab.cuda import compute_capability, kernel_backend_available

    return kernel_backend_available() and compute_capability() == (9, 0)


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


_SMEM_OPT_IN: dict[tuple, int] = {}


@functools.lru_cache(maxsize=None)
def _function(module: str, name: str, options: tuple[str, ...] = ()):
    return get_kernel(module, name, options)


def _kernel(module: str, name: str, smem: int, options: tuple[str, ...] = ()):
    """options: extra compiler flags (a separately compiled build, e.g. for ablations)."""
    kernel = _function(module, name, options)
    # Above 48 KB a kernel must opt in to its dynamic shared memory. The opt-in only grows: a
    # launch with less still fits, and lowering it would break a later, larger launch.
    if smem > _SMEM_OPT_IN.get((module, name, options), 0):
        kernel.max_dynamic_shared_size_bytes = smem
        _SMEM_OPT_IN[(module, name, options)] = smem
    return kernel


def _launch(module: str, name: str, grid, block, args, smem: int, device: torch.device,
            options: tuple[str, ...] = ()) -> None:
    import cupy

    kernel = _kernel(module, name, smem if smem > DEFAULT_SMEM // 2 else 0, options)
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
    idx = reorder_index.to(device=device, dtype=torch.int32).contiguous()
    return idx if idx.data_ptr() % 16 == 0 else idx.clone()  # the kernels read it in 16-byte words


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
              reorder_index, out: MixedQuantized | None, variant: str = "auto",
              pipe_options: tuple[str, ...] = ()) -> MixedQuantized:
    """pipe_options: compiler flags of a diagnostic "pipe" build (bench_gemm.py --quant-diag)."""
    if variant != "auto" and variant not in QUANT_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed 'auto' or {sorted(QUANT_VARIANTS)}")
    plain = kind == "quantize_mixed"
    if variant == "pipe" and not plain:
        raise KernelShapeError(f"variant='pipe' quantizes plain rows only (quantize_mixed); for "
                               f"{kind} use 'auto' or one of {sorted(set(QUANT_VARIANTS) - {'pipe'})}")
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
    variant, smem = fit_quant_variant(variant, m, kn, k_total, up is not None, plain)
    if variant == "row":
        _launch("quantize", name, (m,), (QUANT_THREADS,), args, smem, rows.device)
        return out
    if variant == "pipe":
        sms = torch.cuda.get_device_properties(rows.device).multi_processor_count
        rows_per_block = -(-m // sms)  # balanced: every block takes the same number of rows
        warps, _, staged = pipe_layout(kn, k_total)
        pipe_args = (_ptr(rows), _ptr(idx), np.int32(k_total), np.int32(k_outliers),
                     np.float32(clip), np.int32(qmax), _ptr(out.normal), _ptr(out.normal_scales),
                     _ptr(out.outlier), _ptr(out.outlier_scales), np.int32(m), np.int32(staged))
        _launch("quantize", f"{name}_pipe", (-(-m // rows_per_block),), (32 * (warps + 1),),
                pipe_args, smem, rows.device, pipe_options)
        return out
    if variant in WIDE_BUFFERS:
        capacity = _resident_blocks("quantize", f"{name}_{variant}", smem, QUANT_THREADS,
                                    QUANT_VARIANTS[variant], rows.device)
        rows_per_block = -(-m // capacity)  # balanced: every block takes the same number of rows
        _launch("quantize", f"{name}_{variant}", (-(-m // rows_per_block),), (QUANT_THREADS,),
                args + (np.int32(m),), smem, rows.device)
        return out
    grid = min(m, _resident_blocks("quantize", f"{name}_ring", smem, QUANT_THREADS,
                                   QUANT_VARIANTS[variant], rows.device))
    _launch("quantize", f"{name}_ring", (grid,), (QUANT_THREADS,), args + (np.int32(m),), smem,
            rows.device)
    return out


def fit_quant_variant(variant: str, m: int, kn: int, k_total: int, fused_up: bool,
                      plain: bool = True, sm90: bool | None = None) -> tuple[str, int]:
    """(variant, shared-memory bytes): "auto" resolved, falling back to "row" where the staged rows
    of the chosen kernel do not fit a SM (e.g. SiLU*up at K = 28672); an explicit variant that
    does not fit is refused. sm90: whether the GPU runs the "pipe" kernels (None: ask the GPU)."""
    auto = variant == "auto"
    if auto:
        variant = choose_quant_variant(m, k_total, plain)
    if variant == "pipe":
        if sm90 is None:
            from atom_lab.cuda import compute_capability

            sm90 = compute_capability() >= (9, 0)
        if not sm90:
            if not auto:
                raise KernelShapeError(f"variant={variant!r} needs an sm_90 GPU (bulk copies); use "
                                       f"'auto', 'row', 'ring' or 'wide'")
            variant = choose_quant_variant(m, k_total, plain=False)
    smem = quant_smem_bytes(variant, kn, k_total, fused_up)
    if smem + 1024 <= SMEM_PER_SM and (variant != "pipe" or pipe_layout(kn, k_total)[0] > 0):
        return variant, smem
    if not auto:
        raise KernelShapeError(f"variant={variant} with K={k_total} needs {smem} bytes of shared "
                               f"memory (> {SMEM_PER_SM - 1024}); use variant='row'")
    return "row", quant_smem_bytes("row", kn, k_total, fused_up)


def quant_smem_bytes(variant: str, kn: int, k_total: int, fused_up: bool) -> int:
    """Dynamic shared memory of a quantize kernel for rows of k_total fp16 (kn normal columns)."""
    row_bytes = 2 * k_total * (2 if fused_up else 1)  # gate and up rows of SiLU*up
    if variant == "row":
        return 2 * k_total
    if variant in WIDE_BUFFERS:  # gather offsets of every task + staged rows
        return 4 * (-(-kn // WIDE_COLS) * WIDE_COLS + 256) + WIDE_BUFFERS[variant] * row_bytes
    if variant == "pipe":  # the replicas' rings of staged rows (barriers: static shared memory)
        _, replicas, staged = pipe_layout(kn, k_total)
        return max(replicas * staged, 2) * row_bytes
    return 2 * row_bytes  # ring: two staged rows


def pipe_layout(kn: int, k_total: int) -> tuple[int, int, int]:
    """(consumer warps, replicas, staged rows a replica) of the "pipe" kernel: replicas of one warp
    a task of the row (its normal tasks and the outlier block), each with its own ring of staged
    rows, about PIPE_BUFFERS rows in all; one replica of PIPE_MAX_WARPS warps when a row has more
    tasks. (0, 0, 0) when two staged rows do not fit a SM."""
    row_tasks = -(-kn // WIDE_COLS) + 1
    fit = min(PIPE_MAX_BUFFERS, (SMEM_PER_SM - 1024 - 16 * PIPE_MAX_BUFFERS) // (2 * k_total))
    if fit < 2:
        return 0, 0, 0
    if row_tasks > PIPE_MAX_WARPS:
        return PIPE_MAX_WARPS, 1, min(PIPE_BUFFERS, fit)
    replicas = max(1, min(PIPE_MAX_WARPS // row_tasks, fit // 2))
    return replicas * row_tasks, replicas, min(max(2, round(PIPE_BUFFERS / replicas)), fit // replicas)


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
    if variant in WGP_STAGES:  # WgpLayout in the .cu file: per stage the unpacked weights,
        # the packed activation rows, their scale words, the weights' float scales, two mbarriers;
        # the producer's ring of packed weight rows and their scale words; alignment slack
        stages = WGP_STAGES[variant]
        return (stages * (bn * WG_STAGE_K + bm * (64 + 4 * WGP_SCALE_WORDS) + 4 * 2 * bn + 16)
                + WGP_RING * bn * (64 + 4 * WGP_SCALE_WORDS) + 1024)
    if variant in WG_LAYOUT:  # unpacked stages + their scales + mbarriers, packed ring, the
        # consumers' activation ring (ACP_SLOT), the tile's weight scales [bn, groups] fp16, slack
        stages, ring, acp = WG_LAYOUT[variant]
        acp_slot = 2 * 2 * 128 * 16 + 2 * 2 * 128 * 4 * (WG_STAGE_K // group_size)
        return (stages * (bn * WG_STAGE_K + 4 * 2 * bn + 16) + ring * bn * 64 + acp * acp_slot
                + 2 * bn * (k_normal // group_size) + 1024)
    if not variant.startswith("tc"):
        return 0  # static shared memory only
    groups_per_tile = 128 // group_size
    return TC_STAGES * (bm + bn) * (TILE_BYTES + 2 * groups_per_tile)


def mixed_gemm(a: MixedQuantized, w: MixedQuantized, bias: torch.Tensor | None = None,
               variant: str = "auto", out: torch.Tensor | None = None,
               static_weights: bool = False) -> torch.Tensor:
    """FP16 Y [M, N] = decode(a) @ decode(w)^T (+ bias), as formats.mixed_gemm_reference.

    static_weights=True promises that the kernel launched just before this call did not write w or
    bias (true of a model's): "auto" may then pick a "_pdl" variant, which reads them while that
    kernel is still running. Without the promise "auto" launches plainly; naming a
    "_pdl" variant explicitly makes the same promise."""
    require_kernel_backend()
    m, n, kn, k = check_gemm_operands(a, w)
    auto = variant == "auto"
    if auto:
        variant = auto_gemm_variant(m, n, kn + k, static_weights)
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed 'auto' or {sorted(GEMM_VARIANTS)}")
    tensors = [a.normal, a.normal_scales, a.outlier, a.outlier_scales,
               w.normal, w.normal_scales, w.outlier, w.outlier_scales]
    if variant in GEMV_VARIANTS:  # explicit only: "auto" never picks a gemv variant
        gemv_slots = gemv_plan(variant, kn, k, a.group_size, tensors)
    if variant in STREAM_VARIANTS:
        variant = stream_or_fallback(variant, kn // a.group_size, tensors, auto)
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
    smem = gemm_smem_bytes(variant, a.group_size, kn)
    if smem > SMEM_PER_SM and variant in WG_VARIANTS and auto:  # a very long K: the tile's
        variant, smem = "tc_m64", gemm_smem_bytes("tc_m64", a.group_size, kn)  # scales overflow
    bm, bn, threads = GEMM_VARIANTS[variant]
    if smem > SMEM_PER_SM:
        raise KernelShapeError(f"variant={variant} with K-k={kn}, G={a.group_size} needs {smem} bytes "
                               f"of shared memory (> {SMEM_PER_SM}); use tc_m64")
    grid = ((n + bn - 1) // bn, (m + bm - 1) // bm)
    args = gemm_kernel_args(a, w, bias, y)
    if variant in GEMV_VARIANTS:
        _launch_gemv(variant, a.group_size, m, n, gemv_slots, args, dev)
        return y
    if variant in STREAM_VARIANTS:
        _launch_stream(variant, a.group_size, grid, args, dev)
        return y
    if variant in WG_VARIANTS:
        launch_wgmma(variant, a.group_size, m, n, kn, args, dev)
        return y
    _launch("w4a4_gemm", f"w4a4_gemm_{variant}_g{a.group_size}", grid,
            (threads,), args, smem, dev)
    return y


def launch_wgmma(variant: str, group_size: int, m: int, n: int, kn: int, args, dev,
                 options: tuple[str, ...] = (), persistent: bool = True) -> None:
    """Launch a wgmma GEMM (WG_VARIANTS). The wgp* kernels take a persistent grid: one CTA a SM
    (shared memory allows no more), each walking tiles b, b + grid, ...; persistent=False gives
    every tile its own CTA (an ablation). options: extra compiler flags (ablation builds)."""
    bm, bn, threads = GEMM_VARIANTS[variant]
    if m * (kn // group_size) >= 2**31:
        raise KernelShapeError(f"{variant}: M * (K-k)/G = {m * (kn // group_size)} scale elements; "
                               "the kernels index them with 32 bits (< 2^31)")
    tiles_n, tiles_m = -(-n // bn), -(-m // bm)
    if variant in WGP_STAGES:
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        grid = (min(tiles_n * tiles_m, sms) if persistent else tiles_n * tiles_m,)
    else:
        grid = (tiles_n, tiles_m)
    _launch("w4a4_gemm_sm90", f"w4a4_gemm_{variant}_g{group_size}", grid, (threads,), args,
            gemm_smem_bytes(variant, group_size, kn), dev, options)


def gemm_kernel_args(a: MixedQuantized, w: MixedQuantized, bias: torch.Tensor | None,
                     y: torch.Tensor) -> tuple:
    """The arguments every GEMM kernel starts with (GEMM_ARGS / GEMV_ARGS in the .cu files)."""
    return tuple(_ptr(t) for t in (a.normal, a.normal_scales, a.outlier, a.outlier_scales, w.normal,
                                   w.normal_scales, w.outlier, w.outlier_scales, bias, y)) + (
        np.int32(y.shape[0]), np.int32(y.shape[1]), np.int32(a.k_normal), np.int32(a.k_outliers))


@functools.lru_cache(maxsize=None)
def _smem_opt_in_limit(index: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(index)["sharedMemPerBlockOptin"])


def _require_gemv_module(variant: str, tensors) -> None:
    """KernelShapeError unless kernels/w4a4_gemv.cu can run: sm_90 (bulk copies, mbarriers,
    griddepcontrol) and 16-byte aligned operands (vector loads and bulk copies)."""
    from atom_lab.cuda import compute_capability

    if compute_capability() < (9, 0):
        raise KernelShapeError(f"{variant}: the kernel needs sm_90 or newer, the GPU is "
                               f"sm_{''.join(map(str, compute_capability()))}")
    for i, t in enumerate(tensors):
        if t.data_ptr() % 16:
            raise KernelShapeError(f"{variant}: operand {i} is not 16-byte aligned")


def gemv_plan(variant: str, kn: int, k: int, group_size: int, tensors) -> int:
    """Ring slots of a gemv launch; KernelShapeError (naming the reason) where it cannot run."""
    ng = kn // group_size
    most = GEMV_CONSUMERS * GEMV_GROUPS_PER_WARP[(variant, group_size)]
    if ng > most:
        raise KernelShapeError(f"{variant}: (K-k)/G = {ng} groups, the kernel holds at most {most}")
    _require_gemv_module(variant, tensors)
    index = tensors[0].device.index if tensors[0].device.index is not None else 0
    slot = 8 * (kn // 2) + 16 * ng + 8 * k + 16  # an octet of weight rows, as SlotLayout
    slots = min(GEMV_MAX_SLOTS, (_smem_opt_in_limit(index) - GEMV_BARRIER_BYTES)
                // (slot + GEMV_PARTIAL_BYTES))
    if slots < 2:
        raise KernelShapeError(f"{variant}: K-k={kn} makes a {slot}-byte ring slot; two do not fit "
                               f"in {_smem_opt_in_limit(index)} bytes of shared memory")
    return slots


def _launch_gemv(variant: str, group_size: int, m: int, n: int, slots: int, args, dev) -> None:
    """One CTA a SM (at most one an octet of weight rows), a row of CTAs a token tile. It asks for
    the whole shared memory whatever the slots use: one opt-in value, and one CTA a SM anyway."""
    tile, octet, threads = GEMV_VARIANTS[variant]
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    grid = (min(sms, (n + octet - 1) // octet), (m + tile - 1) // tile)
    _launch("w4a4_gemv", f"w4a4_{variant}_g{group_size}", grid, (threads,), args + (np.int32(slots),),
            _smem_opt_in_limit(index), dev)


def stream_kernel_name(variant: str, group_size: int) -> str:
    """stream_m8 and stream_m8_pdl run one kernel, w4a4_stream_m8_g<G>; only the launch differs."""
    return f"w4a4_{variant.removesuffix('_pdl')}_g{group_size}"


def stream_or_fallback(variant: str, groups: int, tensors, auto: bool) -> str:
    """The stream variant itself where it runs; else KernelShapeError, or under "auto" the
    fallback: stream for a streamt whose K is too long, skinny where w4a4_gemv.cu cannot run."""
    try:
        _require_gemv_module(variant, tensors)
    except KernelShapeError:
        if not auto:
            raise
        return "skinny_m16n16"
    if variant.startswith("streamt") and groups > STREAMT_MAX_GROUPS:
        if not auto:
            raise KernelShapeError(f"{variant}: (K-k)/G = {groups} groups, the persistent kernel "
                                   f"keeps at most {STREAMT_MAX_GROUPS} (two chunks a warp); use "
                                   f"{variant.replace('streamt', 'stream')}")
        return variant.replace("streamt", "stream")
    return variant


def stream_token_bytes(variant: str, group_size: int) -> int:
    """Dynamic shared memory of a streamt CTA: each lane's token fragments of its two chunks."""
    tiles = STREAM_VARIANTS[variant][0] // 8
    return 2 * tiles * STREAM_GROUPS * 32 * STREAM_WARPS * (group_size // 8)


def _launch_stream(variant: str, group_size: int, grid, args, dev) -> None:
    """stream: a CTA a 16-row weight tile and token tile. streamt: a persistent row of CTAs a token
    tile, as few as give every CTA the same number of tiles within STREAM_CTAS_PER_SM a SM. The
    kernels take the gemv signature (its ring-slot count is unused)."""
    name, threads = stream_kernel_name(variant, group_size), STREAM_VARIANTS[variant][2]
    args, smem = args + (np.int32(0),), 0
    if variant.startswith("streamt"):
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        slots = STREAM_CTAS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count
        per_cta = -(-grid[0] // slots)
        grid, smem = (-(-grid[0] // per_cta), grid[1]), stream_token_bytes(variant, group_size)
    if variant.endswith("_pdl") and launch_early(_kernel("w4a4_gemv", name, smem), grid,
                                                 (threads,), args, smem, dev):
        return
    _launch("w4a4_gemv", name, grid, (threads,), args, smem, dev)


def quantized_linear(x: torch.Tensor, w: MixedQuantized, clip: float = 1.0,
                     reorder_index: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp16 -> quantize (gather fused) -> W4A4 GEMM -> [..., N] fp16."""
    a = quantize_mixed(x, w.k_outliers, w.bits, w.group_size, clip, reorder_index)
    y = mixed_gemm(a, w, bias, static_weights=True)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _median_tops(launch, ops: int) -> float:
    """Median of three timed launches (after the caller's warm-up), in TOPS."""
    rates = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        rates.append(ops / (start.elapsed_time(end) * 1e-3) / 1e12)
    return sorted(rates)[1]


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
    return _median_tops(launch, ops)


def wgmma_s8_peak_tops(form: str = "ss", iters: int = 2048) -> float:
    """Measured INT8 wgmma rate (TOPS) of the current Hopper GPU, shared-memory resident.

    form "ss": m64n256k32, both operands from shared memory (the largest tile); "rs": the W4A4
    GEMM's own m64n128k32 with A from registers. Three warpgroups a CTA, one CTA a SM."""
    if form not in ("ss", "rs"):
        raise ValueError(f"form={form!r}: allowed 'ss' or 'rs'")
    require_kernel_backend()
    dev = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    seed = torch.randint(1, 2**31 - 1, (32,), dtype=torch.int64, device=dev).to(torch.int32)
    threads, smem = 3 * 128, (64 + 256) * 128 + 1024
    out = torch.empty(sms * threads, dtype=torch.int32, device=dev)
    args = (_ptr(seed), np.int32(iters), _ptr(out))
    launch = lambda: _launch("w4a4_gemm_sm90", f"wgmma_s8_peak_{form}", (sms,), (threads,), args,
                             smem, dev)
    launch()
    torch.cuda.synchronize()
    n = 256 if form == "ss" else 128
    ops = 2 * 64 * n * 32 * 4 * iters * 3 * sms  # 4 k32 steps an iteration, 3 warpgroups a CTA
    return _median_tops(launch, ops)
