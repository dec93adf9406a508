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

#include "mbarrier.cuh"
#include "pdl.cuh"

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
// The division is q0 = a * rq, then q0 + (a - q0 * qmax) * rq (two FMAs, exact residual;
// rq = RN(1 / qmax)): by Markstein's theorem the correctly rounded a / qmax, checked for every
// fp32 significand of a and qmax in {1, 3, 7, 127} (tests/test_kernels_gemm.py). It replaces a
// division subroutine with a slow-path branch; callers with a fixed qmax compute rq once.
__device__ __forceinline__ __half group_scale(float absmax, float clip, float qmax, float rq) {
    const float a = absmax * clip;
    const float q0 = a * rq;
    const float q = fmaf(fmaf(-q0, qmax, a), rq, q0);
    return __float2half_rn(fmaxf(q, MIN_SCALE));
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
    const __half sh = group_scale(amax, clip, (float)qmax, 1.0f / (float)qmax);
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
    const __half sh = group_scale(amax, 1.0f, 127.0f, 1.0f / 127.0f);
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

// ---------------------------------------------------------------------------------------------
// Round 3 ("wide"): the ring's persistent double-buffered blocks with far fewer instructions an
// element (round 2 was issue-bound at ~107-115 warp instructions a 128-group):
//   - a lane owns 16 consecutive output columns, so 8 lanes (G = 128) or 4 (G = 64) share a group
//     and one warp instruction serves 4 or 8 groups: the per-group work (shuffle max, scale, 1/s,
//     clamp bounds, scale store) is paid by a quarter or an eighth of the lanes' instructions;
//   - the gather offsets (2 * idx, bytes) are staged once a block in shared memory, laid out so a
//     lane's 16 offsets are 4 conflict-free 16-byte loads; each element is then one LDS.U16;
//   - |x| max and the clamp run on half2 pairs. The clamp moves to the input side: with
//     B_hi = fp16(qmax * s) and B_lo = max(-(qmax + 1) * s, -65504) (exact), rint(clamp(x) / s)
//     equals clamp(rint(x / s)) for every fp16 x (B_hi / s is within qmax * 2^-11 of qmax, far
//     inside +-0.5; an infinite B_hi needs x > 7.5 s > 65504, which no fp16 x is);
//   - division and rounding are two instructions an element (round 11, PairQuantizer: an FMA
//     with an approximate reciprocal onto a 2^-14 grid, then the magic add), two biased codes
//     become a byte with one shift-add, four bytes a word with three PRMT and one XOR; each lane
//     stores its 8 bytes with one 8-byte store.
// RMSNorm is applied in place to the staged row (after its sum of squares) and SiLU * up likewise,
// so the quantizer itself is the same for the three producers.
// ---------------------------------------------------------------------------------------------
#define WIDE_COLS 512  // columns of a normal warp task: 32 lanes x 16
#define FP16_MAX 65504.f

// Position of column c's offset in the staged table: normal columns as [task][quarter][lane][4],
// then the outliers as [quarter][lane][4] (8 columns a lane). Inverse: the column of position p.
__device__ __forceinline__ int wide_column(int p, int kn, int k, int tasks) {
    const int normal = tasks * WIDE_COLS;
    const int rem = p < normal ? p : p - normal;
    const int q = (rem >> 7) & 3, lane = (rem >> 2) & 31, e = q * 4 + (rem & 3);
    if (p < normal) {
        const int c = (p >> 9) * WIDE_COLS + lane * 16 + e;  // 512 entries a task
        return c < kn ? c : -1;
    }
    const int j = lane * 8 + e;
    return (q < 2 && j < k) ? kn + j : -1;
}

__device__ __forceinline__ unsigned gather_u16(const unsigned char* row, unsigned off) {
    return *reinterpret_cast<const unsigned short*>(row + off);
}

// Two codes (each the low byte of a rounded float, biased by +8 into 0..15) as one nibble-packed
// low byte, with a single shift-add (LEA); the bits above it are garbage that low_bytes drops. The
// bias comes off with one XOR 0x88 a byte: (n + 8) ^ 8 is n as a two's complement nibble.
__device__ __forceinline__ unsigned nibble_pair(unsigned lo_bits, unsigned hi_bits) {
    return (hi_bits << 4) + lo_bits;
}
#define NIBBLE_BIAS 8
#define NIBBLE_UNBIAS 0x88888888u
// The low bytes of four registers as one word.
__device__ __forceinline__ unsigned low_bytes(unsigned b0, unsigned b1, unsigned b2, unsigned b3) {
    return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

// E gathered fp16 values (offsets in o[]) as E/2 half2 pairs; returns max |x| over them.
template <int E>
__device__ __forceinline__ float gather_pairs(const unsigned char* row, const uint4* o, __half2* p) {
    unsigned h[E];
#pragma unroll
    for (int q = 0; q < E / 4; ++q) {
        h[4 * q + 0] = gather_u16(row, o[q].x);
        h[4 * q + 1] = gather_u16(row, o[q].y);
        h[4 * q + 2] = gather_u16(row, o[q].z);
        h[4 * q + 3] = gather_u16(row, o[q].w);
    }
    __half2 m = __float2half2_rn(0.f);
#pragma unroll
    for (int j = 0; j < E / 2; ++j) {
        const unsigned pair = __byte_perm(h[2 * j], h[2 * j + 1], 0x5410);
        p[j] = *reinterpret_cast<const __half2*>(&pair);
        m = __hmax2(m, __habs2(p[j]));
    }
    return fmaxf(__low2float(m), __high2float(m));
}

// rint(clamp(x) / s) + bias as the low bits of a float, in two instructions an element:
//   y = fma(v, r, 768)  (r ~ 1/s within 1 ulp: MUFU.RCP), then y + (1.5 * 2^23 - 768 + bias).
// Why this equals torch's rint(RN(v / s)) for fp16 v and s (|v / s| <= 128.1 after the clamp):
//  - v = a 2^i, s = b 2^j with integers a, b < 2^11, so v / s is either a half-integer t exactly
//    or at least 1 / (2 b 2^(j-i)) >= 2^-13 away from every t (|v / s| >= 1/2 near t bounds
//    b 2^(j-i) <= 2^12). So rint(RN32(v / s)) = rint(v / s): fp32's rounding cannot reach a t.
//  - |v r - v / s| <= 128.1 * 2^-23 < 2^-15 (rcp.approx is within 1 ulp).
//  - On [512, 1024) fp32 steps are 2^-14: RN(v r + 768) lands exactly on 768 + t when v / s = t
//    (within half a step) and otherwise stays strictly on v / s's side of every 768 + t (more
//    than one step away). The second add then rounds to an integer with ties to even, which
//    is torch.round's rule, and leaves the code in the mantissa's low bits (0x400000 + n).
// tests/test_kernels_gemm.py checks this on every fp16 significand pair next to each tie.
struct PairQuantizer {
    __half2 lo, hi;
    float r, add;
    __device__ PairQuantizer(__half sh, int qmax, int bias) {
        const float s = __half2float(sh);
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));  // s >= 1e-5: normal
        add = 12582912.0f - 768.0f + (float)bias;
        hi = __half2half2(__float2half_rn((float)qmax * s));
        lo = __half2half2(__float2half_rn(fmaxf(-(float)(qmax + 1) * s, -FP16_MAX)));
    }
    __device__ __forceinline__ void operator()(__half2 x, unsigned& b0, unsigned& b1) const {
        const float2 f = __half22float2(__hmin2(__hmax2(x, lo), hi));
        b0 = __float_as_uint(__fadd_rn(__fmaf_rn(f.x, r, 768.0f), add));
        b1 = __float_as_uint(__fadd_rn(__fmaf_rn(f.y, r, 768.0f), add));
    }
};

// A normal task: 512 columns, lane = 16 of them (byte offsets o in the staged row); G / 16 lanes
// a group. normal_codes quantizes the lane's gathered pairs p (max |x| amax): returns the group's
// scale; the lane's 16 codes go to `words` (8 bytes).
template <int G>
__device__ __forceinline__ __half normal_codes(const __half2 (&p)[8], float amax, float clip,
                                               int qmax, float rq, uint2& words) {
    constexpr int LPG = G / 16;
#pragma unroll
    for (int d = LPG / 2; d >= 1; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    const __half sh = group_scale(amax, clip, (float)qmax, rq);
    const PairQuantizer quant(sh, qmax, NIBBLE_BIAS);
    unsigned bytes[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        unsigned b0, b1;
        quant(p[j], b0, b1);
        bytes[j] = nibble_pair(b0, b1);
    }
    words = make_uint2(low_bytes(bytes[0], bytes[1], bytes[2], bytes[3]) ^ NIBBLE_UNBIAS,
                       low_bytes(bytes[4], bytes[5], bytes[6], bytes[7]) ^ NIBBLE_UNBIAS);
    return sh;
}

template <int G>
__device__ __forceinline__ void normal_task(const unsigned char* row, const uint4 (&o)[4], int task,
                                            int kn, float clip, int qmax,
                                            unsigned char* __restrict__ codes_row,
                                            __half* __restrict__ scales_row) {
    const int lane = threadIdx.x & 31;
    const int c0 = task * WIDE_COLS + lane * 16;
    __half2 p[8];
    const float amax = gather_pairs<16>(row, o, p);
    uint2 words;
    const __half sh = normal_codes<G>(p, amax, clip, qmax, 1.0f / (float)qmax, words);
    if (c0 < kn) {
        *reinterpret_cast<uint2*>(codes_row + c0 / 2) = words;
        if (lane % (G / 16) == 0) scales_row[c0 / G] = sh;
    }
}

template <int G>
__device__ void wide_normal_task(const unsigned char* row, const uint4* table, int task, int kn,
                                 float clip, int qmax, unsigned char* __restrict__ codes_row,
                                 __half* __restrict__ scales_row) {
    uint4 o[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) o[q] = table[(task * 4 + q) * 32 + (threadIdx.x & 31)];
    normal_task<G>(row, o, task, kn, clip, qmax, codes_row, scales_row);
}

// The outlier task: lane j takes outlier columns 8j..8j+7 (k <= 256), one INT8 scale a row.
// outlier_codes quantizes the lane's gathered pairs: returns the scale; the 8 codes go to `words`.
__device__ __forceinline__ __half outlier_codes(const __half2* p, float amax, int k,
                                                uint2& words) {
    const bool active = (threadIdx.x & 31) * 8 < k;
    amax = warp_max_nonneg(active ? amax : 0.f);
    const __half sh = group_scale(amax, 1.0f, 127.0f, 1.0f / 127.0f);
    const PairQuantizer quant(sh, 127, 0);
    unsigned b[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) quant(p[j], b[2 * j], b[2 * j + 1]);
    words = make_uint2(low_bytes(b[0], b[1], b[2], b[3]), low_bytes(b[4], b[5], b[6], b[7]));
    return sh;
}

__device__ __forceinline__ void outlier_task(const unsigned char* row, const uint4 (&o)[2], int k,
                                             signed char* __restrict__ out_row,
                                             __half* __restrict__ oscale) {
    const int lane = threadIdx.x & 31;
    __half2 p[4];
    const float amax = gather_pairs<8>(row, o, p);
    uint2 words;
    const __half sh = outlier_codes(p, amax, k, words);
    if (lane * 8 < k) *reinterpret_cast<uint2*>(out_row + lane * 8) = words;
    if (lane == 0) *oscale = sh;
}

__device__ void wide_outlier_task(const unsigned char* row, const uint4* table, int tasks, int k,
                                  signed char* __restrict__ out_row, __half* __restrict__ oscale) {
    uint4 o[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) o[q] = table[tasks * (WIDE_COLS / 4) + q * 32 + (threadIdx.x & 31)];
    outlier_task(row, o, k, out_row, oscale);
}

template <int MODE, int G, int NBUF>
__device__ void quantize_mixed_wide(const __half* __restrict__ x, const __half* __restrict__ up,
                                    const __half* __restrict__ norm_w, float eps,
                                    const int* __restrict__ idx, int K, int k, float clip, int qmax,
                                    unsigned char* __restrict__ codes, __half* __restrict__ scales,
                                    signed char* __restrict__ outlier, __half* __restrict__ oscales,
                                    int M) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int ROWS = MODE == SILU_MUL ? 2 : 1;
    const int kn = K - k, ngroups = kn / G;
    const int tasks = (kn + WIDE_COLS - 1) / WIDE_COLS;
    const int table_len = tasks * WIDE_COLS + 256;
    unsigned* table = reinterpret_cast<unsigned*>(smem);
    __half* bufs = reinterpret_cast<__half*>(smem + 4 * table_len);  // [NBUF][ROWS][K]
    __shared__ float red[QUANT_THREADS / 32];
    const int warp = threadIdx.x >> 5;

    // NBUF - 1 rows are in flight while one is quantized (one cp.async group a row, empty or not).
    long long m = blockIdx.x;
#pragma unroll
    for (int j = 0; j < NBUF - 1; ++j) {
        const long long r = m + (long long)j * gridDim.x;
        if (r < M) stage_row<MODE>(x, up, r, K, bufs + j * ROWS * K, bufs + j * ROWS * K + K);
        cp_async_commit();
    }
    for (int p = threadIdx.x; p < table_len; p += QUANT_THREADS) {
        const int c = wide_column(p, kn, k, tasks);
        table[p] = c < 0 ? 0u : 2u * (unsigned)(idx == nullptr ? c : idx[c]);
    }
    for (int b = 0; m < M; m += gridDim.x, b = (b + 1) % NBUF) {
        const long long ahead = m + (long long)(NBUF - 1) * gridDim.x;
        __half* abuf = bufs + ((b + NBUF - 1) % NBUF) * ROWS * K;
        if (ahead < M) stage_row<MODE>(x, up, ahead, K, abuf, abuf + K);
        cp_async_commit();
        asm volatile("cp.async.wait_group %0;\n" ::"n"(NBUF - 1));
        __syncthreads();  // row m staged by every thread (and, the first time, the table)
        __half* row = bufs + b * ROWS * K;
        const float rms = prepare_row<MODE>(row, row + K, K, eps, red);
        if (MODE == RMSNORM) {  // weight * (x * rms).to(fp16), in place, as LlamaRMSNorm in fp16
            uint4* rv = reinterpret_cast<uint4*>(row);
            const uint4* wv = reinterpret_cast<const uint4*>(norm_w);
            for (int v = threadIdx.x; v < K / 8; v += QUANT_THREADS) {
                uint4 d = rv[v];
                const uint4 w = wv[v];
                __half* dh = reinterpret_cast<__half*>(&d);
                const __half* wh = reinterpret_cast<const __half*>(&w);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const __half n = __float2half_rn(__half2float(dh[i]) * rms);
                    dh[i] = __float2half_rn(__half2float(wh[i]) * __half2float(n));
                }
                rv[v] = d;
            }
            __syncthreads();
        }
        const unsigned char* rb = reinterpret_cast<const unsigned char*>(row);
        const uint4* tv = reinterpret_cast<const uint4*>(table);
        for (int task = warp; task <= tasks; task += QUANT_THREADS / 32) {
            if (task < tasks) {
                wide_normal_task<G>(rb, tv, task, kn, clip, qmax, codes + m * (kn / 2),
                                    scales + m * ngroups);
            } else if (k > 0) {
                wide_outlier_task(rb, tv, tasks, k, outlier + m * k, oscales + m);
            } else if ((threadIdx.x & 31) == 0) {
                oscales[m] = __float2half_rn(1.0f);
            }
        }
        __syncthreads();  // row m's buffer is restaged at the top of the next iteration
    }
}

// ---------------------------------------------------------------------------------------------
// Round 10 ("pipe", plain quantize only): the wide kernel's warp tasks without block barriers.
// Rounds 2-9 found the row-granular pipeline (a staged row between two __syncthreads, one or three
// rows in flight a block) holding the ring / wide kernels at 50-60% of HBM. Here producer lanes
// stream whole rows with one bulk copy each (TMA) into rings of staged rows; each buffer has a
// full barrier (the copy's bytes) and an empty barrier (one arrival a warp that works on the row).
// The consumer warps are R replicas of one warp a task of the row (row_tasks = the normal tasks
// plus the outlier block; R = CW / row_tasks, the host keeping R * nbuf within the barriers):
// warp (r, task) quantizes that task of the block's rows r, r + R, ..., so its 16 gather offsets
// (2 * idx of its columns) stay in registers, read once. Each replica owns a ring of nbuf buffers.
// A row of more than PIPE_MAX_WARPS tasks: one replica of that many warps, task t to warp
// t % CW, offsets read (L1) a task. A buffer is refilled once every warp of its replica left it.
// ---------------------------------------------------------------------------------------------
#define PIPE_MAX_BUFFERS 16
#define PIPE_MAX_WARPS 27  // consumer warps (plus the producer: 896 threads, 72 registers)
#ifndef QUANT_PIPE_DIAG
#define QUANT_PIPE_DIAG 0  // diagnostic builds (bench_gemm.py --quant-diag; wrong outputs):
#endif                     // 1: copies only (no tasks); 2: math only (the first nbuf rows reused)
#ifndef PIPE_EARLY
#define PIPE_EARLY 1  // rows requested before the warps' offsets are read (more delay those reads)
#endif

// Byte offsets in the staged row of input columns idx[c .. c + 3] (zeros where !valid).
__device__ __forceinline__ uint4 offsets4(const int* __restrict__ idx, int c, bool valid) {
    if (!valid) return make_uint4(0, 0, 0, 0);
    if (idx == nullptr) return make_uint4(2 * c, 2 * c + 2, 2 * c + 4, 2 * c + 6);
    const int4 v = *reinterpret_cast<const int4*>(idx + c);
    return make_uint4(2 * v.x, 2 * v.y, 2 * v.z, 2 * v.w);
}

// This lane's gather offsets for task t of a row: a normal task's 16 columns, or the outlier
// block's 8 (in o[0..1]; k is a multiple of 8: a lane's 8 columns are all in or all out).
__device__ __forceinline__ void task_offsets(const int* __restrict__ idx, int t, int tasks, int kn,
                                             int k, uint4 (&o)[4]) {
    const int lane = threadIdx.x & 31;
    if (t < tasks) {
        const int c0 = t * WIDE_COLS + lane * 16;
#pragma unroll
        for (int q = 0; q < 4; ++q) o[q] = offsets4(idx, c0 + 4 * q, c0 + 4 * q < kn);
    } else {
#pragma unroll
        for (int q = 0; q < 2; ++q) o[q] = offsets4(idx, kn + lane * 8 + 4 * q, lane * 8 < k);
    }
}

// The consumer loop of a warp that keeps one task (replica `replica`, nrows of the block's rows).
// The replica's ring base is folded into the gather offsets once; output pointers advance by a
// fixed stride a row. (ptxas still adds slot * row_bytes to each offset, one add an element: it
// keeps the slot in a vector register even with a block-uniform trip count; round 11 notes.)
template <int G>
__device__ __forceinline__ void pipe_fixed_task(
    const unsigned char* smem, unsigned full, unsigned empty, uint4 (&o)[4], int task, int replica,
    int tasks, int kn, int k, float clip, int qmax, int nbuf, int nrows,
    unsigned row_bytes, long long row_step, unsigned char* __restrict__ codes,
    __half* __restrict__ scales, signed char* __restrict__ outlier, __half* __restrict__ oscales) {
    const int lane = threadIdx.x & 31;
    const unsigned ring = (unsigned)(replica * nbuf) * row_bytes;
#pragma unroll
    for (int q = 0; q < 4; ++q) o[q] = make_uint4(o[q].x + ring, o[q].y + ring, o[q].z + ring,
                                                 o[q].w + ring);
    const long long m0 = blockIdx.x + (long long)replica * gridDim.x;
    const bool normal = task < tasks;
    const int c0 = task * WIDE_COLS + lane * 16;
    const float rq = 1.0f / (float)qmax;
    // normal task: this lane's 8 code bytes and its group's scale (one lane a group writes it);
    // outlier task: its 8 INT8 codes and the row's scale (lane 0).
    unsigned char* code_at = normal ? codes + m0 * (kn / 2) + c0 / 2
                                    : reinterpret_cast<unsigned char*>(outlier + m0 * k + lane * 8);
    __half* scale_at = normal ? scales + m0 * (kn / G) + c0 / G : oscales + m0;
    const long long code_step = row_step * (normal ? kn / 2 : k);
    const long long scale_step = row_step * (normal ? kn / G : 1);
    // bit 0: store the codes, bit 1: store the scale; one register, pinned (ptxas otherwise
    // recomputes both from the lane id every row)
    unsigned stores = (normal ? c0 < kn : lane * 8 < k) ? 1u : 0u;
    if (normal ? (c0 < kn && lane % (G / 16) == 0) : lane == 0) stores |= 2u;
    asm volatile("" : "+r"(stores));
    int slot = 0;
    unsigned phase = 0;
    for (int j = 0; j < nrows; ++j) {
        const unsigned full_b = full + 8 * (replica * nbuf + slot);
        if (QUANT_PIPE_DIAG != 2 || j < nbuf) mbar_wait(full_b, phase);
        const unsigned char* rb = smem + slot * row_bytes;
        // Gather, give the buffer back, then quantize and store: the refill starts while
        // this warp computes, and the proxy fence does not wait for the global stores.
        __half2 p[8];
        float amax = 0.f;
        if (QUANT_PIPE_DIAG != 1) {
            if (normal) {
                amax = gather_pairs<16>(rb, o, p);
            } else if (k > 0) {
                const uint4 oo[2] = {o[0], o[1]};
                amax = gather_pairs<8>(rb, oo, p);
            }
        }
        fence_proxy_async();  // this warp's reads of the buffer before the copy refilling it
        __syncwarp();
        if (lane == 0) mbar_arrive(full_b + (empty - full));
        if (QUANT_PIPE_DIAG != 1) {
            uint2 words;
            __half sh;
            if (normal) {
                sh = normal_codes<G>(p, amax, clip, qmax, rq, words);
            } else if (k > 0) {
                sh = outlier_codes(p, amax, k, words);
            } else {
                sh = __float2half_rn(1.0f);
            }
            if (stores & 1u) *reinterpret_cast<uint2*>(code_at) = words;
            if (stores & 2u) *scale_at = sh;
        }
        code_at += code_step;
        scale_at += scale_step;
        if (++slot == nbuf) {
            slot = 0;
            phase ^= 1;
        }
    }
}

template <int G>
__device__ void quantize_mixed_pipe(const __half* __restrict__ x, const int* __restrict__ idx,
                                    int K, int k, float clip, int qmax,
                                    unsigned char* __restrict__ codes, __half* __restrict__ scales,
                                    signed char* __restrict__ outlier, __half* __restrict__ oscales,
                                    int M, int nbuf) {  // nbuf: buffers a replica
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ __align__(8) unsigned long long bar_words[2 * PIPE_MAX_BUFFERS];
    const int kn = K - k, ngroups = kn / G;
    const int tasks = (kn + WIDE_COLS - 1) / WIDE_COLS;
    const int row_tasks = tasks + 1;  // the last one is the outlier block (or its unit scale)
    const unsigned row_bytes = 2u * (unsigned)K;
    const unsigned full = smem_u32(bar_words), empty = full + 8 * PIPE_MAX_BUFFERS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int CW = blockDim.x / 32 - 1;  // consumer warps; the last warp is the producer
    const bool fixed = row_tasks <= CW;  // one task a warp (replicas R = CW / row_tasks)
    const int R = fixed ? CW / row_tasks : 1;  // the host sizes CW so that R * nbuf fits the bars
    // This block's rows: blockIdx.x + i * gridDim.x for i < nrows.
    const int nrows = (M - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    // Replica r owns buffers r * nbuf .. r * nbuf + nbuf - 1, its j-th row (block row r + j * R)
    // going to buffer r * nbuf + j % nbuf. Only that replica's warps use them, in order, so a warp
    // waiting for a buffer's next phase has itself waited for the previous one: a parity wait can
    // never see a phase two uses old.
    auto rows_of = [&](int r) { return nrows > r ? (nrows - r + R - 1) / R : 0; };
    auto issue = [&](int r, int j) {  // replica r's j-th row into its buffer
        const int b = r * nbuf + j % nbuf;
        const long long m = blockIdx.x + (long long)(r + j * R) * gridDim.x;
        mbar_expect_tx(full + 8 * b, row_bytes);
        bulk_copy(smem_u32(smem + (size_t)b * row_bytes), x + m * K, row_bytes, full + 8 * b);
    };
    const bool producer = warp == CW && lane < R;  // lane r feeds replica r
    const int early = min(min(nbuf, rows_of(lane)), PIPE_EARLY);
    if (warp == CW) {
        if (lane == 0) {
            for (int b = 0; b < R * nbuf; ++b) {
                mbar_init(full + 8 * b, 1);
                mbar_init(empty + 8 * b, (unsigned)min(CW, row_tasks));
            }
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncwarp();
        if (producer)
            for (int j = 0; j < early; ++j) issue(lane, j);
    }
    // A fixed warp's task and replica, and its offsets (read before the barrier, in flight).
    const int task = fixed ? warp % row_tasks : 0, replica = fixed ? warp / row_tasks : 0;
    uint4 o[4] = {};
    if (fixed && warp < R * row_tasks) task_offsets(idx, task, tasks, kn, k, o);
    __syncthreads();  // barriers initialized; no block barrier after this

    if (warp == CW) {  // the producer: a buffer is refilled once every warp with work there left it
        if (producer) {
            const int n = QUANT_PIPE_DIAG == 2 ? min(nbuf, rows_of(lane)) : rows_of(lane);
            for (int j = early; j < n; ++j) {
                if (j >= nbuf) mbar_wait(empty + 8 * (lane * nbuf + j % nbuf), (j / nbuf - 1) & 1);
                issue(lane, j);
            }
        }
        return;
    }
    if (fixed && warp >= R * row_tasks) return;  // the CW % row_tasks spare warps
    const long long row_step = (long long)R * gridDim.x;  // block rows between a replica's rows
    if (fixed) {
        pipe_fixed_task<G>(smem, full, empty, o, task, replica, tasks, kn, k, clip, qmax, nbuf,
                           rows_of(replica), row_bytes, row_step, codes, scales,
                           outlier, oscales);
        return;
    }
    for (int j = 0, n = rows_of(replica); j < n; ++j) {
        const int b = j % nbuf;
        if (QUANT_PIPE_DIAG != 2 || j < nbuf) mbar_wait(full + 8 * b, (j / nbuf) & 1);
        const long long m = blockIdx.x + j * row_step;
        const unsigned char* rb = smem + (size_t)b * row_bytes;
        for (int t = warp; t < row_tasks && QUANT_PIPE_DIAG != 1; t += CW) {
            uint4 off[4] = {};
            task_offsets(idx, t, tasks, kn, k, off);
            if (t < tasks) {
                normal_task<G>(rb, off, t, kn, clip, qmax, codes + m * (kn / 2),
                               scales + m * ngroups);
            } else if (k > 0) {
                const uint4 oo[2] = {off[0], off[1]};
                outlier_task(rb, oo, k, outlier + m * k, oscales + m);
            } else if (lane == 0) {
                oscales[m] = __float2half_rn(1.0f);
            }
        }
        fence_proxy_async();  // this warp's reads of the buffer before the copy that refills it
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * b);
    }
#endif
}

#define QUANT_ARGS                                                                             \
    const __half *__restrict__ x, const __half *__restrict__ up, const __half *__restrict__ norm_w, \
        float eps, const int *__restrict__ idx, int K, int k, float clip, int qmax,              \
        unsigned char *__restrict__ codes, __half *__restrict__ scales,                          \
        signed char *__restrict__ outlier, __half *__restrict__ oscales
#define QUANT_PASS x, up, norm_w, eps, idx, K, k, clip, qmax, codes, scales, outlier, oscales

// Up to PDL_EARLY_ROWS rows the ring kernel lets a PDL-launched consumer (the small-M GEMM,
// kernel_ops.launch_pdl) start at once: it streams its weights while the rows are quantized and
// waits for this grid before reading them (pdl.cuh). Measured (gemm_h100_notes.md, round 4) at
// M = 1: quantize + GEMM 7.5 us instead of 10.6 at 4096^2; at M = 16 the early start cost more than
// it saved (the GEMM's weight flood delays the quantize loads), so from 9 rows the consumer starts
// when this grid ends, as with a plain launch.
#define PDL_EARLY_ROWS 8
#define DEFINE_QUANT(NAME, MODE, G)                                                          \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME(QUANT_ARGS) {          \
        quantize_mixed_row<MODE, G>(QUANT_PASS);                                             \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME##_ring(QUANT_ARGS, int M) { \
        if (M <= PDL_EARLY_ROWS) pdl_launch_dependents();                                    \
        quantize_mixed_ring<MODE, G>(QUANT_PASS, M);                                         \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME##_wide(QUANT_ARGS, int M) { \
        quantize_mixed_wide<MODE, G, 2>(QUANT_PASS, M);                                      \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(QUANT_THREADS) NAME##_wide4(QUANT_ARGS, int M) { \
        quantize_mixed_wide<MODE, G, 4>(QUANT_PASS, M);                                      \
    }

// "pipe" (plain quantize only): consumer warps + the producer warp (the launch's block size),
// nbuf staged rows a replica.
#define DEFINE_PIPE(NAME, G)                                                                  \
    extern "C" __global__ void __launch_bounds__((PIPE_MAX_WARPS + 1) * 32) NAME(            \
        const __half* __restrict__ x, const int* __restrict__ idx, int K, int k, float clip,  \
        int qmax, unsigned char* __restrict__ codes, __half* __restrict__ scales,              \
        signed char* __restrict__ outlier, __half* __restrict__ oscales, int M, int nbuf) {    \
        quantize_mixed_pipe<G>(x, idx, K, k, clip, qmax, codes, scales, outlier, oscales, M,  \
                               nbuf);                                                          \
    }
DEFINE_PIPE(quantize_mixed_g64_pipe, 64)
DEFINE_PIPE(quantize_mixed_g128_pipe, 128)

DEFINE_QUANT(quantize_mixed_g64, PLAIN, 64)
DEFINE_QUANT(quantize_mixed_g128, PLAIN, 128)
DEFINE_QUANT(rmsnorm_quantize_mixed_g64, RMSNORM, 64)
DEFINE_QUANT(rmsnorm_quantize_mixed_g128, RMSNORM, 128)
DEFINE_QUANT(silu_mul_quantize_mixed_g64, SILU_MUL, 64)
DEFINE_QUANT(silu_mul_quantize_mixed_g128, SILU_MUL, 128)
