// Throughput probes for the instructions of the W4A4 GEMM's per-group fold (int32 group sum ->
// fp32, times sa * sw, into the accumulator). One CTA of 1024 threads an SM; each thread runs
// CHAINS independent chains of `iters` steps of one instruction; thread 0 records the SM cycles
// (clock64) the loop took. Results per SM and cycle: 1024 * CHAINS * iters / cycles.
#define CHAINS 8

#define PROBE(NAME, TYPE, INIT, STEP)                                                             \
    extern "C" __global__ void __launch_bounds__(1024) NAME(int iters, unsigned* sink,           \
                                                            long long* cycles) {                  \
        TYPE v[CHAINS];                                                                           \
        _Pragma("unroll") for (int c = 0; c < CHAINS; ++c) v[c] = INIT;                           \
        __syncthreads();                                                                          \
        const long long t0 = clock64();                                                           \
        for (int i = 0; i < iters; ++i) {                                                         \
            _Pragma("unroll") for (int c = 0; c < CHAINS; ++c) STEP;                              \
        }                                                                                         \
        __syncthreads();                                                                          \
        const long long t1 = clock64();                                                           \
        unsigned acc = 0;                                                                         \
        _Pragma("unroll") for (int c = 0; c < CHAINS; ++c) acc ^= *reinterpret_cast<unsigned*>(&v[c]); \
        if (acc == 0x9E3779B9u) sink[threadIdx.x] = acc;                                          \
        if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;                                       \
    }

// I2FP.F32.S32: cvt of an int32 (the group sum) to fp32; the int chain feeds itself through the
// bits of the float so the conversion cannot be hoisted.
PROBE(probe_i2f, int, (int)threadIdx.x + c,
      { float f; asm volatile("cvt.rn.f32.s32 %0, %1;" : "=f"(f) : "r"(v[c])); v[c] = __float_as_int(f); })
// FFMA: the fold's multiply-add.
PROBE(probe_ffma, float, 1.f + threadIdx.x * 1e-3f + c,
      asm volatile("fma.rn.f32 %0, %0, 0f3F7FFFFE, 0f33800000;" : "+f"(v[c])))
// The exact magic-number conversion that avoids I2FP: float bits of 0x4B400000 + x, minus 2^23 +
// 2^22 (exact for |x| < 2^22; a group's sum is at most 128 * 64). One step = IADD + FADD.
PROBE(probe_magic, int, (int)threadIdx.x + c, {
    int t;
    asm volatile("add.s32 %0, %1, 0x4B400000;" : "=r"(t) : "r"(v[c]));
    v[c] = __float_as_int(__int_as_float(t) - 12582912.f);
})
