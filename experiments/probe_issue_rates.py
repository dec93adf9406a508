"""Per-SM throughput of the W4A4 GEMM fold's instructions on this GPU (kernels/issue_rate_probe.cu).

  python experiments/probe_issue_rates.py --out DIR     # GPU: prints a table, writes JSON + MD

The large-M GEMM folds each K-group's int32 sum into an fp32 accumulator: I2FP, FMUL (sa * sw),
FFMA per output element and group. This measures results per SM and clock of I2FP, of FFMA and of
the exact magic-number conversion (IADD + FADD) that can replace I2FP, and what each conversion
caps the GEMM at: one conversion per output element per group of G products.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atom_lab.cuda import get_kernel  # noqa: E402

PROBES = {"probe_i2f": "I2FP.F32.S32 (cvt.rn.f32.s32)", "probe_ffma": "FFMA",
          "probe_magic": "IADD + FADD (exact conversion, one step = 2 instructions)"}
CHAINS, THREADS = 8, 1024  # as the .cu file


def rate(name: str, sms: int, iters: int = 4096, repeats: int = 5) -> float:
    """Median results per SM and clock cycle of one probe over `repeats` launches."""
    import cupy

    kernel = get_kernel("issue_rate_probe", name)
    sink = cupy.zeros(THREADS, dtype=cupy.uint32)
    cycles = cupy.zeros(sms, dtype=cupy.int64)
    rates = []
    for _ in range(repeats + 1):  # the first launch warms up
        kernel((sms,), (THREADS,), (np.int32(iters), sink, cycles))
        cupy.cuda.Device().synchronize()
        rates.append(THREADS * CHAINS * iters / float(cupy.median(cycles)))
    return statistics.median(rates[1:])


MACS_PER_CLK = 4096  # dense INT8 tensor MACs per SM and clock on Hopper: 4 tensor cores x 1024
#                     (H100 SXM's 1979 TOPS = 2 x 4096 x 132 SMs x 1.83 GHz)


def write_report(rates: dict, device: str, sms: int, group: int, out: Path) -> str:
    """rates: probe -> results per SM and clock. Writes issue_rates.{json,md}; returns the MD."""
    rows = [dict(probe=name, instruction=PROBES[name], per_sm_per_clk=round(r, 1),
                 # one conversion per output element and K-group of `group` products: the INT8
                 # tensor rate this instruction alone could keep up with, as a multiple of the peak
                 fold_cap_x_int8_peak=round(r * group / MACS_PER_CLK, 2))
            for name, r in rates.items()]
    lines = [f"# Fold instruction throughput ({device}, {sms} SMs)", "",
             f"One CTA of {THREADS} threads an SM, {CHAINS} independent chains a thread; results "
             f"per SM and clock (clock64). Cap: one conversion per output element per K-group of "
             f"{group} products against {MACS_PER_CLK} INT8 MACs per SM and clock (dense wgmma "
             f"peak), i.e. the multiple of the INT8 peak this instruction alone could feed (< 1: "
             f"it alone would cap the GEMM below the peak).", "",
             "| probe | instruction | per SM per clock | cap, x INT8 peak |", "|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['instruction']} | {r['per_sm_per_clk']} | "
              f"{r['fold_cap_x_int8_peak']} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "issue_rates.json").write_text(json.dumps(
        dict(device=device, sms=sms, group=group, rates=rates, rows=rows), indent=1))
    md = "\n".join(lines) + "\n"
    (out / "issue_rates.md").write_text(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--group", type=int, help="K-group size G of the fold (default 128, or the "
                    "saved run's with --from-json)")
    ap.add_argument("--from-json", type=Path, help="anywhere: rewrite the report of a saved run")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rates = saved.get("rates") or {r["probe"]: r["per_sm_per_clk"] for r in saved["rows"]}
        group = args.group or saved.get("group", 128)
        print(write_report(rates, saved["device"], saved["sms"], group, args.out))
        return 0
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    sms = props["multiProcessorCount"]
    name = props["name"]
    device = name.decode() if isinstance(name, bytes) else str(name)
    rates = {probe: rate(probe, sms) for probe in PROBES}
    print(write_report(rates, device, sms, args.group or 128, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
