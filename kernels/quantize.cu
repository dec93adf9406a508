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
__device__ __forceinline__ float div_rn(float v, float scale, float r) {
    float q = v * r;
    q = fmaf(fmaf(-q, scale, v), r, q);
    return fmaf(fmaf(-q, scale, v), r, q);
}

// rint(v / scale) clamped to [qmin, qmax]. Clamping first (the bounds are integers, so the order
// does not matter) lets adding 1.5 * 2^23 do the round-half-to-even of torch.round in the FP adder:
// the sum's mantissa is then 0x400000 + code, with no float->int conversion instruction.
__device__ __forceinline__ int quant_code(float v, float scale, float r, int qmin, int qmax) {
    const float q = fminf(fmaxf(div_rn(v, scale, r), (float)qmin), (float)qmax);
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
template <int MODE, int G>
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
        packed |= (unsigned int)(quant_code(v[e], s, rcp, -qmax - 1, qmax) & 0xF) << (4 * e);
    if (E == 4) {
        *reinterpret_cast<unsigned short*>(codes_row + c0 / 2) = (unsigned short)packed;
    } else {
#pragma unroll
        for (int b = 0; b < E / 2; ++b) codes_row[c0 / 2 + b] = (unsigned char)(packed >> (8 * b));
    }
    if (lane == 0) scales_row[g] = sh;
}

// One warp quantizes the k outlier columns (INT8, one scale per row, no clip).
template <int MODE>
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
        if (j < k) out_row[j] = (signed char)quant_code(v[i], s, rcp, -128, 127);
    }
    if (lane == 0) *oscale = sh;
}

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
    const int kn = K - k, ngroups = kn / G;
    const float rms = load_row<MODE>(x + m * K, up == nullptr ? nullptr : up + m * K, K, eps, row, red);

    const int warp = threadIdx.x >> 5;
    const int tasks = ngroups + 1;  // the last task is the outlier block (or its unit scale)
    for (int task = warp; task < tasks; task += QUANT_THREADS / 32) {
        if (task < ngroups) {
            quantize_group<MODE, G>(row, idx, rms, norm_w, task, clip, qmax, codes + m * (kn / 2),
                                    scales + m * ngroups);
        } else if (k > 0) {
            quantize_outliers<MODE>(row, idx, rms, norm_w, kn, k, outlier + m * k, oscales + m);
        } else if ((threadIdx.x & 31) == 0) {
            oscales[m] = __float2half_rn(1.0f);  // empty outlier block: unit scale, as encode_mixed
        }
    }
}

#define QUANT_ARGS                                                                             \
    const __half *__restrict__ x, const __half *__restrict__ up, const __half *__restrict__ norm_w, \
        float eps, const int *__restrict__ idx, int K, int k, float clip, int qmax,              \
        unsigned char *__restrict__ codes, __half *__restrict__ scales,                          \
        signed char *__restrict__ outlier, __half *__restrict__ oscales
#define QUANT_PASS x, up, norm_w, eps, idx, K, k, clip, qmax, codes, scales, outlier, oscales

#define DEFINE_QUANT(NAME, MODE, G)                                                  \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME(QUANT_ARGS) {  \
        quantize_mixed_row<MODE, G>(QUANT_PASS);                                     \
    }

DEFINE_QUANT(quantize_mixed_g64, PLAIN, 64)
DEFINE_QUANT(quantize_mixed_g128, PLAIN, 128)
DEFINE_QUANT(rmsnorm_quantize_mixed_g64, RMSNORM, 64)
DEFINE_QUANT(rmsnorm_quantize_mixed_g128, RMSNORM, 128)
DEFINE_QUANT(silu_mul_quantize_mixed_g64, SILU_MUL, 64)
DEFINE_QUANT(silu_mul_quantize_mixed_g128, SILU_MUL, 128)
