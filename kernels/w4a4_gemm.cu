// W4A4 mixed-precision GEMM on INT8 tensor cores: Y[M, N] = A_hat @ W_hat^T (+ bias), FP16 out.
//
// Operands are formats.MixedQuantized: normal columns as signed 4-bit codes nibble-packed along K
// (byte j = element 2j low nibble, 2j+1 high nibble) with one fp16 scale per (row, group of G),
// then k INT8 outlier columns with one fp16 scale per row.
//
// Hopper has no INT4 tensor cores, so codes are unpacked in registers to INT8 and multiplied with
// mma.sync m16n8k32 s8. A 32-bit word of 8 packed codes gives two int8x4 registers with two logic
// ops each: w & 0xF0F0F0F0 holds the odd elements and (w << 4) & 0xF0F0F0F0 the even ones, both
// as 16 * code in exact two's complement. Products are therefore 256x too large; the 1/256 is
// applied once at the end. The even/odd split permutes K inside each 32-element chunk; A and W use
// the same permutation, so the dot product is unchanged.
//
// Per-group scaling: each K-group is accumulated in INT32 starting from the bit pattern of
// 12582912.0f (0x4B400000). As long as |dot| < 2^22 (true: |16q|^2 * 128 <= 2^21), the result's
// bits read as the float 12582912 + dot exactly, so the int->float conversion costs one FADD
// instead of a quarter-rate I2F. Then acc += (f - 12582912) * (sa[m,g] * sw[n,g]) in FP32.
// The outlier block is accumulated in INT32 over all k and scaled once by so_a[m] * so_w[n].
//
// Two kernels share this file:
//   w4a4_gemm_tc_*: tiles of BM x 128 (BM = 64 or 128), 4-stage cp.async pipeline into swizzled
//     shared memory, ldmatrix fragments; for M beyond a few dozen rows.
//   w4a4_gemm_skinny_*: small M (<= 64 rows a block). Weight-bandwidth bound: fragments load straight
//     from global memory (16-byte vectors: each thread's 4 words of a 128-group), 8 warps split K
//     and reduce through shared memory.
// Requirements (checked by atom_lab/kernel_ops.py): K - k a multiple of G and of 64, G in {64, 128},
// k a multiple of 16 (<= 256), N even, 16-byte aligned rows.
#include <cuda_fp16.h>

#include "w4a4_common.cuh"  // unpack, shared-memory address, cp.async, mbarrier helpers

#include "gemv_timeline.cuh"  // debug timeline (-DGEMV_TIMELINE) of the skinny kernel

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                       unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Not volatile, so the compiler may interleave it with unpacking and folding. With `start` the
// accumulator input is the constant c instead of d: a new K-group starts without resetting d.
__device__ __forceinline__ void mma_s8_sched(int (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                             unsigned a3, unsigned b0, unsigned b1, bool start,
                                             int c) {
    if (start) {
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%10,%10,%10};\n"
            : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c));
    } else {
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// acc += (int_bits_as_float(group) - magic) * s, for the 4 outputs of one m16n8 fragment.
__device__ __forceinline__ void fold_group(float (&acc)[4], const int (&grp)[4], float s00,
                                           float s01, float s10, float s11) {
    acc[0] = fmaf(__int_as_float(grp[0]) - MAGIC_F, s00, acc[0]);
    acc[1] = fmaf(__int_as_float(grp[1]) - MAGIC_F, s01, acc[1]);
    acc[2] = fmaf(__int_as_float(grp[2]) - MAGIC_F, s10, acc[2]);
    acc[3] = fmaf(__int_as_float(grp[3]) - MAGIC_F, s11, acc[3]);
}

__device__ __forceinline__ void store_pair(__half* __restrict__ y, const __half* __restrict__ bias,
                                           long long m, int n, int N, float v0, float v1) {
    if (bias != nullptr) {
        v0 += __half2float(bias[n]);
        v1 += __half2float(bias[n + 1]);
    }
    *reinterpret_cast<__half2*>(y + m * N + n) = __floats2half2_rn(v0, v1);
}

#define GEMM_ARGS                                                                              \
    const unsigned char *__restrict__ a_codes, const __half *__restrict__ a_scales,             \
        const signed char *__restrict__ a_out, const __half *__restrict__ a_oscale,             \
        const unsigned char *__restrict__ w_codes, const __half *__restrict__ w_scales,         \
        const signed char *__restrict__ w_out, const __half *__restrict__ w_oscale,             \
        const __half *__restrict__ bias, __half *__restrict__ y, int M, int N, int Kn, int k TL_ARG
#define GEMM_PASS \
    a_codes, a_scales, a_out, a_oscale, w_codes, w_scales, w_out, w_oscale, bias, y, M, N, Kn, \
        k TL_PASS

// ---------------------------------------------------------------------------------------------
// Tensor-core tiled kernel. CTA tile BM x 128, warps WARPS_M x 4, warp tile 64 x 32.
// A K-tile is 64 bytes of every row: 128 packed normal columns (1 or 2 groups) or 64 outliers.
// Shared memory rows are 64 bytes; 16-byte chunk c of row r sits at chunk c ^ ((r >> 1) & 3),
// which makes every ldmatrix phase (8 rows, one chunk) hit 8 distinct bank quads.
// ---------------------------------------------------------------------------------------------
#define TC_STAGES 4
#define TC_BN 128
#define TILE_BYTES 64

__device__ __forceinline__ int swz(int r, int c) { return r * TILE_BYTES + ((c ^ ((r >> 1) & 3)) << 4); }

template <int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(unsigned char* dst, const unsigned char* __restrict__ base,
                                          long long stride, int row0, int nrows, int off, int limit) {
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * 4; i += THREADS) {
        const int r = i >> 2, c = i & 3;
        const bool valid = row0 + r < nrows && off + c * 16 < limit;
        const unsigned char* src = valid ? base + (row0 + r) * stride + off + c * 16 : base;
        cp_async16(smem_u32(dst + swz(r, c)), src, valid);
    }
}

// V2 (the default): both halves' fragments are loaded at the top of a K-tile, mma is schedulable
// and a group starts from the constant magic accumulator. V1 (kept for comparison): per-half
// fragment loads, ordered (volatile) mma, explicit accumulator reset after each fold.
template <int WARPS_M, int G, bool V2>
__device__ void gemm_tc(GEMM_ARGS) {
    constexpr int BM = 64 * WARPS_M, BN = TC_BN, THREADS = 128 * WARPS_M;
    constexpr int GPT = 128 / G;  // groups per K-tile
    constexpr int SROWS = BM + BN;
    constexpr int SC_PER_THREAD = (SROWS * GPT + THREADS - 1) / THREADS;

    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* sA = smem;                                       // [STAGES][BM][64]
    unsigned char* sB = smem + TC_STAGES * BM * TILE_BYTES;         // [STAGES][BN][64]
    __half* sS = reinterpret_cast<__half*>(smem + TC_STAGES * SROWS * TILE_BYTES);  // [STAGES][GPT][SROWS]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int r = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int kb = Kn / 2, ng = Kn / G;
    const int Tn = (kb + TILE_BYTES - 1) / TILE_BYTES;
    const int T = Tn + (k + TILE_BYTES - 1) / TILE_BYTES;

    auto load_tile = [&](int tile, int stage) {
        unsigned char* dA = sA + stage * BM * TILE_BYTES;
        unsigned char* dB = sB + stage * BN * TILE_BYTES;
        if (tile < Tn) {
            load_rows<BM, THREADS>(dA, a_codes, kb, m0, M, tile * TILE_BYTES, kb);
            load_rows<BN, THREADS>(dB, w_codes, kb, n0, N, tile * TILE_BYTES, kb);
        } else {
            const int off = (tile - Tn) * TILE_BYTES;
            load_rows<BM, THREADS>(dA, reinterpret_cast<const unsigned char*>(a_out), k, m0, M, off, k);
            load_rows<BN, THREADS>(dB, reinterpret_cast<const unsigned char*>(w_out), k, n0, N, off, k);
        }
    };
    // Group scales of a tile travel global -> registers (issued early) -> shared (stored late).
    __half sc_reg[SC_PER_THREAD];
    auto fetch_scales = [&](int tile) {
#pragma unroll
        for (int j = 0; j < SC_PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            const int sub = i / SROWS, row = i % SROWS, gi = tile * GPT + sub;
            __half v = __float2half_rn(0.f);
            if (i < SROWS * GPT && gi < ng) {
                if (row < BM) {
                    if (m0 + row < M) v = a_scales[(long long)(m0 + row) * ng + gi];
                } else if (n0 + row - BM < N) {
                    v = w_scales[(long long)(n0 + row - BM) * ng + gi];
                }
            }
            sc_reg[j] = v;
        }
    };
    auto store_scales = [&](int stage) {
#pragma unroll
        for (int j = 0; j < SC_PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            if (i < SROWS * GPT) sS[stage * GPT * SROWS + i] = sc_reg[j];
        }
    };

    float acc[4][4][4];
    int grp[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[i][j][e] = 0.f;
                grp[i][j][e] = (Tn > 0 && !V2) ? MAGIC_I : 0;
            }

#pragma unroll 1
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < T) {
            load_tile(s, s);
            if (s < Tn) {
                fetch_scales(s);
                store_scales(s);
            }
        }
        cp_async_commit();
    }

#pragma unroll 1
    for (int tile = 0; tile < T; ++tile) {
        cp_async_wait<TC_STAGES - 2>();
        __syncthreads();
        const int next = tile + TC_STAGES - 1;
        if (next < T) {
            load_tile(next, next % TC_STAGES);
            if (next < Tn) fetch_scales(next);
        }
        cp_async_commit();

        const int stage = tile % TC_STAGES;
        const unsigned char* tA = sA + stage * BM * TILE_BYTES;
        const unsigned char* tB = sB + stage * BN * TILE_BYTES;
        const bool normal = tile < Tn;
        unsigned pa[2][4][4], pb[2][2][4];  // fragments of the two 32-byte halves of the tile
        auto load_fragments = [&](int h) {
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const int row = wm * 64 + mt * 16 + (lane & 15);
                ldmatrix_x4(smem_u32(tA + swz(row, 2 * h + (lane >> 4))), pa[h][mt]);
            }
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                const int row = wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(smem_u32(tB + swz(row, 2 * h + ((lane >> 3) & 1))), pb[h][np]);
            }
        };
        if (V2) {
            load_fragments(0);
            load_fragments(1);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // 32-byte halves of the tile
            if (!V2) load_fragments(h);
            if (normal) {
#pragma unroll
                for (int s = 0; s < 2; ++s) {  // chunk 2h + s: one k32 step of unpacked codes
                    const bool start = s == 0 && (G == 64 || h == 0);
#pragma unroll
                    for (int mt = 0; mt < 4; ++mt) {
                        const unsigned lo = pa[h][mt][2 * s], hi = pa[h][mt][2 * s + 1];
                        const unsigned a0 = evens(lo), a1 = evens(hi), a2 = odds(lo), a3 = odds(hi);
#pragma unroll
                        for (int nt = 0; nt < 4; ++nt) {
                            const unsigned q = pb[h][nt >> 1][(nt & 1) * 2 + s];
                            if (V2)
                                mma_s8_sched(grp[mt][nt], a0, a1, a2, a3, evens(q), odds(q), start,
                                             MAGIC_I);
                            else
                                mma_s8(grp[mt][nt], a0, a1, a2, a3, evens(q), odds(q));
                        }
                    }
                }
                if (G == 64 || h == 1) {  // a group ends: fold it into the FP32 accumulator
                    const __half* sa = sS + stage * GPT * SROWS + (G == 64 ? h : 0) * SROWS;
                    const __half* sw = sa + BM;
                    const bool last = tile == Tn - 1 && h == 1;
#pragma unroll
                    for (int mt = 0; mt < 4; ++mt) {
                        const float a_lo = __half2float(sa[wm * 64 + mt * 16 + r]);
                        const float a_hi = __half2float(sa[wm * 64 + mt * 16 + r + 8]);
#pragma unroll
                        for (int nt = 0; nt < 4; ++nt) {
                            const float2 w = __half22float2(
                                *reinterpret_cast<const __half2*>(sw + wn * 32 + nt * 8 + 2 * t));
                            fold_group(acc[mt][nt], grp[mt][nt], a_lo * w.x, a_lo * w.y,
                                       a_hi * w.x, a_hi * w.y);
                            if (!V2 || last) {
#pragma unroll
                                for (int e = 0; e < 4; ++e) grp[mt][nt][e] = last ? 0 : MAGIC_I;
                            }
                        }
                    }
                }
            } else {  // INT8 outliers: the ldmatrix words are the fragments as they are
#pragma unroll
                for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) {
                        const unsigned* q = pb[h][nt >> 1] + (nt & 1) * 2;
                        if (V2)
                            mma_s8_sched(grp[mt][nt], pa[h][mt][0], pa[h][mt][1], pa[h][mt][2],
                                         pa[h][mt][3], q[0], q[1], false, 0);
                        else
                            mma_s8(grp[mt][nt], pa[h][mt][0], pa[h][mt][1], pa[h][mt][2],
                                   pa[h][mt][3], q[0], q[1]);
                    }
            }
        }
        if (next < Tn) store_scales(next % TC_STAGES);
    }
    cp_async_wait<0>();

    // Epilogue: undo the x16 x16 of the unpack, add the outlier block, bias, store fp16.
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const long long m = m0 + wm * 64 + mt * 16 + r + 8 * half;
            if (m >= M) continue;
            const float soa = k > 0 ? __half2float(a_oscale[m]) : 0.f;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int n = n0 + wn * 32 + nt * 8 + 2 * t;
                if (n >= N) continue;
                float v0 = acc[mt][nt][2 * half] * (1.f / 256.f);
                float v1 = acc[mt][nt][2 * half + 1] * (1.f / 256.f);
                if (k > 0) {
                    v0 = fmaf((float)grp[mt][nt][2 * half], soa * __half2float(w_oscale[n]), v0);
                    v1 = fmaf((float)grp[mt][nt][2 * half + 1], soa * __half2float(w_oscale[n + 1]), v1);
                }
                store_pair(y, bias, m, n, N, v0, v1);
            }
        }
}

// ---------------------------------------------------------------------------------------------
// Skinny kernel for small M: CTA = 8 warps over a (16*MT) x (8*NT) output tile; warp w takes
// groups w, w+8, ... and outlier 32-chunks w, w+8, ...; partial sums meet in shared memory.
// Thread (r, t) of a warp loads, per row and group, the t-th quarter of the group's bytes (one
// 16-byte vector for G = 128); its word j feeds k32 step j. A and W use the same assignment.
// ---------------------------------------------------------------------------------------------
#define SK_WARPS 8

template <int MT, int NT, int G>
struct SkinnyGroup {
    static constexpr int WORDS = G / 32;
    unsigned a[MT][2][WORDS];
    unsigned b[NT][WORDS];
    float sa[MT][2];
    float sw[NT][2];
};

template <int MT, int NT, int G>
__device__ __forceinline__ void skinny_fetch(SkinnyGroup<MT, NT, G>& f, int gi, GEMM_ARGS) {
    constexpr int WORDS = G / 32;
    const int lane = threadIdx.x & 31, r = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * 16 * MT, n0 = blockIdx.x * 8 * NT;
    const int kb = Kn / 2, ng = Kn / G;
    const int off = gi * (G / 2) + t * WORDS * 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long m = m0 + mt * 16 + r + 8 * h;
            const bool ok = m < M;
            load_words<WORDS>(a_codes + m * kb + off, ok, f.a[mt][h]);
            f.sa[mt][h] = ok ? __half2float(a_scales[m * ng + gi]) : 0.f;
        }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const long long n = n0 + nt * 8 + r;
        load_words<WORDS>(w_codes + n * kb + off, n < N, f.b[nt]);
        const long long c = n0 + nt * 8 + 2 * t;
        f.sw[nt][0] = c < N ? __half2float(w_scales[c * ng + gi]) : 0.f;
        f.sw[nt][1] = c < N ? __half2float(w_scales[(c + 1) * ng + gi]) : 0.f;
    }
}

template <int MT, int NT, int G>
__device__ __forceinline__ void skinny_group(const SkinnyGroup<MT, NT, G>& f, float (&acc)[MT][NT][4]) {
    constexpr int WORDS = G / 32;
    int grp[MT][NT][4];
#pragma unroll
    for (int j = 0; j < WORDS; ++j)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const unsigned lo = f.a[mt][0][j], hi = f.a[mt][1][j];
            const unsigned a0 = evens(lo), a1 = evens(hi), a2 = odds(lo), a3 = odds(hi);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                mma_s8_sched(grp[mt][nt], a0, a1, a2, a3, evens(f.b[nt][j]), odds(f.b[nt][j]),
                             j == 0, MAGIC_I);
        }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            fold_group(acc[mt][nt], grp[mt][nt], f.sa[mt][0] * f.sw[nt][0], f.sa[mt][0] * f.sw[nt][1],
                       f.sa[mt][1] * f.sw[nt][0], f.sa[mt][1] * f.sw[nt][1]);
}

// Each warp's next group is fetched (one group ahead, in registers) while the current one is
// multiplied. (Fetching 2-4 groups at once measured slower at N >= 11008: more registers, fewer
// resident CTAs.)
template <int MT, int NT, int G>
__device__ void gemm_skinny(GEMM_ARGS) {
    constexpr int TM = 16 * MT, TN = 8 * NT;
    __shared__ float red[SK_WARPS][TM][TN];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const int ng = Kn / G;

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    TL_BEGIN;
    SkinnyGroup<MT, NT, G> cur, nxt;
    if (warp < ng) skinny_fetch<MT, NT, G>(cur, warp, GEMM_PASS);
    TL_MARK(1, 0u);
#pragma unroll 1
    for (int gi = warp; gi < ng; gi += SK_WARPS) {
        if (gi + SK_WARPS < ng) skinny_fetch<MT, NT, G>(nxt, gi + SK_WARPS, GEMM_PASS);
        if (gi + SK_WARPS >= ng) TL_MARK(3, cur.b[0][0]);
        skinny_group<MT, NT, G>(cur, acc);
        if (gi == warp) TL_MARK(2, __float_as_uint(acc[0][0][0]));
        cur = nxt;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= 1.f / 256.f;

    // Outlier block: 32 INT8 columns a k32 step; thread t holds bytes 8t..8t+7 of the chunk.
    if (k > 0) {
        int oacc[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) oacc[mt][nt][e] = 0;
        const int chunks = (k + 31) / 32;
#pragma unroll 1
        for (int oc = warp; oc < chunks; oc += SK_WARPS) {
            const int off = oc * 32 + t * 8;
            const bool in_k = off < k;
            unsigned aw[MT][2][2], bw[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const long long m = m0 + mt * 16 + r + 8 * h;
                    load_words<2>(reinterpret_cast<const unsigned char*>(a_out) + m * k + off,
                                  in_k && m < M, aw[mt][h]);
                }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const long long n = n0 + nt * 8 + r;
                load_words<2>(reinterpret_cast<const unsigned char*>(w_out) + n * k + off,
                              in_k && n < N, bw[nt]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mma_s8(oacc[mt][nt], aw[mt][0][0], aw[mt][1][0], aw[mt][0][1], aw[mt][1][1],
                           bw[nt][0], bw[nt][1]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const long long m = m0 + mt * 16 + r + 8 * h;
                const float soa = m < M ? __half2float(a_oscale[m]) : 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int n = n0 + nt * 8 + 2 * t;
                    const float sw0 = n < N ? __half2float(w_oscale[n]) : 0.f;
                    const float sw1 = n < N ? __half2float(w_oscale[n + 1]) : 0.f;
                    acc[mt][nt][2 * h] = fmaf((float)oacc[mt][nt][2 * h], soa * sw0, acc[mt][nt][2 * h]);
                    acc[mt][nt][2 * h + 1] =
                        fmaf((float)oacc[mt][nt][2 * h + 1], soa * sw1, acc[mt][nt][2 * h + 1]);
                }
            }
    }

    TL_MARK(4, __float_as_uint(acc[0][0][0]));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                *reinterpret_cast<float2*>(&red[warp][mt * 16 + r + 8 * h][nt * 8 + 2 * t]) =
                    make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
    __syncthreads();
    TL_MARK(5, 0u);
    for (int e = threadIdx.x * 2; e < TM * TN; e += SK_WARPS * 32 * 2) {
        const int row = e / TN, col = e % TN;
        const long long m = m0 + row;
        const int n = n0 + col;
        if (m >= M || n >= N) continue;
        float v0 = 0.f, v1 = 0.f;
#pragma unroll
        for (int w = 0; w < SK_WARPS; ++w) {
            v0 += red[w][row][col];
            v1 += red[w][row][col + 1];
        }
        store_pair(y, bias, m, n, N, v0, v1);
    }
    TL_MARK(6, 0u);
    TL_END;
}

// ---------------------------------------------------------------------------------------------
// Skinny "ring" kernel (round 2): the skinny kernel's fragment assignment, but each thread streams
// its own fragment words through an S-deep cp.async ring in shared memory, so S groups a warp are in
// flight without holding registers (round 1 kept one group ahead in registers and was a chain of
// dependent memory round trips). A thread reads back only the bytes it copied itself, so the ring
// needs no barrier. The tile's group scales go to shared memory once, while the ring fills; the
// warp's outlier chunk is fetched into registers before the group loop.
// Shared memory: ring [S][LOADS][256 threads][VEC bytes], then scales [ng][TM + TN] fp16.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_bytes(unsigned dst, const void* src, bool valid, int bytes) {
    if (bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                     "r"(valid ? 16 : 0));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
                     "r"(valid ? 8 : 0));
}

template <int MT, int NT, int G, int S>
__device__ void gemm_skinny_ring(GEMM_ARGS) {
    constexpr int WORDS = G / 32, VEC = WORDS * 4, LOADS = 2 * MT + NT;
    constexpr int TM = 16 * MT, TN = 8 * NT, THREADS = SK_WARPS * 32;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* sS = reinterpret_cast<__half*>(smem + S * LOADS * THREADS * VEC);  // [ng][TM + TN]
    float* red = reinterpret_cast<float*>(smem);  // [SK_WARPS][TM][TN], after the ring is drained
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, r = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const int kb = Kn / 2, ng = Kn / G;

    // Ring slot of (stage, load j): this thread's VEC bytes.
    auto slot = [&](int stage, int j) { return smem + ((stage * LOADS + j) * THREADS + tid) * VEC; };
    auto issue = [&](int gi, int stage) {  // group gi's fragment words into the ring
        if (gi < ng) {
            const int off = gi * (G / 2) + t * VEC;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const long long m = m0 + mt * 16 + r + 8 * h;
                    cp_async_bytes(smem_u32(slot(stage, 2 * mt + h)),
                                   a_codes + (m < M ? m : 0) * kb + off, m < M, VEC);
                }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const long long n = n0 + nt * 8 + r;
                cp_async_bytes(smem_u32(slot(stage, 2 * MT + nt)),
                               w_codes + (n < N ? n : 0) * kb + off, n < N, VEC);
            }
        }
        cp_async_commit();  // one group per stage, empty or not: wait_group counts stay uniform
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) issue(warp + s * SK_WARPS, s);

    // The warp's outlier chunk (k <= 256 = 8 chunks: at most one a warp), fetched early.
    const int chunks = (k + 31) / 32;
    const bool has_outliers = warp < chunks;
    unsigned aw[MT][2][2], bw[NT][2];
    {
        const int off = warp * 32 + t * 8;
        const bool in_k = has_outliers && off < k;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const long long m = m0 + mt * 16 + r + 8 * h;
                load_words<2>(reinterpret_cast<const unsigned char*>(a_out) + m * k + off,
                              in_k && m < M, aw[mt][h]);
            }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const long long n = n0 + nt * 8 + r;
            load_words<2>(reinterpret_cast<const unsigned char*>(w_out) + n * k + off,
                          in_k && n < N, bw[nt]);
        }
    }
    // Group scales of the tile, transposed to [group][row]: rows 0..TM-1 activations, then weights.
    for (int i = tid; i < (TM + TN) * ng; i += THREADS) {
        const int row = i / ng, gi = i - row * ng;
        __half v = __float2half_rn(0.f);
        if (row < TM) {
            if (m0 + row < M) v = a_scales[(long long)(m0 + row) * ng + gi];
        } else if (n0 + row - TM < N) {
            v = w_scales[(long long)(n0 + row - TM) * ng + gi];
        }
        sS[gi * (TM + TN) + row] = v;
    }
    __syncthreads();

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    SkinnyGroup<MT, NT, G> f;
#pragma unroll 1
    for (int j = 0, gi = warp; gi < ng; ++j, gi += SK_WARPS) {
        issue(gi + (S - 1) * SK_WARPS, (j + S - 1) % S);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(S - 1));
        const int stage = j % S;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                shared_words<WORDS>(slot(stage, 2 * mt + h), f.a[mt][h]);
                f.sa[mt][h] = __half2float(sS[gi * (TM + TN) + mt * 16 + r + 8 * h]);
            }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            shared_words<WORDS>(slot(stage, 2 * MT + nt), f.b[nt]);
            const __half2 sw = *reinterpret_cast<const __half2*>(sS + gi * (TM + TN) + TM + nt * 8 + 2 * t);
            f.sw[nt][0] = __low2float(sw);
            f.sw[nt][1] = __high2float(sw);
        }
        skinny_group<MT, NT, G>(f, acc);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= 1.f / 256.f;

    if (has_outliers) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                int o[4] = {0, 0, 0, 0};
                mma_s8(o, aw[mt][0][0], aw[mt][1][0], aw[mt][0][1], aw[mt][1][1], bw[nt][0], bw[nt][1]);
                const int n = n0 + nt * 8 + 2 * t;
                const float sw0 = n < N ? __half2float(w_oscale[n]) : 0.f;
                const float sw1 = n < N ? __half2float(w_oscale[n + 1]) : 0.f;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const long long m = m0 + mt * 16 + r + 8 * h;
                    const float soa = m < M ? __half2float(a_oscale[m]) : 0.f;
                    acc[mt][nt][2 * h] = fmaf((float)o[2 * h], soa * sw0, acc[mt][nt][2 * h]);
                    acc[mt][nt][2 * h + 1] = fmaf((float)o[2 * h + 1], soa * sw1, acc[mt][nt][2 * h + 1]);
                }
            }
    }

    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // every warp is done with the ring: reuse it for the cross-warp sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                *reinterpret_cast<float2*>(&red[(warp * TM + mt * 16 + r + 8 * h) * TN + nt * 8 + 2 * t]) =
                    make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
    __syncthreads();
    for (int e = tid * 2; e < TM * TN; e += THREADS * 2) {
        const int row = e / TN, col = e % TN;
        const long long m = m0 + row;
        const int n = n0 + col;
        if (m >= M || n >= N) continue;
        float v0 = 0.f, v1 = 0.f;
#pragma unroll
        for (int w = 0; w < SK_WARPS; ++w) {
            v0 += red[(w * TM + row) * TN + col];
            v1 += red[(w * TM + row) * TN + col + 1];
        }
        store_pair(y, bias, m, n, N, v0, v1);
    }
}

#define DEFINE_TC(NAME, WARPS_M, G, V2)                                                 \
    extern "C" __global__ void __launch_bounds__(128 * WARPS_M, 1) NAME(GEMM_ARGS) {    \
        gemm_tc<WARPS_M, G, V2>(GEMM_PASS);                                             \
    }
#define DEFINE_SKINNY(NAME, MT, NT, G)                                                   \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32) NAME(GEMM_ARGS) {       \
        gemm_skinny<MT, NT, G>(GEMM_PASS);                                               \
    }

DEFINE_TC(w4a4_gemm_tc_m128_g128, 2, 128, true)
DEFINE_TC(w4a4_gemm_tc_m128_g64, 2, 64, true)
DEFINE_TC(w4a4_gemm_tc_m64_g128, 1, 128, true)
DEFINE_TC(w4a4_gemm_tc_m64_g64, 1, 64, true)
DEFINE_TC(w4a4_gemm_tc1_m128_g128, 2, 128, false)
DEFINE_TC(w4a4_gemm_tc1_m128_g64, 2, 64, false)
// (name, m16 tiles, n8 tiles, G)
DEFINE_SKINNY(w4a4_gemm_skinny_m16n16_g128, 1, 2, 128)
DEFINE_SKINNY(w4a4_gemm_skinny_m16n16_g64, 1, 2, 64)
DEFINE_SKINNY(w4a4_gemm_skinny_m16n32_g128, 1, 4, 128)
DEFINE_SKINNY(w4a4_gemm_skinny_m16n32_g64, 1, 4, 64)
DEFINE_SKINNY(w4a4_gemm_skinny_m32n16_g128, 2, 2, 128)
DEFINE_SKINNY(w4a4_gemm_skinny_m32n16_g64, 2, 2, 64)
DEFINE_SKINNY(w4a4_gemm_skinny_m64n16_g128, 4, 2, 128)
DEFINE_SKINNY(w4a4_gemm_skinny_m64n16_g64, 4, 2, 64)
#define DEFINE_RING(NAME, MT, NT, G, S)                                                  \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32) NAME(GEMM_ARGS) {       \
        gemm_skinny_ring<MT, NT, G, S>(GEMM_PASS);                                       \
    }
// (name, m16 tiles, n8 tiles, G, ring depth)
DEFINE_RING(w4a4_gemm_ring_m16n16_g128, 1, 2, 128, 4)
DEFINE_RING(w4a4_gemm_ring_m16n16_g64, 1, 2, 64, 4)
DEFINE_RING(w4a4_gemm_ring3_m16n16_g128, 1, 2, 128, 3)
DEFINE_RING(w4a4_gemm_ring3_m16n16_g64, 1, 2, 64, 3)
DEFINE_RING(w4a4_gemm_ring_m16n32_g128, 1, 4, 128, 4)
DEFINE_RING(w4a4_gemm_ring_m16n32_g64, 1, 4, 64, 4)
DEFINE_RING(w4a4_gemm_ring_m32n16_g128, 2, 2, 128, 4)
DEFINE_RING(w4a4_gemm_ring_m32n16_g64, 2, 2, 64, 4)
