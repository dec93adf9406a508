"""Decode attention over a 4-bit KV cache (issue 5): correctness first, then timings, in one call.

  python experiments/bench_attention.py --out DIR        # on the GPU: checks, timings, CSV + MD
  python experiments/bench_attention.py --plot CSV       # anywhere: the PNG from a results CSV

Variants timed side by side in the same process on the same data:
  kv4   our kernel on the 4-bit cache (codes + fp16 scale/zero per token per head), split-K
        partitions from the planner; kv4_best: the fastest of a sweep over partition counts and
        over the 4- and 8-stage ring builds (a check of the planner's model)
  fp16  the same kernel reading the FP16 cache
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atom_lab import kv_kernels as kk  # noqa: E402
from atom_lab.formats import encode_kv, kv_bytes_per_token  # noqa: E402

HEAD_DIM = 128
CONFIGS = [("llama7b_mha", 32, 32), ("gqa_32q_8kv", 32, 8)]
BATCHES = [1, 16, 64, 256]
CONTEXTS = [512, 2048, 8192]
ROTATE_BYTES = 200e6  # > 2 x the 50 MB L2 for the smallest of the variants' working sets
TOL = 2e-3
SWEEP_SPLITS = (1, 2, 4, 8, 16)
SWEEP_BUILDS = ("kv4", "kv4deep")


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
    for f in fns:
        f()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for f in fns:
        f()
    e1.record()
    e1.synchronize()
    pass_ms = max(e0.elapsed_time(e1), 1e-3)
    reps = max(1, min(math.ceil(target_ms / pass_ms), max(1, 3000 // len(fns))))
    calls = reps * len(fns)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                for f in fns:
                    f()
        run, mode = graph.replay, "graph"
    except Exception as exc:  # capture unsupported: time plain launches
        log(f"    graph capture failed ({type(exc).__name__}: {exc}); timing plain launches")
        torch.cuda.synchronize()
        graph = None

        def run():
            for _ in range(reps):
                for f in fns:
                    f()
        mode = "stream"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / calls)
    del graph
    med = statistics.median(times)
    return med, mode, (max(times) - min(times)) / med


# ------------------------------------------------------------------------------------------------
# Correctness (fresh random inputs, ragged lengths, poisoned outputs)

def same_encoding(cache, which, rows, b, clip) -> bool:
    got, expect = getattr(cache, f"{which}_quantized")(b), encode_kv(rows, cache.bits, 0, clip)
    return all(torch.equal(getattr(got, f), getattr(expect, f)) for f in ("codes", "scales", "zeros"))


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
            dev_len = cache.lengths
            for chunk in (None, 64, 4160):
                plan = None if chunk is None else kk.SplitPlan(-(-max(lengths) // chunk), chunk)
                out4 = torch.full_like(q, float("nan"))
                cache.attend(q, plan=plan, out=out4)
                out16 = torch.full_like(q, float("nan"))
                kk.decode_attention_fp16(q, k, v, dev_len, max(lengths), plan=plan, out=out16)
                deep = kk.SplitPlan(plan.splits, plan.chunk, "kv4deep") if plan else \
                    kk.SplitPlan(4, 1088, "kv4deep")
                out8 = torch.full_like(q, float("nan"))
                kk.decode_attention_kv4(q, cache.k_codes, cache.k_params, cache.v_codes,
                                        cache.v_params, dev_len, max(lengths), plan=deep, out=out8)
                torch.cuda.synchronize()
                rec = dict(head_dim=D, kv_heads=kv_heads, group=group, chunk=chunk or "plan",
                           append_exact=exact_codes,
                           kv4_written=bool(torch.isfinite(out4).all()),
                           kv4_err=rel(out4, ref4),
                           fp16_written=bool(torch.isfinite(out16).all()),
                           fp16_err=rel(out16, ref16),
                           deep_err=rel(out8, ref4) if torch.isfinite(out8).all() else math.inf)
                rec["ok"] = (rec["append_exact"] and rec["kv4_written"] and rec["fp16_written"]
                             and rec["kv4_err"] < TOL and rec["fp16_err"] < TOL
                             and rec["deep_err"] < TOL)
                records.append(rec)
                log(f"  check D={D} kv={kv_heads} g={group} chunk={rec['chunk']}: "
                    f"append_exact={exact_codes} kv4_err={rec['kv4_err']:.2e} "
                    f"fp16_err={rec['fp16_err']:.2e} deep_err={rec['deep_err']:.2e} "
                    f"{'ok' if rec['ok'] else 'FAIL'}")
    return records


# ------------------------------------------------------------------------------------------------
# One benchmark row

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
    need = nsets * (cache_fp16 + cache_kv4) * 1.05 + cache_fp16 * 0.1
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
    torch.cuda.synchronize()

    group = Hq // Hkv
    head_blocks = -(-group // kk.HEADS_PER_CTA)
    plan4 = _plan("kv4", B * Hkv * head_blocks, L)
    plan16 = _plan("fp16", B * Hkv * head_blocks, L)
    gqa = Hq != Hkv

    def kv4(s, plan=plan4):
        c = s["cache"]
        return kk.decode_attention_kv4(s["q"], c.k_codes, c.k_params, c.v_codes, c.v_params,
                                       c.lengths, L, plan=plan, out=s["out4"])

    def fp16(s):
        return kk.decode_attention_fp16(s["q"], s["k"], s["v"], s["cache"].lengths, L,
                                        plan=plan16, out=s["out16"])

    def sdpa(s):
        return F.scaled_dot_product_attention(s["q"].unsqueeze(2), s["k"], s["v"],
                                              enable_gqa=gqa).squeeze(2)

    # Correctness on this row's data: first and last sequence against float64 references.
    errs = dict(kv4=0.0, fp16=0.0, sdpa=0.0)
    s0["out4"].fill_(float("nan"))
    s0["out16"].fill_(float("nan"))
    outs = dict(kv4=kv4(s0), fp16=fp16(s0), sdpa=sdpa(s0))
    for b in sorted({0, B - 1}):
        sl = slice(b, b + 1)
        ref4 = kk.reference_decode_attention(s0["q"][sl], s0["k"][sl], s0["v"][sl], [L])
        ref16 = kk.reference_decode_attention(s0["q"][sl], s0["k"][sl], s0["v"][sl], [L],
                                              quantized=False)
        for name_, ref in (("kv4", ref4), ("fp16", ref16), ("sdpa", ref16)):
            o = outs[name_][sl]
            errs[name_] = max(errs[name_], rel(o, ref) if torch.isfinite(o).all() else math.inf)
    exact = same_encoding(s0["cache"], "v", s0["v"][B - 1], B - 1, 1.0)

    results = {}
    for vname, fn in (("kv4", kv4), ("fp16", fp16), ("sdpa", sdpa)):
        results[vname] = time_calls([lambda s=s, fn=fn: fn(s) for s in sets])
    sweep = {(plan4.kernel, plan4.splits): results["kv4"][0]}
    for build in SWEEP_BUILDS:
        for n in SWEEP_SPLITS:
            chunk = kk._align(-(-L // n), kk.CHUNK_ALIGN)
            p = kk.SplitPlan(-(-L // chunk), chunk, build)
            if (build, p.splits) not in sweep:
                sweep[(build, p.splits)] = time_calls([lambda s=s, p=p: kv4(s, p) for s in sets])[0]
    best = min(sweep, key=sweep.get)
    deep_best = min((v for k_, v in sweep.items() if k_[0] == "kv4deep"), default=math.nan)

    def traffic(cache_bytes, plan):
        partials = 2 * B * Hq * plan.splits * (D + 1) * 4 if plan.splits > 1 else 0
        return cache_bytes + 2 * B * Hq * D * 2 + partials

    bytes4, bytes16 = traffic(cache_kv4, plan4), traffic(cache_fp16, plan16)
    bytes_sdpa = cache_fp16 + 2 * B * Hq * D * 2
    t4, t16, ts = (results[v][0] for v in ("kv4", "fp16", "sdpa"))
    row = dict(
        config=name, q_heads=Hq, kv_heads=Hkv, head_dim=D, batch=B, context=L,
        kv4_splits=plan4.splits, fp16_splits=plan16.splits, rotating_sets=nsets,
        kv4_us=t4 * 1e6, fp16_us=t16 * 1e6, sdpa_us=ts * 1e6, kv4_best_us=sweep[best] * 1e6,
        kv4_best_build=best[0], kv4_best_splits=best[1], kv4deep_best_us=deep_best * 1e6,
        speedup_vs_sdpa=ts / t4, speedup_vs_fp16_kernel=t16 / t4,
        kv4_MB=bytes4 / 1e6, fp16_MB=bytes16 / 1e6,
        kv4_floor_us=bytes4 / bw * 1e6, fp16_floor_us=bytes_sdpa / bw * 1e6,
        kv4_hbm_pct=100 * bytes4 / t4 / bw, fp16_hbm_pct=100 * bytes16 / t16 / bw,
        sdpa_hbm_pct=100 * bytes_sdpa / ts / bw,
        kv4_err=errs["kv4"], fp16_err=errs["fp16"], sdpa_err=errs["sdpa"], append_exact=exact,
        append_GBps=(B * Hkv * L * D * 2 * 2 + cache_kv4) / append_s / 1e9,
        timing="/".join(sorted({results[v][1] for v in results})),
        spread_pct=100 * max(results[v][2] for v in results),
    )
    log(f"  {name:12s} B={B:3d} L={L:5d}: kv4 {row['kv4_us']:8.1f} us ({row['kv4_hbm_pct']:5.1f}% HBM,"
        f" {plan4.splits} splits)  fp16 {row['fp16_us']:8.1f} us ({row['fp16_hbm_pct']:5.1f}%)  "
        f"sdpa {row['sdpa_us']:8.1f} us ({row['sdpa_hbm_pct']:5.1f}%)  x{row['speedup_vs_sdpa']:.2f}"
        f"  best {row['kv4_best_us']:.1f} ({best[0]} S={best[1]}) deep {row['kv4deep_best_us']:.1f}"
        f"  err {row['kv4_err']:.1e}/{row['fp16_err']:.1e}/{row['sdpa_err']:.1e}")
    del sets, outs
    torch.cuda.empty_cache()
    return row


def _plan(family: str, ctas: int, max_len: int) -> kk.SplitPlan:
    shapes = kk.kernel_shapes(family, HEAD_DIM, torch.cuda.current_device())
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
              "/ copy bandwidth. Sweep: split-K partition counts S in 1..16 for the 4-stage (kv4) and "
              "8-stage (kv4deep) ring builds, a check of the planner's cost model.", ""]
    lines.append("| config | batch | context | kv4 us | fp16 kernel us | SDPA us | x SDPA | "
                 "x fp16 kernel | kv4 HBM % | fp16 kernel HBM % | SDPA HBM % | kv4 floor us | "
                 "splits | kv4 err | sweep best us (build, S) | 8-stage best us | target |")
    lines.append("|" + "---|" * 17)
    for r in rows:
        target = ""
        if in_target(r):
            ok = r["speedup_vs_sdpa"] >= 3 and r["kv4_hbm_pct"] >= 70
            target = "met" if ok else (f"missed (x{r['speedup_vs_sdpa']:.2f}, "
                                       f"{r['kv4_hbm_pct']:.0f}%)")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['context']} | {r['kv4_us']:.1f} | "
            f"{r['fp16_us']:.1f} | {r['sdpa_us']:.1f} | {r['speedup_vs_sdpa']:.2f} | "
            f"{r['speedup_vs_fp16_kernel']:.2f} | {r['kv4_hbm_pct']:.1f} | {r['fp16_hbm_pct']:.1f} | "
            f"{r['sdpa_hbm_pct']:.1f} | {r['kv4_floor_us']:.1f} | {r['kv4_splits']} | "
            f"{r['kv4_err']:.1e} | {r['kv4_best_us']:.1f} ({r['kv4_best_build']}, "
            f"{r['kv4_best_splits']}) | {r['kv4deep_best_us']:.1f} | {target} |")
    lines += ["", "Memory per cached token (K + V, all KV heads, head_dim 128):", "",
              "| config | 4-bit bytes | FP16 bytes | ratio |", "|---|---|---|---|"]
    for name, _, hkv in CONFIGS:
        q4, f16 = kv_bytes_per_token(HEAD_DIM, hkv), 2 * hkv * HEAD_DIM * 2
        lines.append(f"| {name} | {q4} | {f16} | {q4 / f16:.4f} |")
    n_ok = sum(c["ok"] for c in checks)
    lines += ["", f"Correctness checks (ragged lengths 1..4099, poisoned outputs, head_dim 64/128, "
              f"GQA groups 1/3/4/8/12, split plans): {n_ok}/{len(checks)} passed, max kv4 error "
              f"{max(c['kv4_err'] for c in checks):.2e}, max fp16-kernel error "
              f"{max(c['fp16_err'] for c in checks):.2e} (relative Frobenius vs float64)."]
    path.write_text("\n".join(lines) + "\n")


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=False)
    for ax, (name, _, _) in zip(axes, CONFIGS):
        sub = [r for r in rows if r["config"] == name]
        labels = [f"B{r['batch']}\nL{r['context']}" for r in sub]
        x = range(len(sub))
        w = 0.27
        for i, (col, lab) in enumerate((("kv4_us", "4-bit KV (ours)"),
                                        ("fp16_us", "FP16 KV (same kernel)"),
                                        ("sdpa_us", "FP16 KV (torch SDPA)"))):
            ax.bar([j + (i - 1) * w for j in x], [float(r[col]) for r in sub], w, label=lab)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--plot", type=Path, help="only draw the PNG from this CSV")
    ap.add_argument("--batches", type=int, nargs="*", default=BATCHES)
    ap.add_argument("--contexts", type=int, nargs="*", default=CONTEXTS)
    args = ap.parse_args()
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
    for fmt in ("kv4", "kv4deep", "fp16"):
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
    log("\nconfig        B     L   kv4_us  fp16_us  sdpa_us  xSDPA  kv4%HBM  target")
    for r in rows:
        t = ("met" if r["speedup_vs_sdpa"] >= 3 and r["kv4_hbm_pct"] >= 70 else "MISS") \
            if in_target(r) else ""
        log(f"{r['config']:12s} {r['batch']:3d} {r['context']:5d} {r['kv4_us']:8.1f} "
            f"{r['fp16_us']:8.1f} {r['sdpa_us']:8.1f} {r['speedup_vs_sdpa']:6.2f} "
            f"{r['kv4_hbm_pct']:7.1f}  {t}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
