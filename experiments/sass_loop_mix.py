"""Instruction mix of a decode kernel's tile loop (H100 SASS; needs nvcc and cuobjdump).

    python experiments/sass_loop_mix.py KERNEL [-DOPTION ...]
e.g. python experiments/sass_loop_mix.py decode_attention_kv4pw8_d128 -DKV4M_PIPE=0

Compiles kernels/decode_attention.cu for sm_90a with the options, finds KERNEL's tile loop (the
shortest backward-branch span holding mma instructions), and prints its length and opcode counts.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def sass_of(kernel: str, options: list[str]) -> list[tuple[int, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", "--std=c++17", "-DNDEBUG",
                        f"-I{KERNELS}", *options, "-o", str(cubin),
                        str(KERNELS / "decode_attention.cu")], check=True)
        text = subprocess.run(["cuobjdump", "-sass", "-fun", kernel, str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def opcode(text: str) -> str:
    return (text.split()[1] if text.startswith("@") else text.split()[0]).split(".")[0]


def main() -> int:
    kernel, options = sys.argv[1], sys.argv[2:]
    ins = sass_of(kernel, options)
    loops = []  # (start, end) of each backward branch's span holding mma instructions
    for addr, text in ins:
        m = re.search(r"BRA\S*\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            if sum("HMMA" in t for a, t in ins if start <= a <= addr) >= 8:
                loops.append((addr - start, start, addr))
    if not loops:
        print(f"{kernel}: no loop with mma instructions")
        return 1
    # the shortest such span is the tile loop (longer ones: out-of-line stubs branching back)
    _, start, end = min(loops)
    body = [t for a, t in ins if start <= a <= end]
    mix = collections.Counter(opcode(t) for t in body)
    top = ", ".join(f"{k} {v}" for k, v in mix.most_common(14))
    print(f"{kernel} {' '.join(options)}: tile loop {start:#x}-{end:#x}, {len(body)} "
          f"instructions: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
