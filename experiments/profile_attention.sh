#!/bin/bash
# Nsight Compute profile of one decode-attention row and build (H100; needs ncu on PATH), plus
# the SASS of the decode kernels (needs nvcc and cuobjdump), written under OUT_DIR.
#   experiments/profile_attention.sh OUT_DIR CONFIG B L BUILD S [NVRTC option]
# e.g. experiments/profile_attention.sh out llama7b_mha 16 2048 kv4pw8 1 -DKV4M_MATH_ONLY=1
set -euo pipefail
out=$1 config=$2 B=$3 L=$4 build=$5 S=$6 opt=${7:-}
mkdir -p "$out"
tag="${config}_B${B}_L${L}_${build}_S${S}${opt:+_${opt#-D}}"; tag=${tag//=/}
sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats
          --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis_Tables
          --section Occupancy)
ncu --clock-control none -k regex:decode_attention -s 2 -c 1 "${sections[@]}" --csv --page raw \
    python3 experiments/bench_attention.py --single "$config" "$B" "$L" "$build" "$S" \
    ${opt:+--opts=$opt} > "$out/ncu_$tag.csv"
if command -v nvcc >/dev/null && command -v cuobjdump >/dev/null && [ ! -f "$out/decode_sass.txt" ]; then
    nvcc -cubin -arch=sm_90a --std=c++17 -DNDEBUG -Ikernels -o "$out/decode.cubin" \
        kernels/decode_attention.cu
    cuobjdump -sass "$out/decode.cubin" > "$out/decode_sass.txt"
    rm "$out/decode.cubin"
fi
