// W4A4 mixed-precision GEMM on Hopper wgmma (sm_90a): Y[M, N] = A_hat @ W_hat^T (+ bias), FP16.
//
// Same operands, semantics and requirements as kernels/w4a4_gemm.cu (formats.MixedQuantized;
// K - k a multiple of G and of 64, G in {64, 128}, k a multiple of 16 up to 256, N even). The
// unpack trick is the same: a word w of 8 packed codes gives (w << 4) & 0xF0F0F0F0 (even codes)
// and w & 0xF0F0F0F0 (odd codes) as int8 holding 16 * code; A and W use one K permutation, so the
// dot product is unchanged and 256x too large (the 1/256 rides on the weight scales).
//
// CTA = 3 warpgroups, output tile 128 x 128, K in stages of 128 INT8 columns (one 128-byte row of
// the 128-byte swizzle: one group of 128 or two of 64).
//   WG0, producer: thread p owns weight row n0 + p. It streams the row's packed codes through a
//     per-thread cp.async ring (a thread reads back only what it copied: no barrier), unpacks them
//     to INT8 once per CTA and stores the row into the stage in the K-major 128-byte-swizzled
//     layout the wgmma descriptor reads (16-byte chunk c of row n at chunk c ^ (n % 8)), with its
//     group scales as float / 256. Outlier stages are INT8 already: cp.async straight into the
//     stage.
//   WG1, WG2, consumers: 64 output rows each. Activation codes go from global memory straight to
//     registers (one stage ahead: wg1, the dispatched kernel; two: wg) and are unpacked there:
//     wgmma m64n128k32 s8 (m64n64k32 halves in wg/wg1) with A from
//     registers and B from shared memory, INT32 per K-group, folded into FP32 as
//     acc += float(x) * (sa[m, g] * sw[n, g] / 256) (the product of two fp16 values is exact in
//     fp32, so the fold rounds once). The outlier block accumulates in INT32 over all k and is
//     scaled once by so_a[m] * so_w[n] in the epilogue.
// Producer and consumers meet at mbarriers: full[s] (128 producer arrivals, after the producer's
// fence.proxy.async: the stores are generic-proxy writes that wgmma reads through the async
// proxy) and empty[s] (256 consumer arrivals, after the stage's wgmmas completed and its scales
// were read).
//
// K permutation inside a stage (shared by both operands): k32 step j, fragment byte positions
// 4t..4t+3 hold evens(word(j, t)) and 16+4t..16+4t+3 hold odds(word(j, t)), where word(j, t) is
// packed word 4t + j of the stage (G = 128) or 8(j/2) + 2t + (j%2) (G = 64: a k32 step stays
// inside its group). So a consumer thread (quad position t) loads 16 contiguous packed bytes of
// a row per stage, and a producer thread turns its row's 64 packed bytes into 8 16-byte stores.
//
// Round 4 (experiments/results/gemm_h100_notes.md) added two reorganisations, measured slower
// than wg1 and kept as comparison variants: wgc (gemm_wg with ACP > 0: each consumer thread
// streams its own activation words through a private cp.async ring) and the persistent wgp
// kernels further down (the producer also stages the activation tile; 2 or 3 consumer WGs).
#include <cuda_fp16.h>

#include "w4a4_common.cuh"  // unpack, shared-memory address, cp.async, mbarrier helpers

#define WG_THREADS 128
#define TILE_M 128
#define TILE_N 128
#define STAGE_K 128                          // INT8 columns a stage
#ifndef STAGES
#define STAGES 8  // unpacked weight stages in shared memory (6 measured 4-12% faster than 4)
#endif
#ifndef RING
#define RING 4  // packed weight stages in flight a producer thread
#endif
#define PACKED_BYTES 64                      // packed bytes of a row a stage
#define B_STAGE (TILE_N * STAGE_K)           // 16 KB
#define RING_STAGE (TILE_N * PACKED_BYTES)   // 8 KB
#define SCALE_STAGE (2 * TILE_N)             // floats: up to two groups a stage
// setmaxnreg moves registers inside the CTA's pool (launch: 384 x 168): 128 x 128 freed = 256 x 64
#define PRODUCER_REGS 40
#define CONSUMER_REGS 232

// ------------------------------------------------------------------------ async copy, barriers

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}


// ---------------------------------------------------------------------------------- wgmma

// K-major operand, 128-byte swizzle: 8-row atoms of 128-byte rows, 1024 bytes apart (SBO); the
// leading offset is unused for this layout. A k32 step advances the start address by 32 bytes.
__device__ __forceinline__ unsigned long long sw128_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

#define D8(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), "+r"(d[i + 4]), \
              "+r"(d[i + 5]), "+r"(d[i + 6]), "+r"(d[i + 7])
#define D64 D8(0), D8(8), D8(16), D8(24), D8(32), D8(40), D8(48), D8(56)
#define D64_LIST                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
    "%56, %57, %58, %59, %60, %61, %62, %63}"

// D (+)= A (registers, 64 x 32 int8) x B (shared memory, 128 x 32 int8, K-major); scale_d = 0
// starts a fresh sum.
__device__ __forceinline__ void wgmma_rs(int (&d)[64], const unsigned (&a)[4],
                                         unsigned long long desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " D64_LIST
        ", {%64, %65, %66, %67}, %68, p;\n}\n"
        : D64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
}

#define D32 D8(0), D8(8), D8(16), D8(24)
#define D32_LIST                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// The same for 64 output columns (one half of the tile).
__device__ __forceinline__ void wgmma_rs_n64(int (&d)[32], const unsigned (&a)[4],
                                             unsigned long long desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 " D32_LIST
        ", {%32, %33, %34, %35}, %36, p;\n}\n"
        : D32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
}

// Orders accumulator reads after the wgmma wait that completes them (and pins the registers).
template <int N>
__device__ __forceinline__ void fence_regs(int (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

template <int FIRST, int STEPS>
__device__ __forceinline__ void pin_fragments(unsigned (&af)[4][4]) {
    // computed before the wgmma fence (else ptxas injects a warpgroup.arrive per wgmma)
#pragma unroll
    for (int j = FIRST; j < FIRST + STEPS; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(af[j][i]));
}

// Issues k32 steps FIRST .. FIRST + STEPS - 1 of a stage for output columns 64H .. 64H + 63 into
// a fresh INT32 sum, as one wgmma group (not waited for).
template <int FIRST, int STEPS, int H>
__device__ __forceinline__ void issue_half(int (&x)[32], unsigned (&af)[4][4],
                                           unsigned long long desc) {
    pin_fragments<FIRST, STEPS>(af);
    wg_fence();
#pragma unroll
    for (int j = 0; j < STEPS; ++j)
        wgmma_rs_n64(x, af[FIRST + j], desc + ((H * 64 * 128) >> 4) + 2 * (FIRST + j), j > 0);
    wg_commit();
}

template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// STEPS k32 steps from step FIRST of a stage into a fresh INT32 sum, waited for.
template <int FIRST, int STEPS>
__device__ __forceinline__ void mma_steps(int (&x)[64], unsigned (&af)[4][4],
                                          unsigned long long desc) {
    pin_fragments<FIRST, STEPS>(af);
    wg_fence();
#pragma unroll
    for (int j = 0; j < STEPS; ++j) wgmma_rs(x, af[FIRST + j], desc + 2 * (FIRST + j), j > 0);
    wg_commit();
    wg_wait0();
    fence_regs(x);
}

// acc[(r|r+8), 8j + 2t + c] += x * sa * sw: the m64n128 accumulator layout, element 4j + 2h + c
// is row r + 8h, column 8j + 2t + c of the warp's 16-row slab.
__device__ __forceinline__ void fold(float (&acc)[64], const int (&x)[64], float sa0, float sa1,
                                     const float* __restrict__ sw, int t4) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const float2 w = *reinterpret_cast<const float2*>(sw + 8 * j + 2 * t4);
        acc[4 * j + 0] = fmaf((float)x[4 * j + 0], sa0 * w.x, acc[4 * j + 0]);
        acc[4 * j + 1] = fmaf((float)x[4 * j + 1], sa0 * w.y, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf((float)x[4 * j + 2], sa1 * w.x, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf((float)x[4 * j + 3], sa1 * w.y, acc[4 * j + 3]);
    }
}

// The same for one 64-column half H of the tile: acc[32H + 4j + e].
template <int H>
__device__ __forceinline__ void fold_half(float (&acc)[64], const int (&x)[32], float sa0,
                                          float sa1, const float* __restrict__ sw, int t4) {
#ifdef WG_ABLATE_NOFOLD  // timing ablation only: wrong results
#pragma unroll
    for (int i = 0; i < 32; ++i) asm volatile("" ::"r"(x[i]));
    return;
#endif
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float2 w = *reinterpret_cast<const float2*>(sw + 64 * H + 8 * j + 2 * t4);
        float* a = acc + 32 * H + 4 * j;
        a[0] = fmaf((float)x[4 * j + 0], sa0 * w.x, a[0]);
        a[1] = fmaf((float)x[4 * j + 1], sa0 * w.y, a[1]);
        a[2] = fmaf((float)x[4 * j + 2], sa1 * w.x, a[2]);
        a[3] = fmaf((float)x[4 * j + 3], sa1 * w.y, a[3]);
    }
}

#define GEMM_ARGS                                                                              \
    const unsigned char *__restrict__ a_codes, const __half *__restrict__ a_scales,             \
        const signed char *__restrict__ a_out, const __half *__restrict__ a_oscale,             \
        const unsigned char *__restrict__ w_codes, const __half *__restrict__ w_scales,         \
        const signed char *__restrict__ w_out, const __half *__restrict__ w_oscale,             \
        const __half *__restrict__ bias, __half *__restrict__ y, int M, int N, int Kn, int k
#define GEMM_PASS \
    a_codes, a_scales, a_out, a_oscale, w_codes, w_scales, w_out, w_oscale, bias, y, M, N, Kn, k

extern __shared__ unsigned char smem_raw[];  // dynamic shared memory of every kernel here

struct Smem {
    unsigned char* b;      // [STG][TILE_N][128] unpacked weights, swizzled
    unsigned char* ring;   // [R][TILE_N][64] packed weights, per-thread slots
    float* scale;          // [STG][2][TILE_N] weight group scales of a stage / 256
    __half* wscale;        // [TILE_N][ng] the tile's weight group scales, as stored
    unsigned full, empty;  // mbarrier arrays (shared addresses), 8 bytes apart
    unsigned char* acp;    // [ACP][ACP_SLOT] consumer threads' private activation slots
};
// A slot of the consumers' activation ring: packed words [2 rows][256 threads][16 bytes], then
// scale words [256 threads][2 rows][G = 128: 1, G = 64: 2 words]
#define ACP_SLOT(G) (2 * 2 * WG_THREADS * 16 + 2 * 2 * WG_THREADS * 4 * (STAGE_K / (G)))

__device__ __forceinline__ void cp_async16_bytes(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

// WORDS aligned 4-byte words of fp16 scales from element e & ~1 (e < 0: none); words past the
// end of the tensor (elems elements) are zero-filled.
template <int WORDS>
__device__ __forceinline__ void cp_scale_words(const __half* __restrict__ scales, long long elems,
                                               long long e, unsigned dst) {
    const long long first = e < 0 ? elems : (e & ~1ll);
#pragma unroll
    for (int w = 0; w < WORDS; ++w) {
        const long long i = first + 2 * w;
        const int bytes = i >= elems ? 0 : (int)min(4ll, 2 * (elems - i));
        cp_async4(dst + 4 * w, bytes > 0 ? scales + i : scales, bytes);
    }
}

// fp16 number j (0..2) of the halves (lo.lo, lo.hi, hi.lo), as stored and as float
__device__ __forceinline__ __half half_bits(unsigned lo, unsigned hi, int j) {
    return __ushort_as_half((unsigned short)__funnelshift_rc(lo, hi, 16 * j));
}
__device__ __forceinline__ float half_at(unsigned lo, unsigned hi, int j) {
    return __half2float(half_bits(lo, hi, j));
}

__device__ __forceinline__ void cp_async8(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void producer_sync() {  // the producer warpgroup alone (barrier 1)
    asm volatile("bar.sync 1, %0;\n" ::"n"(WG_THREADS) : "memory");
}

// ------------------------------------------------------------------------------- producer

template <int G, int STG, int R>
__device__ void produce(GEMM_ARGS, const Smem& sm, int Tn, int T) {
    const int p = threadIdx.x;
    const int n = blockIdx.x * TILE_N + p;
    const bool valid = n < N;
    const int kb = Kn / 2, ng = Kn / G;
    const unsigned char* wrow = w_codes + (long long)(valid ? n : 0) * kb;

    // The tile's weight scales, rows n0 .. n0 + 127, are one contiguous block of 256 * ng bytes
    // starting on a 256-byte boundary: copied once, cooperatively, ahead of the codes. (Loading
    // them stage by stage put a global-memory round trip on every stage: v1, 1.2 us a stage.)
    {
        const long long first = (long long)blockIdx.x * TILE_N * ng, limit = (long long)N * ng;
        const unsigned dst = smem_u32(sm.wscale);
        for (int i = p; i < 16 * ng; i += WG_THREADS) {
            const long long h = first + 8 * i;
            const int bytes = h >= limit ? 0 : (int)min(16ll, 2 * (limit - h));
            cp_async16_bytes(dst + 16 * i, bytes > 0 ? w_scales + h : w_scales, bytes);
        }
        cp_async_commit();
    }
    // 16-byte chunk c of the thread's slot: rotated so 8 consecutive rows hit 8 bank groups
    auto ring_chunk = [&](int slot, int c) {
        return slot * RING_STAGE + p * PACKED_BYTES + ((c ^ ((p >> 1) & 3)) << 4);
    };
    const unsigned ring_base = smem_u32(sm.ring);
    auto issue = [&](int t) {
        if (t < Tn) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int off = t * PACKED_BYTES + c * 16;
                const bool ok = valid && off < kb;
                cp_async16(ring_base + ring_chunk(t % R, c), ok ? wrow + off : w_codes, ok);
            }
        }
        cp_async_commit();  // one group a stage, empty or not: wait counts stay uniform
    };
    constexpr int GPS = STAGE_K / G;  // groups a stage
#pragma unroll
    for (int i = 0; i < R - 1; ++i) issue(i);

#pragma unroll 1
    for (int t = 0; t < T; ++t) {
        const int s = t % STG;
        unsigned char* row = sm.b + s * B_STAGE + p * STAGE_K;
        if (t < Tn) {
            issue(t + R - 1);
            cp_async_wait<R - 1>();  // this thread's copies of stage t (and the scale block)
            if (t == 0) producer_sync();  // everyone's part of the scale block
            unsigned w[16];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const uint4 v = *reinterpret_cast<const uint4*>(sm.ring + ring_chunk(t % R, c));
                w[4 * c] = v.x; w[4 * c + 1] = v.y; w[4 * c + 2] = v.z; w[4 * c + 3] = v.w;
            }
            float sc[2];
#pragma unroll
            for (int g = 0; g < 2; ++g)
                sc[g] = g < GPS && t * GPS + g < ng
                            ? __half2float(sm.wscale[p * ng + t * GPS + g]) * (1.f / 256.f)
                            : 0.f;
            mbar_wait(sm.empty + 8 * s, ((t / STG) & 1) ^ 1);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned e[4], o[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const unsigned wd = G == 128 ? w[4 * q + j] : w[8 * (j >> 1) + 2 * q + (j & 1)];
                    e[q] = evens(wd);
                    o[q] = odds(wd);
                }
                *reinterpret_cast<uint4*>(row + (((2 * j) ^ (p & 7)) << 4)) = make_uint4(e[0], e[1], e[2], e[3]);
                *reinterpret_cast<uint4*>(row + (((2 * j + 1) ^ (p & 7)) << 4)) = make_uint4(o[0], o[1], o[2], o[3]);
            }
            sm.scale[s * SCALE_STAGE + p] = sc[0];
            sm.scale[s * SCALE_STAGE + TILE_N + p] = sc[1];
        } else {  // outlier stage: INT8 as stored, natural K order
            const int base = (t - Tn) * STAGE_K;
            mbar_wait(sm.empty + 8 * s, ((t / STG) & 1) ^ 1);
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int off = base + c * 16;
                const bool ok = valid && off < k;
                const signed char* src = ok ? w_out + (long long)n * k + off : w_out;
                cp_async16(smem_u32(row) + ((c ^ (p & 7)) << 4), src, ok);
            }
            cp_async_commit();
            cp_async_wait<0>();
        }
        fence_proxy_async();
        mbar_arrive(sm.full + 8 * s);
    }
}

// ------------------------------------------------------------------------------- consumers

// Epilogue: outlier block (INT32 sum xo(i) for acc[i]), bias, FP16 pairs, masked at the M and N
// edges. acc[4j + 2h + c] is row r + 8h, column n0 + 8j + 2t + c.
// The epilogue's scales and bias, loaded before the last wgmmas are waited for (loaded after,
// their round trip was paid once a tile).
struct EpiScales {
    float soa[2];    // outlier scales of rows r, r + 8
    __half2 sow[16];  // outlier scales of columns n0 + 8j + 2t, + 1
    __half2 b[16];    // bias of the same columns
};

__device__ __forceinline__ void load_epilogue(GEMM_ARGS, const long long (&m)[2], int t4,
                                              EpiScales& e, int n0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) e.soa[h] = k > 0 ? __half2float(a_oscale[m[h]]) : 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int n = n0 + 8 * j + 2 * t4;
        const __half2 zero = __floats2half2_rn(0.f, 0.f);
        e.sow[j] = k > 0 && n < N ? *reinterpret_cast<const __half2*>(w_oscale + n) : zero;
        e.b[j] = bias != nullptr && n < N ? *reinterpret_cast<const __half2*>(bias + n) : zero;
    }
}

template <typename Outlier>
__device__ __forceinline__ void epilogue(GEMM_ARGS, const float (&acc)[64], Outlier xo,
                                         const EpiScales& e, const long long (&m)[2],
                                         const bool (&valid)[2], int t4, int n0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!valid[h]) continue;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int n = n0 + 8 * j + 2 * t4;
            if (n >= N) continue;
            float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
            if (k > 0) {
                const float2 sow = __half22float2(e.sow[j]);
                v0 = fmaf((float)xo(4 * j + 2 * h), e.soa[h] * sow.x, v0);
                v1 = fmaf((float)xo(4 * j + 2 * h + 1), e.soa[h] * sow.y, v1);
            }
            const float2 b = __half22float2(e.b[j]);
            *reinterpret_cast<__half2*>(y + m[h] * N + n) = __floats2half2_rn(v0 + b.x, v1 + b.y);
        }
    }
}

// A fragments of outlier stage ts: natural K order, 4 bytes a register as stored.
__device__ __forceinline__ void load_outlier_frags(const signed char* __restrict__ a_out, int k,
                                                   const long long (&m)[2], const bool (&valid)[2],
                                                   int base, int t4, unsigned (&af)[4][4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int off = base + 32 * j + 16 * half + 4 * t4;
                af[j][2 * half + h] =
                    valid[h] && off < k
                        ? __ldg(reinterpret_cast<const unsigned*>(a_out + m[h] * k + off))
                        : 0u;
            }
}

// Activation scales wait in AStage as fp16 and are converted at the unpack, a stage after their
// load (round 3 converted at the load, so the conversion waited for the load every stage;
// -DWG_EAGER_SCALE restores that for comparison).
#ifdef WG_EAGER_SCALE
typedef float AScale;
__device__ __forceinline__ AScale to_ascale(__half h) { return __half2float(h); }
#else
typedef __half AScale;
__device__ __forceinline__ AScale to_ascale(__half h) { return h; }
#endif
__device__ __forceinline__ float ascale_float(AScale s) { return (float)s; }

struct AStage {
    unsigned w[2][4];  // packed words of rows r and r + 8: word j feeds k32 step j
    AScale s[2][2];    // their group scales (two groups a stage when G = 64)
};

template <int G>
__device__ __forceinline__ void load_a(const unsigned char* __restrict__ a_codes,
                                       const __half* __restrict__ a_scales, const long long (&m)[2],
                                       const bool (&valid)[2], int kb, int ng, int Tn, int ts,
                                       int t4, AStage& st) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bool ok = valid[h] && ts < Tn;
        const unsigned char* row = a_codes + m[h] * kb + ts * PACKED_BYTES;
        if (G == 128) {
            const uint4 v = ok ? __ldg(reinterpret_cast<const uint4*>(row + 16 * t4)) : make_uint4(0, 0, 0, 0);
            st.w[h][0] = v.x; st.w[h][1] = v.y; st.w[h][2] = v.z; st.w[h][3] = v.w;
            st.s[h][0] = to_ascale(ok ? a_scales[m[h] * ng + ts] : __float2half(0.f));
            st.s[h][1] = to_ascale(__float2half(0.f));
        } else {
#pragma unroll
            for (int g = 0; g < 2; ++g) {
                const bool okg = ok && 2 * ts + g < ng;
                const uint2 v = okg ? __ldg(reinterpret_cast<const uint2*>(row + 32 * g + 8 * t4)) : make_uint2(0, 0);
                st.w[h][2 * g] = v.x;
                st.w[h][2 * g + 1] = v.y;
                st.s[h][g] = to_ascale(okg ? a_scales[m[h] * ng + 2 * ts + g] : __float2half(0.f));
            }
        }
    }
}

template <int G, int STG>
__device__ void consume(GEMM_ARGS, const Smem& sm, int Tn, int T, int wg) {
    const int q = threadIdx.x - WG_THREADS * (1 + wg);
    const int warp = q >> 5, lane = q & 31, r = lane >> 2, t4 = lane & 3;
    const int kb = Kn / 2, ng = Kn / G;
    long long m[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long row = (long long)blockIdx.y * TILE_M + 64 * wg + 16 * warp + r + 8 * h;
        valid[h] = row < M;
        m[h] = valid[h] ? row : 0;
    }
    const unsigned b_base = smem_u32(sm.b);

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    int x[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) x[i] = 0;

    // One normal stage: its A fragments were loaded two stages ago; load stage ts + 2 into `next`.
    auto step = [&](int ts, const AStage& cur, AStage& next) {
        unsigned af[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            af[j][0] = evens(cur.w[0][j]);
            af[j][1] = evens(cur.w[1][j]);
            af[j][2] = odds(cur.w[0][j]);
            af[j][3] = odds(cur.w[1][j]);
        }
        const float sa00 = ascale_float(cur.s[0][0]), sa10 = ascale_float(cur.s[1][0]),
                    sa01 = ascale_float(cur.s[0][1]), sa11 = ascale_float(cur.s[1][1]);
        load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, ts + 2, t4, next);
        const int s = ts % STG;
        mbar_wait(sm.full + 8 * s, (ts / STG) & 1);
        const unsigned long long desc = sw128_desc(b_base + s * B_STAGE);
        const float* sw = sm.scale + s * SCALE_STAGE;
        if (G == 128) {
            mma_steps<0, 4>(x, af, desc);
            fold(acc, x, sa00, sa10, sw, t4);
        } else {
            mma_steps<0, 2>(x, af, desc);
            fold(acc, x, sa00, sa10, sw, t4);
            if (2 * ts + 1 < ng) {
                mma_steps<2, 2>(x, af, desc);
                fold(acc, x, sa01, sa11, sw + TILE_N, t4);
            }
        }
        mbar_arrive(sm.empty + 8 * s);
    };

    AStage s0, s1, s2;  // rotated by unrolling, so no register copies
    load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, 0, t4, s0);
    load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, 1, t4, s1);
#pragma unroll 1
    for (int ts = 0; ts < Tn; ts += 3) {
        step(ts, s0, s2);
        if (ts + 1 < Tn) step(ts + 1, s1, s0);
        if (ts + 2 < Tn) step(ts + 2, s2, s1);
    }

    // Outlier block: natural K order, A fragments as stored (4 bytes a register).
    EpiScales e;
    load_epilogue(GEMM_PASS, m, t4, e, blockIdx.x * TILE_N);
    if (k > 0) {
#pragma unroll 1
        for (int ts = Tn; ts < T; ++ts) {
            const int base = (ts - Tn) * STAGE_K;
            unsigned af[4][4];
            load_outlier_frags(a_out, k, m, valid, base, t4, af);
            const int s = ts % STG;
            mbar_wait(sm.full + 8 * s, (ts / STG) & 1);
            const unsigned long long desc = sw128_desc(b_base + s * B_STAGE);
            // all four k32 steps, also past k: the producer zero-filled those columns (no
            // data-dependent wgmma issue)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(af[j][i]));
            wg_fence();
#pragma unroll
            for (int j = 0; j < 4; ++j) wgmma_rs(x, af[j], desc + 2 * j, ts > Tn || j > 0);
            wg_commit();
            wg_wait0();
            fence_regs(x);
            mbar_arrive(sm.empty + 8 * s);
        }
    }

    epilogue(GEMM_PASS, acc, [&](int i) { return x[i]; }, e, m, valid, t4, blockIdx.x * TILE_N);
}

// ------------------------------------------------------------------- pipelined consumers (v3)
// The tile's 128 columns as two halves with their own INT32 sums (x0, x1: the same 64 registers
// as one m64n128 sum): while the wgmmas of one half run, the other half is folded, and the first
// half of stage t + 1 is issued while the second half of stage t is still running, so each
// warpgroup keeps the tensor cores busy during its own fold.
template <bool B>
struct Flag {  // a compile-time bool passed to a generic lambda
    static constexpr bool value = B;
};

struct AFrag {
    unsigned f[4][4];  // unpacked fragments of the four k32 steps
    float s[2][2];     // scales of rows r, r + 8 (two groups a stage when G = 64)
};

__device__ __forceinline__ void unpack_a(const AStage& p, AFrag& a) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        a.f[j][0] = evens(p.w[0][j]);
        a.f[j][1] = evens(p.w[1][j]);
        a.f[j][2] = odds(p.w[0][j]);
        a.f[j][3] = odds(p.w[1][j]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        a.s[h][0] = ascale_float(p.s[h][0]);
        a.s[h][1] = ascale_float(p.s[h][1]);
    }
}

// AHEAD: packed activation codes loaded AHEAD stages before their unpack (2: two buffers, the
// round 3 final form; 1: one buffer, round 3's v3). ACP > 0 (round 4, with AHEAD = 1): each
// consumer thread instead copies its own packed words and scale words with cp.async into its
// private slots of an ACP-deep ring, ACP - 1 stages ahead, and reads them back with ld.shared
// one stage before their unpack: no register holds a load in flight, nothing waits on global
// memory (round 3's load_a converted the scale right after its load: a stall every stage), and
// no thread reads another's slots, so no barrier.
template <int G, int AHEAD, int STG, int ACP>
__device__ void consume_pipelined(GEMM_ARGS, const Smem& sm, int Tn, int T, int wg) {
    constexpr int STEPS = G / 32;  // k32 steps of a group
    const int q = threadIdx.x - WG_THREADS * (1 + wg);
    const int warp = q >> 5, lane = q & 31, r = lane >> 2, t4 = lane & 3;
    const int kb = Kn / 2, ng = Kn / G;
    long long m[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long row = (long long)blockIdx.y * TILE_M + 64 * wg + 16 * warp + r + 8 * h;
        valid[h] = row < M;
        m[h] = valid[h] ? row : 0;
    }
    const unsigned b_base = smem_u32(sm.b);
    auto desc_of = [&](int ts) { return sw128_desc(b_base + (ts % STG) * B_STAGE); };

    constexpr int GPS = STAGE_K / G;
    const int cq = threadIdx.x - WG_THREADS;  // the thread's slots in the activation ring
    auto acp_slot = [&](int ts) { return sm.acp + (ts % (ACP > 0 ? ACP : 1)) * ACP_SLOT(G); };
    // Per row: the packed words' address at stage 0 and the scale element index m * ng (32-bit:
    // kernel_ops checks M * (K - k) / G < 2^31); invalid rows copy nothing (zero-filled).
    const unsigned char* arow[2];
    int e0[2];
    const int elems = M * ng;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        arow[h] = a_codes + m[h] * kb + (G == 128 ? 16 : 8) * t4;
        e0[h] = valid[h] ? (int)m[h] * ng : elems;
    }
    auto acp_issue = [&](int ts) {  // stage ts's words and scale words -> the thread's slots
        if (ts < Tn) {
            const unsigned slot = smem_u32(acp_slot(ts));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const unsigned dst = slot + (h * 2 * WG_THREADS + cq) * 16;
                const unsigned char* src = arow[h] + ts * PACKED_BYTES;
                const bool ok_row = e0[h] < elems;
                if (G == 128) {
                    cp_async16(dst, ok_row ? src : a_codes, ok_row);
                } else {
#pragma unroll
                    for (int g = 0; g < 2; ++g) {
                        const bool ok = ok_row && 2 * ts + g < ng;
                        cp_async8(dst + 8 * g, ok ? src + 32 * g : a_codes, ok ? 8 : 0);
                    }
                }
                // the aligned word(s) holding element e0 + ts * GPS (and the next): a word past
                // the tensor's last element copies its first half only
                const int first = (e0[h] + ts * GPS) & ~1;
                const unsigned sdst = slot + 2 * 2 * WG_THREADS * 16 + (2 * cq + h) * 4 * GPS;
#pragma unroll
                for (int w = 0; w < GPS; ++w) {
                    const int i = first + 2 * w;
                    const int bytes = i >= elems ? 0 : (i + 1 < elems ? 4 : 2);
                    cp_async4(sdst + 4 * w, bytes > 0 ? a_scales + i : a_scales, bytes);
                }
            }
        }
        cp_async_commit();  // one group a stage, empty or not: wait counts stay uniform
    };
    auto acp_read = [&](int ts, AStage& P) {  // after the wait for its group
        const unsigned char* slot = acp_slot(ts);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint4 v = *reinterpret_cast<const uint4*>(slot + (h * 2 * WG_THREADS + cq) * 16);
            P.w[h][0] = v.x; P.w[h][1] = v.y; P.w[h][2] = v.z; P.w[h][3] = v.w;
            const unsigned char* sc = slot + 2 * 2 * WG_THREADS * 16 + (2 * cq + h) * 4 * GPS;
            const unsigned w0 = *reinterpret_cast<const unsigned*>(sc);
            const unsigned w1 = GPS == 2 ? *reinterpret_cast<const unsigned*>(sc + 4) : 0u;
            const int j0 = (e0[h] + ts * GPS) & 1;  // the element's half (invalid rows: zeros)
            P.s[h][0] = to_ascale(half_bits(w0, w1, j0));  // ts < Tn: the first group exists
            P.s[h][1] = to_ascale(GPS == 2 && 2 * ts + 1 < ng ? half_bits(w0, w1, j0 + 1)
                                                              : __float2half(0.f));
        }
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    int x0[32], x1[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) x0[i] = x1[i] = 0;

    // Stage ts: its first half-unit is in flight (issued by the previous stage). Pn holds the
    // packed codes of stage ts + 1 (loaded two stages ago); they are unpacked into Fn right before
    // the issue of stage ts + 1, and Pn then receives stage ts + 3.
    // MORE: a next stage exists (its first unit is issued here). FULL: both groups of a G = 64
    // stage exist (only the last stage can lack its second). Compile-time, so the loop body has
    // no branch while a wgmma is in flight: a control-flow merge there makes ptxas copy the
    // in-flight accumulators and serialize every wgmma (C7515).
    auto stage = [&](auto more_t, auto full_t, int ts, AFrag& Fc, AFrag& Fn, AStage& Pn) {
        constexpr bool MORE = decltype(more_t)::value, FULL = decltype(full_t)::value;
        const int s = ts % STG;
        const unsigned long long desc = desc_of(ts);
        const float* sw = sm.scale + s * SCALE_STAGE;
        auto last_half = [&](int g) {  // issue the next stage's first unit, then fold half 1
            if (MORE) {
                unpack_a(Pn, Fn);
                if (ACP == 0) load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, ts + 1 + AHEAD, t4, Pn);
                mbar_wait(sm.full + 8 * ((ts + 1) % STG), ((ts + 1) / STG) & 1);
                issue_half<0, STEPS, 0>(x0, Fn.f, desc_of(ts + 1));
                wg_wait<1>();
            } else {
                wg_wait<0>();
            }
            fold_half<1>(acc, x1, Fc.s[0][g], Fc.s[1][g], sw + g * TILE_N, t4);
        };
        issue_half<0, STEPS, 1>(x1, Fc.f, desc);
        if (ACP > 0 && MORE) {  // the next stage's words, read while this stage's wgmmas run
            acp_issue(ts + ACP);
            cp_async_wait<(ACP > 0 ? ACP - 1 : 0)>();
            acp_read(ts + 1, Pn);
        }
        wg_wait<1>();
        fold_half<0>(acc, x0, Fc.s[0][0], Fc.s[1][0], sw, t4);
        if (G == 64 && FULL) {  // second group of the stage
            issue_half<2, 2, 0>(x0, Fc.f, desc);
            wg_wait<1>();
            fold_half<1>(acc, x1, Fc.s[0][0], Fc.s[1][0], sw, t4);
            issue_half<2, 2, 1>(x1, Fc.f, desc);
            wg_wait<1>();
            fold_half<0>(acc, x0, Fc.s[0][1], Fc.s[1][1], sw + TILE_N, t4);
            last_half(1);
        } else {
            last_half(0);
        }
        mbar_arrive(sm.empty + 8 * s);
    };
    using yes = Flag<true>;
    using no = Flag<false>;

    AFrag F0, F1;
    AStage P0, P1x;
    AStage& P1 = AHEAD == 2 ? P1x : P0;  // one buffer: both stages of a pair use P0
    if (ACP > 0) {
#pragma unroll
        for (int i = 0; i < ACP; ++i) acp_issue(i);
        cp_async_wait<(ACP > 0 ? ACP - 1 : 0)>();
        acp_read(0, P0);
        unpack_a(P0, F0);
    } else {
        load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, 0, t4, P0);
        if (AHEAD == 2) load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, 1, t4, P1);
        unpack_a(P0, F0);
        load_a<G>(a_codes, a_scales, m, valid, kb, ng, Tn, AHEAD == 2 ? 2 : 1, t4, P0);
    }
    mbar_wait(sm.full, 0);
    issue_half<0, STEPS, 0>(x0, F0.f, desc_of(0));
    int ts = 0;
#pragma unroll 1
    for (; ts + 2 < Tn; ts += 2) {  // by two: the buffers swap roles, no register copies
        stage(yes(), yes(), ts, F0, F1, P1);
        stage(yes(), yes(), ts + 1, F1, F0, P0);
    }
    const bool last_full = 2 * (Tn - 1) + 1 < ng;  // G = 64: the last stage has both groups
    if (ts + 1 < Tn) {
        stage(yes(), yes(), ts, F0, F1, P1);
        if (last_full) stage(no(), yes(), ts + 1, F1, F0, P0);
        else stage(no(), no(), ts + 1, F1, F0, P0);
    } else {
        if (last_full) stage(no(), yes(), ts, F0, F1, P1);
        else stage(no(), no(), ts, F0, F1, P1);
    }

    // Outlier block: natural K order, A fragments as stored, both halves accumulate over stages.
    EpiScales e;
    load_epilogue(GEMM_PASS, m, t4, e, blockIdx.x * TILE_N);
    auto outlier_stage = [&](int ts, unsigned (&af)[4][4]) {
        mbar_wait(sm.full + 8 * (ts % STG), (ts / STG) & 1);
        const unsigned long long desc = desc_of(ts);
        pin_fragments<0, 4>(af);
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wgmma_rs_n64(x0, af[j], desc + 2 * j, ts > Tn || j > 0);
            wgmma_rs_n64(x1, af[j], desc + ((64 * 128) >> 4) + 2 * j, ts > Tn || j > 0);
        }
        wg_commit();
        wg_wait<0>();
        mbar_arrive(sm.empty + 8 * (ts % STG));
    };
    if (k > 0) {
#pragma unroll 1
        for (int ts = Tn; ts < T; ++ts) {
            unsigned af[4][4];
            load_outlier_frags(a_out, k, m, valid, (ts - Tn) * STAGE_K, t4, af);
            outlier_stage(ts, af);
        }
    }
    epilogue(GEMM_PASS, acc, [&](int i) { return i < 32 ? x0[i] : x1[i - 32]; }, e, m, valid, t4,
             blockIdx.x * TILE_N);
}

// ---------------------------------------------------------------------------------- kernel

// FORM: 0 wgs, 1 wg1 (v3, one buffer), 2 wg (two buffers); STG unpacked weight stages, R packed
// weight stages in flight a producer thread, ACP (FORM 1): activation ring depth (0: registers)
template <int G, int FORM, int STG, int R, int ACP>
__device__ void gemm_wg(GEMM_ARGS) {
    // the 128-byte swizzle repeats every 1024 bytes: stages start on 1024-byte boundaries
    unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    Smem sm;
    sm.b = base;
    sm.ring = base + STG * B_STAGE;
    sm.scale = reinterpret_cast<float*>(sm.ring + R * RING_STAGE);
    sm.full = smem_u32(sm.scale + STG * SCALE_STAGE);
    sm.empty = sm.full + 8 * STG;
    sm.acp = reinterpret_cast<unsigned char*>(sm.scale + STG * SCALE_STAGE + 4 * STG);
    sm.wscale = reinterpret_cast<__half*>(sm.acp + ACP * ACP_SLOT(G));
    const int Tn = (Kn / 2 + PACKED_BYTES - 1) / PACKED_BYTES;
    const int T = Tn + (k + STAGE_K - 1) / STAGE_K;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STG; ++s) {
            mbar_init(sm.full + 8 * s, WG_THREADS);
            mbar_init(sm.empty + 8 * s, 2 * WG_THREADS);
        }
    }
    __syncthreads();
    if (threadIdx.x < WG_THREADS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        produce<G, STG, R>(GEMM_PASS, sm, Tn, T);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
        if (FORM > 0)
            consume_pipelined<G, FORM, STG, ACP>(GEMM_PASS, sm, Tn, T, threadIdx.x / WG_THREADS - 1);
        else
            consume<G, STG>(GEMM_PASS, sm, Tn, T, threadIdx.x / WG_THREADS - 1);
    }
}

// Dynamic shared memory: STG * (B_STAGE + 4 * SCALE_STAGE + 16) + R * RING_STAGE
// + ACP * ACP_SLOT(G) + 2 * TILE_N * ng + 1024 (alignment slack); atom_lab/kernel_ops.py
// computes the same number (WG_LAYOUT).
#define DEFINE_WG(NAME, G, FORM, STG, R, ACP)                                             \
    extern "C" __global__ void __launch_bounds__(3 * WG_THREADS, 1) NAME(GEMM_ARGS) {    \
        gemm_wg<G, FORM, STG, R, ACP>(GEMM_PASS);                                        \
    }

DEFINE_WG(w4a4_gemm_wg_m128_g128, 128, 2, STAGES, RING, 0)
DEFINE_WG(w4a4_gemm_wg1_m128_g128, 128, 1, STAGES, RING, 0)  // v3: one packed activation buffer
DEFINE_WG(w4a4_gemm_wgs_m128_g128, 128, 0, STAGES, RING, 0)  // v2: fold after the whole sum
DEFINE_WG(w4a4_gemm_wgc_m128_g128, 128, 1, 6, 4, 4)  // round 4: activation ring, 6 stages
#ifndef WG_ONLY_G128  // ablation builds (bench_gemm.py --large) compile the group-128 kernels only
DEFINE_WG(w4a4_gemm_wg_m128_g64, 64, 2, STAGES, RING, 0)
DEFINE_WG(w4a4_gemm_wg1_m128_g64, 64, 1, STAGES, RING, 0)
DEFINE_WG(w4a4_gemm_wgs_m128_g64, 64, 0, STAGES, RING, 0)
DEFINE_WG(w4a4_gemm_wgc_m128_g64, 64, 1, 6, 4, 4)
#endif

// ============================================== round 4: persistent, activations through shared memory
// The same tile algebra (unpack trick, K permutation, fold) as above, reorganised so that no
// consumer instruction waits on global memory and no tile waits for its pipeline to fill:
//   - The producer warpgroup also copies the activation tile's packed codes (ROWS x 64 bytes a
//     stage) and the fp16 group scales of both operands with cp.async, issued WGP_RING - 1 stages
//     ahead; activation data lands in the stage slot itself (so its release is the stage's empty
//     barrier), weight data in the producer's private ring as before. Scales travel as the aligned
//     4-byte word(s) holding them (fp16 elements are 2-byte aligned only); the reader picks the
//     half by the parity of the element index. No per-tile scale block: any K fits.
//   - Consumers read their fragments' packed words and scales with ld.shared, one stage ahead.
//   - Persistent grid: CTA b takes tiles b, b + gridDim.x, ... (N-fastest order); the stage
//     counter runs on across tiles, so the producer fills the next tile's stages while the
//     consumers finish the previous one (outliers, epilogue).
//   - CW consumer warpgroups of 64 rows (tile 64 CW x 128). PIPE (CW = 2): each consumer issues
//     unit u + 1 (a 64-column half of a group) before folding unit u, as wg_m128. SERIAL: issue a
//     unit, wait, fold (32 INT32 registers instead of 64, so three consumer warpgroups fit the
//     register file; the other warpgroups keep the tensor cores busy during a fold).
#define WGP_RING 4       // packed weight stages in flight a producer thread
#define SCALE_WORDS 2    // 4-byte words of fp16 scales kept a row a stage (G = 64 needs both)

template <int CW, int STG>
struct WgpLayout {  // byte offsets in the 1024-aligned dynamic shared memory
    static constexpr int ROWS = 64 * CW;
    static constexpr int B = 0;                                     // [STG][128][128] swizzled
    static constexpr int A = B + STG * B_STAGE;                     // [STG][ROWS][64] packed
    static constexpr int ASC = A + STG * ROWS * PACKED_BYTES;       // [STG][ROWS][2] scale words
    static constexpr int WSC = ASC + STG * ROWS * 4 * SCALE_WORDS;  // [STG][2][128] float
    static constexpr int BAR = WSC + STG * SCALE_STAGE * 4;         // full[STG], empty[STG]
    static constexpr int WRING = BAR + 16 * STG;                    // [R][128][64] packed W
    static constexpr int RSC = WRING + WGP_RING * RING_STAGE;        // [R][128][2] W scale words
    static constexpr int BYTES = RSC + WGP_RING * TILE_N * 4 * SCALE_WORDS;
};

template <int V>
struct Int {  // a compile-time int passed to a generic lambda
    static constexpr int value = V;
};

struct WgpTile {  // the tile a cursor is on: its rows and columns
    int tm, tn;
};

__device__ __forceinline__ WgpTile wgp_tile(int tile, int tiles_n) {
    const int tm = tile / tiles_n;
    return {tm, tile - tm * tiles_n};
}

template <int G, int CW, int STG>
__device__ void wgp_produce(GEMM_ARGS, unsigned char* base, int tiles_n, int tiles, int Tn, int T) {
    using L = WgpLayout<CW, STG>;
    constexpr int ROWS = L::ROWS, GPS = STAGE_K / G, WORDS = GPS;
    const int p = threadIdx.x;
    const int kb = Kn / 2, ng = Kn / G;
    const unsigned sbase = smem_u32(base);
    const int mine = tiles > (int)blockIdx.x ? (tiles - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    const int total = mine * T;

    // Issue cursor (WGP_RING - 1 stages ahead of the unpack): the tile's weight row n and first
    // activation row m0, updated when the cursor enters a tile.
    int tile_i = blockIdx.x, t_i = 0, n_i = 0, m0_i = 0;
    auto enter = [&](int tile, int& n, int& m0) {
        const WgpTile c = wgp_tile(tile, tiles_n);
        n = c.tn * TILE_N + p;
        m0 = c.tm * ROWS;
    };
    auto issue = [&](int g) {
        if (g < total) {
            if (t_i == 0) enter(tile_i, n_i, m0_i);
            const int s = g % STG;
            mbar_wait(sbase + L::BAR + 8 * (STG + s), ((g / STG) & 1) ^ 1);  // slot s is free
            const bool nvalid = n_i < N;
            if (t_i < Tn) {
                const int off0 = t_i * PACKED_BYTES;
                const unsigned char* wrow = w_codes + (size_t)(nvalid ? n_i : 0) * kb + off0;
                const unsigned ring = sbase + L::WRING + (g % WGP_RING) * RING_STAGE + p * PACKED_BYTES;
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const bool ok = nvalid && off0 + 16 * q < kb;
                    // chunk rotated so 8 consecutive rows' reads hit 8 bank groups
                    cp_async16(ring + ((q ^ ((p >> 1) & 3)) << 4), ok ? wrow + 16 * q : w_codes, ok);
                }
                cp_scale_words<WORDS>(w_scales, (long long)N * ng,
                                      nvalid ? (long long)n_i * ng + t_i * GPS : -1,
                                      sbase + L::RSC + ((g % WGP_RING) * TILE_N + p) * 4 * SCALE_WORDS);
#pragma unroll
                for (int row = p; row < ROWS; row += WG_THREADS) {
                    const int m = m0_i + row;
                    const bool mvalid = m < M;
                    const unsigned char* arow = a_codes + (size_t)(mvalid ? m : 0) * kb + off0;
                    const unsigned dst = sbase + L::A + (s * ROWS + row) * PACKED_BYTES;
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const bool ok = mvalid && off0 + 16 * q < kb;
                        cp_async16(dst + 16 * q, ok ? arow + 16 * q : a_codes, ok);
                    }
                    cp_scale_words<WORDS>(a_scales, (long long)M * ng,
                                          mvalid ? (long long)m * ng + t_i * GPS : -1,
                                          sbase + L::ASC + (s * ROWS + row) * 4 * SCALE_WORDS);
                }
            } else {  // outlier stage: INT8 weights as stored, natural K order, into the stage
                const int obase = (t_i - Tn) * STAGE_K;
                const unsigned row = sbase + L::B + s * B_STAGE + p * STAGE_K;
                const signed char* src = w_out + (size_t)(nvalid ? n_i : 0) * k + obase;
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    const bool ok = nvalid && obase + 16 * q < k;
                    cp_async16(row + ((q ^ (p & 7)) << 4), ok ? src + 16 * q : w_out, ok);
                }
            }
            if (++t_i == T) {
                t_i = 0;
                tile_i += gridDim.x;
            }
        }
        cp_async_commit();  // one group a stage, empty or not: wait counts stay uniform
    };

#pragma unroll
    for (int i = 0; i < WGP_RING - 1; ++i) issue(i);
    int tile_u = blockIdx.x, t_u = 0, npar = 0;  // unpack cursor; parity of n * ng
#pragma unroll 1
    for (int g = 0; g < total; ++g) {
        if (t_u == 0) {
            int n, m0;
            enter(tile_u, n, m0);
            npar = (n * ng) & 1;
        }
        issue(g + WGP_RING - 1);
        cp_async_wait<WGP_RING - 1>();  // this thread's copies of stage g
        const int s = g % STG;
        if (t_u < Tn) {
            const unsigned char* ring = base + L::WRING + (g % WGP_RING) * RING_STAGE + p * PACKED_BYTES;
            unsigned w[16];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const uint4 v = *reinterpret_cast<const uint4*>(ring + ((q ^ ((p >> 1) & 3)) << 4));
                w[4 * q] = v.x; w[4 * q + 1] = v.y; w[4 * q + 2] = v.z; w[4 * q + 3] = v.w;
            }
            const uint2 sw = *reinterpret_cast<const uint2*>(
                base + L::RSC + ((g % WGP_RING) * TILE_N + p) * 4 * SCALE_WORDS);
            const int j0 = (npar + t_u * GPS) & 1;
            float* scale = reinterpret_cast<float*>(base + L::WSC) + s * SCALE_STAGE;
#pragma unroll
            for (int gi = 0; gi < GPS; ++gi)
                scale[gi * TILE_N + p] =
                    t_u * GPS + gi < ng ? half_at(sw.x, sw.y, j0 + gi) * (1.f / 256.f) : 0.f;
            unsigned char* row = base + L::B + s * B_STAGE + p * STAGE_K;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned e[4], o[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const unsigned wd = G == 128 ? w[4 * q + j] : w[8 * (j >> 1) + 2 * q + (j & 1)];
                    e[q] = evens(wd);
                    o[q] = odds(wd);
                }
                *reinterpret_cast<uint4*>(row + (((2 * j) ^ (p & 7)) << 4)) = make_uint4(e[0], e[1], e[2], e[3]);
                *reinterpret_cast<uint4*>(row + (((2 * j + 1) ^ (p & 7)) << 4)) = make_uint4(o[0], o[1], o[2], o[3]);
            }
        }
        fence_proxy_async();  // generic-proxy stores (and cp.async) before wgmma's async-proxy reads
        mbar_arrive(sbase + L::BAR + 8 * s);
        if (++t_u == T) {
            t_u = 0;
            tile_u += gridDim.x;
        }
    }
}

struct APacked {
    unsigned w[2][4];  // packed words of rows r, r + 8 (as AStage)
    unsigned s[2][2];  // their scale words
};

// The consumer's packed words and scale words of one stage slot (rows lrow, lrow + 8 of the tile).
template <int G, int CW, int STG>
__device__ __forceinline__ void lds_a(const unsigned char* base, int s, int lrow, int t4, APacked& P) {
    using L = WgpLayout<CW, STG>;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = s * L::ROWS + lrow + 8 * h;
        const unsigned char* a = base + L::A + row * PACKED_BYTES;
        if (G == 128) {
            const uint4 v = *reinterpret_cast<const uint4*>(a + 16 * t4);
            P.w[h][0] = v.x; P.w[h][1] = v.y; P.w[h][2] = v.z; P.w[h][3] = v.w;
            P.s[h][0] = *reinterpret_cast<const unsigned*>(base + L::ASC + row * 4 * SCALE_WORDS);
            P.s[h][1] = 0u;
        } else {
#pragma unroll
            for (int g = 0; g < 2; ++g) {
                const uint2 v = *reinterpret_cast<const uint2*>(a + 32 * g + 8 * t4);
                P.w[h][2 * g] = v.x;
                P.w[h][2 * g + 1] = v.y;
            }
            const uint2 sc = *reinterpret_cast<const uint2*>(base + L::ASC + row * 4 * SCALE_WORDS);
            P.s[h][0] = sc.x;
            P.s[h][1] = sc.y;
        }
    }
}

// Fragments and float scales of stage ts from its packed words; mpar: parity of m * ng a row.
template <int G>
__device__ __forceinline__ void unpack_p(const APacked& P, int ts, int ng, const int (&mpar)[2],
                                         AFrag& a) {
    constexpr int GPS = STAGE_K / G;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        a.f[j][0] = evens(P.w[0][j]);
        a.f[j][1] = evens(P.w[1][j]);
        a.f[j][2] = odds(P.w[0][j]);
        a.f[j][3] = odds(P.w[1][j]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j0 = (mpar[h] + ts * GPS) & 1;
#pragma unroll
        for (int g = 0; g < 2; ++g)
            a.s[h][g] = g < GPS && ts * GPS + g < ng ? half_at(P.s[h][0], P.s[h][1], j0 + g) : 0.f;
    }
}

// Unit (group g of the stage, 64-column half H): its k32 steps into a fresh INT32 sum, one wgmma
// group, not waited for.
template <int G, int g, int H>
__device__ __forceinline__ void issue_unit(int (&x)[32], unsigned (&af)[4][4], unsigned long long desc) {
    issue_half<g * (G / 32), G / 32, H>(x, af, desc);
}

// Epilogue of the 64-column half H (acc[32H + 4j + 2h + c]: row r + 8h, column n0 + 64H + 8j +
// 2t + c) with that half's outlier sum xo; scales and bias read here (SERIAL: no registers to
// hold them earlier).
template <int H>
__device__ __forceinline__ void epilogue_half(GEMM_ARGS, const float (&acc)[64], const int (&xo)[32],
                                              const long long (&m)[2], const bool (&valid)[2],
                                              int t4, int n0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!valid[h]) continue;
        const float soa = k > 0 ? __half2float(a_oscale[m[h]]) : 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int n = n0 + 64 * H + 8 * j + 2 * t4;
            if (n >= N) continue;
            float v0 = acc[32 * H + 4 * j + 2 * h], v1 = acc[32 * H + 4 * j + 2 * h + 1];
            if (k > 0) {
                const float2 sow = __half22float2(*reinterpret_cast<const __half2*>(w_oscale + n));
                v0 = fmaf((float)xo[4 * j + 2 * h], soa * sow.x, v0);
                v1 = fmaf((float)xo[4 * j + 2 * h + 1], soa * sow.y, v1);
            }
            if (bias != nullptr) {
                const float2 b = __half22float2(*reinterpret_cast<const __half2*>(bias + n));
                v0 += b.x;
                v1 += b.y;
            }
            *reinterpret_cast<__half2*>(y + m[h] * N + n) = __floats2half2_rn(v0, v1);
        }
    }
}

template <int G, int CW, int STG, bool PIPE>
__device__ void wgp_consume(GEMM_ARGS, unsigned char* base, int tiles_n, int tiles, int Tn, int T,
                            int cw) {
    using L = WgpLayout<CW, STG>;
    constexpr int GPS = STAGE_K / G;
    const int q = threadIdx.x - WG_THREADS * (1 + cw);
    const int warp = q >> 5, lane = q & 31, r = lane >> 2, t4 = lane & 3;
    const int ng = Kn / G;
    const int lrow = 64 * cw + 16 * warp + r;  // tile rows lrow, lrow + 8
    const unsigned sbase = smem_u32(base), full = sbase + L::BAR, empty = full + 8 * STG;
    const unsigned b_base = sbase + L::B;
    const float* wsc = reinterpret_cast<const float*>(base + L::WSC);
    auto desc_of = [&](int gs) { return sw128_desc(b_base + (gs % STG) * B_STAGE); };
    auto wait_full = [&](int gs) { mbar_wait(full + 8 * (gs % STG), (gs / STG) & 1); };

    int gs0 = 0;  // global stage index of the tile's first stage
#pragma unroll 1
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, gs0 += T) {
        const WgpTile c = wgp_tile(tile, tiles_n);
        const int n0 = c.tn * TILE_N;
        const int row0 = c.tm * L::ROWS + lrow;  // rows row0, row0 + 8 (clamped to 0 past M)
        int mpar[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) mpar[h] = row0 + 8 * h < M ? ((row0 + 8 * h) * ng) & 1 : 0;
        auto rows = [&](long long (&m)[2], bool (&valid)[2]) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                valid[h] = row0 + 8 * h < M;
                m[h] = valid[h] ? row0 + 8 * h : 0;
            }
        };
        float acc[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.f;
        int x0[32], x1[32];
        unsigned of[4][4];  // the first outlier stage's A fragments, loaded during the last stage

        if (PIPE) {
            // Stage ts: its unit 0 is in flight (issued by the previous stage). MORE: a next stage
            // exists; its unit 0 is issued here (compile-time, so no branch while wgmmas are in
            // flight: a control-flow merge there serializes every wgmma, ptxas C7515).
            auto stage = [&](auto more_t, int ts, AFrag& Fc, AFrag& Fn) {
                constexpr bool MORE = decltype(more_t)::value;
                const int gs = gs0 + ts;
                const unsigned long long desc = desc_of(gs);
                const float* sw = wsc + (gs % STG) * SCALE_STAGE;
                APacked P;
                auto prefetch = [&]() {  // next stage's packed words (or the outlier fragments)
                    if (MORE) {
                        wait_full(gs + 1);
                        lds_a<G, CW, STG>(base, (gs + 1) % STG, lrow, t4, P);
                    } else if (k > 0) {
                        long long m[2];
                        bool valid[2];
                        rows(m, valid);
                        load_outlier_frags(a_out, k, m, valid, 0, t4, of);
                    }
                };
                auto last = [&](int g) {  // issue the next stage's unit 0, fold this stage's last
                    if (MORE) {
                        unpack_p<G>(P, ts + 1, ng, mpar, Fn);
                        issue_unit<G, 0, 0>(x0, Fn.f, desc_of(gs + 1));
                        wg_wait<1>();
                    } else {
                        wg_wait<0>();
                    }
                    fence_regs(x1);
                    fold_half<1>(acc, x1, Fc.s[0][g], Fc.s[1][g], sw + g * TILE_N, t4);
                };
                if constexpr (G == 128) {
                    issue_unit<G, 0, 1>(x1, Fc.f, desc);
                    prefetch();
                    wg_wait<1>();
                    fence_regs(x0);
                    fold_half<0>(acc, x0, Fc.s[0][0], Fc.s[1][0], sw, t4);
                    last(0);
                } else {
                    issue_unit<G, 0, 1>(x1, Fc.f, desc);
                    wg_wait<1>();
                    fence_regs(x0);
                    fold_half<0>(acc, x0, Fc.s[0][0], Fc.s[1][0], sw, t4);
                    issue_unit<G, 1, 0>(x0, Fc.f, desc);
                    wg_wait<1>();
                    fence_regs(x1);
                    fold_half<1>(acc, x1, Fc.s[0][0], Fc.s[1][0], sw, t4);
                    issue_unit<G, 1, 1>(x1, Fc.f, desc);
                    prefetch();
                    wg_wait<1>();
                    fence_regs(x0);
                    fold_half<0>(acc, x0, Fc.s[0][1], Fc.s[1][1], sw + TILE_N, t4);
                    last(1);
                }
                mbar_arrive(empty + 8 * (gs % STG));
            };
            using yes = Flag<true>;
            using no = Flag<false>;
            AFrag F0, F1;
            {
                APacked P;
                wait_full(gs0);
                lds_a<G, CW, STG>(base, gs0 % STG, lrow, t4, P);
                unpack_p<G>(P, 0, ng, mpar, F0);
            }
            issue_unit<G, 0, 0>(x0, F0.f, desc_of(gs0));
            int ts = 0;
#pragma unroll 1
            for (; ts + 2 < Tn; ts += 2) {  // by two: the fragment buffers swap roles
                stage(yes(), ts, F0, F1);
                stage(yes(), ts + 1, F1, F0);
            }
            if (ts + 1 < Tn) {
                stage(yes(), ts, F0, F1);
                stage(no(), ts + 1, F1, F0);
            } else {
                stage(no(), ts, F0, F1);
            }
        } else {
#pragma unroll 1
            for (int ts = 0; ts < Tn; ++ts) {
                const int gs = gs0 + ts;
                const unsigned long long desc = desc_of(gs);
                const float* sw = wsc + (gs % STG) * SCALE_STAGE;
                AFrag F;
                {
                    APacked P;
                    wait_full(gs);
                    lds_a<G, CW, STG>(base, gs % STG, lrow, t4, P);
                    unpack_p<G>(P, ts, ng, mpar, F);
                }
                if (ts + 1 == Tn && k > 0) {
                    long long m[2];
                    bool valid[2];
                    rows(m, valid);
                    load_outlier_frags(a_out, k, m, valid, 0, t4, of);
                }
                auto group = [&](auto g_t) {  // both halves of group g, one after the other
                    constexpr int g = decltype(g_t)::value;
                    issue_unit<G, g, 0>(x0, F.f, desc);
                    wg_wait<0>();
                    fence_regs(x0);
                    fold_half<0>(acc, x0, F.s[0][g], F.s[1][g], sw + g * TILE_N, t4);
                    issue_unit<G, g, 1>(x0, F.f, desc);
                    wg_wait<0>();
                    fence_regs(x0);
                    fold_half<1>(acc, x0, F.s[0][g], F.s[1][g], sw + g * TILE_N, t4);
                };
                group(Int<0>());
                if constexpr (GPS == 2) group(Int<1>());
                mbar_arrive(empty + 8 * (gs % STG));
            }
        }

        // Outlier block: natural K order, A fragments as stored, INT32 over all outlier stages.
        long long m[2];
        bool valid[2];
        rows(m, valid);
        if (PIPE) {  // both halves at once (x0, x1), epilogue scales loaded before the wait
            EpiScales e;
            load_epilogue(GEMM_PASS, m, t4, e, n0);
            if (k > 0) {
#pragma unroll 1
                for (int ts = Tn; ts < T; ++ts) {
                    if (ts > Tn) load_outlier_frags(a_out, k, m, valid, (ts - Tn) * STAGE_K, t4, of);
                    const int gs = gs0 + ts;
                    wait_full(gs);
                    const unsigned long long desc = desc_of(gs);
                    pin_fragments<0, 4>(of);
                    wg_fence();
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        wgmma_rs_n64(x0, of[j], desc + 2 * j, ts > Tn || j > 0);
                        wgmma_rs_n64(x1, of[j], desc + ((64 * 128) >> 4) + 2 * j, ts > Tn || j > 0);
                    }
                    wg_commit();
                    wg_wait<0>();
                    fence_regs(x0);
                    fence_regs(x1);
                    mbar_arrive(empty + 8 * (gs % STG));
                }
            }
            epilogue(GEMM_PASS, acc, [&](int i) { return i < 32 ? x0[i] : x1[i - 32]; }, e, m, valid,
                     t4, n0);
        } else {  // one half at a time in x0; the outlier stages are released after both halves
            auto outlier_half = [&](auto h_t) {
                constexpr int H = decltype(h_t)::value;
#pragma unroll 1
                for (int ts = Tn; ts < T; ++ts) {
                    if (ts > Tn || (H == 1 && T - Tn > 1))
                        load_outlier_frags(a_out, k, m, valid, (ts - Tn) * STAGE_K, t4, of);
                    const int gs = gs0 + ts;
                    if (H == 0) wait_full(gs);
                    const unsigned long long desc = desc_of(gs);
                    pin_fragments<0, 4>(of);
                    wg_fence();
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        wgmma_rs_n64(x0, of[j], desc + ((H * 64 * 128) >> 4) + 2 * j, ts > Tn || j > 0);
                    wg_commit();
                    wg_wait<0>();
                    fence_regs(x0);
                }
                epilogue_half<H>(GEMM_PASS, acc, x0, m, valid, t4, n0);
            };
            outlier_half(Int<0>());
            outlier_half(Int<1>());
#pragma unroll 1
            for (int ts = Tn; ts < T; ++ts) mbar_arrive(empty + 8 * ((gs0 + ts) % STG));
        }
    }
}

// Registers: the launch gives (CW + 1) x 128 threads the pool of 65536 (CW = 2: 168 each, CW = 3:
// 128); setmaxnreg moves the producer's share to the consumers: 56 / 224 and 56 / 152 (at 40 the
// producer spilled its cursors every stage).
#define WGP_PRODUCER_REGS 56
template <int G, int CW, int STG, bool PIPE>
__device__ void gemm_wgp(GEMM_ARGS) {
    constexpr int CONSUMER = CW == 2 ? 224 : 152;
    unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    using L = WgpLayout<CW, STG>;
    const int Tn = (Kn / 2 + PACKED_BYTES - 1) / PACKED_BYTES;
    const int T = Tn + (k + STAGE_K - 1) / STAGE_K;
    const int tiles_n = (N + TILE_N - 1) / TILE_N;
    const int tiles = tiles_n * ((M + L::ROWS - 1) / L::ROWS);
    if (threadIdx.x == 0) {
        const unsigned full = smem_u32(base) + L::BAR;
        for (int s = 0; s < STG; ++s) {
            mbar_init(full + 8 * s, WG_THREADS);
            mbar_init(full + 8 * (STG + s), CW * WG_THREADS);
        }
    }
    __syncthreads();
    if (threadIdx.x < WG_THREADS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(WGP_PRODUCER_REGS));
        wgp_produce<G, CW, STG>(GEMM_PASS, base, tiles_n, tiles, Tn, T);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER));
        wgp_consume<G, CW, STG, PIPE>(GEMM_PASS, base, tiles_n, tiles, Tn, T,
                                      threadIdx.x / WG_THREADS - 1);
    }
}

// Dynamic shared memory: WgpLayout<CW, STG>::BYTES + 1024 (alignment slack); atom_lab/kernel_ops.py
// computes the same number (WGP_STAGES).
#define DEFINE_WGP(NAME, G, CW, STG, PIPE)                                                    \
    extern "C" __global__ void __launch_bounds__((CW + 1) * WG_THREADS, 1) NAME(GEMM_ARGS) {  \
        gemm_wgp<G, CW, STG, PIPE>(GEMM_PASS);                                                \
    }

DEFINE_WGP(w4a4_gemm_wgp_m128_g128, 128, 2, 6, true)
DEFINE_WGP(w4a4_gemm_wgp3_m192_g128, 128, 3, 6, false)  // three consumer warpgroups
#ifndef WG_ONLY_G128
DEFINE_WGP(w4a4_gemm_wgp_m128_g64, 64, 2, 6, true)
DEFINE_WGP(w4a4_gemm_wgp3_m192_g64, 64, 3, 6, false)
#endif

// ------------------------------------------------------------------------------ wgmma peak
// Shared-memory-resident INT8 wgmma rate (no global traffic in the loop): every warpgroup
// repeats four k32 steps into its own accumulators, waiting once per four. "ss" issues
// m64n256k32 with both operands from shared memory (the largest tile); "rs" issues the GEMM's
// own m64n128k32 with A from registers. atom_lab/kernel_ops.py turns the time into TOPS.
#define D128_LIST                                                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
    "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "  \
    "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "  \
    "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "    \
    "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "  \
    "%123, %124, %125, %126, %127}"
#define D128 D64, D8(64), D8(72), D8(80), D8(88), D8(96), D8(104), D8(112), D8(120)

__device__ __forceinline__ void wgmma_ss_n256(int (&d)[128], unsigned long long da,
                                              unsigned long long db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 " D128_LIST ", %128, %129, 1;\n"
                 : D128
                 : "l"(da), "l"(db));
}

#define PEAK_TILE_ROWS (64 + 256)

__device__ __forceinline__ unsigned char* peak_tiles(unsigned char* raw, unsigned seed) {
    unsigned char* t = raw + ((1024 - (smem_u32(raw) & 1023)) & 1023);
    for (int i = threadIdx.x; i < PEAK_TILE_ROWS * 128; i += blockDim.x)
        t[i] = (unsigned char)((i * 2654435761u + seed) >> 24);  // not zeros: data-independent timing is not assumed
    fence_proxy_async();
    __syncthreads();
    return t;
}

// A fragments of the register-A peak loops: any non-zero values (timing does not depend on them).
__device__ __forceinline__ void peak_fragments(unsigned (&a)[4][4], unsigned s) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) a[j][i] = s * (2u * (4 * j + i) + 3u);
}

template <int N>
__device__ __forceinline__ void peak_store(const int (&d)[N], int* out) {
    int total = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) total ^= d[i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

extern "C" __global__ void __launch_bounds__(3 * WG_THREADS, 1)
    wgmma_s8_peak_ss(const unsigned* __restrict__ seed, int iters, int* __restrict__ out) {
    const unsigned char* t = peak_tiles(smem_raw, seed[0]);
    const unsigned long long da = sw128_desc(smem_u32(t)), db = sw128_desc(smem_u32(t) + 64 * 128);
    int d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0;
#pragma unroll 1
    for (int it = 0; it < iters; ++it) {
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_ss_n256(d, da + 2 * j, db + 2 * j);
        wg_commit();
        wg_wait0();
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+r"(d[i])::"memory");
    peak_store(d, out);
}

extern "C" __global__ void __launch_bounds__(3 * WG_THREADS, 1)
    wgmma_s8_peak_rs(const unsigned* __restrict__ seed, int iters, int* __restrict__ out) {
    const unsigned char* t = peak_tiles(smem_raw, seed[0]);
    const unsigned long long db = sw128_desc(smem_u32(t) + 64 * 128);
    unsigned a[4][4];
    peak_fragments(a, seed[threadIdx.x & 31]);
    int d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0;
#pragma unroll 1
    for (int it = 0; it < iters; ++it) {
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_rs(d, a[j], db + 2 * j, 1);
        wg_commit();
        wg_wait0();
    }
    fence_regs(d);
    peak_store(d, out);
}

// ------------------------------------------------------------------------- fold ceiling probe
// Round 11 diagnostic: the wgmma rate left when every K-group of 128 is folded as this format
// needs, with nothing else in the loop (operands resident in shared memory and registers, no
// global traffic, no unpack): an upper bound for any kernel of the format on INT8 wgmma.
// Each warpgroup issues the W4A4 kernel's m64n128k32 (A from registers) four k32 steps into a
// fresh INT32 sum, waits, and folds its 64 accumulators as the kernel does: I2FP, FMUL (sa * sw),
// FFMA, the group's scales read from shared memory (a thread's 32 column scales as 8 16-byte
// words, its two row scales). With 2 or 3 warpgroups a SM, one folds while the others' wgmmas run.
#define FOLD_SCALE_SETS 4  // scale sets cycled over the groups, so no load can leave the loop

__device__ __forceinline__ const float* fold_probe_scales(unsigned char* tiles) {
    // [set][4 quads][32] column scales, then [set][64] row scales
    float* s = reinterpret_cast<float*>(tiles + PEAK_TILE_ROWS * 128);
    for (int i = threadIdx.x; i < FOLD_SCALE_SETS * (128 + 64); i += blockDim.x)
        s[i] = 1.0f + (float)(i % 97) * 1e-3f;
    __syncthreads();
    return s;
}

// PINGPONG (2 warpgroups): FlashAttention-3's schedule. Warpgroup w issues its wgmmas only after
// the other one has issued its own (named barriers 1 + w), so the two groups queue back to back
// on the tensor cores and one warpgroup folds while the other's group runs.
template <int WGS, bool PINGPONG>
__device__ __forceinline__ void fold_probe(const unsigned* __restrict__ seed, int iters,
                                           float* __restrict__ out) {
    unsigned char* t = peak_tiles(smem_raw, seed[0]);
    const float* scales = fold_probe_scales(t);
    const unsigned long long db = sw128_desc(smem_u32(t) + 64 * 128);
    const int lane = threadIdx.x & 31, row = (threadIdx.x & 127) / 32 * 16 + lane / 4;
    unsigned a[4][4];
    peak_fragments(a, seed[lane]);
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    int d[64];
    const int wg = threadIdx.x / 128;
    if (PINGPONG && wg == 1) asm volatile("bar.arrive 1, 256;" ::: "memory");  // warpgroup 0 first
#pragma unroll 1
    for (int it = 0; it < iters; ++it) {
        if (PINGPONG) asm volatile("bar.sync %0, 256;" ::"r"(1 + wg) : "memory");
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_rs(d, a[j], db + 2 * j, j);
        wg_commit();
        if (PINGPONG) asm volatile("bar.arrive %0, 256;" ::"r"(2 - wg) : "memory");
        wg_wait0();
        fence_regs(d);
        const int set = it % FOLD_SCALE_SETS;
        const float4* sw = reinterpret_cast<const float4*>(scales + set * 128 + (lane & 3) * 32);
        const float sa0 = scales[FOLD_SCALE_SETS * 128 + set * 64 + row];
        const float sa1 = scales[FOLD_SCALE_SETS * 128 + set * 64 + row + 8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {  // column octets 2q, 2q + 1
            const float4 w = sw[q];
            const float c[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int i = 8 * q + e;  // element 4j + 2h + c: row r + 8h, column 8j + 2t + c
                acc[i] = fmaf((float)d[i], ((e & 2) ? sa1 : sa0) * c[(e >> 2) * 2 + (e & 1)], acc[i]);
            }
        }
    }
    if (PINGPONG && wg == 0) asm volatile("bar.sync 1, 256;" ::: "memory");  // the last arrival
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < 64; ++i) total += acc[i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

#define DEFINE_FOLD_PROBE(NAME, WGS, PINGPONG)                                                  \
    extern "C" __global__ void __launch_bounds__((WGS) * WG_THREADS, 1)                         \
        NAME(const unsigned* __restrict__ seed, int iters, float* __restrict__ out) {          \
        fold_probe<WGS, PINGPONG>(seed, iters, out);                                            \
    }
DEFINE_FOLD_PROBE(wgmma_fold_probe_wg2, 2, false)
DEFINE_FOLD_PROBE(wgmma_fold_probe_wg3, 3, false)
DEFINE_FOLD_PROBE(wgmma_fold_probe_pingpong, 2, true)
