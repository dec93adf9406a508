// Register-resident INT8 tensor-core rate: mma.sync m16n8k32 s8 with 8 independent accumulator
// chains per warp and no memory traffic in the loop. experiments/bench_gemm.py uses the measured
// rate as the compute ceiling of the W4A4 GEMM (which runs on the same instruction).
#define CHAINS 8

extern "C" __global__ void mma_s8_peak(const unsigned* __restrict__ seed, int iters, int* __restrict__ out) {
    const unsigned s = seed[threadIdx.x & 31];
    const unsigned a0 = s, a1 = s * 3u, a2 = s * 5u, a3 = s * 7u, b0 = s * 11u, b1 = s * 13u;
    int acc[CHAINS][4];
#pragma unroll
    for (int c = 0; c < CHAINS; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[c][e] = c + e;
#pragma unroll 1
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int c = 0; c < CHAINS; ++c)
            asm volatile(
                "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                "{%8,%9}, {%0,%1,%2,%3};\n"
                : "+r"(acc[c][0]), "+r"(acc[c][1]), "+r"(acc[c][2]), "+r"(acc[c][3])
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
    int total = 0;
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) total += acc[c][0] ^ acc[c][1] ^ acc[c][2] ^ acc[c][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}
