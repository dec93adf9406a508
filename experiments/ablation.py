"""Atom's ablation on a real model: WikiText-2 perplexity of each quantization step, one table.

    python experiments/ablation.py --device cuda --max-windows 0 --out experiments/results

Runs the steps of Atom's Table (FP16 -> W4A4 RTN -> + outliers -> INT8 outliers -> + group ->
+ clipping -> + GPTQ -> + KV4), the weight-only and W8A8 baselines, Atom W3A3 and a small search
for the best W4A4KV4 configuration, all on the same calibration windows (statistics cached) and
the same evaluation tokens. Writes ablation.csv / ablation.md (device and model named) and prints
the table. `--steps` picks a subset by name; `--search` adds the search grid.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import time
from pathlib import Path

import torch

ATOM = dict(outliers=128, outlier_bits="int8", group_size=128, a_clip=0.9, w_clip=0.85,
            weight_method="gptq", w_channel_group=2)

STEPS = [
    ("FP16", {}),
    ("W8A8 RTN", dict(w_bits=8, a_bits=8)),
    ("W4A16 g128 RTN", dict(w_bits=4, group_size=128)),
    ("W4A16 g128 GPTQ", dict(w_bits=4, group_size=128, weight_method="gptq")),
    ("W4A4 RTN", dict(w_bits=4, a_bits=4)),
    ("+ 128 FP16 outliers", dict(w_bits=4, a_bits=4, outliers=128, outlier_bits="fp16")),
    ("outliers INT8", dict(w_bits=4, a_bits=4, outliers=128, outlier_bits="int8")),
    ("+ group 128", dict(w_bits=4, a_bits=4, outliers=128, group_size=128)),
    ("+ clipping", dict(w_bits=4, a_bits=4, outliers=128, group_size=128, a_clip=0.9, w_clip=0.85)),
    ("+ GPTQ", dict(w_bits=4, a_bits=4, **ATOM)),
    ("+ KV4 (Atom W4A4)", dict(w_bits=4, a_bits=4, kv_bits=4, **ATOM)),
    ("Atom W3A3 (KV4)", dict(w_bits=3, a_bits=3, kv_bits=4, **ATOM)),
]


def search_grid() -> list[tuple[str, dict]]:
    """Where the error comes from (weight-only variants) and W4A4KV4 variants around Atom's
    recipe (no rotation): group size, asymmetric weights, KV groups, clipping, outliers."""
    w4 = dict(w_bits=4)
    grid = [
        ("W4A16 g32 RTN", dict(w4, group_size=32)),
        ("W4A16 g128 asym RTN", dict(w4, group_size=128, w_sym=False)),
        ("W4A16 g32 asym RTN", dict(w4, group_size=32, w_sym=False)),
        ("W4A16 g128 GPTQ damp0.1", dict(w4, group_size=128, weight_method="gptq", percdamp=0.1)),
        ("W4A16 g128 GPTQ act_order", dict(w4, group_size=128, weight_method="gptq",
                                            act_order=True)),
    ]
    kv4 = dict(ATOM, w_bits=4, a_bits=4, kv_bits=4)
    variants = [
        ("g64", dict(group_size=64)),
        ("g32", dict(group_size=32)),
        ("g64 w-asym", dict(group_size=64, w_sym=False)),
        ("g32 w-asym", dict(group_size=32, w_sym=False)),
        ("g32 w-asym RTN", dict(group_size=32, w_sym=False, weight_method="rtn")),
        ("g32 w-asym kvg32", dict(group_size=32, w_sym=False, kv_group_size=32)),
        ("g32 w-asym kvg32 K-after-RoPE", dict(group_size=32, w_sym=False, kv_group_size=32,
                                               k_before_rope=False)),
        ("g32 w-asym kvg32 wclip1", dict(group_size=32, w_sym=False, kv_group_size=32,
                                         w_clip=1.0)),
        ("g32 w-asym kvg32 o256", dict(group_size=32, w_sym=False, kv_group_size=32,
                                       outliers=256)),
    ]
    grid += [(f"W4A4KV4 {name}", dict(kv4, **v)) for name, v in variants]
    return grid


def refine_grid() -> list[tuple[str, dict]]:
    """Second round around the best of search_grid (g32, asymmetric weights, KV groups of 32,
    256 outliers): weight clipping off, GPTQ act-order, finer groups, K after RoPE, static."""
    base = dict(ATOM, w_bits=4, a_bits=4, kv_bits=4, group_size=32, w_sym=False,
                kv_group_size=32, outliers=256)
    best = dict(base, w_clip=1.0, act_order=True)
    variants = [
        ("wclip1", dict(base, w_clip=1.0)),
        ("wclip1 act_order", best),
        ("wclip1 act_order K-after-RoPE", dict(best, k_before_rope=False)),
        ("wclip1 act_order aclip1", dict(best, a_clip=1.0)),
        ("wclip1 act_order kvg16", dict(best, kv_group_size=16)),
        ("wclip1 act_order g16", dict(best, group_size=16)),
        ("wclip1 act_order kvclip0.95", dict(best, kv_clip=0.95)),
        ("wclip1 act_order o128", dict(best, outliers=128)),
        ("wclip1 act_order static", dict(best, dynamic=False)),
    ]
    return [(f"W4A4KV4 g32 w-asym kvg32 o256 {name}", v) for name, v in variants]


GRIDS = {"search": search_grid, "refine": refine_grid}


def run_step(name, overrides, args, base_model, calib_windows, eval_tokens, cache_dir):
    from atom_lab.config import QuantConfig
    from atom_lab.eval.perplexity import perplexity
    from atom_lab.quantize import quantize_model

    qcfg = QuantConfig.from_dict(dict(overrides, name=name))
    model = copy.deepcopy(base_model).to(args.device)
    t0 = time.time()
    quantize_model(model, qcfg, calib_windows, device=args.device, progress=False,
                   cache_key=args.model, cache_dir=cache_dir)
    t_quant = time.time() - t0
    result = perplexity(model, eval_tokens, seqlen=args.seqlen,
                        max_windows=args.max_windows or None, batch_size=args.batch_size,
                        progress=False)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dict(step=name, ppl=round(result["ppl"], 3), windows=result["windows"],
                tokens=result["tokens"], quant_s=round(t_quant, 1),
                eval_s=round(time.time() - t0 - t_quant, 1), config=json.dumps(overrides))


def write_tables(rows, out: Path, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    keys = ["step", "ppl", "x_fp16", "windows", "tokens", "quant_s", "eval_s", "config"]
    fp16 = next((r["ppl"] for r in rows if r["step"] == "FP16"), None)
    for r in rows:
        r["x_fp16"] = round(r["ppl"] / fp16, 3) if fp16 else ""
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Atom ablation: {meta['model']}, WikiText-2 test, seqlen {meta['seqlen']}",
             "", f"Device: {meta['device']}. Calibration: {meta['calib']}. {meta['note']}", "",
             "| step | ppl | x FP16 | windows | quant s | config |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['ppl']:.3f} | {r['x_fp16']} | {r['windows']} | {r['quant_s']} "
              f"| `{r['config']}` |" for r in rows]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=0, help="0 = the whole test split")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="evaluation windows per forward")
    p.add_argument("--steps", default="", help="comma-separated step names (default: all)")
    p.add_argument("--search", action="store_true", help="add the search grid (--grid)")
    p.add_argument("--only-search", action="store_true")
    p.add_argument("--grid", default="search", choices=sorted(GRIDS))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from atom_lab.calibration import calibration_windows_for
    from atom_lab.config import CalibConfig
    from atom_lab.data import tokenize_text, wikitext2_text
    from atom_lab.models import load_model

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    base_model, tokenizer = load_model(args.model, device="cpu", dtype=dtype)
    calib = CalibConfig(nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=args.seed)
    calib_windows = calibration_windows_for(tokenizer, calib, args.data_root)
    eval_tokens = tokenize_text(tokenizer, wikitext2_text("test", args.data_root))
    steps = [] if args.only_search else STEPS
    if args.steps:
        wanted = set(args.steps.split(","))
        steps = [s for s in steps if s[0] in wanted]
    if args.search or args.only_search:
        steps = steps + GRIDS[args.grid]()
    cache_dir = Path(args.out) / ".calib_cache"
    rows, meta, table = [], describe_run(args), ""
    for name, overrides in steps:
        row = run_step(name, overrides, args, base_model, calib_windows, eval_tokens, cache_dir)
        print(f"{row['step']:<40} ppl {row['ppl']:>9.3f}  quant {row['quant_s']:>6}s  "
              f"eval {row['eval_s']:>6}s", flush=True)
        rows.append(row)
        table = write_tables(rows, Path(args.out) / (args.tag or "ablation"), meta)
    print(table)


def describe_run(args) -> dict:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    return dict(model=args.model, seqlen=args.seqlen, device=device,
                calib=f"{args.nsamples} x {args.calib_seqlen} tokens of WikiText-2 validation, "
                      f"seed {args.seed}",
                note="Weights of SmolLM2-135M-Instruct come from a Q4_1 GGUF (already on a "
                     "4-bit asymmetric group-32 grid); activations are real.")


if __name__ == "__main__":
    main()
