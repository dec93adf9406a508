"""Decode attention over a 4-bit KV cache (issue 5): correctness first, then timings, in one call.

  python experiments/bench_attention.py --out DIR        # on the GPU: checks, timings, CSV + MD
  python experiments/bench_attention.py --plot CSV       # anywhere: the PNG from a results CSV
  python experiments/bench_attention.py --ablate --out DIR   # kernel variants x key rows (GPU)
  python experiments/bench_attention.py --trace --out DIR    # per-CTA timelines of key rows (GPU)
  python experiments/bench_attention.py --graph-trace --out DIR  # the same inside a CUDA graph
  python experiments/bench_attention.py --single gqa_32q_8kv 16 2048 kv4p 1   # a few calls of one
        row and build (split-K partitions S, 0 = planned), e.g. under ncu

Variants timed side by side in the same process on the same data:
  kv4   our kernel on the paged 4-bit cache (round 4: blocks of 16 tokens of one KV head, one
        contiguous run of codes + fp16 scale/zero, through a block table; round 5: each block
        copied by one bulk copy, the TMA engine): the planner's pick of
        build (4 or 8 warps a CTA) and split-K partitions; kv4_best: the fastest of a sweep over
        partition counts and both builds (a check of the planner's model), and the cluster
        builds ("_cl", round 8: split-K merged in a thread-block cluster, 2..8 partitions)
  twin  the planned kernel and plan launched the other way: plain <-> early start ("_pdl" builds,
        programmatic dependent launch; round 5, not planned: not faster)
  old   the same cache in rounds 1-3's contiguous layout (codes and params of K and V in four
        separate arrays), round 3's planner over its builds (round 3's kernel with 4 or 8 warps,
        round 1's kernel)
  fp16  round 1's kernel body reading the FP16 cache
  sdpa  torch scaled_dot_product_attention on the FP16 cache [B, Hkv, L, D] (enable_gqa for GQA)
All sequences of a row have the same length L (the SDPA baseline then needs no mask, its fastest
path). Each call is timed inside a CUDA graph (launch gaps as in a real decode step), median of
replays, rotating over enough input sets that they do not fit in L2. The HBM floor of a row is
its bytes moved (cache + q + out, + split-K partials) over the bandwidth of a large
device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atom_lab import kv_kernels as kk  # noqa: E402
from gpu_timing import capture_graph, time_graph  # noqa: E402  (experiments/ is on sys.path)
from atom_lab.formats import encode_kv, kv_bytes_per_token  # noqa: E402

HEAD_DIM = 128
CONFIGS = [("llama7b_mha", 32, 32), ("gqa_32q_8kv", 32, 8)]
BATCHES = [1, 16, 64, 256]
CONTEXTS = [512, 2048, 8192]
ROTATE_BYTES = 200e6  # > 2 x the 50 MB L2 for the smallest of the variants' working sets
TOL = 2e-3
SWEEP_SPLITS = (1, 2, 4, 8, 16)
PAGED_BUILDS = kk._FAMILY["kv4p"]
SWEEP_BUILDS = kk._PLANNED["kv4p"]  # the builds the planner picks from
CLUSTER_BUILDS = tuple(b for b in PAGED_BUILDS if kk.BUILDS[b].cluster)
CHECK_BUILDS = PAGED_BUILDS + kk._FAMILY["kv4"]
# Ablation: (label, cache, build, NVRTC options, check, splits or None), timed side by side on
# key rows (the target rows, a bandwidth-bound one, a lone-CTA one and a tiny one that shows the
# fixed cost of a call). cache: "paged" (as appended: an identity block table here), "shuffled"
# (the same blocks at random places in the pool), "old" (the contiguous layout). check: "ragged"
# (checked on ragged lengths and the row's data), "row" (the row's data only: right for an
# identity table alone), "diag" (computes something else: no correctness gate). splits None:
# the row's own list.
SUBSET = ("-DBUILD_ROUND1=0", "-DBUILD_D64=0")  # faster compiles: fewer builds
PAGED_ONLY = SUBSET + ("-DBUILD_OLD=0",)
ABLATIONS = [
    ("contiguous kv4 (round 3)", "old", "kv4", (), "ragged", None),
    ("contiguous kv4w8 (round 3)", "old", "kv4w8", (), "ragged", None),
    ("contiguous kv4v3 (round 1)", "old", "kv4v3", (), "ragged", None),
    ("paged kv4p", "paged", "kv4p", (), "ragged", None),
    ("paged kv4pw8", "paged", "kv4pw8", (), "ragged", None),
    ("paged kv4p_pdl (early start)", "paged", "kv4p_pdl", (), "ragged", None),
    ("paged kv4p_cl (split-K merged in a cluster)", "paged", "kv4p_cl", (), "ragged", (2, 4)),
    ("paged kv4pw8_cl (split-K merged in a cluster)", "paged", "kv4pw8_cl", (), "ragged",
     (2, 4, 8)),
    ("paged kv4pw8_pdl (early start)", "paged", "kv4pw8_pdl", (), "ragged", None),
    *[(f"kv4pw8_pdl, {n} blocks a warp prefetched", "paged", "kv4pw8_pdl",
       (f"-DKV4P_EARLY_BLOCKS={n}",) + PAGED_ONLY, "ragged", None) for n in (0, 1, 2, 8, 16)],
    ("paged kv4p, shuffled blocks", "shuffled", "kv4p", (), "ragged", None),
    ("kv4p without the table (direct addresses)", "paged", "kv4p", ("-DKV4P_DIRECT=1",) +
     PAGED_ONLY, "row", None),
    *[(f"{b}, block ids two fetches ahead (round 5)", "paged", b, ("-DKV4P_ID_BATCH=0",) +
       PAGED_ONLY, "ragged", None) for b in ("kv4p", "kv4pw8")],
    ("kv4pw8 without the table (direct addresses)", "paged", "kv4pw8", ("-DKV4P_DIRECT=1",) +
     PAGED_ONLY, "row", None),
    ("diag: kv4pw8 copies only, without the table (direct addresses)", "paged", "kv4pw8",
     ("-DKV4P_DIRECT=1", "-DKV4M_LOAD_ONLY=1") + PAGED_ONLY, "diag", (1,)),
    *[(f"{b} bulk copies, {n} stages", "paged", b, (f"-DKV4M_NST={n}",) + PAGED_ONLY, "ragged",
       None) for b, n in (("kv4p", 3), ("kv4p", 6), ("kv4pw8", 8))],
    *[(f"{b} cp.async copies (round 4)", "paged", b, ("-DKV4P_BULK=0",) + PAGED_ONLY, "ragged",
       None) for b in ("kv4p", "kv4pw8")],
    ("kv4pw8 bulk copies, 6 stages", "paged", "kv4pw8", ("-DKV4M_NST=6",) + PAGED_ONLY, "ragged",
     None),
    ("kv4pw8 bulk copies, one tile at a time (no software pipeline)", "paged", "kv4pw8",
     ("-DKV4M_PIPE=0",) + PAGED_ONLY, "ragged", None),
    ("kv4pw8 bulk copies, 5 stages", "paged", "kv4pw8", ("-DKV4M_NST=5",) + PAGED_ONLY, "ragged",
     None),
    ("kv4pw8 bulk copies, 3 stages", "paged", "kv4pw8", ("-DKV4M_NST=3",) + PAGED_ONLY, "ragged",
     None),
    *[(f"{b} bulk copies, without the L2 evict-first policy (round 9)", "paged", b,
       ("-DKV4P_EVICT_FIRST=0",) + PAGED_ONLY,
       "ragged", None) for b in ("kv4p", "kv4pw8")],
    ("diag: kv4p cp.async copies only (round 4)", "paged", "kv4p",
     ("-DKV4P_BULK=0", "-DKV4M_LOAD_ONLY=1") + PAGED_ONLY, "diag", (1,)),
    ("kv4p cp.async copies, L2 256B hint", "paged", "kv4p", ("-DKV4P_BULK=0", "-DKV4M_PF=256") +
     PAGED_ONLY, "ragged", None),
    ("diag: kv4p copies only", "paged", "kv4p", ("-DKV4M_LOAD_ONLY=1",) + PAGED_ONLY, "diag",
     (1,)),
    ("diag: kv4pw8 copies only", "paged", "kv4pw8", ("-DKV4M_LOAD_ONLY=1",) + PAGED_ONLY, "diag",
     (1,)),
    *[(f"diag: kv4pw8 copies only, without {what}", "paged", "kv4pw8",
       ("-DKV4M_LOAD_ONLY=1",) + flags + PAGED_ONLY, "diag", (1,)) for what, flags in (
        ("the query load", ("-DKV4M_DIAG_NO_QUERY=1",)),
        ("the epilogue", ("-DKV4M_DIAG_NO_EPILOGUE=1",)),
        ("the table, the query load and the epilogue",
         ("-DKV4P_DIRECT=1", "-DKV4M_DIAG_NO_QUERY=1", "-DKV4M_DIAG_NO_EPILOGUE=1")))],
    *[(f"{b}, round 6's epilogue", "paged", b, ("-DKV4M_LEAN_MERGE=0",) + PAGED_ONLY, "ragged",
       None) for b in ("kv4p", "kv4pw8")],
    *[(f"diag: {b} math only (first tiles copied, then recomputed)", "paged", b,
       ("-DKV4M_MATH_ONLY=1",) + PAGED_ONLY, "diag", (1,)) for b in ("kv4p", "kv4pw8")],
    *[(f"diag: kv4pw8 copies only, {what}", "paged", "kv4pw8",
       ("-DKV4M_LOAD_ONLY=1",) + flags + PAGED_ONLY, "diag", (1,)) for what, flags in (
        ("then only the output stores (no merge)", ("-DKV4M_DIAG_STORE_ONLY=1",)),
        ("the merge without the output stores", ("-DKV4M_DIAG_NO_STORE=1",)))],
    *[(f"diag: kv4pw8{what}, the epilogue run twice (the second time on warm code)", "paged",
       "kv4pw8", flags + ("-DKV4M_DIAG_EPI_REPS=2",) + PAGED_ONLY, check, (1,))
      for what, flags, check in (("", (), "ragged"), (" copies only", ("-DKV4M_LOAD_ONLY=1",),
                                                           "diag"))],
    # (math only without the epilogue is no such thing: nothing stored, the math is dropped)
    ("diag: kv4pw8 math only, the merge without the output stores", "paged", "kv4pw8",
     ("-DKV4M_MATH_ONLY=1", "-DKV4M_DIAG_NO_STORE=1") + PAGED_ONLY, "diag", (1,)),
    *[(f"diag: two partitions, {b}, {what}", "paged", b, flags + PAGED_ONLY, "diag", (2,))
      for b in ("kv4pw8", "kv4pw8_cl") for what, flags in (
          ("math only", ("-DKV4M_MATH_ONLY=1",)), ("copies only", ("-DKV4M_LOAD_ONLY=1",)),
          ("copies only, without the epilogue",
           ("-DKV4M_LOAD_ONLY=1", "-DKV4M_DIAG_NO_EPILOGUE=1")))],
    ("diag: contiguous kv4 copies only", "old", "kv4", ("-DKV4M_LOAD_ONLY=1",) + SUBSET, "diag",
     (1,)),
    ("diag: plain 16-byte reads of the pool (kernels/read_probe.cu)", "read", "", (), "diag", (1,)),
    ("diag: 16-byte reads, one contiguous range a CTA (as decode CTAs)", "read_ranges", "", (),
     "diag", (1,)),
    *[(f"diag: 16-byte reads, one range a CTA, {u} loads in flight a thread", f"read_ranges_u{u}",
       "", (), "diag", (1,)) for u in (8, 16)],
    *[(f"diag: bulk copies of {c} B, one range a CTA, {nw} warps x {n} stages", "read_bulk", "",
       (f"-DBULK_NW={nw}", f"-DBULK_NST={n}", f"-DBULK_CHUNK={c}"), "diag", (1,))
      for c, nw, n in ((2176, 8, 4), (2176, 8, 8), (2176, 16, 4), (4352, 8, 4), (8704, 8, 2))],
    *[(f"diag: bulk copies of 2176 B, one range a CTA, 8 warps x 4 stages, {n} CTA(s) an SM",
       "read_bulk", "", ("-DBULK_NW=8", "-DBULK_NST=4", "-DBULK_CHUNK=2176",
                         f"-DBULK_SMEM={smem}"), "diag", (1,)) for n, smem in ((2, 100000),
                                                                              (1, 150000))],
    # Round 10: the design's bound on GQA B16 L2048. The math kept, the merge gone (each warp
    # stores its own partial after one block barrier), then also the table and the query load,
    # and without the evict-first policy; and a grid that returns at entry (what a call costs
    # before any work).
    *[(f"diag: kv4pw8, no merge, the stores after one block barrier{what}", "paged", "kv4pw8",
       ("-DKV4M_DIAG_RAW_STORE=1",) + flags + PAGED_ONLY, "diag", (1,)) for what, flags in (
        ("", ()), (", without the table", ("-DKV4P_DIRECT=1",)),
        (", without the table and the query load", ("-DKV4P_DIRECT=1", "-DKV4M_DIAG_NO_QUERY=1")),
        (", without the L2 evict-first policy", ("-DKV4P_EVICT_FIRST=0",)))],
    *[(f"{b}, round 9's merge (partials after a block barrier, merge_and_store)", "paged", b,
       ("-DKV4M_OWN_RING_MERGE=0",) + PAGED_ONLY, "ragged", None) for b in ("kv4p", "kv4pw8")],
    ("diag: kv4pw8 returning at entry (the grid's launch)", "paged", "kv4pw8",
     ("-DKV4M_EMPTY=1",) + PAGED_ONLY, "diag", (1,)),
    # Round 11: the rings as rounds 5-10 had them, 16 bytes past a 128-byte boundary
    *[(f"{b}, the rings 16 bytes past a 128-byte boundary (rounds 5-10)", "paged", b,
       ("-DKV4M_SMEM_ALIGN=16",) + PAGED_ONLY, "ragged", None) for b in ("kv4p", "kv4pw8")],
    ("paged kv4p, blocks position-major (tile, sequence, head)", "position", "kv4p", (), "ragged",
     None),
    ("paged kv4pw8, blocks position-major (tile, sequence, head)", "position", "kv4pw8", (),
     "ragged", None),
]
# In-graph timelines (-DKV4M_TRACE=1, --graph-trace): (config, batch, context, build, options)
GRAPH_TRACES = [("gqa_32q_8kv", 16, 2048, "kv4pw8", opts) for opts in (
    (), ("-DKV4M_DIAG_RAW_STORE=1",), ("-DKV4P_EVICT_FIRST=0",),
    ("-DKV4P_EVICT_FIRST=0", "-DKV4M_DIAG_RAW_STORE=1"))]
# (config, batch, context, split-K partition counts)
ABLATION_ROWS = [("llama7b_mha", 16, 2048, (1,)), ("gqa_32q_8kv", 64, 2048, (1,)),
                 ("gqa_32q_8kv", 16, 8192, (1, 2)), ("gqa_32q_8kv", 64, 8192, (1,)),
                 ("gqa_32q_8kv", 16, 2048, (1, 2, 4)), ("llama7b_mha", 256, 2048, (1,)),
                 ("gqa_32q_8kv", 16, 64, (1,)), ("gqa_32q_8kv", 1, 2048, (8, 16)),
                 ("llama7b_mha", 1, 8192, (4, 8))]
# Timelines (-DKV4M_TRACE=1): (config, batch, context, cache, build, splits, extra options)
TRACES = [("llama7b_mha", 16, 2048, "paged", "kv4p", 1, ()),
          ("llama7b_mha", 16, 2048, "paged", "kv4pw8", 1, ()),
          ("llama7b_mha", 16, 2048, "old", "kv4w8", 1, ()),
          ("gqa_32q_8kv", 16, 8192, "paged", "kv4p", 1, ()),
          ("gqa_32q_8kv", 16, 8192, "paged", "kv4pw8", 1, ()),
          ("gqa_32q_8kv", 16, 2048, "paged", "kv4pw8", 1, ()),
          ("gqa_32q_8kv", 64, 8192, "paged", "kv4p", 1, ()),
          ("gqa_32q_8kv", 16, 2048, "paged", "kv4pw8", 1, ("-DKV4M_OWN_RING_MERGE=0",)),
          ("gqa_32q_8kv", 16, 2048, "paged", "kv4pw8", 1, ("-DKV4M_DIAG_RAW_STORE=1",))]


def log(msg: str) -> None:
    print(msg, flush=True)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------------
# Measurements

def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:])


def time_calls(fns, target_ms: float = 20.0, replays: int = 7) -> tuple[float, str, float]:
    """Median seconds per call of fns (called round-robin), inside a CUDA graph when possible."""
    t = time_graph(fns, target_ms, replays, max_calls=3000, fallback=True, log=log)
    return t.seconds, t.mode, t.spread


# ------------------------------------------------------------------------------------------------
# The cache layouts a variant reads (a "set" is a dict: q, cache, and what else a row needs)

def shuffle_blocks(cache, gen=None):
    """The cache's blocks moved to random places of a new pool, and the table that finds them."""
    perm = torch.randperm(cache.num_blocks, device=cache.device, generator=gen)
    pool = torch.empty_like(cache.pool)
    pool[perm] = cache.pool
    return pool, perm[cache.block_table.long()].int()


def position_major_blocks(cache):
    """The cache's blocks moved so that block i of every (sequence, KV head) lies next to block i
    of the others (pool order: tile, sequence, head), and the table that finds them."""
    table = cache.block_table.long()  # [B, Hkv, max_blocks]
    order = table.permute(2, 0, 1).reshape(-1)  # old ids in position-major order
    pool = torch.empty_like(cache.pool)
    pool[: order.numel()] = cache.pool[order]
    new_id = torch.zeros(cache.pool.shape[0], dtype=torch.long, device=order.device)
    new_id[order] = torch.arange(order.numel(), device=order.device)
    return pool, new_id[table].int()


def layout_args(s: dict, layout: str) -> tuple:
    """The tensors the decode function of `layout` takes before the lengths (made once a set)."""
    c = s["cache"]
    if layout == "paged":
        return c.pool, c.block_table
    if layout not in s:
        make = {"shuffled": shuffle_blocks, "position": position_major_blocks}.get(
            layout, kk.to_contiguous)
        s[layout] = make(c)
    return s[layout]


def decode(s: dict, layout: str, max_len: int, plan, out, opts: tuple = ()):
    fn = kk.decode_attention_kv4 if layout == "old" else kk.decode_attention_paged
    return fn(s["q"], *layout_args(s, layout), s["cache"].lengths, max_len, plan=plan, out=out,
              compile_options=opts)


def layout_of(build: str) -> str:
    return "paged" if build in PAGED_BUILDS else "old"


# ------------------------------------------------------------------------------------------------
# Correctness (fresh random inputs, ragged lengths, poisoned outputs)

def same_encoding(cache, which, rows, b, clip) -> bool:
    got, expect = getattr(cache, f"{which}_quantized")(b), encode_kv(rows, cache.bits, 0, clip)
    return all(torch.equal(getattr(got, f), getattr(expect, f)) for f in ("codes", "scales", "zeros"))


def poisoned_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of a NaN-poisoned output, inf if any element was left unwritten."""
    torch.cuda.synchronize()
    return rel(out, ref) if torch.isfinite(out).all() else math.inf


def check_correctness() -> list[dict]:
    records = []
    gen = torch.Generator(device="cuda").manual_seed(1234)
    lengths = [1, 17, 300, 1000, 4099]
    for D in kk.HEAD_DIMS:
        for kv_heads, group in [(2, 1), (2, 3), (1, 4), (2, 8), (1, 12)]:
            B = len(lengths)
            cap = -(-max(lengths) // 16) * 16
            k = torch.randn(B, kv_heads, cap, D, device="cuda", generator=gen).half()
            v = torch.randn(B, kv_heads, cap, D, device="cuda", generator=gen).half()
            q = (2 * torch.randn(B, kv_heads * group, D, device="cuda", generator=gen)).half()
            cache = kk.QuantizedKVCache(B, kv_heads, D, cap, clip=0.95)
            cache.append(k, v, lengths)
            exact_codes = all(same_encoding(cache, which, src[b, :, :n], b, 0.95)
                              for b, n in enumerate(lengths) for which, src in (("k", k), ("v", v)))
            ref4 = kk.reference_decode_attention(q, k, v, lengths, clip=0.95)
            ref16 = kk.reference_decode_attention(q, k, v, lengths, quantized=False)
            s = dict(q=q, cache=cache)
            s["shuffled"] = shuffle_blocks(cache, gen)
            for chunk in (None, 64, 4160):
                plan = None if chunk is None else kk.SplitPlan(-(-max(lengths) // chunk), chunk)
                rec = dict(head_dim=D, kv_heads=kv_heads, group=group, chunk=chunk or "plan",
                           append_exact=exact_codes)
                out = torch.full_like(q, float("nan"))
                cache.attend(q, plan=plan, out=out)  # planned build
                rec["planned_err"] = poisoned_err(out, ref4)
                for build in CHECK_BUILDS:  # each build, planned splits or this row's
                    p = kk.SplitPlan(plan.splits, plan.chunk, build) if plan else \
                        kk.SplitPlan(3, 1408, build)
                    if kk.BUILDS[build].cluster:
                        p = split_plan(max(lengths), p.splits, build)
                    for layout in ((layout_of(build), "shuffled") if build in PAGED_BUILDS
                                   else ("old",)):
                        out = torch.full_like(q, float("nan"))
                        decode(s, layout, max(lengths), p, out)
                        name = build + ("_shuffled" if layout == "shuffled" else "")
                        rec[f"{name}_err"] = poisoned_err(out, ref4)
                out = torch.full_like(q, float("nan"))
                kk.decode_attention_fp16(q, k, v, cache.lengths, max(lengths), plan=plan, out=out)
                rec["fp16_err"] = poisoned_err(out, ref16)
                errs = [v_ for k_, v_ in rec.items() if k_.endswith("_err")]
                rec["ok"] = exact_codes and max(errs) < TOL
                records.append(rec)
                log(f"  check D={D} kv={kv_heads} g={group} chunk={rec['chunk']}: "
                    f"append_exact={exact_codes} " +
                    " ".join(f"{k_}={v_:.2e}" for k_, v_ in rec.items() if k_.endswith("_err")) +
                    f" {'ok' if rec['ok'] else 'FAIL'}")
    return records


# ------------------------------------------------------------------------------------------------
# One benchmark row

def rotating_sets(B, Hq, Hkv, L) -> list[dict]:
    """Sets with their caches filled, enough that calls rotating through them read more than the
    L2 holds (as the timed calls do)."""
    cache_kv4 = B * Hkv * L * (HEAD_DIM // 2 + 4) * 2
    sets = [make_set(B, Hq, Hkv, L, HEAD_DIM)
            for _ in range(max(1, min(256, math.ceil(ROTATE_BYTES / cache_kv4))))]
    for s in sets:
        s["cache"].append(s["k"], s["v"])
    return sets


def make_set(B, Hq, Hkv, L, D):
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.float16)
    cache = kk.QuantizedKVCache(B, Hkv, D, L)
    return dict(q=q, k=k, v=v, cache=cache, out4=torch.empty_like(q), out16=torch.empty_like(q))


def bench_row(name, Hq, Hkv, B, L, bw, D=HEAD_DIM) -> dict | None:
    cache_fp16 = B * Hkv * L * D * 2 * 2
    cache_kv4 = B * Hkv * L * (D // 2 + 4) * 2
    free, _ = torch.cuda.mem_get_info()
    nsets = max(1, min(256, math.ceil(ROTATE_BYTES / cache_kv4)))
    need = nsets * (cache_fp16 + 2 * cache_kv4) * 1.05 + cache_fp16 * 0.1  # paged + contiguous
    if need > free * 0.9:
        log(f"  skip {name} B={B} L={L}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
        return None
    sets = [make_set(B, Hq, Hkv, L, D) for _ in range(nsets)]
    # Bulk prefill append: the first set timed (kernel already compiled by the checks).
    s0 = sets[0]
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    e0.record()
    s0["cache"].append(s0["k"], s0["v"])
    e1.record()
    e1.synchronize()
    append_s = e0.elapsed_time(e1) / 1e3
    for s in sets[1:]:
        s["cache"].append(s["k"], s["v"])
    for s in sets:
        layout_args(s, "old")
    torch.cuda.synchronize()

    group = Hq // Hkv
    head_blocks = -(-group // kk.HEADS_PER_CTA)
    plan4 = _plan("kv4p", B * Hkv * head_blocks, L)
    plan_old = _plan("kv4", B * Hkv * head_blocks, L)
    plan16 = _plan("fp16", B * Hkv * head_blocks, L)
    gqa = Hq != Hkv

    def kv4(s, plan=plan4):
        return decode(s, "paged", L, plan, s["out4"])

    def old(s):
        return decode(s, "old", L, plan_old, s["out4"])

    def fp16(s):
        return kk.decode_attention_fp16(s["q"], s["k"], s["v"], s["cache"].lengths, L,
                                        plan=plan16, out=s["out16"])

    def sdpa(s):
        return F.scaled_dot_product_attention(s["q"].unsqueeze(2), s["k"], s["v"],
                                              enable_gqa=gqa).squeeze(2)

    # Correctness on this row's data: first and last sequence against float64 references.
    errs = dict(kv4=0.0, old=0.0, fp16=0.0, sdpa=0.0)
    s0["out4"].fill_(float("nan"))
    s0["out16"].fill_(float("nan"))
    outs = dict(kv4=kv4(s0).clone(), fp16=fp16(s0), sdpa=sdpa(s0))
    s0["out4"].fill_(float("nan"))
    outs["old"] = old(s0)
    for b in sorted({0, B - 1}):
        sl = slice(b, b + 1)
        ref4 = kk.reference_decode_attention(s0["q"][sl], s0["k"][sl], s0["v"][sl], [L])
        ref16 = kk.reference_decode_attention(s0["q"][sl], s0["k"][sl], s0["v"][sl], [L],
                                              quantized=False)
        for name_, ref in (("kv4", ref4), ("old", ref4), ("fp16", ref16), ("sdpa", ref16)):
            o = outs[name_][sl]
            errs[name_] = max(errs[name_], rel(o, ref) if torch.isfinite(o).all() else math.inf)
    exact = same_encoding(s0["cache"], "v", s0["v"][B - 1], B - 1, 1.0)

    results = {}
    for vname, fn in (("kv4", kv4), ("old", old), ("fp16", fp16), ("sdpa", sdpa)):
        results[vname] = time_calls([lambda s=s, fn=fn: fn(s) for s in sets])
    sweep = {(plan4.kernel, plan4.splits): results["kv4"][0]}
    twin = launch_twin(plan4.kernel)
    results["twin"] = time_calls([lambda s=s: kv4(s, kk.SplitPlan(plan4.splits, plan4.chunk, twin))
                                  for s in sets])
    for build in SWEEP_BUILDS + CLUSTER_BUILDS:
        for n in SWEEP_SPLITS:
            p = split_plan(L, n, build)
            if (build, p.splits) not in sweep:
                sweep[(build, p.splits)] = time_calls([lambda s=s, p=p: kv4(s, p) for s in sets])[0]
    best = min(sweep, key=sweep.get)

    def traffic(cache_bytes, plan):  # a cluster's partials stay on chip
        partials = 2 * B * Hq * plan.splits * (D + 1) * 4 \
            if plan.splits > 1 and not kk.BUILDS[plan.kernel or "kv4p"].cluster else 0
        return cache_bytes + 2 * B * Hq * D * 2 + partials

    bytes4, bytes16 = traffic(cache_kv4, plan4), traffic(cache_fp16, plan16)
    bytes_sdpa = cache_fp16 + 2 * B * Hq * D * 2
    t4, told, t16, ts = (results[v][0] for v in ("kv4", "old", "fp16", "sdpa"))
    row = dict(
        config=name, q_heads=Hq, kv_heads=Hkv, head_dim=D, batch=B, context=L,
        kv4_build=plan4.kernel, kv4_splits=plan4.splits, old_build=plan_old.kernel,
        old_splits=plan_old.splits, fp16_splits=plan16.splits, rotating_sets=nsets,
        kv4_us=t4 * 1e6, old_us=told * 1e6, fp16_us=t16 * 1e6, sdpa_us=ts * 1e6,
        twin_build=twin, twin_us=results["twin"][0] * 1e6,
        twin_speedup_vs_sdpa=ts / results["twin"][0],
        kv4_best_us=sweep[best] * 1e6, kv4_best_build=best[0], kv4_best_splits=best[1],
        sweep=" ".join(f"{b_}/{n_}:{t_ * 1e6:.1f}" for (b_, n_), t_ in sorted(sweep.items())),
        speedup_vs_sdpa=ts / t4, speedup_vs_old=told / t4, old_speedup_vs_sdpa=ts / told,
        speedup_vs_fp16_kernel=t16 / t4,
        kv4_MB=bytes4 / 1e6, fp16_MB=bytes16 / 1e6,
        kv4_floor_us=bytes4 / bw * 1e6, fp16_floor_us=bytes_sdpa / bw * 1e6,
        kv4_hbm_pct=100 * bytes4 / t4 / bw,
        old_hbm_pct=100 * traffic(cache_kv4, plan_old) / told / bw,
        fp16_hbm_pct=100 * bytes16 / t16 / bw, sdpa_hbm_pct=100 * bytes_sdpa / ts / bw,
        kv4_err=errs["kv4"], old_err=errs["old"], fp16_err=errs["fp16"], sdpa_err=errs["sdpa"],
        append_exact=exact,
        append_GBps=(B * Hkv * L * D * 2 * 2 + cache_kv4) / append_s / 1e9,
        timing="/".join(sorted({results[v][1] for v in results})),
        spread_pct=100 * max(results[v][2] for v in results),
    )
    log(f"  {name:12s} B={B:3d} L={L:5d}: kv4 {row['kv4_us']:8.1f} us ({row['kv4_hbm_pct']:5.1f}% HBM,"
        f" {plan4.kernel} S={plan4.splits})  old {row['old_us']:8.1f} ({plan_old.kernel} "
        f"S={plan_old.splits})  fp16 {row['fp16_us']:8.1f}"
        f"  sdpa {row['sdpa_us']:8.1f} us ({row['sdpa_hbm_pct']:5.1f}%)  x{row['speedup_vs_sdpa']:.2f}"
        f"  twin {twin} {row['twin_us']:.1f}  sweep {row['sweep']}"
        f"  err {row['kv4_err']:.1e}/{row['old_err']:.1e}/{row['fp16_err']:.1e}/"
        f"{row['sdpa_err']:.1e}")
    del sets, outs
    torch.cuda.empty_cache()
    return row


def launch_twin(build: str) -> str:
    """The same kernel body launched the other way: plain <-> early start (PDL); a cluster
    build's twin merges the same partitions through global memory (the last CTA's ticket)."""
    if build.endswith("_cl"):
        return build[:-len("_cl")]
    return build[:-len("_pdl")] if build.endswith("_pdl") else build + "_pdl"


def _plan(family: str, ctas: int, max_len: int, builds=None) -> kk.SplitPlan:
    shapes = kk.kernel_shapes(family, HEAD_DIM, torch.cuda.current_device(), builds=builds)
    return kk.plan_splits(ctas, max_len, kk._token_bytes(family, HEAD_DIM), shapes)


# ------------------------------------------------------------------------------------------------
# Reports

TARGET = "context >= 2048 and batch >= 16"


def in_target(r) -> bool:
    return int(r["context"]) >= 2048 and int(r["batch"]) >= 16


def write_csv(rows, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_markdown(rows, checks, env, path: Path) -> None:
    lines = [f"# Decode attention, 4-bit KV cache vs FP16 KV ({env['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "Equal lengths per row (SDPA without a mask, its fastest path). Times: median per "
              "call inside CUDA graphs, rotating inputs larger than L2. HBM % = bytes moved / time "
              "/ copy bandwidth. kv4: the paged cache (round 4), the planner's build and split-K "
              "partitions S (kv4p / kv4pw8: 4 / 8 warps a CTA). old: the same cache in rounds "
              "1-3's contiguous layout, round 3's planner (kv4 / kv4w8: round-3 kernel, kv4v3: "
              "round 1's). Sweep: S in 1..16 for the builds the planner picks from, a check of "
              "its cost model, and S in 2..8 for the cluster builds (`_cl`: the partitions "
              "merged in a thread-block cluster through distributed shared memory). twin: the "
              "planned kernel and plan launched the other way (plain <-> early start, `_pdl`: "
              "programmatic dependent launch, L2 prefetches of the first "
              "blocks before waiting for the previous kernel, here the previous call).", ""]
    lines.append("| config | batch | context | kv4 us | old us | fp16 kernel us | SDPA us | x SDPA | "
                 "x old | old x SDPA | kv4 HBM % | old HBM % | SDPA HBM % | kv4 floor us | "
                 "build, S | old build, S | kv4 err | sweep best us (build, S) | twin us (build) | "
                 "twin x SDPA | target |")
    lines.append("|" + "---|" * 21)
    for r in rows:
        target = ""
        if in_target(r):
            ok = r["speedup_vs_sdpa"] >= 3 and r["kv4_hbm_pct"] >= 70
            target = "met" if ok else (f"missed (x{r['speedup_vs_sdpa']:.2f}, "
                                       f"{r['kv4_hbm_pct']:.0f}%)")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['context']} | {r['kv4_us']:.1f} | "
            f"{r['old_us']:.1f} | {r['fp16_us']:.1f} | {r['sdpa_us']:.1f} | "
            f"{r['speedup_vs_sdpa']:.2f} | {r['speedup_vs_old']:.2f} | "
            f"{r['old_speedup_vs_sdpa']:.2f} | {r['kv4_hbm_pct']:.1f} | "
            f"{r['old_hbm_pct']:.1f} | {r['sdpa_hbm_pct']:.1f} | {r['kv4_floor_us']:.1f} | "
            f"{r['kv4_build']}, {r['kv4_splits']} | {r['old_build']}, {r['old_splits']} | "
            f"{r['kv4_err']:.1e} | {r['kv4_best_us']:.1f} "
            f"({r['kv4_best_build']}, {r['kv4_best_splits']}) | {r['twin_us']:.1f} "
            f"({r['twin_build']}) | {r['twin_speedup_vs_sdpa']:.2f} | {target} |")
    lines += ["", f"Memory per cached token (K + V, all KV heads, head_dim {HEAD_DIM}; a paged block "
              f"of one KV head is {kk.block_bytes(HEAD_DIM)} bytes = 16 tokens, a multiple of 128 "
              f"with no padding, so only a sequence's last, partly filled block holds unused "
              f"slots):", "",
              "| config | 4-bit bytes | FP16 bytes | ratio |", "|---|---|---|---|"]
    for name, _, hkv in CONFIGS:
        q4, f16 = kk.block_bytes(HEAD_DIM) * hkv // kk.BLOCK_TOKENS, 2 * hkv * HEAD_DIM * 2
        assert q4 == kv_bytes_per_token(HEAD_DIM, hkv)
        lines.append(f"| {name} | {q4} | {f16} | {q4 / f16:.4f} |")
    n_ok = sum(c["ok"] for c in checks)
    names = [k[:-4] for k in checks[0] if k.endswith("_err")]
    worst = {b: max(c[f"{b}_err"] for c in checks) for b in names}
    lines += ["", f"Correctness checks (ragged lengths 1..4099, poisoned outputs, head_dim 64/128, "
              f"GQA groups 1/3/4/8/12, split plans, every build, paged builds also on a "
              f"shuffled pool): {n_ok}/{len(checks)} passed; max error per variant " +
              ", ".join(f"{b} {e:.2e}" for b, e in worst.items()) +
              " (relative Frobenius vs float64)."]
    path.write_text("\n".join(lines) + "\n")


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    names = [c[0] for c in CONFIGS if any(r["config"] == c[0] for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["config"] == name]
        labels = [f"B{r['batch']}\nL{r['context']}" for r in sub]
        x = range(len(sub))
        w = 0.21
        for i, (col, lab) in enumerate((("kv4_us", "4-bit KV, paged (planned)"),
                                        ("old_us", "4-bit KV, contiguous (round 3)"),
                                        ("fp16_us", "FP16 KV (round-1 kernel)"),
                                        ("sdpa_us", "FP16 KV (torch SDPA)"))):
            ax.bar([j + (i - 1.5) * w for j in x], [float(r[col]) for r in sub], w, label=lab)
        ax.scatter(list(x), [float(r["kv4_floor_us"]) for r in sub], marker="_", s=200,
                   color="k", label="4-bit HBM floor", zorder=3)
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(name)
        ax.set_ylabel("us per decode step (one layer)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=130)


def split_plan(L: int, n: int, build: str) -> kk.SplitPlan:
    """About n partitions of L tokens (a cluster build: 2..MAX_CLUSTER, its merge's range)."""
    if kk.BUILDS[build].cluster:
        n = min(max(n, 2), kk.MAX_CLUSTER)
    chunk = kk._align(-(-L // n), kk.CHUNK_ALIGN)
    return kk.SplitPlan(-(-L // chunk), chunk, build)


def variant_check(layout: str, build: str, opts: tuple) -> float:
    """Worst relative error of a build variant on ragged lengths (partial tiles, one token),
    GQA, NaN params and random codes past each length, one and many partitions."""
    gen = torch.Generator(device="cuda").manual_seed(77)
    lengths, cap, worst = [1, 17, 300, 1029], 1040, 0.0
    dims = (128,) if "-DBUILD_D64=0" in opts else kk.HEAD_DIMS
    for D in dims:
        kv_heads, group = 2, 4
        k = torch.randn(len(lengths), kv_heads, cap, D, device="cuda", generator=gen).half()
        v = torch.randn(len(lengths), kv_heads, cap, D, device="cuda", generator=gen).half()
        q = (2 * torch.randn(len(lengths), kv_heads * group, D, device="cuda",
                             generator=gen)).half()
        cache = kk.QuantizedKVCache(len(lengths), kv_heads, D, cap)
        cache.append(k, v, lengths)
        cache.poison_unused(gen)
        s = dict(q=q, cache=cache)
        ref = kk.reference_decode_attention(q, k, v, lengths)
        for n in (1, 3, 17):
            out = torch.full_like(q, float("nan"))
            decode(s, layout, max(lengths), split_plan(max(lengths), n, build), out, opts)
            worst = max(worst, poisoned_err(out, ref))
    return worst


def read_pool(pool: torch.Tensor, ctas_per_sm: int = 8, ranges: int | None = None,
              path: str = "read", opts: tuple[str, ...] = ()) -> None:
    """Read every byte of the pool once (the copy ceiling in this timing): plain 16-byte loads as
    one grid-stride sweep ("read"), or `ranges` CTAs each reading one contiguous range with 4
    ("read_ranges"), 8 or 16 ("read_ranges_u8", "_u16") loads in flight a thread, or the same
    ranges through bulk copies into per-warp rings ("read_bulk"; opts: -DBULK_NW / _NST /
    _CHUNK, and _SMEM: the shared memory a CTA asks for, which sets the CTAs an SM)."""
    from atom_lab.cuda import get_kernel

    sms = torch.cuda.get_device_properties(pool.device).multi_processor_count
    grid, n16 = ranges or sms * ctas_per_sm, pool.numel() // 16
    if READ_SINK.get(grid) is None:
        READ_SINK[grid] = torch.zeros(grid, dtype=torch.int32, device=pool.device)
    sink = kk._ptr(READ_SINK[grid])
    if path == "read_bulk":
        flags = dict(o[2:].split("=") for o in opts)
        nw, nst = int(flags.get("BULK_NW", 8)), int(flags.get("BULK_NST", 4))
        chunk = int(flags.get("BULK_CHUNK", 2176))
        kernel = get_kernel("read_probe", "bulk_probe_ranges", opts)
        smem = int(flags.get("BULK_SMEM", nw * nst * chunk))  # more: fewer CTAs an SM
        kernel.max_dynamic_shared_size_bytes = smem
        per_cta = -(-pool.numel() // grid)
        kk._launch(kernel, (grid, 1, 1), (nw * 32, 1, 1),
                   (kk._ptr(pool), np.int64(pool.numel()), np.int64(per_cta), sink), smem)
    elif ranges:
        name = "read_probe_ranges" + path[len("read_ranges"):]
        kk._launch(get_kernel("read_probe", name), (grid, 1, 1), (256, 1, 1),
                   (kk._ptr(pool), np.int64(n16), np.int64(-(-n16 // grid)), sink))
    else:
        kk._launch(get_kernel("read_probe", "read_probe_v16"), (grid, 1, 1), (256, 1, 1),
                   (kk._ptr(pool), np.int64(n16), sink))


READ_SINK: dict[int, torch.Tensor] = {}


def ablate(out_dir: Path, only: list[str] | None = None, rows: list[str] | None = None) -> None:
    """Time every ABLATIONS variant (or those whose label contains one of `only`) on
    ABLATION_ROWS (or those named in `rows` as CONFIG:B:L); each "ragged" variant is checked
    first on ragged inputs, each non-diagnostic one on the row's data."""
    records, checked = [], {}
    ablation_rows = [r for r in ABLATION_ROWS if not rows or f"{r[0]}:{r[1]}:{r[2]}" in rows]
    if rows and len(ablation_rows) != len(rows):
        raise SystemExit(f"--rows: each of {rows} must be one of "
                         f"{[f'{c}:{b}:{l}' for c, b, l, _ in ABLATION_ROWS]}")
    variants = [a for a in ABLATIONS if not only or any(
        a[0] == o[1:] if o.startswith("=") else o in a[0] for o in only)]
    for label, layout, build, opts, check, _ in variants:
        if check == "ragged":
            checked[label] = variant_check(layout, build, opts)
            log(f"  check {label}: err {checked[label]:.2e}")
    for config, B, L, row_splits in ablation_rows:
        _, hq, hkv = next(c for c in CONFIGS if c[0] == config)
        cache_kv4 = B * hkv * L * (HEAD_DIM // 2 + 4) * 2
        sets = rotating_sets(B, hq, hkv, L)
        for s in sets:
            for layout in ("old", "shuffled", "position"):
                layout_args(s, layout)
        s0 = sets[0]
        identity = torch.arange(B * hkv * (L // 16), device="cuda", dtype=torch.int32)
        identity = identity.view(B, hkv, -1)
        assert torch.equal(s0["cache"].block_table, identity)  # what the direct variant assumes
        ref = kk.reference_decode_attention(s0["q"][:1], s0["k"][:1], s0["v"][:1], [L])
        line = []
        for label, layout, build, opts, check, splits in variants:
            if layout.startswith("read"):
                ctas = None if layout == "read" else B * hkv  # one range a sequence and KV head
                t = time_calls([lambda s=s: read_pool(s["cache"].pool, ranges=ctas, path=layout,
                                                      opts=opts) for s in sets])[0]
                records.append(dict(config=config, batch=B, context=L, variant=label, splits=1,
                                    us=t * 1e6, err=math.nan, check=check, ragged_err=math.nan,
                                    MB=cache_kv4 / 1e6))
                line.append(f"{label} {t * 1e6:.1f}")
                continue
            for n in splits or row_splits:
                plan = split_plan(L, n, build)
                if plan.splits != n:
                    continue
                s0["out4"].fill_(float("nan"))
                decode(s0, layout, L, plan, s0["out4"], opts)
                err = poisoned_err(s0["out4"][:1], ref)
                ok = check == "diag" or (err < TOL and checked.get(label, 0.0) < TOL)
                t = time_calls([lambda s=s, plan=plan, layout=layout, opts=opts:
                                decode(s, layout, L, plan, s["out4"], opts) for s in sets])[0] \
                    if ok else math.nan
                records.append(dict(config=config, batch=B, context=L, variant=label,
                                    splits=plan.splits, us=t * 1e6, err=err, check=check,
                                    ragged_err=checked.get(label, math.nan),
                                    MB=cache_kv4 / 1e6))
                line.append(f"{label}/S{plan.splits} {t * 1e6:.1f}")
        log(f"  ablate {config} B={B} L={L}: " + " | ".join(line))
        del sets
        torch.cuda.empty_cache()
    (out_dir / "attention_ablation.json").write_text(json.dumps(records, indent=1))
    columns = [(c, b, l) for c, b, l, _ in ablation_rows]
    lines = ["| variant | S | " + " | ".join(f"{c} B{b} L{l}" for c, b, l in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for label, *_ in variants:
        for n in sorted({r["splits"] for r in records if r["variant"] == label}):
            cells = [next((f"{r['us']:.1f}" for r in records if r["variant"] == label and
                           (r["config"], r["batch"], r["context"]) == row and r["splits"] == n), "")
                     for row in columns]
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    (out_dir / "attention_ablation.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


def trace_buffers(opts: tuple) -> tuple:
    """The trace build's device buffers: per-CTA stamps [2][5 * 65536] and per-warp loop ends
    [2][16 * 65536] (by call parity), and the launch counter that sets the parity."""
    from atom_lab.cuda import load_module
    import cupy

    mod = load_module("decode_attention", opts)
    return tuple(cupy.ndarray((n,), dtype=dt, memptr=mod.get_global(name)) for name, n, dt in (
        ("kv4m_trace", 2 * 5 * 65536, cupy.uint64),
        ("kv4m_warp_trace", 2 * 16 * 65536, cupy.uint64), ("kv4m_entries", 1, cupy.uint32)))


def traced_call(bufs, parity: int, ctas: int, build: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One launch's stamps [ctas, 5] and, for the kv4m body, its warps' loop ends [ctas, warps]."""
    import cupy

    stamps, warp_stamps, _ = bufs
    t = cupy.asnumpy(stamps[parity * 5 * 65536:][:5 * ctas]).reshape(ctas, 5).astype(np.int64)
    if kk.BUILDS[build].layout != "kv4m":  # only that body marks its warps
        return t, None
    w = cupy.asnumpy(warp_stamps[parity * 16 * 65536:][:16 * ctas]).reshape(ctas, 16)
    return t, w[:, :kk.BUILDS[build].warps].astype(np.int64)


def trace(out_dir: Path) -> None:
    """Per-CTA timelines (%globaltimer, SM id) of one call for each TRACES entry."""
    import cupy

    summaries = []
    for config, B, L, layout, build, n, extra in TRACES:
        _, hq, hkv = next(c for c in CONFIGS if c[0] == config)
        opts = ("-DKV4M_TRACE=1",) + tuple(extra)
        s = make_set(B, hq, hkv, L, HEAD_DIM)
        s["cache"].append(s["k"], s["v"])
        plan = split_plan(L, n, build)

        def call():
            decode(s, layout, L, plan, s["out4"], opts)
        call()
        call()
        torch.cuda.synchronize()
        bufs = trace_buffers(opts)
        for b in bufs:
            b.fill(0)
        cupy.cuda.Device().synchronize()
        call()  # launch 0: parity 0
        torch.cuda.synchronize()
        ctas = plan.splits * B * hkv * (-(-(hq // hkv) // kk.HEADS_PER_CTA))
        t, w = traced_call(bufs, 0, ctas, build)
        info = dict(config=config, batch=B, context=L, cache=layout, build=build,
                    splits=plan.splits, options=" ".join(extra),
                    MB=B * hkv * L * (HEAD_DIM + 8) / 1e6)
        summaries.append(summarize_trace(t, info) | (warp_trace_stats(t, w) if w is not None
                                                     else {}))
        log(f"  trace {summaries[-1]}")
    torch.cuda.empty_cache()
    (out_dir / "attention_trace.json").write_text(json.dumps(summaries, indent=1))


def graph_trace(out_dir: Path) -> None:
    """The timelines of the last two calls of a graph of back-to-back calls on rotating inputs
    (as the benchmark times them), for each GRAPH_TRACES entry: the last call's phases, and the
    gap between the previous call's last CTA and the last call's first."""
    import cupy

    summaries = []
    for config, B, L, build, extra in GRAPH_TRACES:
        _, hq, hkv = next(c for c in CONFIGS if c[0] == config)
        opts = ("-DKV4M_TRACE=1",) + tuple(extra)
        cache_kv4 = B * hkv * L * (HEAD_DIM // 2 + 4) * 2
        sets = rotating_sets(B, hq, hkv, L)
        plan = split_plan(L, 1, build)
        calls = [lambda s=s: decode(s, "paged", L, plan, s["out4"], opts) for s in sets] * 2
        graph = capture_graph(calls, 4)  # 8 x sets calls: an even count, the last one odd
        graph.replay()
        torch.cuda.synchronize()
        bufs = trace_buffers(opts)
        for b in bufs:
            b.fill(0)
        cupy.cuda.Device().synchronize()
        graph.replay()
        torch.cuda.synchronize()
        ctas = B * hkv * (-(-(hq // hkv) // kk.HEADS_PER_CTA))
        (t0, _), (t1, w1) = (traced_call(bufs, p, ctas, build) for p in (0, 1))
        info = dict(config=config, batch=B, context=L, build=build, options=" ".join(extra),
                    calls=8 * len(sets), MB=cache_kv4 / 1e6)
        row = summarize_trace(t1, info) | warp_trace_stats(t1, w1)
        row.update(gap_from_previous_us=round(float(t1[:, 0].min() - t0[:, 3].max()) / 1e3, 2),
                   period_us=round(float(t1[:, 3].max() - t0[:, 3].max()) / 1e3, 2))
        summaries.append(row)
        log(f"  graph trace {row}")
        del graph, sets
        torch.cuda.empty_cache()
    (out_dir / "attention_graph_trace.json").write_text(json.dumps(summaries, indent=1))


def warp_trace_stats(t: np.ndarray, w: np.ndarray) -> dict:
    """Per CTA, from each warp's loop end w [ctas, warps] (ns): how far apart its warps finish
    the loop and how long the CTA runs after its slowest warp's loop (us, percentiles over CTAs)."""
    spread = (w.max(1) - w.min(1)) / 1e3
    after = (t[:, 3] - w.max(1)) / 1e3
    last = (w.max(1) - t[:, 0].min()) / 1e3

    def q(x, p):
        return round(float(np.percentile(x, p)), 2)
    return dict(warp_loop_spread_p50=q(spread, 50), warp_loop_spread_max=q(spread, 100),
                after_last_warp_p50=q(after, 50), after_last_warp_max=q(after, 100),
                last_warp_loop_end_p50=q(last, 50), last_warp_loop_end_max=q(last, 100))


def summarize_trace(t: np.ndarray, info: dict) -> dict:
    """Times in us from the first CTA's start: launch spread, phases (round 2/3 body only: round
    1's marks entry and exit alone), finish spread, CTAs and finish times per SM."""
    t0 = t[:, 0].min()
    start, loop0, loop1, fin = ((t[:, i] - t0) / 1e3 for i in range(4))
    sm = t[:, 4]
    per_sm = np.bincount(sm, minlength=132)
    sm_done = np.array([fin[sm == i].max() for i in np.unique(sm)])
    stamps = np.unique(t[:, :4][t[:, :4] > 0])

    def q(x, p):
        return round(float(np.percentile(x, p)), 2)
    span = float(fin.max())
    out = dict(info, ctas=len(t), sms=int((per_sm > 0).sum()), ctas_per_sm_max=int(per_sm.max()),
               ctas_per_sm_min=int(per_sm[per_sm > 0].min()),
               timer_step_ns=int(np.diff(stamps).min()) if len(stamps) > 1 else 0,
               span_us=round(span, 2), GBps_over_span=round(info["MB"] * 1e3 / span, 1),
               start_p50=q(start, 50), start_max=q(start, 100), finish_p10=q(fin, 10),
               finish_p50=q(fin, 50), finish_p90=q(fin, 90), finish_max=round(span, 2),
               sm_done_p10=q(sm_done, 10), sm_done_p50=q(sm_done, 50))
    if (t[:, 1] > 0).all() and (t[:, 2] > 0).all():
        out.update(prologue_p50=q(loop0 - start, 50), loop_p10=q(loop1 - loop0, 10),
                   loop_p50=q(loop1 - loop0, 50), loop_max=q(loop1 - loop0, 100),
                   epilogue_p50=q(fin - loop1, 50), epilogue_max=q(fin - loop1, 100))
    return out


def single(config: str, B: int, L: int, build: str, splits: int, opts: tuple = ()) -> None:
    """A few calls of one row and build (NVRTC options opts), nothing else (a profiler's target)."""
    _, hq, hkv = next(c for c in CONFIGS if c[0] == config)
    s = make_set(B, hq, hkv, L, HEAD_DIM)
    s["cache"].append(s["k"], s["v"])
    plan = split_plan(L, splits, build) if splits else None
    for _ in range(3):
        decode(s, layout_of(build), L, plan, s["out4"], opts)
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--plot", type=Path, help="only draw the PNG from this CSV")
    ap.add_argument("--batches", type=int, nargs="*", default=BATCHES)
    ap.add_argument("--contexts", type=int, nargs="*", default=CONTEXTS)
    ap.add_argument("--single", nargs=5, metavar=("CONFIG", "B", "L", "BUILD", "S"))
    ap.add_argument("--opts", nargs="*", default=[], help="--single: NVRTC options of the build")
    ap.add_argument("--ablate", action="store_true", help="only the kernel-variant ablation")
    ap.add_argument("--variants", nargs="*",
                    help="--ablate: only labels containing one of these (=LABEL: exactly LABEL)")
    ap.add_argument("--rows", nargs="*", metavar="CONFIG:B:L",
                    help="--ablate: only these of its rows, e.g. gqa_32q_8kv:16:2048")
    ap.add_argument("--trace", action="store_true", help="only the per-CTA timelines")
    ap.add_argument("--graph-trace", action="store_true",
                    help="only the timelines of calls inside a CUDA graph (GRAPH_TRACES)")
    args = ap.parse_args()
    if args.ablate or args.trace or args.graph_trace:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.trace:
            trace(args.out)
        if args.graph_trace:
            graph_trace(args.out)
        if args.ablate:
            ablate(args.out, args.variants, args.rows)
        return 0
    if args.single:
        cfg, B, L, build, S = args.single
        single(cfg, int(B), int(L), build, int(S), tuple(args.opts))
        return 0
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    import cupy

    env = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
               torch=torch.__version__, cupy=cupy.__version__)
    bw = copy_bandwidth()
    env["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    for fmt in kk.BUILDS:
        kern = kk._decode_kernel(fmt, HEAD_DIM)
        env[f"{fmt}_ctas_per_sm"] = kk._resident_ctas(fmt, HEAD_DIM, 0)[1]
        env[f"{fmt}_regs"] = getattr(kern, "num_regs", "?")
        env[f"{fmt}_local_bytes"] = getattr(kern, "local_size_bytes", "?")
    log(f"env: {json.dumps(env)}")

    log("correctness:")
    checks = check_correctness()
    (args.out / "attention_checks.json").write_text(json.dumps(checks, indent=1))
    log(f"  {sum(c['ok'] for c in checks)}/{len(checks)} checks passed")

    rows = []
    for name, hq, hkv in CONFIGS:
        for L in args.contexts:
            for B in args.batches:
                r = bench_row(name, hq, hkv, B, L, bw)
                if r:
                    rows.append(r)
                    write_csv(rows, args.out / "attention_bench.csv")
    env["wall_s"] = round(time.time() - t_start, 1)
    write_markdown(rows, checks, env, args.out / "attention_bench.md")
    try:
        plot(args.out / "attention_bench.csv", args.out / "attention_bench.png")
    except ImportError:
        log("matplotlib missing: draw the PNG later with --plot")
    log("\nconfig        B     L   kv4_us   old_us  sdpa_us  xSDPA  kv4%HBM  plan     best  target")
    for r in rows:
        t = ("met" if r["speedup_vs_sdpa"] >= 3 and r["kv4_hbm_pct"] >= 70 else "MISS") \
            if in_target(r) else ""
        log(f"{r['config']:12s} {r['batch']:3d} {r['context']:5d} {r['kv4_us']:8.1f} "
            f"{r['old_us']:8.1f} {r['sdpa_us']:8.1f} {r['speedup_vs_sdpa']:6.2f} "
            f"{r['kv4_hbm_pct']:7.1f}  {r['kv4_build']}/{r['kv4_splits']:<3d} "
            f"{r['kv4_best_us']:6.1f}  {t}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
