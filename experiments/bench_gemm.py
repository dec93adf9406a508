"""W4A4 kernels on the GPU (issue 4): correctness pass, measured ceilings, timing table.

    python3 experiments/bench_gemm.py --out DIR [--quick]

One call does everything, in this order:
1. correctness: quantize kernels (plain, RMSNorm, SiLU*up; gather fused) against the CPU reference
   encoder, and every GEMM variant against formats.mixed_gemm_reference, on fresh random inputs
   with poisoned outputs, odd M, groups 64/128, outliers 0/16/128/256;
2. ceilings measured in the same run: HBM bandwidth (device-to-device copy, bytes read + written),
   the INT8 mma.sync rate (register-resident microbenchmark), torch._int_mm and cuBLAS FP16 at
   8192^3;
3. timings: (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)}, M in
   {1, 16, 64, 256, 1024, 4096}, 128 outliers, group 128: our quantize (with the reorder gather),
   GEMM (every variant, and the dispatched one), both; cuBLAS FP16 (torch.matmul); W8A8
   (torch._int_mm alone, and with the per-token x per-channel scale epilogue in torch).
   Each row's floor = max(2MNK / INT8 rate, bytes / HBM bandwidth).
Timing: rows with M <= 64 (every contender of the row) and every quantize measurement replay a
captured CUDA graph of many calls (METHOD.md: small launches; launch gaps as in a graph-captured
decode step); larger rows use CUDA events around a batch of launches queued behind a GPU spin (so
Python launch cost never shows). Inputs rotate over enough copies to exceed 3x the L2; median of 7.
The `timing` column says which. `--small` runs only the small-M rows (M = 1, 16) and the quantize
kernels at every M, checking only those kernels (rounds 3 and 4; `--no-quant` leaves the quantize
checks and sweeps out) and writes gemm_<gpu>_round4_small*.csv. `--timeline` adds the per-CTA
phase timeline of the small-M kernels at 4096 x 4096 (debug builds, kernels/gemv_timeline.cuh).
Writes gemm_<gpu>.csv, gemm_<gpu>_variants.csv, gemm_<gpu>.md, gemm_<gpu>.png, gemm_<gpu>_log.txt.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atom_lab import kernel_ops as ko  # noqa: E402
import atom_lab.cuda  # noqa: E402
from atom_lab.cuda import launch_pdl  # noqa: E402
from gpu_timing import time_graph  # noqa: E402  (experiments/ is on sys.path as the script folder)
from atom_lab.formats import MixedQuantized, decode_mixed, encode_mixed  # noqa: E402
from atom_lab.gather_plan import bank_aware_order  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)]
MS = [1, 16, 64, 256, 1024, 4096]
OUTLIERS, GROUP, A_CLIP = 128, 128, 0.9
ROTATE_BYTES = 150e6  # > 3x the 50 MB L2
TRIALS = 7
GRAPH_MAX_M = 64  # rows up to here are timed through CUDA graphs (kernels of a few microseconds)
SPIN_CYCLES_PER_MS = 2.0e6  # an upper bound of the SM clock: the spin lasts at least as long
LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


# --------------------------------------------------------------------------------------- inputs


def activations(m: int, k_total: int, device="cuda") -> torch.Tensor:
    """FP16 activations with a few large channels, as LLM linear inputs have."""
    x = torch.randn(m, k_total, device=device)
    hot = torch.randperm(k_total, device=device)[: max(1, k_total // 64)]
    x[:, hot] *= 20
    return x.half()


def poisoned_mixed(m: int, kn: int, k: int, group: int, bits: int, byte: int) -> MixedQuantized:
    dev = "cuda"
    return MixedQuantized(
        normal=torch.full((m, kn // 2), byte, dtype=torch.uint8, device=dev),
        normal_scales=torch.full((m, kn // group), float("nan"), dtype=torch.float16, device=dev),
        outlier=torch.full((m, k), byte - 256 if byte > 127 else byte, dtype=torch.int8, device=dev),
        outlier_scales=torch.full((m, 1), float("nan"), dtype=torch.float16, device=dev),
        bits=bits, group_size=group)


def to_cuda(q: MixedQuantized) -> MixedQuantized:
    return MixedQuantized(q.normal.cuda(), q.normal_scales.cuda(), q.outlier.cuda(),
                          q.outlier_scales.cuda(), q.bits, q.group_size)


def clone_mixed(q: MixedQuantized) -> MixedQuantized:
    return MixedQuantized(q.normal.clone(), q.normal_scales.clone(), q.outlier.clone(),
                          q.outlier_scales.clone(), q.bits, q.group_size)


# ---------------------------------------------------------------------------------- correctness

QUANT_CASES = [  # (M, K, k, G, bits, clip, gather)
    (1, 1024, 128, 128, 4, 0.9, True),
    (37, 4096, 128, 128, 4, 0.9, True),
    (16, 1152, 0, 64, 4, 1.0, True),
    (5, 2304, 256, 128, 4, 0.85, False),
    (9, 1104, 16, 64, 3, 0.9, True),
    (300, 11008, 128, 128, 4, 0.9, True),
    (2000, 4096, 128, 64, 4, 0.9, True),  # pipe: more rows a block than staged buffers (ring wraps)
]
# row = round 1; ring = persistent double-buffered; ring_b1 = one block a SM (many rows a block);
# pipe (round 10): plain quantize only
CHECK_QUANT_VARIANTS = ("row", "ring", "ring_b1", "wide", "wide4", "pipe")
GEMM_CASES = [  # (M, N, K, k, G, bias)
    (1, 256, 1024, 128, 128, False),
    (7, 384, 1152, 128, 64, True),
    (16, 256, 4096, 128, 128, False),
    (33, 512, 2048, 0, 128, False),
    (64, 250, 1280, 256, 128, True),
    (130, 384, 1104, 16, 64, False),
    (257, 640, 1056, 32, 128, True),
    (1000, 256, 4224, 128, 128, False),
    (1000, 1030, 2112, 64, 64, True),  # large M, N not a multiple of 128, group 64
    (4133, 520, 2176, 256, 128, False),  # M > 4096 (the wgmma kernels' M edge), two outlier stages
]


def check_quantize() -> bool:
    ok = True
    log("quantize kernels vs the CPU reference encoder (exact match expected for 'plain'):")
    for m, k_total, k, g, bits, clip, gather in QUANT_CASES:
        x = activations(m, k_total)
        idx = torch.randperm(k_total, device="cuda") if gather else None
        norm_w = (torch.rand(k_total, device="cuda") + 0.5).half()
        up = activations(m, k_total)
        col = idx.cpu() if gather else slice(None)
        refs = {
            "plain": x.cpu()[:, col],
            "rmsnorm": ko.rmsnorm_fp16_reference(x.cpu(), norm_w.cpu(), 1e-5)[:, col],
            "silu_mul": ko.silu_mul_fp16_reference(x.cpu(), up.cpu())[:, col],
        }
        for (kind, ref_in), variant in ((kr, v) for kr in refs.items() for v in CHECK_QUANT_VARIANTS
                                        if kr == "plain" or v != "pipe"):
            ref = encode_mixed(ref_in, k, bits, g, clip)
            for byte in (0x00, 0xFF):
                out = poisoned_mixed(m, k_total - k, k, g, bits, byte)
                if kind == "plain":
                    ko.quantize_mixed(x, k, bits, g, clip, idx, out=out, variant=variant)
                elif kind == "rmsnorm":
                    ko.rmsnorm_quantize_mixed(x, norm_w, 1e-5, k, bits, g, clip, idx, out=out,
                                              variant=variant)
                else:
                    ko.silu_mul_quantize_mixed(x, up, k, bits, g, clip, idx, out=out, variant=variant)
                torch.cuda.synchronize()
                agree = ko.mixed_agreement(out, ref)
                exact = all(v == 1.0 for key, v in agree.items() if key.endswith("equal"))
                close = (agree["codes_equal"] >= 0.999 and agree["scales_equal"] >= 0.99
                         and agree["outliers_equal"] >= 0.999 and agree["max_code_diff"] <= 1)
                good = exact if kind == "plain" else close
                ok &= good
                if byte == 0xFF or not good:
                    log(f"  {kind:8s} {variant:7s} M={m:4d} K={k_total:5d} k={k:3d} G={g:3d} bits={bits} "
                        f"poison={byte:#04x}: {'PASS' if good else 'FAIL'} "
                        + " ".join(f"{key}={v:.6f}" if isinstance(v, float) else f"{key}={v}"
                                   for key, v in agree.items()))
    return ok


def check_gemm() -> bool:
    ok = True
    log("GEMM variants vs formats.mixed_gemm_reference (float64), outputs poisoned with NaN:")
    for m, n, k_total, k, g, with_bias in GEMM_CASES:
        a = encode_mixed(activations(m, k_total), k, 4, g, A_CLIP)
        w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, g, 0.85)
        bias = (torch.randn(n, device="cuda")).half() if with_bias else None
        ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
        if bias is not None:
            ref += bias.double()
        for variant in small_variants() if SMALL_ONLY else runnable_variants():
            y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            try:
                ko.mixed_gemm(a, w, bias, variant=variant, out=y)
            except ko.KernelShapeError as exc:
                log(f"  {variant:14s} M={m:4d} N={n:4d} K={k_total:5d}: not run ({exc})")
                continue
            torch.cuda.synchronize()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            finite = bool(torch.isfinite(y).all())
            good = finite and err < 1e-3
            ok &= good
            line = (f"  {variant:14s} M={m:4d} N={n:4d} K={k_total:5d} k={k:3d} G={g:3d} "
                    f"bias={int(with_bias)}: rel_err={err:.2e} all_written={finite} "
                    f"{'PASS' if good else 'FAIL'}")
            log(line)
            if not good:
                bad = (~torch.isfinite(y)) | ((y.double() - ref).abs() > 1e-2 * ref.abs().max())
                rows = bad.any(1).nonzero().flatten()[:8].tolist()
                cols = bad.any(0).nonzero().flatten()[:8].tolist()
                log(f"      bad rows {rows} bad cols {cols} (count {int(bad.sum())})")
    return ok


# ------------------------------------------------------------------------------------- timing


def timed(calls, min_batch_ms: float = 3.0) -> float:
    """Median GPU microseconds of one call; calls (closures) are cycled to rotate inputs."""
    n = len(calls)
    for c in calls:
        c()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for c in calls:
        c()
    end.record()
    end.synchronize()
    cpu_ms = (time.perf_counter() - t0) * 1e3 / n
    gpu_ms = start.elapsed_time(end) / n
    reps = int(min(max(min_batch_ms / max(gpu_ms, 1e-4), n, 20), 3000))
    results = []
    for _ in range(TRIALS):
        torch.cuda._sleep(int((reps * cpu_ms * 1.5 + 1.0) * SPIN_CYCLES_PER_MS))
        start.record()
        for i in range(reps):
            calls[i % n]()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) / reps)
    return statistics.median(results) * 1e3


def timed_graph(calls, target_ms: float = 8.0) -> float:
    """Median GPU microseconds of one call from replays of one captured CUDA graph that holds
    repeated passes over calls (cycled: inputs rotate); warm-up first, outside the capture."""
    return time_graph(calls, target_ms, TRIALS).seconds * 1e6


def copies(nbytes: float) -> int:
    return int(min(max(math.ceil(ROTATE_BYTES / max(nbytes, 1)), 1), 64))


def same_bytes_copy_us(nbytes: int) -> float:
    """One device-to-device copy moving nbytes (half read, half written), graph-timed on rotating
    buffers like the quantize kernels: what a single memory-bound kernel of that size reaches."""
    half = max(nbytes // 2 // 16, 1) * 16
    pairs = [(torch.empty(half, dtype=torch.uint8, device="cuda"),
              torch.empty(half, dtype=torch.uint8, device="cuda")) for _ in range(copies(2 * half))]
    return timed_graph([lambda s=s_, d=d_: d.copy_(s) for s_, d_ in pairs])


def same_traffic_gather_us(xs: list[torch.Tensor]) -> float:
    """A torch copy that reads all of each fp16 [m, k] in xs (every 32-byte sector: it takes every
    4th element) and writes a quarter of it: the quantize kernel's traffic shape (all of x read,
    about a quarter of its bytes written), graph-timed on the quantize kernels' rotating inputs."""
    ys = [torch.empty(x.shape[0], x.shape[1] // 4, device="cuda", dtype=torch.float16) for x in xs]
    return timed_graph([lambda x=x, y=y: y.copy_(x[:, ::4]) for x, y in zip(xs, ys)])


def hbm_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(2**29, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    us = timed([lambda: dst.copy_(src)])
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def library_peaks() -> dict:
    n = 8192
    a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-128, 127, (n, n), dtype=torch.int8, device="cuda")
    a16, b16 = torch.randn(n, n, device="cuda").half(), torch.randn(n, n, device="cuda").half()
    ops = 2 * n**3
    t_int = timed([lambda: torch._int_mm(a8, b8.t())], 20)
    t_f16 = timed([lambda: torch.matmul(a16, b16.t())], 20)
    return {"int_mm_8192_tops": ops / t_int / 1e6, "cublas_fp16_8192_tflops": ops / t_f16 / 1e6}


def int8_weight(w: torch.Tensor):
    scale = (w.float().abs().amax(1) / 127).clamp_min(1e-8)
    return torch.round(w.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def int_mm_padded(x8: torch.Tensor, w8t: torch.Tensor) -> torch.Tensor:
    """torch._int_mm needs M > 16 in some torch versions: pad with zero rows there."""
    if x8.shape[0] > 16:
        return torch._int_mm(x8, w8t)
    pad = torch.zeros(32, x8.shape[1], dtype=torch.int8, device=x8.device)
    pad[: x8.shape[0]] = x8
    return torch._int_mm(pad, w8t)[: x8.shape[0]]


SMALL_ONLY = False  # --small: the dispatched small-M kernels of rounds 1 and 3 against round 4's
SMALL_VARIANTS = ("skinny_m16n16", "gemv2_m8", "gemv2_m16", "stream_m8", "stream_m16",
                  "stream_m8_pdl", "stream_m16_pdl", "streamt_m8", "streamt_m16", "streamt_m8_pdl",
                  "streamt_m16_pdl")
PDL_OK = True  # set by probe_pdl(): False drops the "_pdl" launches (reported in the log)
QUANT_SWEEP = True  # --no-quant: time only the dispatched quantize kernel, check none


def probe_pdl() -> bool:
    """A programmatic-serialization launch must run eagerly and inside a captured graph, and give
    the plain launch's bits; otherwise the _pdl variants are left out of this run."""
    try:
        a = encode_mixed(activations(3, 1152), 128, 4, GROUP, A_CLIP)
        w = encode_mixed((torch.randn(72, 1152, device="cuda") * 0.05).half(), 128, 4, GROUP, 0.85)
        plain = ko.mixed_gemm(a, w, variant="stream_m8")
        eager = ko.mixed_gemm(a, w, variant="stream_m8_pdl")
        graph, ys = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            for _ in range(3):
                ys.append(ko.mixed_gemm(a, w, variant="stream_m8_pdl"))
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(plain, eager) and all(torch.equal(plain, y) for y in ys)
        log(f"PDL launch probe: {'same bits as the plain launch' if same else 'DIFFERENT bits'}")
        if atom_lab.cuda._EARLY_LAUNCH_FAILED:  # mixed_gemm fell back to plain launches
            log("PDL launch probe: the early launch fell back to a plain one; _pdl variants dropped")
            return False
        return same
    except Exception as exc:  # noqa: BLE001 -- any failure only drops the variants, reported
        log(f"PDL launch unusable here, _pdl variants dropped: {exc!r}")
        return False


def small_variants() -> list[str]:
    return [v for v in SMALL_VARIANTS if PDL_OK or not v.endswith("_pdl")]


def runnable_variants() -> list[str]:
    """Every GEMM variant this GPU runs (the wgmma ones need sm_90a)."""
    return [v for v in ko.GEMM_VARIANTS if (v not in ko.WG_VARIANTS or ko.has_wgmma())
            and (PDL_OK or not v.endswith("_pdl"))]


def applicable_variants(m: int) -> list[str]:
    if SMALL_ONLY:
        return small_variants()
    return [v for v in runnable_variants()
            if (v.startswith(("tc", "wg")) or (m <= 256 and v.startswith("skinny")) or m <= 64)
            and not (v.startswith(("gemv", "stream")) and m > 16)]  # one token tile a launch row


def bench_quantize_only(k_total: int, ms: list, ceil: dict, variant_rows: list) -> None:
    """--small: every quantize variant at larger M (the GEMMs there are the large-M rows' job)."""
    kn = k_total - OUTLIERS
    idx = reorder_index(k_total)
    for m in ms:
        xs = [activations(m, k_total) for _ in range(min(copies(m * k_total * 2), 8))]
        quant_bytes = 2 * m * k_total + ko.mixed_bytes(m, kn, OUTLIERS, GROUP) + 4 * k_total
        for v in ko.QUANT_VARIANTS:
            t = timed_graph([lambda x=x, v=v: ko.quantize_mixed(x, OUTLIERS, 4, GROUP, A_CLIP, idx,
                                                                variant=v) for x in xs])
            variant_rows.append({"K": k_total, "N": 0, "M": m, "variant": f"quant_{v}", "us": t,
                                 "tops": 100 * quant_bytes / (t * 1e3) / ceil["hbm_gbps"],
                                 "chosen": int(v == ko.choose_quant_variant(m, k_total)), "timing": "graph"})
        done = variant_rows[-len(ko.QUANT_VARIANTS):]
        t_copy = same_bytes_copy_us(quant_bytes)
        drawn = reorder_index(k_total, bank_aware=False)
        t_drawn = timed_graph([lambda x=x: ko.quantize_mixed(x, OUTLIERS, 4, GROUP, A_CLIP, drawn,
                                                             variant="pipe") for x in xs])
        variant_rows.append({"K": k_total, "N": 0, "M": m, "variant": "quant_pipe_drawn_index",
                             "us": t_drawn, "tops": 100 * quant_bytes / (t_drawn * 1e3) / ceil["hbm_gbps"],
                             "chosen": 0, "timing": "graph"})
        log(f"K={k_total:5d} M={m:4d} quant "
            + " ".join(f"{r['variant'][6:]}={r['us']:.1f}us({r['tops']:.0f}%)" for r in done)
            + f" | pipe, index as drawn {t_drawn:.1f}us | same-bytes copy {t_copy:.1f}us")


def reorder_index(k_total: int, bank_aware: bool = True) -> torch.Tensor:
    """A random reorder index for the gather, in the bank-aware order within groups that the kernel
    backend gives every index (gather_plan; the same groups, so the same GEMM), or as drawn."""
    idx = torch.randperm(k_total)
    if bank_aware:
        idx = idx[bank_aware_order(idx, OUTLIERS, GROUP)]
    return idx.int().cuda()


def quant_pipe_diag(out: Path) -> None:
    """--quant-diag: the "pipe" quantize kernel beside its copies-only and math-only builds
    (QUANT_PIPE_DIAG = 1 / 2 in kernels/quantize.cu), ring depths (ko.PIPE_BUFFERS staged rows a
    block in all), and a same-bytes torch copy, at M >= 1024."""
    builds = {"default": ((), None), "copies only": (("-DQUANT_PIPE_DIAG=1",), None),
              "math only": (("-DQUANT_PIPE_DIAG=2",), None), "2 buffers": ((), 2),
              "3 buffers": ((), 3), "4 buffers": ((), 4), "6 buffers": ((), 6),
              "8 buffers": ((), 8), "4 buffers, math only": (("-DQUANT_PIPE_DIAG=2",), 4)}
    lines = ["| K | M | " + " | ".join(f"{b} us" for b in builds) + " | same-bytes copy us |",
             "|---|---|" + "---|" * (len(builds) + 1)]
    default_buffers = ko.PIPE_BUFFERS
    for k_total in (4096, 11008):
        kn = k_total - OUTLIERS
        idx = reorder_index(k_total)
        for m in (1024, 4096):
            xs = [activations(m, k_total) for _ in range(min(copies(m * k_total * 2), 8))]
            quant_bytes = 2 * m * k_total + ko.mixed_bytes(m, kn, OUTLIERS, GROUP) + 4 * k_total
            t = []
            for options, buffers in builds.values():
                ko.PIPE_BUFFERS = buffers or default_buffers
                t.append(timed_graph([lambda x=x, o=options: ko._quantize(
                    "quantize_mixed", x, None, None, 0.0, OUTLIERS, 4, GROUP, A_CLIP, idx, None,
                    "pipe", o) for x in xs]))
            ko.PIPE_BUFFERS = default_buffers
            lines.append(f"| {k_total} | {m} | " + " | ".join(f"{u:.1f}" for u in t)
                         + f" | {same_bytes_copy_us(quant_bytes):.1f} |")
            log(lines[-1])
    (out / "quant_pipe_diag.md").write_text("\n".join(lines) + "\n")


def fold_ceiling(out: Path, iters: int = 2048) -> None:
    """--fold-ceiling: the wgmma rate left once each K-group of 128 is folded as the format needs
    (kernels/w4a4_gemm_sm90.cu, wgmma_fold_probe_wg*: operands resident, no global traffic, no
    unpack), beside the plain wgmma peaks of the same run: the bound for any W4A4 kernel with
    per-(row, group) scales on both operands on INT8 wgmma."""
    import numpy as np

    dev = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    seed = torch.randint(1, 2**31 - 1, (32,), dtype=torch.int64, device=dev).to(torch.int32)
    scale_sets = 4  # FOLD_SCALE_SETS in the .cu file: [set][128] column and [set][64] row scales
    smem = (64 + 256) * 128 + scale_sets * (128 + 64) * 4 + 1024
    rates = {"wgmma m64n256k32 (both from shared memory)": ko.wgmma_s8_peak_tops("ss"),
             "wgmma m64n128k32 (A from registers)": ko.wgmma_s8_peak_tops("rs")}
    probes = {"wgmma_fold_probe_wg2": (2, "2 warpgroups"), "wgmma_fold_probe_wg3": (3, "3 warpgroups"),
              "wgmma_fold_probe_pingpong": (2, "2 warpgroups in ping-pong (FA3's schedule)")}
    for name, (wgs, what) in probes.items():
        res = torch.empty(sms * wgs * 128, dtype=torch.float32, device=dev)
        args = (np.uint64(seed.data_ptr()), np.int32(iters), np.uint64(res.data_ptr()))
        launch = lambda n=name, w=wgs, a=args: ko._launch("w4a4_gemm_sm90", n, (sms,), (w * 128,),
                                                           a, smem, dev)
        launch()
        torch.cuda.synchronize()
        rates[f"m64n128k32 + fold a group of 128, {what}"] = ko._median_tops(
            launch, 2 * 64 * 128 * 128 * iters * wgs * sms)
    peak = max(rates.values())
    lines = [f"# Fold ceiling on {torch.cuda.get_device_name()} (bench_gemm.py --fold-ceiling)", "",
             f"Issue 4's 60% of the INT8 rate is {0.6 * peak:.0f} TOPS here.", "",
             "| loop (one CTA a SM, shared-memory resident) | TOPS | % of the best wgmma rate |",
             "|---|---|---|"]
    for name, tops in rates.items():
        lines.append(f"| {name} | {tops:.0f} | {100 * tops / peak:.0f} |")
    (out / "gemm_fold_ceiling.md").write_text("\n".join(lines) + "\n")
    for line in lines:
        log(line)


def bench_shape(k_total: int, n: int, ceil: dict, rows: list, variant_rows: list) -> None:
    kn = k_total - OUTLIERS
    w16 = (torch.randn(n, k_total, device="cuda") * 0.02).half()
    wq = encode_mixed(w16, OUTLIERS, 4, GROUP, 0.85)
    w_bytes = ko.mixed_bytes(n, kn, OUTLIERS, GROUP)
    wqs = [wq] + [clone_mixed(wq) for _ in range(copies(w_bytes) - 1)]
    w16ts = [w16.t()] + [w16.clone().t() for _ in range(copies(w16.numel() * 2) - 1)]
    w8, s8 = int8_weight(w16)
    w8ts = [w8.t()] + [w8.clone().t() for _ in range(copies(w8.numel()) - 1)]
    idx = reorder_index(k_total)
    for m in MS:
        xs = [activations(m, k_total) for _ in range(min(copies(m * k_total * 2), 8))]
        a_bytes = ko.mixed_bytes(m, kn, OUTLIERS, GROUP)
        aqs = [ko.quantize_mixed(x, OUTLIERS, 4, GROUP, A_CLIP, idx) for x in xs]
        aqs += [clone_mixed(aqs[i % len(aqs)]) for i in range(len(aqs), copies(a_bytes))]
        pairs = max(len(aqs), len(wqs))
        x8s = [int8_weight(x)[0] for x in xs]
        sx = [int8_weight(x)[1][:, None] for x in xs]
        s8row = s8[None, :]

        timer = timed_graph if m <= GRAPH_MAX_M else timed  # one method for every contender
        quant_variants = ko.QUANT_VARIANTS if QUANT_SWEEP else [ko.choose_quant_variant(m, k_total)]
        t_qvar = {v: timed_graph([lambda x=x, v=v: ko.quantize_mixed(x, OUTLIERS, 4, GROUP, A_CLIP,
                                                                     idx, variant=v) for x in xs])
                  for v in quant_variants}
        t_quant = t_qvar[ko.choose_quant_variant(m, k_total)]
        t_var = {}
        for v in applicable_variants(m):
            try:
                ko.mixed_gemm(aqs[0], wqs[0], variant=v)
            except ko.KernelShapeError as exc:  # e.g. streamt with a K too long for its registers
                log(f"K={k_total:5d} N={n:5d} M={m:4d} {v}: not run ({exc})")
                continue
            t_var[v] = timer([lambda a=aqs[i % len(aqs)], w=wqs[i % len(wqs)], v=v:
                              ko.mixed_gemm(a, w, variant=v) for i in range(pairs)])
        auto = ko.auto_gemm_variant(m, n, k_total, static_weights=PDL_OK)  # the model path
        if auto in ko.STREAM_VARIANTS:  # the kernel "auto" runs (stream for a K too long for streamt)
            auto = ko.stream_or_fallback(auto, kn // GROUP, [aqs[0].normal, wqs[0].normal], True)
        t_gemm = t_var[auto]
        t_both = timer([lambda x=xs[i % len(xs)], w=wqs[i % len(wqs)]:
                        ko.quantized_linear(x, w, A_CLIP, idx) for i in range(pairs)])
        big = max(len(xs), len(w16ts))
        t_f16 = timer([lambda x=xs[i % len(xs)], wt=w16ts[i % len(w16ts)]: torch.matmul(x, wt)
                       for i in range(big)])
        big = max(len(x8s), len(w8ts))
        t_int = timer([lambda x=x8s[i % len(x8s)], wt=w8ts[i % len(w8ts)]: int_mm_padded(x, wt)
                       for i in range(big)])
        t_w8a8 = timer([lambda j=i % len(x8s), wt=w8ts[i % len(w8ts)]:
                        (int_mm_padded(x8s[j], wt) * sx[j]).mul_(s8row).half() for i in range(big)])

        ops = ko.gemm_flops(m, n, k_total)
        gemm_bytes = a_bytes + w_bytes + 2 * m * n
        floor_us = max(ops / (ceil["int8_peak_tops"] * 1e6), gemm_bytes / (ceil["hbm_gbps"] * 1e3))
        quant_bytes = 2 * m * k_total + a_bytes + 4 * k_total
        t_copy = same_bytes_copy_us(quant_bytes)
        t_gather = same_traffic_gather_us(xs)
        gather_bytes = 2 * m * k_total + m * k_total // 2
        row = {
            "K": k_total, "N": n, "M": m, "variant": auto,
            "timing": "graph" if timer is timed_graph else "events",
            "quant_us": t_quant, "quant_hbm_pct": 100 * quant_bytes / (t_quant * 1e3) / ceil["hbm_gbps"],
            "copy_us": t_copy, "copy_hbm_pct": 100 * quant_bytes / (t_copy * 1e3) / ceil["hbm_gbps"],
            "gather_us": t_gather,
            "gather_hbm_pct": 100 * gather_bytes / (t_gather * 1e3) / ceil["hbm_gbps"],
            "gemm_us": t_gemm, "gemm_tops": ops / t_gemm / 1e6,
            "both_us": t_both, "cublas_fp16_us": t_f16, "int_mm_us": t_int, "w8a8_us": t_w8a8,
            "floor_us": floor_us, "floor_bound": "compute" if ops / (ceil["int8_peak_tops"] * 1e6)
            > gemm_bytes / (ceil["hbm_gbps"] * 1e3) else "memory",
            "gemm_vs_cublas": t_f16 / t_gemm, "gemm_vs_w8a8": t_w8a8 / t_gemm,
            "gemm_vs_int_mm": t_int / t_gemm, "both_vs_cublas": t_f16 / t_both,
            "gemm_pct_int8_peak": 100 * (ops / t_gemm / 1e6) / ceil["int8_peak_tops"],
            "gemm_pct_floor": 100 * floor_us / t_gemm,
        }
        rows.append(row)
        for v, t in t_var.items():
            variant_rows.append({"K": k_total, "N": n, "M": m, "variant": v, "us": t,
                                 "tops": ops / t / 1e6, "chosen": int(v == auto),
                                 "timing": row["timing"]})
        for v, t in t_qvar.items():  # quantize variants: "tops" column holds % of HBM here
            variant_rows.append({"K": k_total, "N": n, "M": m, "variant": f"quant_{v}", "us": t,
                                 "tops": 100 * quant_bytes / (t * 1e3) / ceil["hbm_gbps"],
                                 "chosen": int(v == ko.choose_quant_variant(m, k_total)), "timing": "graph"})
        log(f"K={k_total:5d} N={n:5d} M={m:4d} quant {t_quant:7.1f}us ({row['quant_hbm_pct']:4.0f}% hbm;"
            f" same-bytes copy {t_copy:.1f}us, {row['copy_hbm_pct']:.0f}%;"
            f" read-all write-a-quarter {t_gather:.1f}us, {row['gather_hbm_pct']:.0f}%)"
            f" gemm[{auto}] {t_gemm:7.1f}us ({row['gemm_tops']:6.0f} TOPS) both {t_both:7.1f}"
            f" | fp16 {t_f16:7.1f} int_mm {t_int:7.1f} w8a8 {t_w8a8:7.1f} floor {floor_us:6.1f}"
            f" | variants " + " ".join(f"{v}={t:.1f}" for v, t in t_var.items())
            + " | quant " + " ".join(f"{v}={t:.1f}" for v, t in t_qvar.items()))


# ------------------------------------------------------------------------------ ncu target


def profile_target() -> None:
    """A few launches for `ncu -k regex:'gemv|skinny|quantize' python3 bench_gemm.py
    --profile-target` (duration, DRAM and issue rates, stall reasons, shared-memory wavefronts):
    round 3's small-M kernels against skinny (round 1) at M = 1 and 16 for (K, N) = (4096, 4096)
    and (11008, 4096), and the quantize kernels row / wide / wide4 at M = 1024 and 4096."""
    for k_total, n in ((4096, 4096), (11008, 4096)):
        w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.02).half(), OUTLIERS, 4, GROUP,
                         0.85)
        idx = reorder_index(k_total)
        for m, variants in ((1, ("skinny_m16n16", "gemv_m8", "gemv2_m8")),
                            (16, ("skinny_m16n16", "gemv_m16", "gemv2_m16"))):
            a = ko.quantize_mixed(activations(m, k_total), OUTLIERS, 4, GROUP, A_CLIP, idx)
            for v in variants:
                ko.mixed_gemm(a, w, variant=v)
        for m in (1024, 4096):
            x = activations(m, k_total)
            for v in ("row", "wide", "wide4"):
                ko.quantize_mixed(x, OUTLIERS, 4, GROUP, A_CLIP, idx, variant=v)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------ timeline

TIMELINE_OPTIONS = ("-DGEMV_TIMELINE",)  # kernels/gemv_timeline.cuh: record layout
TL_POINTS = 7
TL_WORDS = 2 * TL_POINTS + 1
TL_PHASES = ("entry", "prologue", "first data", "last data", "compute", "reduce", "store")
TIMELINE_LAUNCHES = 24
TIMELINE_VARIANTS = ((1, ("skinny_m16n16", "gemv2_m8", "stream_m8", "stream_m8_pdl")),
                     (16, ("skinny_m16n16", "gemv2_m16", "stream_m16", "stream_m16_pdl")))


def timeline_launcher(variant: str, a: MixedQuantized, w: MixedQuantized, y: torch.Tensor,
                      record: torch.Tensor):
    """(CTAs, closure) launching the -DGEMV_TIMELINE build of a small-M kernel with its record
    buffer: the launch geometry of mixed_gemm for skinny, gemv2 and stream."""
    import cupy
    import numpy as np

    from atom_lab.cuda import get_kernel, torch_current_stream

    dev, (m, n), g = y.device, y.shape, a.group_size
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    tile, rows, threads = ko.GEMM_VARIANTS[variant]
    args = ko.gemm_kernel_args(a, w, None, y)
    if variant.startswith("skinny"):
        module, name, smem, extra = "w4a4_gemm", f"w4a4_gemm_{variant}_g{g}", 0, ()
        grid = (-(-n // rows), -(-m // tile))
    elif variant in ko.GEMV_VARIANTS:
        tensors = [a.normal, a.normal_scales, a.outlier, a.outlier_scales,
                   w.normal, w.normal_scales, w.outlier, w.outlier_scales]
        slots = ko.gemv_plan(variant, a.k_normal, a.k_outliers, g, tensors)
        module, name, extra = "w4a4_gemv", f"w4a4_{variant}_g{g}", (np.int32(slots),)
        smem = ko._smem_opt_in_limit(index) - 1024  # the record takes static shared memory
        grid = (min(torch.cuda.get_device_properties(index).multi_processor_count, -(-n // 8)),
                -(-m // tile))
    else:
        module, name, smem = "w4a4_gemv", ko.stream_kernel_name(variant, g), 0
        extra, grid = (np.int32(0),), (-(-n // rows), -(-m // tile))
    kernel = get_kernel(module, name, TIMELINE_OPTIONS)
    if smem > ko.DEFAULT_SMEM:
        kernel.max_dynamic_shared_size_bytes = smem
    args = args + extra + (np.uint64(record.data_ptr()),)
    if variant.endswith("_pdl"):
        return grid[0] * grid[1], lambda: launch_pdl(kernel, grid, (threads,), args, smem, dev)

    def launch():
        with cupy.cuda.Device(index), torch_current_stream(index):
            kernel(grid, (threads,), args, shared_mem=smem)
    return grid[0] * grid[1], launch


def summarize_timeline(rec: torch.Tensor) -> dict:
    """rec [launches, CTAs, TL_WORDS] of one graph replay -> medians in microseconds. Launch 0 is
    left out (nothing before it in the graph)."""
    origin = rec[1:, :, 0].min()  # ns since the epoch: subtract before going to float
    gt = (rec[1:, :, :TL_POINTS] - origin).double() / 1e3  # us
    ck = rec[1:, :, TL_POINTS:2 * TL_POINTS].double()
    start, end = gt[:, :, 0].min(1).values, gt[:, :, 6].max(1).values
    rel = gt - start[:, None, None]
    med = lambda t: float(t.median())  # noqa: E731
    stamps = torch.unique(rec[1:, :, :TL_POINTS].flatten())
    steps = stamps[1:] - stamps[:-1]
    return {
        "period_us": float((start[-1] - start[0]) / (len(start) - 1)),
        "span_us": med(end - start), "gap_us": med(start[1:] - end[:-1]),
        "entry_spread_us": med(rel[:, :, 0].max(1).values),
        "prologue_us": med(rel[:, :, 1] - rel[:, :, 0]),
        "first_data_us": med(rel[:, :, 2].min(1).values),
        "cta_first_data_us": med(rel[:, :, 2] - rel[:, :, 0]),
        "cta_last_data_us": med(rel[:, :, 3] - rel[:, :, 0]),
        "last_data_us": med(rel[:, :, 3].max(1).values),
        "compute_after_data_us": med(rel[:, :, 4] - rel[:, :, 3]),
        "reduce_us": med(rel[:, :, 5] - rel[:, :, 4]),
        "store_us": med(rel[:, :, 6] - rel[:, :, 5]),
        "cta_span_us": med(rel[:, :, 6] - rel[:, :, 0]),
        "sm_ghz": med((ck[:, :, 6] - ck[:, :, 0]) / (gt[:, :, 6] - gt[:, :, 0]) / 1e3),
        "timer_step_ns": int(steps[steps > 0].min()) if (steps > 0).any() else 0,
        "ctas_per_sm": float(torch.bincount(rec[1, :, 2 * TL_POINTS].long()).max()),
    }


def timeline(out: Path, slug: str) -> None:
    """--timeline: where the time of the small-M kernels goes at (K, N) = (4096, 4096), M = 1 and
    16: debug builds record per-CTA phase timestamps (kernels/gemv_timeline.cuh) in a captured
    graph of TIMELINE_LAUNCHES back-to-back launches on rotating weights, as timed_graph runs
    them; plus what an empty kernel costs a graph node. Writes gemm_<gpu>_timeline.csv (one row
    a kernel) and gemm_<gpu>_timeline_ctas.csv (launches 1-3, every CTA, us from launch start)."""
    k_total, n = 4096, 4096
    kn = k_total - OUTLIERS
    dev = torch.device("cuda", torch.cuda.current_device())
    wq = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.02).half(), OUTLIERS, 4, GROUP, 0.85)
    wqs = [wq] + [clone_mixed(wq) for _ in range(copies(ko.mixed_bytes(n, kn, OUTLIERS, GROUP)) - 1)]
    idx = reorder_index(k_total)
    empty = {c: timed_graph([lambda c=c: ko._launch("w4a4_gemv", "gemv_empty_kernel", (c,), (256,),
                                                    (), 0, dev)]) for c in (1, 256)}
    log(f"timeline: empty kernel a graph node: {empty[1]:.2f} us (1 CTA), {empty[256]:.2f} us "
        "(256 CTAs of 256 threads)")
    rows, cta_rows = [], []
    for m, variants in TIMELINE_VARIANTS:
        a = ko.quantize_mixed(activations(m, k_total), OUTLIERS, 4, GROUP, A_CLIP, idx)
        for v in variants:
            if v.endswith("_pdl") and not PDL_OK:
                continue
            ys = [torch.empty(m, n, dtype=torch.float16, device="cuda")
                  for _ in range(TIMELINE_LAUNCHES)]
            recs = [torch.zeros((n // 8 + 1) * 2 * TL_WORDS, dtype=torch.int64, device="cuda")
                    for _ in range(TIMELINE_LAUNCHES)]
            launches = [timeline_launcher(v, a, wqs[i % len(wqs)], ys[i], recs[i])
                        for i in range(TIMELINE_LAUNCHES)]
            ctas = launches[0][0]
            us = timed_graph([f for _, f in launches])  # also leaves the last replay's records
            rec = torch.stack([r[: ctas * TL_WORDS].view(ctas, TL_WORDS) for r in recs]).cpu()
            summary = {"M": m, "variant": v, "ctas": ctas, "graph_us": us, **summarize_timeline(rec)}
            rows.append(summary)
            log("timeline " + " ".join(f"{key}={val:.2f}" if isinstance(val, float) else
                                       f"{key}={val}" for key, val in summary.items()))
            for i in range(1, 4):
                start = int(rec[i, :, 0].min())
                for c in range(ctas):
                    r = rec[i, c]
                    cta_rows.append({"M": m, "variant": v, "launch": i, "cta": c,
                                     "sm": int(r[2 * TL_POINTS]),
                                     **{f"t_{p}": (int(r[j]) - start) / 1e3 for j, p in
                                        enumerate(TL_PHASES)},
                                     **{f"clk_{p}": int(r[TL_POINTS + j] - r[TL_POINTS]) for j, p in
                                        enumerate(TL_PHASES)}})
    for name, data in ((f"gemm_{slug}_timeline.csv", rows), (f"gemm_{slug}_timeline_ctas.csv", cta_rows)):
        with open(out / name, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(data[0]))
            wr.writeheader()
            wr.writerows(data)
    keys = ("graph_us", "period_us", "span_us", "gap_us", "entry_spread_us", "first_data_us",
            "last_data_us", "cta_first_data_us", "cta_last_data_us", "compute_after_data_us",
            "reduce_us", "store_us")
    print(f"\n{'M':>3} {'kernel':>15} " + " ".join(f"{k[:-3][:9]:>9}" for k in keys) + "  (us)")
    for r in rows:
        print(f"{r['M']:3d} {r['variant']:>15} " + " ".join(f"{r[k]:9.2f}" for k in keys))


NCU_KEYS = {"Duration": "us", "DRAM Throughput": "dram%", "Issued Warp Per Scheduler": "ipc",
            "Achieved Occupancy": "occ%", "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum": "smem_wf",
            "smsp__inst_executed.sum": "inst", "dram__bytes_read.sum": "dram_rd"}


def summarize_ncu(path: str) -> None:
    """One line a profiled kernel from `ncu --csv --page details`: duration, DRAM %, issue rate,
    occupancy, shared-memory wavefronts, instructions and the three largest stall reasons."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.startswith('"')]
    table = list(csv.reader(lines))
    header, kernels = table[0], {}
    for r in table[1:]:
        d = dict(zip(header, r))
        key = (d["ID"], d["Kernel Name"][:28], d["Grid Size"])
        val = d["Metric Value"].replace(",", "")
        try:
            val = float(val)
        except ValueError:
            continue
        if d["Metric Name"] == "Duration" and d["Metric Unit"] == "ns":
            val /= 1e3
        kernels.setdefault(key, {})[d["Metric Name"]] = val
    for (_, name, grid), mets in kernels.items():
        stalls = sorted(((v, k.split("stalled_")[1].split("_per_issue")[0]) for k, v in mets.items()
                         if "issue_stalled_" in k), reverse=True)[:3]
        print(f"{name:28s} {grid:14s} " + " ".join(
            f"{short}={mets[k]:.4g}" for k, short in NCU_KEYS.items() if k in mets)
            + " | " + " ".join(f"{n}={v:.2f}" for v, n in stalls))


# --------------------------------------------------------------------------------------- SASS

SASS_OPS = ("IMMA", "LDSM", "LDGSTS", "LDG", "LDS", "STS", "STG", "LOP3", "SHF", "IMAD", "IADD3",
            "FFMA", "FADD", "FMUL", "I2F", "F2F", "HADD2", "BAR", "BRA")


def sass_mix(out: Path, slug: str) -> None:
    """Static instruction counts per GEMM kernel (nvcc + cuobjdump, when the machine has them)."""
    nvcc, cuobjdump = shutil.which("nvcc"), shutil.which("cuobjdump")
    if not (nvcc and cuobjdump):
        log("no nvcc/cuobjdump: no SASS instruction mix")
        return
    sass = ""
    for name in ("w4a4_gemm", "quantize"):
        src = Path(__file__).resolve().parent.parent / "kernels" / f"{name}.cu"
        cubin = out / f"{name}.cubin"
        subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-std=c++17",
                        "-o", str(cubin), str(src)], check=True)
        sass += subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                               text=True).stdout
        cubin.unlink()
    lines, name, counts = [], None, {}
    for line in sass.splitlines() + ["Function : <end>"]:
        if "Function :" in line:
            if name:
                lines.append(f"{name}: " + " ".join(f"{op}={counts.get(op, 0)}" for op in SASS_OPS))
            name, counts = line.split("Function :")[1].strip(), {}
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    (out / f"gemm_{slug}_sass.txt").write_text("\n".join(lines) + "\n")
    log("SASS static mix:\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------- output

COLUMNS = [
    ("K", "K", "{}"), ("N", "N", "{}"), ("M", "M", "{}"),
    ("quant_us", "quant us", "{:.1f}"), ("quant_hbm_pct", "quant % HBM", "{:.0f}"),
    ("copy_us", "same-bytes copy us", "{:.1f}"), ("copy_hbm_pct", "copy % HBM", "{:.0f}"),
    ("gather_us", "read-all write-1/4 us", "{:.1f}"), ("gather_hbm_pct", "its % HBM", "{:.0f}"),
    ("gemm_us", "GEMM us", "{:.1f}"), ("variant", "kernel", "{}"), ("gemm_tops", "GEMM TOPS", "{:.0f}"),
    ("both_us", "quant+GEMM us", "{:.1f}"), ("cublas_fp16_us", "cuBLAS FP16 us", "{:.1f}"),
    ("w8a8_us", "W8A8 us", "{:.1f}"), ("int_mm_us", "_int_mm us", "{:.1f}"),
    ("floor_us", "floor us", "{:.1f}"), ("floor_bound", "bound", "{}"),
    ("gemm_vs_cublas", "GEMM x FP16", "{:.2f}"), ("gemm_vs_w8a8", "GEMM x W8A8", "{:.2f}"),
    ("gemm_vs_int_mm", "GEMM x _int_mm", "{:.2f}"), ("both_vs_cublas", "both x FP16", "{:.2f}"),
    ("gemm_pct_int8_peak", "% INT8 peak", "{:.0f}"), ("gemm_pct_floor", "% of floor", "{:.0f}"),
]


def write_outputs(out: Path, slug: str, device: str, ceil: dict, rows: list, variant_rows: list,
                  correct: dict) -> None:
    with open(out / f"gemm_{slug}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with open(out / f"gemm_{slug}_variants.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(variant_rows[0]))
        wr.writeheader()
        wr.writerows(variant_rows)
    md = [f"# W4A4 GEMM and activation quantization on {device}", "",
          f"Measured by `experiments/bench_gemm.py` ({time.strftime('%Y-%m-%d')}); torch "
          f"{torch.__version__}. 128 INT8 outlier channels, group 128, activation clip {A_CLIP}, "
          "reorder gather fused into the quantize kernel (a random index in the bank-aware order "
          "within groups that the kernel backend uses, atom_lab/gather_plan.py). Times are medians "
          "of CUDA-event batches "
          "with inputs rotated beyond the L2.", "",
          "Ceilings measured in the same run:", "",
          f"- HBM bandwidth (device-to-device copy, read + write): {ceil['hbm_gbps']:.0f} GB/s",
          f"- INT8 mma.sync m16n8k32 (register resident): {ceil['int8_mma_tops']:.0f} TOPS",
          *([f"- INT8 wgmma (shared-memory resident): m64n256k32 both operands from shared memory "
             f"{ceil['wgmma_ss_tops']:.0f} TOPS; m64n128k32 with A from registers (the W4A4 "
             f"kernel's instruction) {ceil['wgmma_rs_tops']:.0f} TOPS"] if "wgmma_ss_tops" in ceil
            else []),
          f"- INT8 peak used for '% INT8 peak' and the floor: the highest of these, "
          f"{ceil['int8_peak_tops']:.0f} TOPS",
          f"- torch._int_mm 8192^3: {ceil['int_mm_8192_tops']:.0f} TOPS; cuBLAS FP16 8192^3: "
          f"{ceil['cublas_fp16_8192_tflops']:.0f} TFLOP/s", "",
          f"Correctness pass: quantize {'PASS' if correct['quantize'] else 'FAIL'}, "
          f"GEMM {'PASS' if correct['gemm'] else 'FAIL'} (see the log).", "",
          "W8A8 = torch._int_mm + per-token x per-channel scale epilogue in torch (unfused); "
          "_int_mm = the INT8 GEMM alone (int32 out). Floor = max(2MNK / INT8 peak, bytes of "
          "packed A + packed W + FP16 Y / HBM bandwidth). Ratios > 1: ours faster. Same-bytes "
          "copy: one device-to-device copy moving the quantize kernel's bytes (FP16 in, packed "
          "out), timed the same way: the ceiling of a single memory-bound kernel of that size. "
          "Read-all write-1/4: a torch copy of every 4th element of the FP16 input (it reads "
          "every sector of it and writes a quarter of its bytes), the quantize kernel's "
          "traffic shape.", "",
          "| " + " | ".join(c[1] for c in COLUMNS) + " |",
          "|" + "---|" * len(COLUMNS)]
    for r in rows:
        md.append("| " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |")
    (out / f"gemm_{slug}.md").write_text("\n".join(md) + "\n")
    plot(out / f"gemm_{slug}.png", device, rows)


def plot(path: Path, device: str, rows: list) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(4.2 * len(SHAPES), 3.6), sharey=True)
    for ax, (k_total, n) in zip(axes, SHAPES):
        sel = [r for r in rows if r["K"] == k_total and r["N"] == n]
        ms = [r["M"] for r in sel]
        for key, label in (("gemm_vs_cublas", "W4A4 GEMM"), ("both_vs_cublas", "W4A4 quant+GEMM"),
                           ("w8a8_us", "W8A8 (_int_mm+scale)")):
            ys = [r["cublas_fp16_us"] / r[key] if key == "w8a8_us" else r[key] for r in sel]
            ax.plot(ms, ys, marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={k_total}, N={n}")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("speed-up over cuBLAS FP16")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"W4A4 on INT8 tensor cores, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_small(out: Path, slug: str, rows: list, variant_rows: list) -> None:
    """--small: the per-variant CSV (with each GEMM's speed-up over cuBLAS FP16 of its row) and the
    small-M rows (CSV), and short tables printed last."""
    cublas = {(r["K"], r["N"], r["M"]): r["cublas_fp16_us"] for r in rows}
    for r in variant_rows:
        key = (r["K"], r["N"], r["M"])
        r["x_cublas_fp16"] = cublas[key] / r["us"] if key in cublas and r["N"] else ""
    for name, data in ((f"gemm_{slug}_round4_small.csv", variant_rows),
                       (f"gemm_{slug}_round4_small_rows.csv", rows)):
        with open(out / name, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(data[0]))
            wr.writeheader()
            wr.writerows(data)
    (out / f"gemm_{slug}_round4_small_log.txt").write_text("\n".join(LOG) + "\n")
    gemms = [r for r in variant_rows if not r["variant"].startswith("quant_")]
    names = list(dict.fromkeys(r["variant"] for r in gemms))
    print(f"\n{'K':>5} {'N':>5} {'M':>3} {'fp16':>6} " + " ".join(f"{v:>15}" for v in names)
          + "   (us, x cuBLAS FP16)")
    for key in cublas:
        sel = {r["variant"]: r for r in gemms if (r["K"], r["N"], r["M"]) == key}
        print(f"{key[0]:5d} {key[1]:5d} {key[2]:3d} {cublas[key]:6.1f} " + " ".join(
            f"{sel[v]['us']:6.1f} ({sel[v]['x_cublas_fp16']:4.2f}x)" if v in sel else f"{'-':>15}"
            for v in names))
    print(f"\n{'K':>5} {'N':>5} {'M':>3} {'kernel':>9} {'us':>6} {'fp16':>6} {'x':>5} {'w8a8 x':>6} "
          f"{'intmm x':>7} {'both':>6} {'quant':>6} {'floor%':>6}")
    for r in rows:
        print(f"{r['K']:5d} {r['N']:5d} {r['M']:3d} {r['variant']:>9} {r['gemm_us']:6.1f} "
              f"{r['cublas_fp16_us']:6.1f} {r['gemm_vs_cublas']:5.2f} {r['gemm_vs_w8a8']:6.2f} "
              f"{r['gemm_vs_int_mm']:7.2f} {r['both_us']:6.1f} {r['quant_us']:6.1f} "
              f"{r['gemm_pct_floor']:6.0f}")
    quant = [r for r in variant_rows if r["variant"].startswith("quant_") and r["M"] >= 256]
    names = list(dict.fromkeys(r["variant"] for r in quant))
    print(f"\n{'K':>5} {'M':>4} " + " ".join(f"{v[6:]:>12}" for v in names) + "   (us, % HBM)")
    for key in dict.fromkeys((r["K"], r["M"]) for r in quant):
        sel = {r["variant"]: r for r in quant if (r["K"], r["M"]) == key}
        print(f"{key[0]:5d} {key[1]:4d} " + " ".join(
            f"{sel[v]['us']:6.1f} ({sel[v]['tops']:2.0f}%)" for v in names))


# ------------------------------------------------------------------ large M: variants, ablations

LARGE_MS = [256, 1024, 4096]
# Builds timed beside the registered wgmma variants: (label, variant, compiler flags, persistent).
# -DWG_ONLY_G128 keeps an ablation build's compile to the group-128 kernels.
LARGE_BUILDS = [
    ("wg1_m128:eager", "wg1_m128", ("-DWG_EAGER_SCALE", "-DWG_ONLY_G128"), True),
    ("wg1_m128:nofold", "wg1_m128", ("-DWG_ABLATE_NOFOLD", "-DWG_ONLY_G128"), True),
    ("wgc_m128:nofold", "wgc_m128", ("-DWG_ABLATE_NOFOLD", "-DWG_ONLY_G128"), True),
    ("wgp_m128:np", "wgp_m128", (), False),
]


def large_contenders() -> list[tuple[str, str, tuple, bool]]:
    return [(v, v, (), True) for v in ko.WG_VARIANTS] + LARGE_BUILDS


def run_large(label_variant, a: MixedQuantized, w: MixedQuantized, y: torch.Tensor, bias=None):
    _, variant, options, persistent = label_variant
    m, n = y.shape
    ko.launch_wgmma(variant, a.group_size, m, n, a.k_normal, ko.gemm_kernel_args(a, w, bias, y),
                    y.device, options, persistent)


def check_large() -> bool:
    """Every wgmma variant and every non-ablation build against the float64 format reference on
    GEMM_CASES with M > 64 (plus a multi-tile persistent case), outputs poisoned with NaN."""
    ok = True
    log("large-M variants and builds vs formats.mixed_gemm_reference (float64), NaN-poisoned:")
    cases = [c for c in GEMM_CASES if c[0] > 64] + [(3000, 1300, 1152, 128, 128, True),
                                                     (2001, 1030, 1216, 64, 64, False)]
    for m, n, k_total, k, g, with_bias in cases:
        a = encode_mixed(activations(m, k_total), k, 4, g, A_CLIP)
        w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, g, 0.85)
        bias = torch.randn(n, device="cuda").half() if with_bias else None
        ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
        if bias is not None:
            ref += bias.double()
        for lv in large_contenders():
            if "nofold" in lv[0] or (g == 64 and "-DWG_ONLY_G128" in lv[2]):
                continue
            y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            try:
                run_large(lv, a, w, y, bias)
                torch.cuda.synchronize()
            except ko.KernelShapeError as exc:
                log(f"  {lv[0]:16s} M={m:4d} N={n:4d} K={k_total:5d}: not run ({exc})")
                continue
            err = ((y.double() - ref).norm() / ref.norm()).item()
            good = bool(torch.isfinite(y).all()) and err < 1e-3
            ok &= good
            log(f"  {lv[0]:16s} M={m:4d} N={n:4d} K={k_total:5d} k={k:3d} G={g:3d} bias={int(with_bias)}:"
                f" rel_err={err:.2e} {'PASS' if good else 'FAIL'}")
    return ok


def bench_large(out: Path, slug: str) -> int:
    """--large: correctness of every wgmma variant and build, then all of them side by side with
    cuBLAS FP16, W8A8 and _int_mm at M in LARGE_MS on the four shapes (event timing)."""
    t0 = time.time()
    correct = check_large()
    log(f"correctness {'PASS' if correct else 'FAIL'} ({time.time() - t0:.0f}s)")
    ceil = {"wgmma_ss_tops": ko.wgmma_s8_peak_tops("ss"), "wgmma_rs_tops": ko.wgmma_s8_peak_tops("rs")}
    log("ceilings: " + ", ".join(f"{k}={v:.0f}" for k, v in ceil.items()))
    peak = max(ceil.values())
    results = []
    labels = [lv[0] for lv in large_contenders()]
    for k_total, n in SHAPES:
        kn = k_total - OUTLIERS
        w16 = (torch.randn(n, k_total, device="cuda") * 0.02).half()
        wq = encode_mixed(w16, OUTLIERS, 4, GROUP, 0.85)
        wqs = [wq] + [clone_mixed(wq) for _ in range(copies(ko.mixed_bytes(n, kn, OUTLIERS, GROUP)) - 1)]
        w16ts = [w16.t()] + [w16.clone().t() for _ in range(copies(w16.numel() * 2) - 1)]
        w8, s8 = int8_weight(w16)
        w8ts = [w8.t()] + [w8.clone().t() for _ in range(copies(w8.numel()) - 1)]
        idx = reorder_index(k_total)
        for m in LARGE_MS:
            xs = [activations(m, k_total) for _ in range(min(copies(m * k_total * 2), 8))]
            aqs = [ko.quantize_mixed(x, OUTLIERS, 4, GROUP, A_CLIP, idx) for x in xs]
            aqs += [clone_mixed(aqs[i % len(aqs)]) for i in range(len(aqs),
                                                                copies(ko.mixed_bytes(m, kn, OUTLIERS, GROUP)))]
            pairs = max(len(aqs), len(wqs))
            y = torch.empty(m, n, dtype=torch.float16, device="cuda")
            row = {"K": k_total, "N": n, "M": m}
            for lv in large_contenders():
                row[lv[0]] = timed([lambda a=aqs[i % len(aqs)], w=wqs[i % len(wqs)], lv=lv:
                                    run_large(lv, a, w, y) for i in range(pairs)])
            x8s = [int8_weight(x)[0] for x in xs]
            sx = [int8_weight(x)[1][:, None] for x in xs]
            big = max(len(xs), len(w16ts))
            row["cublas_fp16"] = timed([lambda x=xs[i % len(xs)], wt=w16ts[i % len(w16ts)]:
                                        torch.matmul(x, wt) for i in range(big)])
            big = max(len(x8s), len(w8ts))
            row["int_mm"] = timed([lambda x=x8s[i % len(x8s)], wt=w8ts[i % len(w8ts)]:
                                   torch._int_mm(x, wt) for i in range(big)])
            row["w8a8"] = timed([lambda j=i % len(x8s), wt=w8ts[i % len(w8ts)]:
                                 (torch._int_mm(x8s[j], wt) * sx[j]).mul_(s8[None, :]).half()
                                 for i in range(big)])
            ops = ko.gemm_flops(m, n, k_total)
            best = min(labels[: len(ko.WG_VARIANTS)], key=lambda v: row[v])
            log(f"K={k_total:5d} N={n:5d} M={m:4d} | " + " ".join(f"{v}={row[v]:.1f}" for v in labels)
                + f" | fp16 {row['cublas_fp16']:.1f} w8a8 {row['w8a8']:.1f} int_mm {row['int_mm']:.1f}"
                f" | best {best} {ops / row[best] / 1e6:.0f} TOPS ({100 * ops / row[best] / 1e6 / peak:.0f}%"
                f" of wgmma) x{row['w8a8'] / row[best]:.2f} W8A8 x{row['cublas_fp16'] / row[best]:.2f} FP16")
            results.append(row)
            del xs, aqs, x8s, sx
        del wqs, w16ts, w8ts
        torch.cuda.empty_cache()
    with open(out / f"gemm_{slug}_large.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(results[0]))
        wr.writeheader()
        wr.writerows(results)
    log(f"total {time.time() - t0:.0f}s")
    (out / f"gemm_{slug}_large_log.txt").write_text("\n".join(LOG) + "\n")
    short = {lab: lab.replace("_m128", "").replace("_m192", "") for lab in labels}
    print("\nus (lower is better); x = best registered variant vs W8A8 / FP16")
    print(f"{'K':>5} {'N':>5} {'M':>4} " + " ".join(f"{short[v]:>9}" for v in labels)
          + f" {'fp16':>7} {'w8a8':>7} {'best':>8} {'xW8A8':>5} {'xFP16':>5} {'%pk':>3}")
    for r in results:
        best = min(labels[: len(ko.WG_VARIANTS)], key=lambda v: r[v])
        ops = ko.gemm_flops(r["M"], r["N"], r["K"])
        print(f"{r['K']:5d} {r['N']:5d} {r['M']:4d} " + " ".join(f"{r[v]:9.1f}" for v in labels)
              + f" {r['cublas_fp16']:7.1f} {r['w8a8']:7.1f} {short[best]:>8} {r['w8a8'] / r[best]:5.2f}"
              f" {r['cublas_fp16'] / r[best]:5.2f} {100 * ops / r[best] / 1e6 / peak:3.0f}")
    return 0 if correct else 1


def main() -> int:
    global MS, SHAPES, SMALL_ONLY, PDL_OK, QUANT_SWEEP
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--quick", action="store_true", help="two shapes, three M values")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--sass", action="store_true", help="static SASS mix of the GEMM kernels")
    parser.add_argument("--profile-target", action="store_true", help="only launch kernels for ncu")
    parser.add_argument("--ncu-summary", metavar="CSV", help="summarize an ncu --csv report")
    parser.add_argument("--small", action="store_true",
                        help="small-M rows (M = 1, 16) and the quantize kernels at every M only")
    parser.add_argument("--no-quant", action="store_true",
                        help="with --small: no quantize checks or sweeps (dispatched kernel timed)")
    parser.add_argument("--large", action="store_true",
                        help="large-M wgmma variants and ablation builds side by side (M >= 256)")
    parser.add_argument("--timeline", action="store_true",
                        help="per-CTA phase timeline of the small-M kernels (4096^2, M = 1, 16)")
    parser.add_argument("--quant-diag", action="store_true",
                        help="only the pipe quantize kernels beside their copies-only / math-only builds")
    parser.add_argument("--fold-ceiling", action="store_true",
                        help="only the wgmma rate with the format's per-group fold and nothing else")
    args = parser.parse_args()
    if args.fold_ceiling:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        fold_ceiling(Path(args.out))
        return 0
    if args.quant_diag:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        quant_pipe_diag(Path(args.out))
        return 0
    if args.profile_target:
        profile_target()
        return 0
    if args.ncu_summary:
        summarize_ncu(args.ncu_summary)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        SHAPES, MS = SHAPES[:2], [1, 16, 4096]
    if args.small:
        MS, SMALL_ONLY = [1, 16], True
    device = torch.cuda.get_device_name()
    slug = (re.search(r"[AHBL]\d{2,3}", device) or re.search(r"\w+", device)).group(0).lower()
    torch.manual_seed(0)
    log(f"device: {device}; torch {torch.__version__}")
    if args.large:
        return bench_large(out, slug)
    t0 = time.time()
    correct = {"quantize": None, "gemm": None}
    PDL_OK = probe_pdl()
    QUANT_SWEEP = not (args.small and args.no_quant)
    if not args.skip_checks:
        if QUANT_SWEEP:
            correct["quantize"] = check_quantize()
        correct["gemm"] = check_gemm()
        log(f"correctness: quantize {correct['quantize']}, gemm {correct['gemm']} "
            f"({time.time() - t0:.0f}s)")
    ceil = {"hbm_gbps": hbm_bandwidth(), "int8_mma_tops": ko.mma_s8_peak_tops()}
    if ko.has_wgmma() and not args.small:  # --small rows are bytes-bound: mma.sync rate enough
        ceil.update(wgmma_ss_tops=ko.wgmma_s8_peak_tops("ss"), wgmma_rs_tops=ko.wgmma_s8_peak_tops("rs"))
    ceil["int8_peak_tops"] = max(v for key, v in ceil.items() if key.endswith("tops")
                                 and key.startswith(("int8", "wgmma")))
    if not args.small:
        ceil.update(library_peaks())
    log("ceilings: " + ", ".join(f"{k}={v:.0f}" for k, v in ceil.items()))
    if args.timeline:
        timeline(out, slug)
    rows, variant_rows = [], []
    for k_total, n in SHAPES:
        bench_shape(k_total, n, ceil, rows, variant_rows)
        torch.cuda.empty_cache()
    if args.small:
        for k_total in dict.fromkeys(k for k, _ in SHAPES) if QUANT_SWEEP else ():
            bench_quantize_only(k_total, [256, 1024, 4096], ceil, variant_rows)
            torch.cuda.empty_cache()
        log(f"total {time.time() - t0:.0f}s")
        write_small(out, slug, rows, variant_rows)
        return 0 if all(v in (None, True) for v in correct.values()) else 1
    write_outputs(out, slug, device, ceil, rows, variant_rows, correct)
    if args.sass:
        sass_mix(out, slug)
    log(f"total {time.time() - t0:.0f}s")
    (out / f"gemm_{slug}_log.txt").write_text("\n".join(LOG) + "\n")
    print()
    print(f"{'K':>5} {'N':>5} {'M':>4} {'gemm':>8} {'xFP16':>6} {'xW8A8':>6} {'xintmm':>6} "
          f"{'%peak':>5} {'%floor':>6} {'quant%':>6}")
    for r in rows:
        print(f"{r['K']:5d} {r['N']:5d} {r['M']:4d} {r['gemm_us']:8.1f} {r['gemm_vs_cublas']:6.2f} "
              f"{r['gemm_vs_w8a8']:6.2f} {r['gemm_vs_int_mm']:6.2f} {r['gemm_pct_int8_peak']:5.0f} "
              f"{r['gemm_pct_floor']:6.0f} {r['quant_hbm_pct']:6.0f}")
    return 0 if all(v in (None, True) for v in correct.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
