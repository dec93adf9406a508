// Activation quantization into formats.MixedQuantized (the GEMM's operand), fused with the reorder
// gather and optionally with the producer: plain FP16 input, RMSNorm, or SiLU(gate) * up.
//
// One block quantizes one row (token). The row is first read once, coalesced, into shared memory
// (16-byte loads); the gather idx[c] then reads shared memory, so the permutation costs no extra
// global traffic. Each warp then takes whole quantization groups: a group of G columns, or the
// outlier block. Arithmetic matches the CPU reference bit for bit: scale computed in fp32 as
// clip * absmax / qmax, clamped to 1e-5, rounded to fp16; code = rint(x / float(scale_fp16)).
//
// Requirements (checked by atom_lab/kernel_ops.py): K % 8 == 0, (K - k) % G == 0,
// G in {64, 128}, k <= 256, 16-byte aligned rows.
#include <cuda_fp16.h>

#define QUANT_THREADS 256
#define MAX_OUTLIERS_PER_LANE 8  // k <= 256
#define MIN_SCALE 1e-5f

enum Producer { PLAIN = 0, RMSNORM = 1, SILU_MUL = 2 };

// Max of non-negative floats in one instruction: their bit patterns order like unsigned ints.
__device__ __forceinline__ float warp_max_nonneg(float v) {
    return __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(v)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Scale exactly as primitives.compute_scales: fp32 (absmax * clip) / qmax, clamp, round to fp16.
__device__ __forceinline__ __half group_scale(float absmax, float clip, float qmax) {
    float s = fmaxf(absmax * clip / qmax, MIN_SCALE);
    return __float2half_rn(s);
}

// v / scale correctly rounded (what torch computes) without a division per element: r is the
// correctly rounded 1/scale, q0 = v * r is within 1.5 ulp, and each residual step
// q + (v - q * scale) * r (FMA, exact residual) moves it to within 1 ulp and then, by Markstein's
// theorem (r = RN(1/scale), q within 1 ulp), to exactly RN(v / scale).
// STEPS = 1 suffices when v and scale are both fp16 values (11-bit significands), as here: checked
// exhaustively over all significand pairs and quotient exponents 2^-15..2^9 (notes, round 2).
template <int STEPS>
__device__ __forceinline__ float div_rn(float v, float scale, float r) {
    float q = v * r;
#pragma unroll
    for (int i = 0; i < STEPS; ++i) q = fmaf(fmaf(-q, scale, v), r, q);
    return q;
}

// rint(v / scale) clamped to [qmin, qmax]. Clamping first (the bounds are integers, so the order
// does not matter) lets adding 1.5 * 2^23 do the round-half-to-even of torch.round in the FP adder:
// the sum's mantissa is then 0x400000 + code, with no float->int conversion instruction.
template <int STEPS>
__device__ __forceinline__ int quant_code(float v, float scale, float r, int qmin, int qmax) {
    const float q = fminf(fmaxf(div_rn<STEPS>(v, scale, r), (float)qmin), (float)qmax);
    return __float_as_int(q + 12582912.0f) - 0x4B400000;
}

// silu(g) rounded to fp16, times u, rounded to fp16: what an fp16 PyTorch MLP computes.
__device__ __forceinline__ __half silu_mul(__half g, __half u) {
    float gf = __half2float(g);
    __half s = __float2half_rn(gf / (1.0f + expf(-gf)));
    return __float2half_rn(__half2float(s) * __half2float(u));
}

// Phase 1: the row into shared memory (producer applied where it is elementwise), and for RMSNorm
// the factor 1 / sqrt(mean(x^2) + eps).
template <int MODE>
__device__ float load_row(const __half* __restrict__ x, const __half* __restrict__ up, int K,
                          float eps, __half* row, float* red) {
    const uint4* src = reinterpret_cast<const uint4*>(x);
    const uint4* src_up = reinterpret_cast<const uint4*>(up);
    uint4* dst = reinterpret_cast<uint4*>(row);
    float sumsq = 0.f;
#pragma unroll 4
    for (int v = threadIdx.x; v < K / 8; v += QUANT_THREADS) {
        uint4 d = src[v];
        if (MODE == SILU_MUL) {
            uint4 u = src_up[v];
            __half* dh = reinterpret_cast<__half*>(&d);
            const __half* uh = reinterpret_cast<const __half*>(&u);
#pragma unroll
            for (int i = 0; i < 8; ++i) dh[i] = silu_mul(dh[i], uh[i]);
        }
        if (MODE == RMSNORM) {
            const __half* dh = reinterpret_cast<const __half*>(&d);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float f = __half2float(dh[i]);
                sumsq = fmaf(f, f, sumsq);
            }
        }
        dst[v] = d;
    }
    if (MODE != RMSNORM) {
        __syncthreads();
        return 1.f;
    }
    sumsq = warp_sum(sumsq);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = sumsq;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < QUANT_THREADS / 32; ++w) total += red[w];
    return 1.0f / sqrtf(total / (float)K + eps);
}

// The value the quantizer sees at input column j (before the gather it is column j of the row).
template <int MODE>
__device__ __forceinline__ float produced(const __half* row, int j, float rms,
                                          const __half* __restrict__ norm_w) {
    __half h = row[j];
    if (MODE == RMSNORM) {  // weight * (x * rms).to(fp16), as LlamaRMSNorm in fp16
        __half n = __float2half_rn(__half2float(h) * rms);
        h = __float2half_rn(__half2float(norm_w[j]) * __half2float(n));
    }
    return __half2float(h);
}

template <int G>
__device__ __forceinline__ void load_indices(const int* __restrict__ idx, int c0, int* out) {
    constexpr int E = G / 32;
    if (idx == nullptr) {
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = c0 + e;
    } else if (E == 4) {
        int4 v = *reinterpret_cast<const int4*>(idx + c0);
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = idx[c0 + e];
    }
}

// One warp quantizes normal group g: lane takes G/32 consecutive columns (an even count).
template <int MODE, int G, int STEPS>
__device__ void quantize_group(const __half* row, const int* __restrict__ idx, float rms,
                               const __half* __restrict__ norm_w, int g, float clip, int qmax,
                               unsigned char* __restrict__ codes_row, __half* __restrict__ scales_row) {
    constexpr int E = G / 32;
    const int lane = threadIdx.x & 31;
    const int c0 = g * G + lane * E;
    int cols[E];
    load_indices<G>(idx, c0, cols);
    float v[E];
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        v[e] = produced<MODE>(row, cols[e], rms, norm_w);
        amax = fmaxf(amax, fabsf(v[e]));
    }
    amax = warp_max_nonneg(amax);
    const __half sh = group_scale(amax, clip, (float)qmax);
    const float s = __half2float(sh), rcp = __frcp_rn(s);
    unsigned int packed = 0;
#pragma unroll
    for (int e = 0; e < E; ++e)
        packed |= (unsigned int)(quant_code<STEPS>(v[e], s, rcp, -qmax - 1, qmax) & 0xF) << (4 * e);
    if (E == 4) {
        *reinterpret_cast<unsigned short*>(codes_row + c0 / 2) = (unsigned short)packed;
    } else {
#pragma unroll
        for (int b = 0; b < E / 2; ++b) codes_row[c0 / 2 + b] = (unsigned char)(packed >> (8 * b));
    }
    if (lane == 0) scales_row[g] = sh;
}

// One warp quantizes the k outlier columns (INT8, one scale per row, no clip).
template <int MODE, int STEPS>
__device__ void quantize_outliers(const __half* row, const int* __restrict__ idx, float rms,
                                  const __half* __restrict__ norm_w, int kn, int k,
                                  signed char* __restrict__ out_row, __half* __restrict__ oscale) {
    const int lane = threadIdx.x & 31;
    float v[MAX_OUTLIERS_PER_LANE];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_OUTLIERS_PER_LANE; ++i) {
        const int j = lane + 32 * i;
        v[i] = 0.f;
        if (j < k) {
            const int c = kn + j;
            v[i] = produced<MODE>(row, idx == nullptr ? c : idx[c], rms, norm_w);
            amax = fmaxf(amax, fabsf(v[i]));
        }
    }
    amax = warp_max_nonneg(amax);
    const __half sh = group_scale(amax, 1.0f, 127.0f);
    const float s = __half2float(sh), rcp = __frcp_rn(s);
#pragma unroll
    for (int i = 0; i < MAX_OUTLIERS_PER_LANE; ++i) {
        const int j = lane + 32 * i;
        if (j < k) out_row[j] = (signed char)quant_code<STEPS>(v[i], s, rcp, -128, 127);
    }
    if (lane == 0) *oscale = sh;
}

// Warp tasks of one staged row: the normal groups, then the outlier block (or its unit scale).
template <int MODE, int G, int STEPS>
__device__ void quantize_row_tasks(const __half* row, const int* __restrict__ idx, float rms,
                                   const __half* __restrict__ norm_w, long long m, int K, int k,
                                   float clip, int qmax, unsigned char* __restrict__ codes,
                                   __half* __restrict__ scales, signed char* __restrict__ outlier,
                                   __half* __restrict__ oscales) {
    const int kn = K - k, ngroups = kn / G;
    const int warp = threadIdx.x >> 5;
    const int tasks = ngroups + 1;  // the last task is the outlier block (or its unit scale)
    for (int task = warp; task < tasks; task += QUANT_THREADS / 32) {
        if (task < ngroups) {
            quantize_group<MODE, G, STEPS>(row, idx, rms, norm_w, task, clip, qmax,
                                           codes + m * (kn / 2), scales + m * ngroups);
        } else if (k > 0) {
            quantize_outliers<MODE, STEPS>(row, idx, rms, norm_w, kn, k, outlier + m * k, oscales + m);
        } else if ((threadIdx.x & 31) == 0) {
            oscales[m] = __float2half_rn(1.0f);  // empty outlier block: unit scale, as encode_mixed
        }
    }
}

// Round 1 ("row"): one block a row; load the row, then quantize it (no overlap inside a block).
template <int MODE, int G>
__device__ void quantize_mixed_row(const __half* __restrict__ x, const __half* __restrict__ up,
                                   const __half* __restrict__ norm_w, float eps,
                                   const int* __restrict__ idx, int K, int k, float clip, int qmax,
                                   unsigned char* __restrict__ codes, __half* __restrict__ scales,
                                   signed char* __restrict__ outlier, __half* __restrict__ oscales) {
    extern __shared__ __align__(16) unsigned char smem[];
    __half* row = reinterpret_cast<__half*>(smem);
    __shared__ float red[QUANT_THREADS / 32];
    const long long m = blockIdx.x;
    const float rms = load_row<MODE>(x + m * K, up == nullptr ? nullptr : up + m * K, K, eps, row, red);
    quantize_row_tasks<MODE, G, 2>(row, idx, rms, norm_w, m, K, k, clip, qmax, codes, scales,
                                   outlier, oscales);
}

// ---------------------------------------------------------------------------------------------
// Round 2 ("ring"): persistent blocks (grid <= resident blocks) stride over the rows with two
// shared-memory row buffers: cp.async stages row i+1 while the warps quantize row i, so the HBM
// stream and the quantize arithmetic overlap inside every block. The producer's elementwise part
// (SiLU * up) runs as an in-place pass over the staged row; RMSNorm's sum of squares likewise.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                     (unsigned)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

template <int MODE>
__device__ __forceinline__ void stage_row(const __half* __restrict__ x, const __half* __restrict__ up,
                                          long long m, int K, __half* buf, __half* buf_up) {
    const uint4* src = reinterpret_cast<const uint4*>(x + m * K);
    uint4* dst = reinterpret_cast<uint4*>(buf);
    for (int v = threadIdx.x; v < K / 8; v += QUANT_THREADS) cp_async16(dst + v, src + v);
    if (MODE == SILU_MUL) {
        const uint4* src_up = reinterpret_cast<const uint4*>(up + m * K);
        uint4* dst_up = reinterpret_cast<uint4*>(buf_up);
        for (int v = threadIdx.x; v < K / 8; v += QUANT_THREADS) cp_async16(dst_up + v, src_up + v);
    }
}

// The staged row -> what the quantizer reads (SiLU*up applied in place); returns RMSNorm's factor.
template <int MODE>
__device__ float prepare_row(__half* row, const __half* row_up, int K, float eps, float* red) {
    if (MODE == PLAIN) return 1.f;
    uint4* rv = reinterpret_cast<uint4*>(row);
    float sumsq = 0.f;
    for (int v = threadIdx.x; v < K / 8; v += QUANT_THREADS) {
        uint4 d = rv[v];
        __half* dh = reinterpret_cast<__half*>(&d);
        if (MODE == SILU_MUL) {
            const uint4 u = reinterpret_cast<const uint4*>(row_up)[v];
            const __half* uh = reinterpret_cast<const __half*>(&u);
#pragma unroll
            for (int i = 0; i < 8; ++i) dh[i] = silu_mul(dh[i], uh[i]);
            rv[v] = d;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float f = __half2float(dh[i]);
                sumsq = fmaf(f, f, sumsq);
            }
        }
    }
    if (MODE == SILU_MUL) {
        __syncthreads();
        return 1.f;
    }
    sumsq = warp_sum(sumsq);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sumsq;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < QUANT_THREADS / 32; ++w) total += red[w];
    return 1.0f / sqrtf(total / (float)K + eps);
}

template <int MODE, int G>
__device__ void quantize_mixed_ring(const __half* __restrict__ x, const __half* __restrict__ up,
                                    const __half* __restrict__ norm_w, float eps,
                                    const int* __restrict__ idx, int K, int k, float clip, int qmax,
                                    unsigned char* __restrict__ codes, __half* __restrict__ scales,
                                    signed char* __restrict__ outlier, __half* __restrict__ oscales,
                                    int M) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int ROWS = MODE == SILU_MUL ? 2 : 1;  // staged rows a buffer (gate and up)
    __half* bufs = reinterpret_cast<__half*>(smem);  // [2][ROWS][K]
    __shared__ float red[QUANT_THREADS / 32];
    long long m = blockIdx.x;
    stage_row<MODE>(x, up, m, K, bufs, bufs + K);
    cp_async_commit();
    for (int b = 0; m < M; m += gridDim.x, b ^= 1) {
        const long long next = m + gridDim.x;
        __half* nbuf = bufs + (b ^ 1) * ROWS * K;
        if (next < M) stage_row<MODE>(x, up, next, K, nbuf, nbuf + K);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();  // row m staged by every thread
        __half* row = bufs + b * ROWS * K;
        const float rms = prepare_row<MODE>(row, row + K, K, eps, red);
        quantize_row_tasks<MODE, G, 1>(row, idx, rms, norm_w, m, K, k, clip, qmax, codes, scales,
                                       outlier, oscales);
        __syncthreads();  // row m's buffer is restaged at the top of the next iteration
    }
}

#define QUANT_ARGS                                                                             \
    const __half *__restrict__ x, const __half *__restrict__ up, const __half *__restrict__ norm_w, \
        float eps, const int *__restrict__ idx, int K, int k, float clip, int qmax,              \
        unsigned char *__restrict__ codes, __half *__restrict__ scales,                          \
        signed char *__restrict__ outlier, __half *__restrict__ oscales
#define QUANT_PASS x, up, norm_w, eps, idx, K, k, clip, qmax, codes, scales, outlier, oscales

#define DEFINE_QUANT(NAME, MODE, G)                                                          \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME(QUANT_ARGS) {          \
        quantize_mixed_row<MODE, G>(QUANT_PASS);                                             \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME##_ring(QUANT_ARGS, int M) { \
        quantize_mixed_ring<MODE, G>(QUANT_PASS, M);                                         \
    }

DEFINE_QUANT(quantize_mixed_g64, PLAIN, 64)
DEFINE_QUANT(quantize_mixed_g128, PLAIN, 128)
DEFINE_QUANT(rmsnorm_quantize_mixed_g64, RMSNORM, 64)
DEFINE_QUANT(rmsnorm_quantize_mixed_g128, RMSNORM, 128)
DEFINE_QUANT(silu_mul_quantize_mixed_g64, SILU_MUL, 64)
DEFINE_QUANT(silu_mul_quantize_mixed_g128, SILU_MUL, 128)
