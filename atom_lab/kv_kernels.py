"""4-bit KV cache on the GPU: quantize-and-append and fused decode attention (CuPy kernels).

Cache layout: paged, 16-token blocks (as vLLM and FlashInfer, which Atom's kernels used):
  pool         uint8 [num_blocks, block_bytes(head_dim)]; a block holds 16 tokens of one KV head
               as one contiguous run of 16 D + 128 bytes (2176 for D = 128, 1152 for D = 64, both
               multiples of 128, so no padding): K codes [16, D/2], V codes [16, D/2]
               (formats.KVQuantized codes), then 16 K and 16 V param words (int32: fp16 scale in
               the low half, fp16 zero in the high half)
  block_table  int32 [batch, kv_heads, max_blocks]: physical block of the i-th 16 tokens of each
               (sequence, KV head); every entry is a valid id, used or not (the kernel prefetches
               before it knows the length)
  lengths      int32 [batch] on the device (the kernels read it) and mirrored on the host
Sequences of different lengths share one pool and grow a block at a time without copies; the host
allocates blocks on append (one (sequence, head) after the other, so a prompt's blocks of one
head are consecutive in a fresh pool) and takes them back on `release`. The decode kernel copies
a whole block per 16-token tile with one bulk copy (the TMA engine, round 5: 7-10% faster than
cp.async copies on every measured row) and reads each block id two tiles ahead of its copies.
Measured on the H100 (round 4, attention_notes.md): with cp.async copies the runs came no faster
than round 3's four streams of K codes, V codes, K params and V params (60.0 vs 60.0 us on a
142 MB row), the table read costs up to 11% on grids of one CTA an SM (kv4p; the 8-warp build
hides most of it), and blocks scattered over the pool up to 4%. Blocks hold one KV
head each (not all heads of 16 tokens, as vLLM's pages): so a head's tokens can be consecutive
in memory; the all-heads page measured no faster either.
`k_quantized(b)` / `v_quantized(b)` read a sequence back as formats.KVQuantized tensors and
`append_quantized` writes KVQuantized tensors in (the two conversions of the layout);
`to_contiguous` gives rounds 1-3's contiguous layout, which `decode_attention_kv4` still runs
as the measured comparison. The "_pdl" builds of the paged kernel start early (programmatic
dependent launch: only L2 prefetch hints before they wait for the previous kernel, so correct
behind any producer); timed back to back they are 0-2% faster on grids of many CTAs and 1.15-1.2x
slower on grids of one CTA an SM (round 5), so they are not planned. The "_cl" builds launch the
same kernels in thread-block clusters of the split-K partitions, which merge their partials
through distributed shared memory instead of global memory (round 8): 14% faster than the best
plain plan on one GQA sequence of 2048 tokens, slower on grids of many clusters, so not planned
either.

Only one quantization group per head (kv_group_size 0 or head_dim) is supported: the decode
kernel folds the dequantization into the dot products as s * (q.c - z * sum(q)), which needs one
(scale, zero) per token row. Finer groups are refused with a clear error.

Prefill: `prefill_attention` appends the fresh K/V quantized and computes attention on the fresh
FP16 K/V with torch SDPA. Decode: `append` the new token's K/V, then `attend` with the query.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from atom_lab.cuda import (get_kernel, launch_cluster, launch_early, require_kernel_backend,
                            torch_current_stream)
from atom_lab.formats import KVQuantized, decode_kv, encode_kv, kv_bytes_per_token

HEAD_DIMS = (64, 128)
HEADS_PER_CTA = 8       # query heads one decode CTA serves (the mma's 8-wide dimension)
TILE = 16               # tokens per warp tile
CHUNK_ALIGN = 64        # context partitions are multiples of this many tokens
CAPACITY_ALIGN = 16     # capacity multiple: tiles never straddle the end of a row block
BLOCK_TOKENS = 16       # tokens of one paged block (= TILE: a warp's tile is one block)
APPEND_WARPS = 8
MAX_SPLITS = 256        # the merging CTA keeps [8 heads][splits] weights in shared memory
MAX_CLUSTER = 8         # a cluster build's splits: at most the portable cluster size


@dataclass(frozen=True)
class DecodeBuild:
    """One compiled decode kernel (kernels/decode_attention.cu): decode_attention_<name>_d<D>,
    with the split planner's cost constants, fitted to H100 runs (attention_notes.md)."""
    warps: int
    stages: int             # ring stages per warp (cp.async copies; paged builds: bulk copies)
    layout: str             # "kv4m": round-2/3 4-bit body; "kv4v3": round-1 4-bit body; "fp16"
    hbm_bytes_per_s: float  # sustained cache read rate of a GPU full of its CTAs (many waves)
    cta_bytes_per_s: float  # read rate of one CTA alone on its SM
    fixed_s: float          # a call that reads almost nothing: launch, first loads, epilogue
    wave_tail: float = 0.0  # a one-wave grid streams this much longer (the SMs' finish times
    #                         spread); spread over the waves of a longer grid
    wave_start_s: float = 0.0  # each further wave of CTAs: their starts and ends not overlapped
    early: bool = False     # launched with programmatic dependent launch (decode_attention.cu:
    #                         prefetch_first_blocks): starts while the previous kernel finishes
    cluster: bool = False   # the same kernel launched in clusters of its `splits` CTAs, which
    #                         merge their partials through distributed shared memory (round 8)


BUILDS = {
    # the round-3 body on the paged cache, a block a tile by one bulk copy (round 5). Rates refit
    # to round 5's sweep (attention_bench.csv): sustained ~2.95 TB/s; a lone CTA an SM reads 17
    # (4 warps) / 25 (8 warps; 20 until round 8, which the batch-1 sweeps showed too low) GB/s;
    # planned within 2.5% of the sweep's best on every row with batch >= 16
    "kv4p": DecodeBuild(4, 4, "kv4m", 2.95e12, 17e9, 3.8e-6, 0.126, 0.7e-6),
    "kv4pw8": DecodeBuild(8, 4, "kv4m", 2.97e12, 25e9, 4.0e-6, 0.126, 1.1e-6),
    # The contiguous layout of rounds 1-3 (decode_attention_kv4), the measured comparison.
    # round 3 body (software-pipelined, L2 128-byte prefetch hint): 4 CTAs an SM
    "kv4": DecodeBuild(4, 4, "kv4m", 2.65e12, 23.5e9, 3.6e-6, 0.126, 0.7e-6),
    # twice the warps, 2 CTAs an SM: faster lone CTAs
    "kv4w8": DecodeBuild(8, 4, "kv4m", 2.68e12, 33e9, 4.5e-6, 0.145, 1.1e-6),
    # 6-stage rings (5 tiles in flight a warp): measured slower, not planned
    "kv4s6": DecodeBuild(4, 6, "kv4m", 2.3e12, 22e9, 3.6e-6, 0.126, 0.7e-6),
    # round 1 body: more instructions, yet the higher sustained rate on grids of many waves, and a
    # costlier start (it reads the length before its first copies)
    "kv4v3": DecodeBuild(4, 4, "kv4v3", 3.01e12, 16.9e9, 4.8e-6, 0.305, 4.0e-6),
    "fp16": DecodeBuild(4, 3, "fp16", 2.95e12, 21e9, 5e-6),
}
# round 5: the two paged builds started early (PDL: L2 prefetches of their first blocks before they
# wait for the previous kernel); not planned (see the module docstring)
BUILDS.update({f"{name}_pdl": replace(BUILDS[name], early=True) for name in ("kv4p", "kv4pw8")})
# round 8: the two paged builds with split-K merged inside a cluster (2..MAX_CLUSTER partitions)
BUILDS.update({f"{name}_cl": replace(BUILDS[name], cluster=True) for name in ("kv4p", "kv4pw8")})
# builds a cache format runs ("kv4p": paged, "kv4": contiguous) and those the planner picks from
_FAMILY = {"kv4p": ("kv4p", "kv4pw8", "kv4p_pdl", "kv4pw8_pdl", "kv4p_cl", "kv4pw8_cl"),
           "kv4": ("kv4", "kv4w8", "kv4s6", "kv4v3"), "fp16": ("fp16",)}
_PLANNED = {"kv4p": ("kv4p", "kv4pw8"), "kv4": ("kv4", "kv4w8", "kv4v3"), "fp16": ("fp16",)}


def block_bytes(head_dim: int) -> int:
    """Bytes of one paged block of one KV head: 16 tokens' K and V codes and param words."""
    return BLOCK_TOKENS * (head_dim + 8)


def check_layout(head_dim: int, kv_heads: int, capacity: int, bits: int = 4,
                 group_size: int = 0) -> None:
    """Raise ValueError naming the key, the value and what is allowed."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim}: the KV kernels support {HEAD_DIMS}")
    if group_size not in (0, head_dim):
        raise ValueError(f"kv_group_size={group_size}: the KV kernels support one group per head "
                         f"(0 or {head_dim}); finer groups are fake-quant only")
    if not 2 <= bits <= 4:
        raise ValueError(f"kv_bits={bits}: the 4-bit KV cache holds codes of 2..4 bits")
    if kv_heads < 1:
        raise ValueError(f"kv_heads={kv_heads}: must be >= 1")
    if capacity < 1 or capacity % CAPACITY_ALIGN:
        raise ValueError(f"capacity={capacity}: must be a positive multiple of {CAPACITY_ALIGN}")


def check_heads(q_heads: int, kv_heads: int) -> int:
    """Query heads per KV head (GQA group); query heads must be a multiple of the KV heads."""
    if q_heads < kv_heads or q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads}: must be a positive multiple of kv_heads={kv_heads}")
    return q_heads // kv_heads


# ------------------------------------------------------------------------------------------------
# Split-K planning (host side)

# Split-K merge by the last CTA: fixed + per partition + per CTA-wave (each partitioned CTA
# holds its slot through its fence and ticket atomic, which queue behind the streaming traffic
# of a full GPU: traced epilogues of 3 us median, 8.5 us at worst). H100 fits.
MERGE_S = (2e-6, 0.15e-6, 3e-6)
# Split-K merged inside a cluster (the "_cl" builds): two cluster barriers and a few
# distributed-shared-memory loads a CTA, no global round trip.
MERGE_CLUSTER_S = 0.5e-6


@dataclass(frozen=True)
class KernelShape:
    """What the split planner needs to know of one decode-kernel build."""
    name: str               # a key of BUILDS
    slots: int              # CTAs resident on the whole GPU at once
    hbm_bytes_per_s: float  # see DecodeBuild
    cta_bytes_per_s: float
    fixed_s: float
    wave_tail: float = 0.0
    wave_start_s: float = 0.0
    cluster: bool = False   # partitions merged in a cluster: 2..MAX_CLUSTER of them


@dataclass(frozen=True)
class SplitPlan:
    splits: int       # context partitions launched per (sequence, head block)
    chunk: int        # tokens per partition, a multiple of CHUNK_ALIGN
    kernel: str = ""  # the build to launch (a key of BUILDS); "" means the cache format's default


def plan_splits(ctas: int, max_len: int, token_bytes: int, kernels, max_splits: int = 64
                ) -> SplitPlan:
    """Pick the kernel build and partition count minimizing the modelled time

        fixed + max(all bytes / sustained rate * (1 + wave_tail / waves),
                    waves * one CTA's bytes / its lone rate)
        + (waves - 1) * wave_start + (split-K merge if partitioned),

    where ctas = batch * kv_heads * head_blocks, token_bytes = bytes of one token of one KV head,
    and a partially filled last wave of CTAs costs a whole wave. The merge is a cluster's
    (MERGE_CLUSTER_S) for cluster builds, which take at most MAX_CLUSTER partitions (one: a plain
    launch of the same kernel). Partition counts are powers of two: the model has no term for
    the SMs that hold two CTAs of a one-wave grid, and counts between (S = 5: 160 CTAs on 132
    SMs) measured slower than both neighbours (round 8, attention_notes.md).
    """
    max_len = max(int(max_len), 1)
    best, best_t = None, math.inf
    for shape in kernels:
        limit = min(max_splits, MAX_CLUSTER if shape.cluster else max_splits)
        for s in (1 << i for i in range(limit.bit_length()) if 1 << i <= limit):
            chunk = _align(-(-max_len // s), CHUNK_ALIGN)
            splits = -(-max_len // chunk)
            if splits != s:
                continue
            waves = -(-ctas * splits // shape.slots)
            total_s = ctas * max_len * token_bytes / shape.hbm_bytes_per_s
            cta_s = chunk * token_bytes / shape.cta_bytes_per_s
            t = shape.fixed_s + max(total_s * (1 + shape.wave_tail / waves), waves * cta_s) + \
                (waves - 1) * shape.wave_start_s
            if splits > 1 and shape.cluster:
                t += MERGE_CLUSTER_S
            elif splits > 1:
                t += MERGE_S[0] + MERGE_S[1] * splits + MERGE_S[2] * ctas * splits / shape.slots
            if t < best_t:
                best, best_t = SplitPlan(splits, chunk, shape.name), t
    return best


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


# ------------------------------------------------------------------------------------------------
# Launch plumbing: CuPy kernels on torch's current stream, raw pointers as arguments

def _ptr(t: torch.Tensor):
    return np.uint64(t.data_ptr())


def _launch(kernel, grid, block, args, smem: int = 0) -> None:
    stream = torch_current_stream()
    with stream:
        kernel(grid, block, args, shared_mem=smem)


def _token_bytes(fmt: str, head_dim: int) -> int:
    """Cache bytes of one token of one KV head (K and V)."""
    return head_dim + 8 if fmt.startswith("kv4") else 4 * head_dim


def _stage_bytes(build: str, head_dim: int) -> int:
    """Shared memory of one ring stage (one 16-token tile: codes or fp16 rows, and params)."""
    layout = BUILDS[build].layout
    if layout == "kv4m":
        return TILE * head_dim + 2 * TILE * 4
    if layout == "kv4v3":  # V rows padded by 16 bytes
        return TILE * (head_dim // 2) + TILE * (head_dim // 2 + 16) + 2 * TILE * 4
    return 2 * TILE * (2 * head_dim + 16)


# builds whose ring depth is the source's KV4M_NST (a -DKV4M_NST=N compile option changes it):
# these four and their early-start and cluster twins
_NST_BUILDS = tuple(n for n in BUILDS if n.split("_")[0] in ("kv4p", "kv4pw8", "kv4", "kv4w8"))


def _ring_stages(build: str, options: tuple[str, ...] = ()) -> int:
    for opt in options:
        m = re.fullmatch(r"-DKV4M_NST=(\d+)", opt)
        if m and build in _NST_BUILDS:
            return int(m.group(1))
    return BUILDS[build].stages


def _smem_bytes(build: str, head_dim: int, options: tuple[str, ...] = ()) -> int:
    """Dynamic shared memory of a decode CTA: the query rows plus each warp's ring of stages, which
    the epilogue reuses for the warps' outputs, maxima, sums and the split-K weights."""
    spec = BUILDS[build]
    rings = spec.warps * _ring_stages(build, options) * _stage_bytes(build, head_dim)
    # outputs [warps][8][head_dim (+ 8 padding)], maxima and sums [warps][8], two [8] head tables
    # and the split-K weights [8][MAX_SPLITS] (decode_attention.cu: merge_and_store)
    merge = 4 * (spec.warps * HEADS_PER_CTA * (head_dim + 10) + 2 * HEADS_PER_CTA
                 + HEADS_PER_CTA * MAX_SPLITS)
    return HEADS_PER_CTA * head_dim * 2 + max(rings, merge)


def kernel_shapes(family: str, head_dim: int, device_index: int = 0,
                  options: tuple[str, ...] = (), builds=None) -> list[KernelShape]:
    """Decode builds of a cache format ("kv4" or "fp16") as the split planner sees them; builds
    (keys of BUILDS) overrides the planned ones, e.g. ("kv4v3",) for round 1's kernel."""
    shapes = []
    for name in builds or _PLANNED[family]:
        spec = BUILDS[name]
        sms, per_sm = _resident_ctas(name, head_dim, device_index, tuple(options))
        shapes.append(KernelShape(name, sms * per_sm, spec.hbm_bytes_per_s, spec.cta_bytes_per_s,
                                  spec.fixed_s, spec.wave_tail, spec.wave_start_s, spec.cluster))
    return shapes


@functools.lru_cache(maxsize=None)
def _decode_kernel(fmt: str, head_dim: int, options: tuple[str, ...] = ()):
    name = fmt.removesuffix("_cl")  # a cluster build launches the plain build's kernel
    kernel = get_kernel("decode_attention", f"decode_attention_{name}_d{head_dim}", options)
    smem = _smem_bytes(fmt, head_dim, options)
    if smem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = smem
    try:  # several CTAs' rings must fit on one SM: ask for the largest shared-memory carveout
        kernel.preferred_shared_memory_carveout = 100
    except Exception:  # a hint only; older CuPy lacks the attribute
        pass
    return kernel


@functools.lru_cache(maxsize=None)
def _resident_ctas(fmt: str, head_dim: int, device_index: int,
                   options: tuple[str, ...] = ()) -> tuple[int, int]:
    """(SM count, CTAs of this kernel resident per SM) from its registers and shared memory."""
    props = torch.cuda.get_device_properties(device_index)
    kernel = _decode_kernel(fmt, head_dim, options)
    try:
        regs = int(kernel.num_regs)
    except Exception:  # attribute missing in some CuPy versions: assume the launch-bounds cap
        regs = 128
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    threads = BUILDS[fmt].warps * 32
    by_regs = 65536 // max(regs * threads, 1)
    static = int(getattr(kernel, "shared_size_bytes", 0) or 0)  # e.g. the bulk copies' mbarriers
    by_smem = smem_sm // (_smem_bytes(fmt, head_dim, options) + static + 1024)
    return props.multi_processor_count, max(1, min(by_regs, by_smem, 2048 // threads))


_TICKETS: dict[int, torch.Tensor] = {}


def _tickets(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed split-K counters; each merging CTA resets its own, so they stay zero between calls."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    t = _TICKETS.get(idx)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _TICKETS[idx] = t
    return t


# ------------------------------------------------------------------------------------------------
# Decode attention

def decode_attention_paged(q, pool, block_table, lengths, max_len: int,
                           softmax_scale: float | None = None, plan: SplitPlan | None = None,
                           out: torch.Tensor | None = None,
                           compile_options: tuple[str, ...] = ()) -> torch.Tensor:
    """softmax(q K^T * scale) V over each sequence's first lengths[b] cached tokens, paged cache.

    q [B, Hq, D] fp16; pool uint8 [num_blocks, block_bytes(D)]; block_table int32
    [B, Hkv, max_blocks]; lengths int32 [B] on the device, max_len >= max(lengths) known on the
    host.
    Returns [B, Hq, D] fp16 (written into `out` if given). plan.kernel picks a build ("kv4p",
    "kv4pw8", their early-start twins "kv4p_pdl", "kv4pw8_pdl", or their cluster-merge twins
    "kv4p_cl", "kv4pw8_cl", which take 1..MAX_CLUSTER partitions); compile_options (NVRTC
    flags) build a tuning variant.
    """
    if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.shape[0] < 1:
        raise ValueError(f"pool: expected uint8 [num_blocks >= 1, block bytes], got "
                         f"{pool.dtype} {tuple(pool.shape)}")
    D = pool.shape[1] // BLOCK_TOKENS - 8
    if D not in HEAD_DIMS or pool.shape[1] != block_bytes(D):
        raise ValueError(f"pool: block of {pool.shape[1]} bytes; allowed "
                         f"{[block_bytes(d) for d in HEAD_DIMS]} (head_dim {HEAD_DIMS})")
    if block_table.dim() != 3 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table: expected int32 [batch, kv_heads, max_blocks], got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    for name, t in (("pool", pool), ("block_table", block_table), ("lengths", lengths)):
        if t.device != q.device or not t.is_contiguous():
            raise ValueError(f"{name}: must be a contiguous tensor on q's device {q.device}, got "
                             f"{t.device}, contiguous={t.is_contiguous()}")
    B, Hkv, max_blocks = block_table.shape
    if lengths.dtype != torch.int32 or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths: expected int32 [{B}], got {lengths.dtype} {tuple(lengths.shape)}")
    return _decode("kv4p", q, (pool, block_table), lengths, max_len, B, Hkv,
                   max_blocks * BLOCK_TOKENS, max_blocks, D, softmax_scale, plan, out,
                   tuple(compile_options), (np.int32(pool.shape[0]),))


def decode_attention_kv4(q, k_codes, k_params, v_codes, v_params, lengths, max_len: int,
                         softmax_scale: float | None = None, plan: SplitPlan | None = None,
                         out: torch.Tensor | None = None,
                         compile_options: tuple[str, ...] = ()) -> torch.Tensor:
    """The same attention over rounds 1-3's contiguous layout (the comparison; see to_contiguous).

    k_codes/v_codes uint8 [B, Hkv, cap, D/2]; k_params/v_params int32 [B, Hkv, cap]. plan.kernel
    picks a build ("kv4", "kv4w8", "kv4s6", or round 1's "kv4v3").
    """
    B, Hkv, cap, half_d = k_codes.shape
    return _decode("kv4", q, (k_codes, k_params, v_codes, v_params), lengths, max_len, B, Hkv,
                   cap, cap, 2 * half_d, softmax_scale, plan, out, tuple(compile_options))


def decode_attention_fp16(q, k, v, lengths, max_len: int, softmax_scale: float | None = None,
                          plan: SplitPlan | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The same kernel reading an FP16 cache k, v [B, Hkv, cap, D] (the comparison point)."""
    B, Hkv, cap, D = k.shape
    return _decode("fp16", q, (k, None, v, None), lengths, max_len, B, Hkv, cap, cap, D,
                   softmax_scale, plan, out, ())


def _decode(family, q, sources, lengths, max_len, B, Hkv, cap, extent, D, softmax_scale, plan,
            out, options, extra_args=()):
    """sources: the cache tensors the kernel takes before `lengths` (None: a null pointer);
    cap: tokens a sequence can hold; extent: the kernel's size argument (capacity or blocks);
    extra_args: the kernel's arguments after the split-K tickets (paged: the pool's blocks)."""
    require_kernel_backend()
    check_layout(D, Hkv, cap)
    if q.dim() != 3 or q.shape[0] != B or q.shape[2] != D or q.dtype != torch.float16:
        raise ValueError(f"q: expected fp16 [batch={B}, q_heads, head_dim={D}], "
                         f"got {q.dtype} {tuple(q.shape)}")
    if not q.is_cuda:
        raise ValueError(f"q: the kernels need CUDA tensors, got q on {q.device}")
    if not 0 <= max_len <= cap:
        raise ValueError(f"max_len={max_len}: must lie in 0..capacity={cap}")
    group = check_heads(q.shape[1], Hkv)
    head_blocks = -(-group // HEADS_PER_CTA)
    device = q.device
    if plan is None:
        plan = plan_splits(B * Hkv * head_blocks, max_len, _token_bytes(family, D),
                           kernel_shapes(family, D, device.index or 0, options))
    fmt = plan.kernel or family
    if fmt not in _FAMILY[family]:
        raise ValueError(f"plan.kernel={plan.kernel!r}: a {family} cache runs {_FAMILY[family]}")
    if (plan.chunk % CHUNK_ALIGN or plan.splits * plan.chunk < max_len
            or not 1 <= plan.splits <= MAX_SPLITS):
        raise ValueError(f"plan={plan}: chunk must be a multiple of {CHUNK_ALIGN}, splits in "
                         f"1..{MAX_SPLITS} and splits * chunk must cover max_len={max_len}")
    clustered = BUILDS[fmt].cluster and plan.splits > 1
    if BUILDS[fmt].cluster and plan.splits > MAX_CLUSTER:
        raise ValueError(f"plan={plan}: the cluster build {fmt} takes splits in 1..{MAX_CLUSTER}")
    if out is None:
        out = torch.empty_like(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if plan.splits > 1 and not clustered:
        part_o = torch.empty(B * q.shape[1] * plan.splits * D, dtype=torch.float32, device=device)
        part_lse = torch.empty(B * q.shape[1] * plan.splits, dtype=torch.float32, device=device)
    else:
        part_o = part_lse = out  # never touched with one split or a cluster's merge
    tickets = _tickets(B * Hkv * head_blocks, device)
    q = q.contiguous()
    args = (_ptr(q),) + tuple(_ptr(t) if t is not None else np.uint64(0) for t in sources) + (
        _ptr(lengths), np.int32(Hkv), np.int32(group), np.int32(head_blocks), np.int32(extent),
        np.int32(plan.chunk), np.int32(plan.splits), np.float32(scale * math.log2(math.e)),
        _ptr(out), _ptr(part_o), _ptr(part_lse), _ptr(tickets)) + tuple(extra_args)
    kernel, smem = _decode_kernel(fmt, D, options), _smem_bytes(fmt, D, options)
    grid, block = (plan.splits, Hkv * head_blocks, B), (BUILDS[fmt].warps * 32, 1, 1)
    if clustered:
        launch_cluster(kernel, grid, block, args, smem, device, plan.splits)
    elif not (BUILDS[fmt].early and launch_early(kernel, grid, block, args, smem, device)):
        _launch(kernel, grid, block, args, smem)
    return out


# ------------------------------------------------------------------------------------------------
# The cache object

class QuantizedKVCache:
    """One layer's paged 4-bit KV cache for a batch of sequences (see the module docstring).

    capacity: tokens one sequence may hold (a multiple of 16); num_blocks: blocks in the shared
    pool (default batch * capacity / 16, enough for every sequence at full capacity; fewer
    makes the sequences share the pool, and an append that finds it empty is refused).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, bits: int = 4,
                 group_size: int = 0, clip: float = 1.0, device=None,
                 num_blocks: int | None = None):
        """num_blocks counts blocks of one KV head (default batch * kv_heads * capacity / 16)."""
        check_layout(head_dim, kv_heads, capacity, bits, group_size)
        if not 0.0 < clip <= 1.0:
            raise ValueError(f"kv_clip={clip}: clip ratio must lie in (0, 1]")
        if batch < 1:
            raise ValueError(f"batch={batch}: must be >= 1")
        self.max_blocks = capacity // BLOCK_TOKENS
        num_blocks = batch * kv_heads * self.max_blocks if num_blocks is None else int(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
        device = torch.device(device if device is not None else "cuda")
        self.batch, self.kv_heads, self.head_dim, self.capacity = batch, kv_heads, head_dim, capacity
        self.bits, self.clip = bits, clip
        self.pool = torch.zeros(num_blocks, block_bytes(head_dim), dtype=torch.uint8,
                                device=device)
        # unused entries point at block 0: valid to read, masked by the length
        self.block_table = torch.zeros(batch, kv_heads, self.max_blocks, dtype=torch.int32,
                                       device=device)
        self.host_table = np.zeros((batch, kv_heads, self.max_blocks), dtype=np.int32)
        self.blocks_held = np.zeros(batch, dtype=np.int64)  # blocks of each of its KV heads
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out ascending ids
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.host_lengths = np.zeros(batch, dtype=np.int64)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def num_blocks(self) -> int:
        return self.pool.shape[0]

    def free_blocks(self) -> int:
        return len(self._free)

    def bytes_per_token(self) -> int:
        """K + V bytes of one cached token over all KV heads (codes, scales, zeros); a block has
        no padding, so this is also the pool's bytes per token slot."""
        return kv_bytes_per_token(self.head_dim, self.kv_heads, self.bits)

    def reset(self) -> None:
        for b in range(self.batch):
            self.release(b)

    def release(self, b: int) -> None:
        """Empty sequence b and give its blocks back to the pool."""
        held = int(self.blocks_held[b])
        self._free.extend(int(i) for i in self.host_table[b, :, :held].reshape(-1)[::-1])
        self.host_table[b] = 0
        self.blocks_held[b] = 0
        self.block_table[b].zero_()
        self.lengths[b] = 0
        self.host_lengths[b] = 0

    def _reserve(self, T: int, counts) -> np.ndarray:
        """Check counts (tokens per sequence, default T) against the capacity and allocate the
        blocks they need; returns them as int64 [batch]."""
        host_counts = np.full(self.batch, T, dtype=np.int64) if counts is None else \
            np.asarray(counts, dtype=np.int64).reshape(-1)
        if host_counts.shape != (self.batch,) or (host_counts < 0).any() or (host_counts > T).any():
            raise ValueError(f"counts={list(host_counts)}: need {self.batch} values in 0..{T}")
        new_lengths = self.host_lengths + host_counts
        if (new_lengths > self.capacity).any():
            b = int(np.argmax(new_lengths > self.capacity))
            raise ValueError(f"append of {int(host_counts[b])} tokens to sequence {b} of length "
                             f"{int(self.host_lengths[b])} exceeds capacity={self.capacity}")
        # per KV head; never negative, so an append that failed after reserving leaks nothing
        need = np.maximum(-(-new_lengths // BLOCK_TOKENS) - self.blocks_held, 0)
        if need.sum() * self.kv_heads > len(self._free):
            raise ValueError(f"num_blocks={self.num_blocks}: the pool has {len(self._free)} free "
                             f"blocks, this append needs {int(need.sum()) * self.kv_heads}; "
                             f"release sequences or build the cache with more blocks")
        if need.any():
            for b in np.flatnonzero(need):
                held = int(self.blocks_held[b])
                for h in range(self.kv_heads):
                    for i in range(held, held + int(need[b])):
                        self.host_table[b, h, i] = self._free.pop()
                self.blocks_held[b] = held + int(need[b])
            self.block_table.copy_(torch.from_numpy(self.host_table))
        return host_counts

    def _check_new(self, k, v, dtype, width, what):
        expect = (self.batch, self.kv_heads)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or tuple(t.shape[:2]) != expect or t.shape[3] != width:
                raise ValueError(f"{name}: expected [batch={self.batch}, kv_heads={self.kv_heads}, "
                                 f"T, {what}], got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype}, got {t.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")

    def append(self, k: torch.Tensor, v: torch.Tensor, counts=None) -> None:
        """Quantize and append new tokens: k, v [B, Hkv, D] (one token) or [B, Hkv, T, D].

        counts: tokens of each sequence to take (a length-B sequence of ints <= T; default T),
        so a padded ragged prefill appends only each sequence's real tokens.
        """
        require_kernel_backend()
        if k.dim() == 3:
            k, v = k.unsqueeze(2), v.unsqueeze(2)
        self._check_new(k, v, torch.float16, self.head_dim, f"head_dim={self.head_dim}")
        T = k.shape[2]
        host_counts = self._reserve(T, counts)
        dev_counts = _const_counts(T, self.batch, self.device) if counts is None else \
            torch.as_tensor(host_counts, dtype=torch.int32).to(self.device, non_blocking=True)
        k, v = k.contiguous(), v.contiguous()
        rows = self.batch * self.kv_heads * T
        kernel = get_kernel("kv_quant_append", f"kv_quant_append_d{self.head_dim}")
        args = (_ptr(k), _ptr(v), _ptr(dev_counts), _ptr(self.lengths), _ptr(self.block_table),
                _ptr(self.pool), np.int32(self.batch), np.int32(self.kv_heads), np.int32(T),
                np.int32(self.max_blocks), np.int32(2**self.bits - 1), np.float32(self.clip))
        _launch(kernel, (-(-rows // APPEND_WARPS), 2, 1), (APPEND_WARPS * 32, 1, 1), args)
        self.lengths += dev_counts
        self.host_lengths += host_counts

    def append_quantized(self, k: KVQuantized, v: KVQuantized, counts=None) -> None:
        """Append tokens already encoded (formats.encode_kv of [B, Hkv, T, D]): codes
        [B, Hkv, T, D/2], scales and zeros [B, Hkv, T, 1]; no kernel, any device."""
        for name, t in (("k", k), ("v", v)):
            if t.bits != self.bits or t.group_size not in (0, self.head_dim):
                raise ValueError(f"{name}: bits={t.bits}, group_size={t.group_size}; this cache "
                                 f"holds bits={self.bits}, one group per head")
        self._check_new(k.codes, v.codes, torch.uint8, self.head_dim // 2,
                        f"head_dim/2={self.head_dim // 2}")
        T = k.codes.shape[2]
        for name, t in (("k", k), ("v", v)):
            for part in ("scales", "zeros"):
                got = tuple(getattr(t, part).shape)
                if got != tuple(t.codes.shape[:3]) + (1,):
                    raise ValueError(f"{name}.{part}: expected {tuple(t.codes.shape[:3]) + (1,)} "
                                     f"(one per token and head), got {got}")
        host_counts = self._reserve(T, counts)
        regions = _block_regions(self.pool, self.head_dim)
        for b in np.flatnonzero(host_counts):
            n, start = int(host_counts[b]), int(self.host_lengths[b])
            pos = np.arange(start, start + n)
            blk = torch.as_tensor(self.host_table[b][:, pos // BLOCK_TOKENS], dtype=torch.long,
                                  device=self.device)  # [Hkv, n]
            slot = torch.as_tensor(pos % BLOCK_TOKENS, dtype=torch.long, device=self.device)
            for t, codes, params in ((k, regions[0], regions[2]), (v, regions[1], regions[3])):
                codes[blk, slot] = t.codes[b, :, :n].to(self.device)
                params[blk, slot] = _param_words(t.scales[b, :, :n], t.zeros[b, :, :n]
                                                 ).to(self.device)
        self.lengths += torch.as_tensor(host_counts, dtype=torch.int32).to(self.device)
        self.host_lengths += host_counts

    def poison_unused(self, generator: torch.Generator | None = None) -> None:
        """For tests: random codes and NaN scales/zeros in every token slot past each length (the
        rest of each last block, and one spare block that every unused table entry is pointed
        at), which the kernels read ahead but must never let into a result."""
        nan_word = 0x7E007E00  # fp16 NaN in both halves (a positive int32)
        spare = self._free.pop() if self._free else None
        if spare is None:
            raise ValueError(f"num_blocks={self.num_blocks}: poison_unused needs one free block")
        unused = np.arange(self.max_blocks) >= self.blocks_held[:, None, None]
        self.host_table[np.broadcast_to(unused, self.host_table.shape)] = spare
        self.block_table.copy_(torch.from_numpy(self.host_table))
        self._free.append(spare)  # the table keeps pointing at it; unused entries may
        k_codes, v_codes, k_params, v_params = _block_regions(self.pool, self.head_dim)
        slots = [(spare, 0)] + [(int(self.host_table[b, h, n // BLOCK_TOKENS]), n % BLOCK_TOKENS)
                                for b, n in enumerate(self.host_lengths.tolist())
                                for h in range(self.kv_heads) if n % BLOCK_TOKENS]
        for block, first in slots:
            for codes in (k_codes, v_codes):
                shape = codes[block, first:].shape
                codes[block, first:] = torch.randint(
                    0, 256, shape, dtype=torch.uint8, generator=generator,
                    device=generator.device if generator is not None else "cpu").to(self.device)
            k_params[block, first:] = nan_word
            v_params[block, first:] = nan_word

    def attend(self, q: torch.Tensor, softmax_scale: float | None = None,
               plan: SplitPlan | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode attention of q [B, Hq, D] fp16 over the cached tokens -> [B, Hq, D] fp16."""
        return decode_attention_paged(q, self.pool, self.block_table, self.lengths,
                                      int(self.host_lengths.max()), softmax_scale, plan, out)

    def k_quantized(self, b: int) -> KVQuantized:
        """Sequence b's cached keys as formats.KVQuantized ([Hkv, length, ...])."""
        return self._quantized(b, 0)

    def v_quantized(self, b: int) -> KVQuantized:
        return self._quantized(b, 1)

    def _quantized(self, b: int, which: int) -> KVQuantized:
        n = int(self.host_lengths[b])
        blocks = torch.as_tensor(self.host_table[b, :, :-(-n // BLOCK_TOKENS)], dtype=torch.long,
                                 device=self.device)
        regions = _block_regions(self.pool[blocks], self.head_dim)
        codes, params = regions[which], regions[2 + which]  # [Hkv, nb, 16, ...]
        codes = codes.reshape(self.kv_heads, -1, self.head_dim // 2)[:, :n]
        params = params.reshape(self.kv_heads, -1)[:, :n]
        return _kv_quantized(codes.contiguous(), params, self.bits)


def _block_regions(blocks: torch.Tensor, head_dim: int):
    """Views of blocks uint8 [..., block_bytes]: K codes, V codes [..., 16, D/2] and K params,
    V params int32 [..., 16] (writable: they share the blocks' storage)."""
    half, t = head_dim // 2, BLOCK_TOKENS
    shape = blocks.shape[:-1]
    k_codes = blocks[..., :t * half].unflatten(-1, (t, half))
    v_codes = blocks[..., t * half:2 * t * half].unflatten(-1, (t, half))
    k_params = blocks[..., 2 * t * half:2 * t * half + 4 * t].view(torch.int32)
    v_params = blocks[..., 2 * t * half + 4 * t:].view(torch.int32)
    assert k_params.shape == shape + (t,) and v_params.shape == shape + (t,)
    return k_codes, v_codes, k_params, v_params


def _param_words(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp16 scales, zeros [..., 1] -> int32 words [...]: scale in the low half, zero in the high."""
    halves = torch.cat([scales.to(torch.float16), zeros.to(torch.float16)], dim=-1).contiguous()
    return halves.view(torch.int32).squeeze(-1)


def _kv_quantized(codes: torch.Tensor, params: torch.Tensor, bits: int) -> KVQuantized:
    """codes [..., n, D/2] and int32 param words [..., n] -> formats.KVQuantized."""
    halves = params.contiguous().view(torch.float16).unflatten(-1, (-1, 2))
    return KVQuantized(codes, halves[..., :1].contiguous(), halves[..., 1:].contiguous(), bits, 0)


def to_contiguous(cache: QuantizedKVCache):
    """The cache in rounds 1-3's contiguous layout for decode_attention_kv4: k_codes, k_params,
    v_codes, v_params ([B, Hkv, capacity, D/2] uint8 and [B, Hkv, capacity] int32); token
    slots past a sequence's blocks hold block 0's bytes (masked by the length)."""
    B, H, D, cap = cache.batch, cache.kv_heads, cache.head_dim, cache.capacity
    k_codes = torch.empty(B, H, cap, D // 2, dtype=torch.uint8, device=cache.device)
    v_codes = torch.empty_like(k_codes)
    k_params = torch.empty(B, H, cap, dtype=torch.int32, device=cache.device)
    v_params = torch.empty_like(k_params)
    for b in range(B):  # one sequence at a time: no second copy of the whole pool
        regions = _block_regions(cache.pool[cache.block_table[b].long()], D)  # [H, nb, 16, ..]
        for dst, src in zip((k_codes, v_codes, k_params, v_params), regions):
            dst[b] = src.reshape(dst[b].shape)
    return k_codes, k_params, v_codes, v_params


@functools.lru_cache(maxsize=64)
def _const_counts(T: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), T, dtype=torch.int32, device=device)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cache: QuantizedKVCache, counts=None) -> torch.Tensor:
    """Prefill: write k, v [B, Hkv, T, D] into the empty cache quantized, and return causal SDPA
    on the fresh FP16 q [B, Hq, T, D], k, v (rows past a sequence's count are padding)."""
    if cache.host_lengths.any():
        raise ValueError("prefill_attention needs an empty cache (lengths all 0); "
                         "use append + attend for tokens after the prompt")
    check_heads(q.shape[1], k.shape[1])
    cache.append(k, v, counts)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ------------------------------------------------------------------------------------------------
# The CPU reference (the kernels' contract)

def reference_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths,
                               bits: int = 4, clip: float = 1.0, quantized: bool = True,
                               softmax_scale: float | None = None) -> torch.Tensor:
    """Exact float64 attention of q [B, Hq, D] over k, v [B, Hkv, L, D] (first lengths[b] rows),
    on encode_kv -> decode_kv of the fp16 K/V when `quantized`. Returns [B, Hq, D] float64."""
    B, Hq, D = q.shape
    group = check_heads(Hq, k.shape[1])
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        kb, vb = k[b, :, :n], v[b, :, :n]
        if quantized:
            kb = decode_kv(encode_kv(kb, bits, 0, clip), torch.float64)
            vb = decode_kv(encode_kv(vb, bits, 0, clip), torch.float64)
        kb = kb.double().repeat_interleave(group, dim=0)
        vb = vb.double().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hnd->hn", q[b].double(), kb) * scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(scores, dim=-1), vb)
    return out
