// W4A4 GEMM for a few tokens (M <= 16 a launch row): a weight-streaming kernel, Y = A_hat W_hat^T.
//
// Same operands and arithmetic as w4a4_gemm.cu (formats.MixedQuantized; 4-bit codes unpacked to
// INT8 with two logic ops, mma.sync m16n8k32 s8, each K-group accumulated in INT32 from the magic
// constant 0x4B400000 and folded into FP32 with sa * sw). What differs is the organisation, built
// for the HBM stream of the weights:
//   - one CTA a SM (grid = min(SMs, N/8)); CTA c owns a contiguous range of weight-row octets, and
//     the bytes of one octet (8 rows: codes, group scales, outliers, outlier scales) are four
//     contiguous runs of global memory, so a producer warp moves each with ONE bulk copy
//     (cp.async.bulk, completing on an mbarrier) into a ring of S octet slots. Every slot is issued
//     at kernel start (S * 17-46 KB in flight a SM, more than the latency-bandwidth product).
//   - 15 consumer warps split K: warp w owns K-groups [w*ng/15, (w+1)*ng/15) (and one outlier
//     32-column chunk), so its activation fragments (16 tokens x its groups, packed) are loaded
//     from global once into registers and reused for every octet.
//   - per octet each consumer writes its partial m16n8 tile (one float4 a lane) to shared memory
//     and arrives on the slot's "empty" barrier; the producer warp, which waits on that barrier
//     before refilling the slot anyway, sums the 15 partials and writes Y (+ bias). No CTA-wide
//     barrier after the prologue.
// Tokens are the mma A operand (rows gid and gid + 8 of the m16 tile), weight rows the B operand
// (n8 = one octet). HI = false (M <= 8 a tile) leaves the upper 8 token rows as constant zeros.
// gridDim.y walks token tiles (16, or 8 without HI), so any M is correct, but only one tile is
// what it is built for.
//
// Requirements (atom_lab/kernel_ops.py checks them and falls back to the skinny kernel): sm_90,
// 16-byte aligned operands, (K - k) / G <= 15 * GPW groups, k <= 256, and two slots that fit.
#include <cuda_fp16.h>

#include "w4a4_common.cuh"  // unpack, shared-memory address, cp.async, mbarrier helpers

#include "gemv_timeline.cuh"
#include "pdl.cuh"

#define CONSUMERS 15  // + 1 producer = 16 warps: 4 a scheduler, so 128 registers a thread
#define GEMV_THREADS (32 * (CONSUMERS + 1))
#define BARRIER_BYTES 256  // full[S] and empty[S] mbarriers, S <= 16
#define PARTIAL_BYTES (CONSUMERS * 32 * 16)  // one float4 a consumer lane, a slot

// ------------------------------------------------------------------------------------ the mma
__device__ __forceinline__ void mma_s8(int (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                       unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// A K-group's first step starts from the magic constant instead of d (no reset instructions).
__device__ __forceinline__ void mma_s8_start(int (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                             unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(MAGIC_I));
}

// Layout of one octet slot: codes [8][Kn/2] | group scales [8][ng] fp16 | outliers [8][k] |
// outlier scales [8] fp16. Every part is a multiple of 16 bytes (Kn % 64 == 0, k % 16 == 0).
struct SlotLayout {
    unsigned codes, scales, outliers, oscales, bytes;
    __device__ SlotLayout(int kb, int ng, int k) {
        codes = 0;
        scales = 8 * kb;
        outliers = scales + 16 * ng;
        oscales = outliers + 8 * k;
        bytes = oscales + 16;
    }
};

#define GEMV_ARGS                                                                              \
    const unsigned char *__restrict__ a_codes, const __half *__restrict__ a_scales,             \
        const signed char *__restrict__ a_out, const __half *__restrict__ a_oscale,             \
        const unsigned char *__restrict__ w_codes, const __half *__restrict__ w_scales,         \
        const signed char *__restrict__ w_out, const __half *__restrict__ w_oscale,             \
        const __half *__restrict__ bias, __half *__restrict__ y, int M, int N, int Kn, int k,  \
        int slots TL_ARG
#define GEMV_PASS \
    a_codes, a_scales, a_out, a_oscale, w_codes, w_scales, w_out, w_oscale, bias, y, M, N, Kn, k, \
        slots TL_PASS

// The producer's copy of octet o into a slot. Whole octets: four bulk copies by lane 0 on the
// slot's full barrier. The last octet of an N that is not a multiple of 8: the warp copies the
// valid rows with plain loads (their scale run need not be a multiple of 16 bytes), then arrives.
__device__ __forceinline__ void issue_octet(unsigned char* slot, unsigned full, long long o, int N,
                                            int kb, int ng, int k, const SlotLayout& L,
                                            const unsigned char* __restrict__ w_codes,
                                            const __half* __restrict__ w_scales,
                                            const signed char* __restrict__ w_out,
                                            const __half* __restrict__ w_oscale) {
    const int lane = threadIdx.x & 31;
    const int rows = (int)min(8LL, (long long)N - 8 * o);
    if (rows == 8) {
        if (lane == 0) {
            mbar_expect_tx(full, L.bytes);
            bulk_copy(smem_u32(slot + L.codes), w_codes + o * 8 * kb, 8 * kb, full);
            bulk_copy(smem_u32(slot + L.scales), w_scales + o * 8 * ng, 16 * ng, full);
            if (k > 0) bulk_copy(smem_u32(slot + L.outliers), w_out + o * 8 * k, 8 * k, full);
            bulk_copy(smem_u32(slot + L.oscales), w_oscale + o * 8, 16, full);
        }
        return;
    }
    auto copy_words = [&](unsigned char* dst, const void* src, int bytes) {  // bytes % 4 == 0
        const unsigned* s = reinterpret_cast<const unsigned*>(src);
        unsigned* d = reinterpret_cast<unsigned*>(dst);
        for (int i = lane; i < bytes / 4; i += 32) d[i] = s[i];
    };
    copy_words(slot + L.codes, w_codes + o * 8 * kb, rows * kb);
    copy_words(slot + L.scales, w_scales + o * 8 * ng, rows * ng * 2);
    copy_words(slot + L.outliers, w_out + o * 8 * k, rows * k);
    copy_words(slot + L.oscales, w_oscale + o * 8, rows * 2);
    __syncwarp();
    if (lane == 0) mbar_arrive(full);
}

// The producer warp: fill the ring, then per octet wait until every consumer is done with it, sum
// the consumers' partial tiles, store Y (+ bias) and refill the slot. Partial layout, lane (gid, t):
// WA (weights were the mma A operand): weight row gid of the octet, tokens 2t, 2t+1, 8+2t, 9+2t;
// else (tokens were A): weight rows 2t, 2t+1, tokens gid (x, y) and gid + 8 (z, w).
template <bool WA, bool HI>
__device__ void gemv_producer(unsigned char* ring, const float4* partial, unsigned long long* bars,
                              long long o_begin, int count, int m0, int ng, GEMV_ARGS) {
    const int lane = threadIdx.x & 31, gid = lane >> 2, t = lane & 3;
    const int kb = Kn / 2;
    const SlotLayout L(kb, ng, k);
    auto full = [&](int s) { return smem_u32(bars + s); };
    auto empty = [&](int s) { return smem_u32(bars + 16 + s); };
    for (int i = 0; i < min(slots, count); ++i)
        issue_octet(ring + i * L.bytes, full(i), o_begin + i, N, kb, ng, k, L, w_codes, w_scales,
                    w_out, w_oscale);
    for (int i = 0; i < count; ++i) {
        const int s = i % slots;
        mbar_wait(empty(s), (i / slots) & 1);
        float4 sum = partial[(s * CONSUMERS) * 32 + lane];
#pragma unroll
        for (int w = 1; w < CONSUMERS; ++w) {
            const float4 p = partial[(s * CONSUMERS + w) * 32 + lane];
            sum.x += p.x; sum.y += p.y; sum.z += p.z; sum.w += p.w;
        }
        sum.x *= 1.f / 256.f; sum.y *= 1.f / 256.f; sum.z *= 1.f / 256.f; sum.w *= 1.f / 256.f;
        if (WA) {
            const int n = (int)(8 * (o_begin + i)) + gid;
            if (n < N) {
                const float b = bias != nullptr ? __half2float(bias[n]) : 0.f;
                const float v[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
                for (int e = 0; e < (HI ? 4 : 2); ++e) {
                    const long long m = m0 + 8 * (e >> 1) + 2 * t + (e & 1);
                    if (m < M) y[m * N + n] = __float2half_rn(v[e] + b);
                }
            }
        } else {
            const int n = (int)(8 * (o_begin + i)) + 2 * t;
            if (n < N) {
                float b0 = 0.f, b1 = 0.f;
                if (bias != nullptr) {
                    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(bias + n));
                    b0 = b.x; b1 = b.y;
                }
                const int m_lo = m0 + gid, m_hi = m0 + gid + 8;
                if (m_lo < M)
                    *reinterpret_cast<__half2*>(y + (long long)m_lo * N + n) =
                        __floats2half2_rn(sum.x + b0, sum.y + b1);
                if (HI && m_hi < M)
                    *reinterpret_cast<__half2*>(y + (long long)m_hi * N + n) =
                        __floats2half2_rn(sum.z + b0, sum.w + b1);
            }
        }
        __syncwarp();
        if (i + slots < count)
            issue_octet(ring + s * L.bytes, full(s), o_begin + i + slots, N, kb, ng, k, L, w_codes,
                        w_scales, w_out, w_oscale);
        if (i == count - 1) {
            TL_MARK(5, __float_as_uint(sum.x));
            TL_MARK(6, 0u);
        }
    }
    if (lane == 0) TL_STORE;  // every consumer marked before its last arrive, seen through the barrier
}

// Prologue of both kernels: shared-memory carve-up, this CTA's octets, the mbarriers.
struct GemvCta {
    unsigned long long* bars;  // full[S] at 0, empty[S] at 16
    float4* partial;           // [S][CONSUMERS][32]
    unsigned char* ring;       // [S][slot bytes]
    long long o_begin;
    int count;
    __device__ GemvCta(unsigned char* smem, int N, int slots) {
        bars = reinterpret_cast<unsigned long long*>(smem);
        partial = reinterpret_cast<float4*>(smem + BARRIER_BYTES);
        ring = smem + BARRIER_BYTES + slots * PARTIAL_BYTES;
        const long long octets = (N + 7) / 8;
        o_begin = blockIdx.x * octets / gridDim.x;
        count = (int)((blockIdx.x + 1) * octets / gridDim.x - o_begin);
        if (threadIdx.x == 0) {
            for (int s = 0; s < slots; ++s) {
                mbar_init(smem_u32(bars + s), 1);
                mbar_init(smem_u32(bars + 16 + s), CONSUMERS);
            }
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        }
        __syncthreads();
    }
};

template <int G, bool HI, int GPW>
__device__ void gemv(GEMV_ARGS) {
    constexpr int WORDS = G / 32;   // 32-bit words of a group a lane holds (one per k32 step)
    constexpr int LANE_BYTES = G / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    TL_BEGIN;
    const GemvCta cta(smem, N, slots);
    TL_MARK(1, 0u);
    unsigned long long* bars = cta.bars;
    float4* partial = cta.partial;
    unsigned char* ring = cta.ring;
    const long long o_begin = cta.o_begin;
    const int count = cta.count;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, t = lane & 3;
    const int kb = Kn / 2, ng = Kn / G;
    const SlotLayout L(kb, ng, k);
    const int m0 = blockIdx.y * (HI ? 16 : 8);  // token tile of this CTA row
    auto full = [&](int s) { return smem_u32(bars + s); };
    auto empty = [&](int s) { return smem_u32(bars + 16 + s); };

    if (warp == CONSUMERS) {
        gemv_producer<false, HI>(ring, partial, bars, o_begin, count, m0, ng, GEMV_PASS);
        return;
    }

    // Consumer warp: its K-groups' activation fragments, once, in registers.
    const int g_begin = warp * ng / CONSUMERS;
    const int g_count = (warp + 1) * ng / CONSUMERS - g_begin;
    const long long tok_lo = m0 + gid, tok_hi = m0 + gid + 8;
    const bool lo_ok = tok_lo < M, hi_ok = HI && tok_hi < M;
    unsigned a_lo[GPW][WORDS], a_hi[GPW][WORDS];
    __half2 sa[GPW];  // (token gid, token gid + 8) scales of group g_begin + j: one register
    const __half zero = __float2half_rn(0.f);
#pragma unroll
    for (int j = 0; j < GPW; ++j) {
        const int g = g_begin + j;
        const bool in = j < g_count;
        const int off = g * (G / 2) + t * LANE_BYTES;
        load_words<WORDS>(a_codes + tok_lo * kb + off, in && lo_ok, a_lo[j]);
        sa[j].x = in && lo_ok ? a_scales[tok_lo * ng + g] : zero;
        sa[j].y = zero;
        if (HI) {
            load_words<WORDS>(a_codes + tok_hi * kb + off, in && hi_ok, a_hi[j]);
            if (in && hi_ok) sa[j].y = a_scales[tok_hi * ng + g];
        } else {
#pragma unroll
            for (int e = 0; e < WORDS; ++e) a_hi[j][e] = 0;
        }
    }
    // Outlier chunk c = 15 - warp (32 INT8 columns; k <= 256 means at most 8 chunks).
    const int chunk = CONSUMERS - 1 - warp;
    const bool has_chunk = chunk * 32 < k;
    const int o_off = chunk * 32 + t * 8;
    const bool o_in = has_chunk && o_off < k;
    unsigned ao_lo[2], ao_hi[2] = {0u, 0u};
    load_words<2>(reinterpret_cast<const unsigned char*>(a_out) + tok_lo * k + o_off, o_in && lo_ok,
                  ao_lo);
    if (HI)
        load_words<2>(reinterpret_cast<const unsigned char*>(a_out) + tok_hi * k + o_off,
                      o_in && hi_ok, ao_hi);
    // The 4-bit products carry 16 x 16 (unpacked codes); the producer divides the sum by 256, so
    // the INT8 outlier part is entered 256x too large here (exact: powers of two).
    const float so_lo = has_chunk && lo_ok ? __half2float(a_oscale[tok_lo]) * 256.f : 0.f;
    const float so_hi = has_chunk && hi_ok ? __half2float(a_oscale[tok_hi]) * 256.f : 0.f;

#pragma unroll 1
    for (int i = 0; i < count; ++i) {
        const int s = i % slots;
        mbar_wait(full(s), (i / slots) & 1);
        const unsigned char* slot = ring + s * L.bytes;
        const __half* sw_row0 = reinterpret_cast<const __half*>(slot + L.scales) + (2 * t) * ng;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < GPW; ++j) {
            if (j < g_count) {
                // Opaque to the compiler: keeps it from hoisting the unpacked (2x as many) words
                // out of the octet loop, which spills.
#pragma unroll
                for (int e = 0; e < WORDS; ++e) {
                    asm volatile("" : "+r"(a_lo[j][e]));
                    if (HI) asm volatile("" : "+r"(a_hi[j][e]));
                }
                const int g = g_begin + j;
                unsigned b[WORDS];
                shared_words<WORDS>(slot + L.codes + gid * kb + g * (G / 2) + t * LANE_BYTES, b);
                const float sw0 = __half2float(sw_row0[g]), sw1 = __half2float(sw_row0[ng + g]);
                int grp[4];
#pragma unroll
                for (int e = 0; e < WORDS; ++e) {
                    const unsigned lo = a_lo[j][e], hi = a_hi[j][e];
                    if (e == 0)
                        mma_s8_start(grp, evens(lo), evens(hi), odds(lo), odds(hi), evens(b[e]),
                                     odds(b[e]));
                    else
                        mma_s8(grp, evens(lo), evens(hi), odds(lo), odds(hi), evens(b[e]), odds(b[e]));
                }
                const float2 a = __half22float2(sa[j]);
                acc[0] = fmaf(__int_as_float(grp[0]) - MAGIC_F, a.x * sw0, acc[0]);
                acc[1] = fmaf(__int_as_float(grp[1]) - MAGIC_F, a.x * sw1, acc[1]);
                if (HI) {
                    acc[2] = fmaf(__int_as_float(grp[2]) - MAGIC_F, a.y * sw0, acc[2]);
                    acc[3] = fmaf(__int_as_float(grp[3]) - MAGIC_F, a.y * sw1, acc[3]);
                }
            }
        }
        if (has_chunk) {
            unsigned b[2] = {0u, 0u};
            if (o_in) shared_words<2>(slot + L.outliers + gid * k + o_off, b);
            int o[4] = {0, 0, 0, 0};
            mma_s8(o, ao_lo[0], ao_hi[0], ao_lo[1], ao_hi[1], b[0], b[1]);
            const __half* osw = reinterpret_cast<const __half*>(slot + L.oscales);
            const float sw0 = __half2float(osw[2 * t]), sw1 = __half2float(osw[2 * t + 1]);
            acc[0] = fmaf((float)o[0], so_lo * sw0, acc[0]);
            acc[1] = fmaf((float)o[1], so_lo * sw1, acc[1]);
            if (HI) {
                acc[2] = fmaf((float)o[2], so_hi * sw0, acc[2]);
                acc[3] = fmaf((float)o[3], so_hi * sw1, acc[3]);
            }
        }
        partial[(s * CONSUMERS + warp) * 32 + lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(s));
    }
}

// ---------------------------------------------------------------------------------------------
// gemv2 (round 3, second version): the same CTA, ring and producer, but the weights are the mma A
// operand: one m16n8k32 covers TWO octets (rows gid of octets i and i+1) against 8 tokens (the
// n8 B operand), so each weight word is unpacked once for 16 rows and the fold costs half as much
// a weight row; M <= 16 adds a second token tile sharing the unpacked weights. Groups are taken
// in branch-free pairs (a second group past the warp's range re-reads a live one and meets zero
// token codes and scales), so two IMMA chains are in flight. An odd last octet pairs with zeros.
// ---------------------------------------------------------------------------------------------
template <int G, int TILES, int GPW>
__device__ void gemv2(GEMV_ARGS) {
    constexpr int WORDS = G / 32, LANE_BYTES = G / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    TL_BEGIN;
    const GemvCta cta(smem, N, slots);
    TL_MARK(1, 0u);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, t = lane & 3;
    const int kb = Kn / 2, ng = Kn / G;
    const SlotLayout L(kb, ng, k);
    const int m0 = blockIdx.y * 8 * TILES;
    if (warp == CONSUMERS) {
        gemv_producer<true, TILES == 2>(cta.ring, cta.partial, cta.bars, cta.o_begin, cta.count, m0,
                                         ng, GEMV_PASS);
        return;
    }

    // Token fragments (B operand: token tt*8 + gid, the lane's quarter of each group) and the
    // scales of tokens 2t, 2t+1 of each tile, loaded once.
    const int g_begin = warp * ng / CONSUMERS;
    const int g_count = (warp + 1) * ng / CONSUMERS - g_begin;
    const __half zero = __float2half_rn(0.f);
    unsigned x[TILES][GPW][WORDS];
    __half2 sa[TILES][GPW];
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const long long tok = m0 + tt * 8 + gid, tok0 = m0 + tt * 8 + 2 * t;
#pragma unroll
        for (int j = 0; j < GPW; ++j) {
            const int g = g_begin + j;
            const bool in = j < g_count;
            load_words<WORDS>(a_codes + tok * kb + g * (G / 2) + t * LANE_BYTES, in && tok < M,
                              x[tt][j]);
            sa[tt][j].x = in && tok0 < M ? a_scales[tok0 * ng + g] : zero;
            sa[tt][j].y = in && tok0 + 1 < M ? a_scales[(tok0 + 1) * ng + g] : zero;
        }
    }
    const int chunk = CONSUMERS - 1 - warp;  // the warp's INT8 outlier chunk, if k reaches it
    const bool has_chunk = chunk * 32 < k;
    const int o_off = chunk * 32 + t * 8;
    const bool o_in = has_chunk && o_off < k;
    unsigned xo[TILES][2];
    float2 so[TILES];  // x256: the producer divides every sum by 256 (see gemv)
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const long long tok = m0 + tt * 8 + gid, tok0 = m0 + tt * 8 + 2 * t;
        load_words<2>(reinterpret_cast<const unsigned char*>(a_out) + tok * k + o_off,
                      o_in && tok < M, xo[tt]);
        so[tt].x = has_chunk && tok0 < M ? __half2float(a_oscale[tok0]) * 256.f : 0.f;
        so[tt].y = has_chunk && tok0 + 1 < M ? __half2float(a_oscale[tok0 + 1]) * 256.f : 0.f;
    }

#pragma unroll 1
    for (int i = 0; i < cta.count; i += 2) {
        const int s0 = i % slots, s1 = (i + 1) % slots;
        const bool two = i + 1 < cta.count;
        mbar_wait(smem_u32(cta.bars + s0), (i / slots) & 1);
        if (two) mbar_wait(smem_u32(cta.bars + s1), ((i + 1) / slots) & 1);
        if (i == 0) TL_MARK(2, 0u);
        if (i + 2 >= cta.count) TL_MARK(3, 0u);
        const unsigned char* slot0 = cta.ring + s0 * L.bytes;
        const unsigned char* slot1 = cta.ring + s1 * L.bytes;
        const __half* sw0_row = reinterpret_cast<const __half*>(slot0 + L.scales) + gid * ng;
        const __half* sw1_row = reinterpret_cast<const __half*>(slot1 + L.scales) + gid * ng;
        float acc[TILES][4];
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[tt][e] = 0.f;

#pragma unroll
        for (int j0 = 0; j0 < GPW; j0 += 2) {
            if (j0 >= g_count) break;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = j0 + h;
                if (j >= GPW) break;
                const int g = g_begin + (j < g_count ? j : 0);
#pragma unroll
                for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
                    for (int e = 0; e < WORDS; ++e) asm volatile("" : "+r"(x[tt][j][e]));
                const int off = gid * kb + g * (G / 2) + t * LANE_BYTES;
                unsigned w0[WORDS], w1[WORDS];
                shared_words<WORDS>(slot0 + L.codes + off, w0);
                if (two) {
                    shared_words<WORDS>(slot1 + L.codes + off, w1);
                } else {
#pragma unroll
                    for (int e = 0; e < WORDS; ++e) w1[e] = 0u;
                }
                const float sw0 = __half2float(sw0_row[g]);
                const float sw1 = two ? __half2float(sw1_row[g]) : 0.f;
                int grp[TILES][4];
#pragma unroll
                for (int e = 0; e < WORDS; ++e) {
                    const unsigned a0 = evens(w0[e]), a1 = evens(w1[e]), a2 = odds(w0[e]),
                                   a3 = odds(w1[e]);
#pragma unroll
                    for (int tt = 0; tt < TILES; ++tt) {
                        const unsigned b0 = evens(x[tt][j][e]), b1 = odds(x[tt][j][e]);
                        if (e == 0)
                            mma_s8_start(grp[tt], a0, a1, a2, a3, b0, b1);
                        else
                            mma_s8(grp[tt], a0, a1, a2, a3, b0, b1);
                    }
                }
#pragma unroll
                for (int tt = 0; tt < TILES; ++tt) {
                    const float2 a = __half22float2(sa[tt][j]);
                    acc[tt][0] = fmaf(__int_as_float(grp[tt][0]) - MAGIC_F, sw0 * a.x, acc[tt][0]);
                    acc[tt][1] = fmaf(__int_as_float(grp[tt][1]) - MAGIC_F, sw0 * a.y, acc[tt][1]);
                    acc[tt][2] = fmaf(__int_as_float(grp[tt][2]) - MAGIC_F, sw1 * a.x, acc[tt][2]);
                    acc[tt][3] = fmaf(__int_as_float(grp[tt][3]) - MAGIC_F, sw1 * a.y, acc[tt][3]);
                }
            }
        }
        if (has_chunk) {
            unsigned w0[2] = {0u, 0u}, w1[2] = {0u, 0u};
            if (o_in) shared_words<2>(slot0 + L.outliers + gid * k + o_off, w0);
            if (o_in && two) shared_words<2>(slot1 + L.outliers + gid * k + o_off, w1);
            const float osw0 = __half2float(reinterpret_cast<const __half*>(slot0 + L.oscales)[gid]);
            const float osw1 =
                two ? __half2float(reinterpret_cast<const __half*>(slot1 + L.oscales)[gid]) : 0.f;
#pragma unroll
            for (int tt = 0; tt < TILES; ++tt) {
                int o[4] = {0, 0, 0, 0};
                mma_s8(o, w0[0], w1[0], w0[1], w1[1], xo[tt][0], xo[tt][1]);
                acc[tt][0] = fmaf((float)o[0], osw0 * so[tt].x, acc[tt][0]);
                acc[tt][1] = fmaf((float)o[1], osw0 * so[tt].y, acc[tt][1]);
                acc[tt][2] = fmaf((float)o[2], osw1 * so[tt].x, acc[tt][2]);
                acc[tt][3] = fmaf((float)o[3], osw1 * so[tt].y, acc[tt][3]);
            }
        }
        // Octet i: rows gid (acc 0, 1); octet i + 1: rows gid + 8 (acc 2, 3); tiles in z, w.
        const float hi0 = TILES == 2 ? acc[TILES - 1][0] : 0.f, hi1 = TILES == 2 ? acc[TILES - 1][1] : 0.f;
        const float hi2 = TILES == 2 ? acc[TILES - 1][2] : 0.f, hi3 = TILES == 2 ? acc[TILES - 1][3] : 0.f;
        cta.partial[(s0 * CONSUMERS + warp) * 32 + lane] = make_float4(acc[0][0], acc[0][1], hi0, hi1);
        if (two)
            cta.partial[(s1 * CONSUMERS + warp) * 32 + lane] = make_float4(acc[0][2], acc[0][3], hi2, hi3);
        if (i + 2 >= cta.count) TL_MARK(4, __float_as_uint(acc[0][0]));
        __syncwarp();
        if (lane == 0) {
            mbar_arrive(smem_u32(cta.bars + 16 + s0));
            if (two) mbar_arrive(smem_u32(cta.bars + 16 + s1));
        }
    }
}

#define DEFINE_GEMV(NAME, G, HI, GPW)                                                      \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 1) NAME(GEMV_ARGS) {       \
        gemv<G, HI, GPW>(GEMV_PASS);                                                       \
    }

// GPW (groups a consumer warp holds): K - k <= 15 * GPW * G, i.e. 15360 columns (13440 for m16_g64,
// where 16 groups a warp would spill).
DEFINE_GEMV(w4a4_gemv_m8_g128, 128, false, 8)
DEFINE_GEMV(w4a4_gemv_m8_g64, 64, false, 16)
DEFINE_GEMV(w4a4_gemv_m16_g128, 128, true, 8)
DEFINE_GEMV(w4a4_gemv_m16_g64, 64, true, 14)
#define DEFINE_GEMV2(NAME, G, TILES, GPW)                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 1) NAME(GEMV_ARGS) {       \
        gemv2<G, TILES, GPW>(GEMV_PASS);                                                   \
    }
DEFINE_GEMV2(w4a4_gemv2_m8_g128, 128, 1, 8)
DEFINE_GEMV2(w4a4_gemv2_m8_g64, 64, 1, 16)
DEFINE_GEMV2(w4a4_gemv2_m16_g128, 128, 2, 7)
DEFINE_GEMV2(w4a4_gemv2_m16_g64, 64, 2, 12)

// ---------------------------------------------------------------------------------------------
// stream (round 4): no ring, no producer warp, nothing staged before the first load. A CTA is
// STREAM_WARPS warps on one tile of 16 weight rows (blockIdx.x) x one token tile (blockIdx.y: 8
// tokens, 16 with TILES = 2). Weights are the mma A operand (tile rows gid and gid + 8), tokens the
// n8 B operand, as in gemv2. The tile's K-groups are split into contiguous ranges over the warps; a
// warp walks its range in chunks of STREAM_GROUPS groups through two register buffers and requests
// both buffers before any arithmetic: for K - k <= 2 * STREAM_WARPS * STREAM_GROUPS * G (Llama's
// K = 4096 at G = 128) every weight byte of the CTA is requested at entry, so a CTA costs one DRAM round trip
// plus its share of the stream; a longer K keeps two chunks a warp in flight. Outlier 32-column
// chunk c belongs to warp c. Partial tiles meet in shared memory behind one barrier; then one
// thread an output sums the warps and stores it.
// PDL: weights never depend on the previous kernel, so they may be requested before
// griddepcontrol.wait, activations only after it (coherent loads). ptxas decides how many weight
// loads actually precede the wait (SASS, round 5: stream 4-8 of its 18 code loads, streamt 10 of
// 20 with pdl_wait_after_arrival; the scale loads follow it). launch_dependents at entry lets a
// next kernel that was launched with programmatic stream serialization take SMs as our CTAs
// retire. Both instructions are no-ops in a plain launch.
// ---------------------------------------------------------------------------------------------
#define STREAM_WARPS 8
#define STREAM_GROUPS 2  // K-groups of a chunk (G = 128: a lane's 16 bytes of two rows, twice)

// Weight bytes are read once: no L1 allocation, and a 256-byte L2 fetch (a warp's chunk of a row is
// 128 contiguous bytes, the next chunk follows). Volatile keeps NVVM from moving them past
// pdl_wait (ptxas still may: see pdl_wait_after_arrival).
template <int WORDS>
__device__ __forceinline__ void load_weight_words(const unsigned char* p, bool valid,
                                                  unsigned (&w)[WORDS]) {
    if constexpr (WORDS == 4) {
        if (valid)
            asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                         : "l"(p));
        else
            w[0] = w[1] = w[2] = w[3] = 0u;
    } else {
        if (valid)
            asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n"
                         : "=r"(w[0]), "=r"(w[1])
                         : "l"(p));
        else
            w[0] = w[1] = 0u;
    }
}

// Tokens may come from the kernel before this one: coherent loads (ld.global, no .nc), which ptxas
// keeps behind griddepcontrol.wait. An .nc load (__ldg, or a const __restrict__ argument) promises
// data that no one writes while the kernel runs, so ptxas may hoist it above the wait: it did in
// streamt (SASS: every token LDG.CONSTANT before ACQBULK), which then read its producer's
// activations before they were written (the graph race test's NaNs).
template <int WORDS>
__device__ __forceinline__ void load_fresh_words(const unsigned char* p, bool valid,
                                                 unsigned (&w)[WORDS]) {
    if constexpr (WORDS == 4) {
        if (valid)
            asm("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                : "l"(p)
                : "memory");
        else
            w[0] = w[1] = w[2] = w[3] = 0u;
    } else {
        if (valid)
            asm("ld.global.v2.u32 {%0,%1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "l"(p) : "memory");
        else
            w[0] = w[1] = 0u;
    }
}
__device__ __forceinline__ __half load_fresh_half(const __half* p, bool valid) {
    unsigned short h = 0;
    if (valid) asm("ld.global.u16 %0, [%1];\n" : "=h"(h) : "l"(p) : "memory");
    return __ushort_as_half(h);
}

template <int G, int TILES>
struct StreamChunk {
    static constexpr int C = STREAM_GROUPS, WORDS = G / 32;
    unsigned w[C][2][WORDS];      // tile rows gid, gid + 8: the lane's quarter t of each group
    unsigned x[TILES][C][WORDS];  // token tt * 8 + gid, quarter t of each group
    __half2 sw[C];                // scales of rows (gid, gid + 8)
    __half2 sa[TILES][C];         // scales of tokens (2t, 2t + 1)
};

// One warp's view of the tile: its rows, tokens and K-groups.
struct StreamLane {
    const unsigned char *w_row0, *w_row1;  // codes of tile rows gid, gid + 8
    const __half *sw_row0, *sw_row1;
    bool row0_ok, row1_ok;
    int g_end, t, gid, m0, ng, kb;
};

template <int G, int TILES>
__device__ __forceinline__ void stream_load_weights(StreamChunk<G, TILES>& c, int g0,
                                                    const StreamLane& l) {
    constexpr int C = StreamChunk<G, TILES>::C, WORDS = G / 32;
    const __half zero = __float2half_rn(0.f);
#pragma unroll
    for (int j = 0; j < C; ++j) {
        const int g = g0 + j;
        const bool in = g < l.g_end;
        const int off = g * (G / 2) + l.t * (G / 8);
        load_weight_words<WORDS>(l.w_row0 + off, in && l.row0_ok, c.w[j][0]);
        load_weight_words<WORDS>(l.w_row1 + off, in && l.row1_ok, c.w[j][1]);
        c.sw[j].x = in && l.row0_ok ? l.sw_row0[g] : zero;
        c.sw[j].y = in && l.row1_ok ? l.sw_row1[g] : zero;
    }
}

template <int G, int TILES>
__device__ __forceinline__ void stream_load_tokens(StreamChunk<G, TILES>& c, int g0,
                                                   const StreamLane& l, int M,
                                                   const unsigned char* __restrict__ a_codes,
                                                   const __half* __restrict__ a_scales) {
    constexpr int C = StreamChunk<G, TILES>::C, WORDS = G / 32;
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const long long tok = l.m0 + tt * 8 + l.gid, tok0 = l.m0 + tt * 8 + 2 * l.t;
#pragma unroll
        for (int j = 0; j < C; ++j) {
            const int g = g0 + j;
            const bool in = g < l.g_end;
            load_fresh_words<WORDS>(a_codes + tok * l.kb + g * (G / 2) + l.t * (G / 8),
                                    in && tok < M, c.x[tt][j]);
            c.sa[tt][j].x = load_fresh_half(a_scales + tok0 * l.ng + g, in && tok0 < M);
            c.sa[tt][j].y = load_fresh_half(a_scales + (tok0 + 1) * l.ng + g, in && tok0 + 1 < M);
        }
    }
}

// acc[tt]: (row gid, token 2t), (gid, 2t + 1), (gid + 8, 2t), (gid + 8, 2t + 1) of token tile tt.
template <int G, int TILES>
__device__ __forceinline__ void stream_compute(const StreamChunk<G, TILES>& c, int g0, int g_end,
                                               float (&acc)[TILES][4]) {
    constexpr int C = StreamChunk<G, TILES>::C, WORDS = G / 32;
#pragma unroll
    for (int j = 0; j < C; ++j) {
        if (g0 + j >= g_end) break;  // warp-uniform: the last chunk of a range may be short
        int grp[TILES][4];
#pragma unroll
        for (int e = 0; e < WORDS; ++e) {
            const unsigned a0 = evens(c.w[j][0][e]), a1 = evens(c.w[j][1][e]);
            const unsigned a2 = odds(c.w[j][0][e]), a3 = odds(c.w[j][1][e]);
#pragma unroll
            for (int tt = 0; tt < TILES; ++tt) {
                const unsigned b0 = evens(c.x[tt][j][e]), b1 = odds(c.x[tt][j][e]);
                if (e == 0)
                    mma_s8_start(grp[tt], a0, a1, a2, a3, b0, b1);
                else
                    mma_s8(grp[tt], a0, a1, a2, a3, b0, b1);
            }
        }
        const float2 s = __half22float2(c.sw[j]);
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt) {
            const float2 a = __half22float2(c.sa[tt][j]);
            acc[tt][0] = fmaf(__int_as_float(grp[tt][0]) - MAGIC_F, s.x * a.x, acc[tt][0]);
            acc[tt][1] = fmaf(__int_as_float(grp[tt][1]) - MAGIC_F, s.x * a.y, acc[tt][1]);
            acc[tt][2] = fmaf(__int_as_float(grp[tt][2]) - MAGIC_F, s.y * a.x, acc[tt][2]);
            acc[tt][3] = fmaf(__int_as_float(grp[tt][3]) - MAGIC_F, s.y * a.y, acc[tt][3]);
        }
    }
}

// The rows of weight tile `tile` (16 rows from 16 * tile) in a warp's view.
__device__ __forceinline__ void stream_rows(StreamLane& l, long long tile, int N,
                                            const unsigned char* __restrict__ w_codes,
                                            const __half* __restrict__ w_scales) {
    const long long r0 = 16 * tile + l.gid, r1 = r0 + 8;
    l.row0_ok = r0 < N;
    l.row1_ok = r1 < N;
    l.w_row0 = w_codes + r0 * l.kb;
    l.w_row1 = w_codes + r1 * l.kb;
    l.sw_row0 = w_scales + r0 * l.ng;
    l.sw_row1 = w_scales + r1 * l.ng;
}

// The INT8 outlier chunk `warp` (32 columns) of one weight tile: rows gid, gid + 8, and its tokens.
template <int TILES>
struct StreamOutliers {
    unsigned w0[2], w1[2];  // weight rows gid, gid + 8: bytes 8t..8t+7 of the chunk
    float sw0, sw1;         // their scales
    unsigned x[TILES][2];   // token tt * 8 + gid
    float2 sa[TILES];       // scales of tokens 2t, 2t + 1, x256: the 4-bit products carry 16 x 16
    bool has, in;           // this warp has a chunk; this lane's 8 bytes lie inside k
    int off;
};

template <int TILES>
__device__ __forceinline__ void stream_outlier_weights(StreamOutliers<TILES>& o, long long tile,
                                                       const StreamLane& l, int N, int k,
                                                       const signed char* __restrict__ w_out,
                                                       const __half* __restrict__ w_oscale) {
    const long long r0 = 16 * tile + l.gid, r1 = r0 + 8;
    const unsigned char* base = reinterpret_cast<const unsigned char*>(w_out);
    load_weight_words<2>(base + r0 * k + o.off, o.in && l.row0_ok, o.w0);
    load_weight_words<2>(base + r1 * k + o.off, o.in && l.row1_ok, o.w1);
    o.sw0 = o.has && l.row0_ok ? __half2float(w_oscale[r0]) : 0.f;
    o.sw1 = o.has && l.row1_ok ? __half2float(w_oscale[r1]) : 0.f;
}

template <int TILES>
__device__ __forceinline__ void stream_outlier_tokens(StreamOutliers<TILES>& o, const StreamLane& l,
                                                      int M, int k,
                                                      const signed char* __restrict__ a_out,
                                                      const __half* __restrict__ a_oscale) {
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const long long tok = l.m0 + tt * 8 + l.gid, tok0 = l.m0 + tt * 8 + 2 * l.t;
        load_fresh_words<2>(reinterpret_cast<const unsigned char*>(a_out) + tok * k + o.off,
                            o.in && tok < M, o.x[tt]);
        o.sa[tt].x = __half2float(load_fresh_half(a_oscale + tok0, o.has && tok0 < M)) * 256.f;
        o.sa[tt].y =
            __half2float(load_fresh_half(a_oscale + tok0 + 1, o.has && tok0 + 1 < M)) * 256.f;
    }
}

template <int TILES>
__device__ __forceinline__ void stream_outlier_compute(const StreamOutliers<TILES>& o,
                                                       float (&acc)[TILES][4]) {
    if (!o.has) return;
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        int d[4] = {0, 0, 0, 0};
        mma_s8(d, o.w0[0], o.w1[0], o.w0[1], o.w1[1], o.x[tt][0], o.x[tt][1]);
        acc[tt][0] = fmaf((float)d[0], o.sw0 * o.sa[tt].x, acc[tt][0]);
        acc[tt][1] = fmaf((float)d[1], o.sw0 * o.sa[tt].y, acc[tt][1]);
        acc[tt][2] = fmaf((float)d[2], o.sw1 * o.sa[tt].x, acc[tt][2]);
        acc[tt][3] = fmaf((float)d[3], o.sw1 * o.sa[tt].y, acc[tt][3]);
    }
}

// Every warp's partial tile into red, one barrier, then one thread an output sums and stores.
template <int TILES>
__device__ __forceinline__ void stream_reduce_store(float (*red)[TILES * 4][32],
                                                    const float (&acc)[TILES][4], long long tile,
                                                    int m0, int M, int N,
                                                    const __half* __restrict__ bias,
                                                    __half* __restrict__ y) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[warp][tt * 4 + e][lane] = acc[tt][e];
    __syncthreads();
    TL_MARK(5, 0u);
    for (int o = threadIdx.x; o < TILES * 128; o += STREAM_WARPS * 32) {
        const int e = o >> 5, L = o & 31;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < STREAM_WARPS; ++w) v += red[w][e][L];
        const long long n = 16 * tile + (L >> 2) + 8 * ((e & 3) >> 1);
        const long long m = m0 + (e >> 2) * 8 + 2 * (L & 3) + (e & 1);
        if (n < N && m < M) {
            const float b = bias != nullptr ? __half2float(bias[n]) : 0.f;
            y[m * N + n] = __float2half_rn(v * (1.f / 256.f) + b);
        }
    }
}

// A warp's view of the CTA: its K-groups [g_begin, l.g_end), its outlier chunk (chunk `warp`).
template <int G, int TILES>
__device__ __forceinline__ int stream_setup(StreamLane& l, StreamOutliers<TILES>& o, int M, int Kn,
                                            int k) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    l.gid = lane >> 2;
    l.t = lane & 3;
    l.kb = Kn / 2;
    l.ng = Kn / G;
    l.m0 = blockIdx.y * 8 * TILES;
    l.g_end = (warp + 1) * l.ng / STREAM_WARPS;
    o.has = warp * 32 < k;
    o.off = warp * 32 + l.t * 8;
    o.in = o.has && o.off < k;
    return warp * l.ng / STREAM_WARPS;
}

// XOR of every weight word a CTA requests before its pdl wait (see pdl_wait_after_arrival).
template <int G, int TILES>
__device__ __forceinline__ unsigned stream_fold_weights(const StreamChunk<G, TILES>& a,
                                                        const StreamChunk<G, TILES>& b,
                                                        const StreamOutliers<TILES>& o) {
    unsigned x = o.w0[0] ^ o.w0[1] ^ o.w1[0] ^ o.w1[1];
#pragma unroll
    for (int j = 0; j < StreamChunk<G, TILES>::C; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int e = 0; e < G / 32; ++e) x ^= a.w[j][r][e] ^ b.w[j][r][e];
    return x;
}

template <int G, int TILES>
__device__ void gemv_stream(GEMV_ARGS) {
    constexpr int C = StreamChunk<G, TILES>::C;
    __shared__ float red[STREAM_WARPS][TILES * 4][32];
    TL_BEGIN;
    pdl_launch_dependents();
    StreamLane l;
    StreamOutliers<TILES> o;
    const int g_begin = stream_setup<G, TILES>(l, o, M, Kn, k);
    const int chunks = (l.g_end - g_begin + C - 1) / C;
    stream_rows(l, blockIdx.x, N, w_codes, w_scales);

    // Weights first: both buffers and the warp's outlier chunk.
    StreamChunk<G, TILES> A, B;
    stream_load_weights(A, g_begin, l);
    if (chunks > 1) stream_load_weights(B, g_begin + C, l);
    stream_outlier_weights(o, blockIdx.x, l, N, k, w_out, w_oscale);
    TL_MARK(1, 0u);

    // Then the tokens, which the previous kernel may have written.
    pdl_wait();
    stream_load_tokens(A, g_begin, l, M, a_codes, a_scales);
    if (chunks > 1) stream_load_tokens(B, g_begin + C, l, M, a_codes, a_scales);
    stream_outlier_tokens(o, l, M, k, a_out, a_oscale);

    float acc[TILES][4];
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[tt][e] = 0.f;
#pragma unroll 1
    for (int c = 0; c < chunks; c += 2) {
        if (c + 1 >= chunks) TL_MARK(3, A.w[C - 1][1][0]);
        stream_compute(A, g_begin + c * C, l.g_end, acc);
        if (c == 0) TL_MARK(2, __float_as_uint(acc[0][0]));
        if (c + 2 < chunks) {
            stream_load_weights(A, g_begin + (c + 2) * C, l);
            stream_load_tokens(A, g_begin + (c + 2) * C, l, M, a_codes, a_scales);
        }
        if (c + 1 < chunks) {
            if (c + 2 >= chunks) TL_MARK(3, B.w[C - 1][1][0]);
            stream_compute(B, g_begin + (c + 1) * C, l.g_end, acc);
            if (c + 3 < chunks) {
                stream_load_weights(B, g_begin + (c + 3) * C, l);
                stream_load_tokens(B, g_begin + (c + 3) * C, l, M, a_codes, a_scales);
            }
        }
    }
    stream_outlier_compute(o, acc);
    TL_MARK(4, __float_as_uint(acc[0][0]));
    stream_reduce_store<TILES>(red, acc, blockIdx.x, l.m0, M, N, bias, y);
    TL_MARK(6, 0u);
    TL_END;
}

// streamt keeps a warp's token fragments in (dynamic) shared memory between tiles instead of
// registers: slot ((chunk * TILES + tt) * C + j) of this lane, lanes contiguous (no conflicts);
// each lane reads back only what it wrote, so no barrier is needed.
template <int G, int TILES>
__device__ __forceinline__ unsigned* stream_token_slot(unsigned char* smem, int ch, int tt, int j) {
    constexpr int C = StreamChunk<G, TILES>::C;
    const int slot = ((ch * TILES + tt) * C + j) * STREAM_WARPS * 32 + threadIdx.x;
    return reinterpret_cast<unsigned*>(smem + slot * (G / 8));
}
template <int G, int TILES>
__device__ __forceinline__ void stream_stash_tokens(unsigned char* smem, int ch,
                                                    const StreamChunk<G, TILES>& c) {
    constexpr int C = StreamChunk<G, TILES>::C;
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int j = 0; j < C; ++j) {
            unsigned* p = stream_token_slot<G, TILES>(smem, ch, tt, j);
            if constexpr (G == 128)
                *reinterpret_cast<uint4*>(p) =
                    make_uint4(c.x[tt][j][0], c.x[tt][j][1], c.x[tt][j][2], c.x[tt][j][3]);
            else
                *reinterpret_cast<uint2*>(p) = make_uint2(c.x[tt][j][0], c.x[tt][j][1]);
        }
}
template <int G, int TILES>
__device__ __forceinline__ void stream_unstash_tokens(unsigned char* smem, int ch,
                                                      StreamChunk<G, TILES>& c) {
    constexpr int C = StreamChunk<G, TILES>::C;
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int j = 0; j < C; ++j)
            shared_words<G / 32>(reinterpret_cast<const unsigned char*>(
                                     stream_token_slot<G, TILES>(smem, ch, tt, j)),
                                 c.x[tt][j]);
}

// ---------------------------------------------------------------------------------------------
// streamt (round 4, persistent form) for K - k <= 2 * STREAM_WARPS * STREAM_GROUPS * G, where a
// warp's K-slice is at most two chunks: CTA b walks weight tiles b, b + gridDim.x, ... The
// slice's token fragments (in shared memory: registers are short), token scales and outlier
// tokens are loaded once and kept for every tile (no re-reads of the activations a tile), and the
// next tile's weights (both
// chunks and the outlier chunk) are requested as soon as the current tile's registers are free:
// chunk A right after it is multiplied, while B is; B before the reduction. Partial tiles
// alternate between two shared buffers, so one barrier a tile suffices: a warp writing tile i + 2
// has passed tile i + 1's barrier, which every reader of tile i reached after reading it.
// ---------------------------------------------------------------------------------------------
template <int G, int TILES>
__device__ void gemv_stream_tiles(GEMV_ARGS) {
    constexpr int C = StreamChunk<G, TILES>::C;
    __shared__ float red[2][STREAM_WARPS][TILES * 4][32];
    extern __shared__ __align__(16) unsigned char token_smem[];  // host: stream_token_bytes
    pdl_launch_dependents();
    StreamLane l;
    StreamOutliers<TILES> o;
    const int g_begin = stream_setup<G, TILES>(l, o, M, Kn, k);
    const long long tiles = (N + 15) / 16;
    long long tile = blockIdx.x;
    stream_rows(l, tile, N, w_codes, w_scales);
    StreamChunk<G, TILES> A, B;
    stream_load_weights(A, g_begin, l);
    stream_load_weights(B, g_begin + C, l);
    stream_outlier_weights(o, tile, l, N, k, w_out, w_oscale);
    pdl_wait_after_arrival(stream_fold_weights(A, B, o), M > 0);
    stream_load_tokens(A, g_begin, l, M, a_codes, a_scales);
    stream_load_tokens(B, g_begin + C, l, M, a_codes, a_scales);
    stream_outlier_tokens(o, l, M, k, a_out, a_oscale);
    stream_stash_tokens(token_smem, 0, A);
    stream_stash_tokens(token_smem, 1, B);
#pragma unroll 1
    for (int i = 0; tile < tiles; tile += gridDim.x, ++i) {
        float acc[TILES][4];
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[tt][e] = 0.f;
        const long long next = tile + gridDim.x;
        stream_unstash_tokens(token_smem, 0, A);
        stream_compute(A, g_begin, l.g_end, acc);
        stream_outlier_compute(o, acc);
        if (next < tiles) {
            stream_rows(l, next, N, w_codes, w_scales);
            stream_load_weights(A, g_begin, l);
            stream_outlier_weights(o, next, l, N, k, w_out, w_oscale);
        }
        stream_unstash_tokens(token_smem, 1, B);
        stream_compute(B, g_begin + C, l.g_end, acc);
        if (next < tiles) stream_load_weights(B, g_begin + C, l);
        stream_reduce_store<TILES>(red[i & 1], acc, tile, l.m0, M, N, bias, y);
    }
}

#define DEFINE_STREAM(NAME, G, TILES)                                                       \
    extern "C" __global__ void __launch_bounds__(STREAM_WARPS * 32, 2) NAME(                 \
        GEMV_ARGS) {                                                                        \
        gemv_stream<G, TILES>(GEMV_PASS);                                                   \
    }
// Two CTAs a SM (<= 128 registers): 256 CTAs, Llama's N = 4096, in one wave on 132 SMs.
DEFINE_STREAM(w4a4_stream_m8_g128, 128, 1)
DEFINE_STREAM(w4a4_stream_m8_g64, 64, 1)
DEFINE_STREAM(w4a4_stream_m16_g128, 128, 2)
DEFINE_STREAM(w4a4_stream_m16_g64, 64, 2)
#define DEFINE_STREAMT(NAME, G, TILES)                                                      \
    extern "C" __global__ void __launch_bounds__(STREAM_WARPS * 32, 2) NAME(                 \
        GEMV_ARGS) {                                                                        \
        gemv_stream_tiles<G, TILES>(GEMV_PASS);                                             \
    }
DEFINE_STREAMT(w4a4_streamt_m8_g128, 128, 1)
DEFINE_STREAMT(w4a4_streamt_m8_g64, 64, 1)
DEFINE_STREAMT(w4a4_streamt_m16_g128, 128, 2)
DEFINE_STREAMT(w4a4_streamt_m16_g64, 64, 2)

// An empty kernel: what one graph node costs with nothing to do (bench_gemm.py --timeline).
extern "C" __global__ void gemv_empty_kernel() {}
