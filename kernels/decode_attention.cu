// Decode attention (one query token per sequence) over a KV cache of ragged lengths, GQA, split-K.
//
// Two cache formats share one kernel body:
//   KV4  : formats.KVQuantized, one group per head. codes [B, Hkv, cap, D/2] (nibble-packed,
//          unsigned), params [B, Hkv, cap] 32-bit words = (fp16 scale) | (fp16 zero) << 16.
//   FP16 : plain fp16 K/V [B, Hkv, cap, D] (the same kernel reading fp16, for comparison).
//
// Grid (splits, Hkv * head_blocks, B); a CTA of WARPS warps takes the query heads of one KV head
// (up to 8; more need head_blocks > 1) and one chunk of the context, so every cached byte is read
// once per head block. The warps take 16-token tiles round-robin, each streaming its tiles through
// its own NST-stage cp.async ring in shared memory (zero-filled past the sequence's length).
//
// Tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate) with the heads in the 8-wide dims:
//   scores  S^T[head, token] = Q[16 (8 used), d] . K^T[d, 8 tokens]
//   output  O^T[d, head]     = V^T[16 d, 16 tokens] . P'^T[16 tokens, 8 heads]
// The accumulator of the first is the B operand of the second, so P never leaves registers.
// KV4 dequantization is folded into the algebra instead of applied per element:
//   q . (c - z) s_k            = s_k (q . c - z sum(q))       codes c exact in fp16
//   sum_t p_t s_v,t (c_t - z_t) = sum_t p'_t c_t - sum_t p'_t z_t,  p' = p s_v rounded to fp16 once
// and the second sum is one extra mma whose A rows all hold z, so both sums see the same p'.
// Nibbles become fp16 with the 0x6400 exponent trick (one LOP3 and one HADD2/HFMA2 a pair).
// Each MMA operand's k order is a fixed permutation of d (KV4) chosen so that a thread's 16-byte
// smem read of a token row feeds its fragment directly; Q is permuted the same way.
//
// Split-K: with splits > 1 each CTA writes a normalized partial and its log-sum-exp (base 2);
// the last CTA of a (sequence, head block) to finish (an atomic ticket, reset after use so CUDA
// graph replays work) merges them, so no second kernel is launched. Self-contained (no headers).

#define WARPS 4
#define TILE 16
#define HEADS_PER_CTA 8
#define NEG_BIG (-1e30f)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// ---------------------------------------------------------------------------------------------
// Small PTX helpers

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 float_to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fast_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Nibbles at bits 0-3 and 16-19 of x -> half2 of their values (exact).
__device__ __forceinline__ u32 nibbles_lo(u32 x) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(0x000F000Fu), "r"(0x64006400u));
    asm("sub.f16x2 %0, %0, %1;" : "+r"(r) : "r"(0x64006400u));  // (1024 + c) - 1024
    return r;
}

// Nibbles at bits 4-7 and 20-23 of x -> half2 of their values (exact).
__device__ __forceinline__ u32 nibbles_hi(u32 x) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(0x00F000F0u), "r"(0x64006400u));
    // (1024 + 16 c) / 16 - 64
    asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(r) : "r"(0x2C002C00u), "r"(0xD400D400u));
    return r;
}

// Byte j of a in byte 0, byte j of b in byte 2.
__device__ __forceinline__ u32 pair_bytes(u32 a, u32 b, u32 j) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(j | ((j + 4) << 8)));
    return r;
}

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16-byte async copy; bytes past src_bytes (0..16) are zero-filled.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// L2 load (another CTA wrote it during this launch); not volatile, so loads can overlap.
__device__ __forceinline__ float load_cg(const float* p) {
    float v;
    asm("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}

// ---------------------------------------------------------------------------------------------
// Cache formats: the tile copy, the score fragment and the value fragment of each.
//
// Lane roles follow the mma layouts: gid = lane / 4, tig = lane % 4. In a 16-token tile the
// score accumulator of n-tile n holds tokens n*8 + 2*tig + {0,1} for head gid; the output
// accumulator of m-tile mt holds heads 2*tig + {0,1} for d = out_d(mt, 0 or 1).

template <int D, int STAGES>
struct KV4 {
    static constexpr bool QUANTIZED = true;
    static constexpr int NST = STAGES;             // ring stages per warp
    static constexpr int K_ROW = D / 2;            // bytes of one token's codes
    static constexpr int V_PITCH = D / 2 + 16;     // padded: conflict-free 8-byte value reads
    static constexpr int OFF_V = TILE * K_ROW;
    static constexpr int OFF_KP = OFF_V + TILE * V_PITCH;
    static constexpr int OFF_VP = OFF_KP + TILE * 4;
    static constexpr int STAGE = OFF_VP + TILE * 4;
    static constexpr int STEPS = D / 16;           // k-steps of the score mma
    static constexpr int MTILES = D / 16;          // m-tiles of the output mma (+1 for zeros)

    // d of the k slot pair {2tig, 2tig+1} (kk=0) / {2tig+8, 2tig+9} (kk=1), first element; the
    // second element of each pair is d + 4. Thread tig's k slots cover d in [tig*D/4, +D/4):
    // word i = s/2 of its 16-byte row slice holds d = tig*D/4 + 8i + 0..7.
    static __device__ __forceinline__ int q_d(int s, int tig, int kk) {
        return tig * (D / 4) + 8 * (s >> 1) + 2 * (s & 1) + kk;
    }
    static constexpr int Q_PAIR = 4;

    static __device__ __forceinline__ int out_d(int mt, int gid, int r) {
        return gid * (D / 8) + 2 * mt + r;
    }

    // Copy one 16-token tile into a stage. k_src / v_src point at this lane's first 16-byte chunk
    // of the tile (tile start + lane * 16), p_src at its 4-token params chunk (lanes 0-7); only
    // the first `rem` tokens are read, the rest of the stage is zero-filled. Every address lies
    // inside the cache (capacity is a multiple of 16), read or not.
    static constexpr int CH_ROW = K_ROW / 16;  // 16-byte chunks of one token's codes
    static constexpr int STEP_BYTES = TILE * K_ROW;
    static __device__ __forceinline__ void load_tile(u32 stage, const u8* k_src, const u8* v_src,
                                                     const u32* p_src, int rem, int lane) {
#pragma unroll
        for (int i = 0; i < TILE * CH_ROW / 32; ++i) {
            const int tok = lane / CH_ROW + i * (32 / CH_ROW);
            const int bytes = tok < rem ? 16 : 0;
            cp_async16(stage + lane * 16 + i * 512, k_src + i * 512, bytes);
            cp_async16(stage + OFF_V + tok * V_PITCH + (lane % CH_ROW) * 16, v_src + i * 512, bytes);
        }
        if (lane < 8) {  // params: 4 tokens a chunk; lanes 0-3 keys, 4-7 values
            const int c = lane & 3;
            cp_async16(stage + (lane < 4 ? OFF_KP : OFF_VP) + c * 16, p_src,
                       4 * min(max(rem - 4 * c, 0), 4));
        }
    }

    // Scores of n-tile n (8 tokens) for head gid: acc[0..1] = raw q.c of tokens n*8+2tig+{0,1}.
    static __device__ __forceinline__ void scores(float (&acc)[4], const u8* st, int n,
                                                  const u32 (&qa)[STEPS][2], int gid, int tig) {
        const u8* row = st + (n * 8 + gid) * K_ROW + tig * (D / 8);
        u32 w[D / 32];
        if constexpr (D == 128) {
            const uint4 x = *reinterpret_cast<const uint4*>(row);
            w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
        } else {
            const uint2 x = *reinterpret_cast<const uint2*>(row);
            w[0] = x.x; w[1] = x.y;
        }
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            const u32 x = (s & 1) ? (w[s >> 1] >> 8) : w[s >> 1];
            mma16816(acc, qa[s][0], 0u, qa[s][1], 0u, nibbles_lo(x), nibbles_hi(x));
        }
    }

    // O^T += V^T P'^T for the tile, plus the zero-point row: o[MTILES] = sum_t p'_t z_t.
    static __device__ __forceinline__ void accumulate(float (&o)[MTILES + 1][4], const u8* st,
                                                      u32 pb0, u32 pb1, u32 za0, u32 za2,
                                                      int gid, int tig) {
        constexpr int WV = D / 64;  // 32-bit words of one token's slice per thread
        const u8* base = st + OFF_V + gid * (D / 16);
        u32 v[4][WV];
        const int toks[4] = {2 * tig, 2 * tig + 1, 2 * tig + 8, 2 * tig + 9};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u8* p = base + toks[i] * V_PITCH;
            if constexpr (WV == 2) {
                const uint2 x = *reinterpret_cast<const uint2*>(p);
                v[i][0] = x.x; v[i][1] = x.y;
            } else {
                v[i][0] = *reinterpret_cast<const u32*>(p);
            }
        }
#pragma unroll
        for (int mt = 0; mt < MTILES; ++mt) {
            const int w = mt >> 2;
            const u32 j = mt & 3;
            const u32 x0 = pair_bytes(v[0][w], v[1][w], j);
            const u32 x1 = pair_bytes(v[2][w], v[3][w], j);
            mma16816(o[mt], nibbles_lo(x0), nibbles_hi(x0), nibbles_lo(x1), nibbles_hi(x1), pb0, pb1);
        }
        mma16816(o[MTILES], za0, za0, za2, za2, pb0, pb1);
    }
};

template <int D, int STAGES>
struct KV16 {
    static constexpr bool QUANTIZED = false;
    static constexpr int NST = STAGES;
    static constexpr int ROW = 2 * D;
    static constexpr int PITCH = 2 * D + 16;  // conflict-free ldmatrix rows
    static constexpr int OFF_V = TILE * PITCH;
    static constexpr int STAGE = 2 * TILE * PITCH;
    static constexpr int STEPS = D / 16;
    static constexpr int MTILES = D / 16;

    static __device__ __forceinline__ int q_d(int s, int tig, int kk) {
        return 16 * s + 2 * tig + 8 * kk;
    }
    static constexpr int Q_PAIR = 1;

    static __device__ __forceinline__ int out_d(int mt, int gid, int r) {
        return 16 * mt + gid + 8 * r;
    }

    static constexpr int CH_ROW = ROW / 16;
    static constexpr int STEP_BYTES = TILE * ROW;
    static __device__ __forceinline__ void load_tile(u32 stage, const u8* k_src, const u8* v_src,
                                                     const u32*, int rem, int lane) {
#pragma unroll
        for (int i = 0; i < TILE * CH_ROW / 32; ++i) {
            const int tok = lane / CH_ROW + i * (32 / CH_ROW);
            const int bytes = tok < rem ? 16 : 0;
            const u32 dst = tok * PITCH + (lane % CH_ROW) * 16;
            cp_async16(stage + dst, k_src + i * 512, bytes);
            cp_async16(stage + OFF_V + dst, v_src + i * 512, bytes);
        }
    }

    static __device__ __forceinline__ void scores(float (&acc)[4], u32 st, int n,
                                                  const u32 (&qa)[STEPS][2], int lane) {
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        // matrix i of an x4 load: k-step s + i/2, d half i%2; lane supplies row lane%8
        const u32 row = st + (n * 8 + (lane & 7)) * PITCH + (lane >> 3) * 16;
#pragma unroll
        for (int s = 0; s < STEPS; s += 2) {
            u32 b[4];
            ldmatrix_x4(b, row + s * 32);
            mma16816(acc, qa[s][0], 0u, qa[s][1], 0u, b[0], b[1]);
            mma16816(acc, qa[s + 1][0], 0u, qa[s + 1][1], 0u, b[2], b[3]);
        }
    }

    static __device__ __forceinline__ void accumulate(float (&o)[MTILES + 1][4], u32 st, u32 pb0,
                                                      u32 pb1, int lane) {
        // matrix i: tokens (i/2)*8 + lane%8, d block i%2 of the m-tile
        const int i = lane >> 3;
        const u32 row = st + OFF_V + ((i >> 1) * 8 + (lane & 7)) * PITCH + (i & 1) * 16;
#pragma unroll
        for (int mt = 0; mt < MTILES; ++mt) {
            u32 a[4];
            ldmatrix_x4_trans(a, row + mt * 32);
            mma16816(o[mt], a[0], a[1], a[2], a[3], pb0, pb1);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// The kernel body

template <class F, int D>
__device__ __forceinline__ void decode_attention(
    const u16* __restrict__ q, const u8* __restrict__ k, const u32* __restrict__ k_params,
    const u8* __restrict__ v, const u32* __restrict__ v_params, const int* __restrict__ lengths,
    int kv_heads, int group, int head_blocks, int capacity, int chunk, int splits,
    float scale_log2, u16* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_lse, int* __restrict__ tickets) {
    extern __shared__ __align__(16) u8 smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int b = blockIdx.z, split = blockIdx.x;
    const int kvh = blockIdx.y / head_blocks, hb = blockIdx.y % head_blocks;
    const int head0 = kvh * group + hb * HEADS_PER_CTA;
    const int nheads = min(HEADS_PER_CTA, group - hb * HEADS_PER_CTA);
    const int q_heads = kv_heads * group;

    const int len = lengths[b];
    const int nsplit_b = max(1, (len + chunk - 1) / chunk);
    if (split >= nsplit_b) return;
    const int start = split * chunk;
    const int end = min(start + chunk, len);

    // This (sequence, kv head)'s rows.
    const long long row0 = (long long)(b * kv_heads + kvh) * capacity;
    const u8* kc = k + row0 * (F::QUANTIZED ? D / 2 : 2 * D);
    const u8* vc = v + row0 * (F::QUANTIZED ? D / 2 : 2 * D);
    const u32* kp = F::QUANTIZED ? k_params + row0 : nullptr;
    const u32* vp = F::QUANTIZED ? v_params + row0 : nullptr;

    const int ntiles = end > start ? (end - start + TILE - 1) / TILE : 0;
    const int mine = ntiles > warp ? (ntiles - warp + WARPS - 1) / WARPS : 0;
    u16* s_q = reinterpret_cast<u16*>(smem);
    u8* rings = smem + HEADS_PER_CTA * D * 2;
    const u32 ring = smem_addr(rings) + warp * F::NST * F::STAGE;
    const u8* ring_ptr = rings + warp * F::NST * F::STAGE;

    // Query rows of this head block -> smem (zeros for missing heads), in flight together with
    // the first tiles of every warp: one commit group ahead of the ring's.
    {
        const u8* qsrc = reinterpret_cast<const u8*>(q + (long long)(b * q_heads + head0) * D);
        const u32 qdst = smem_addr(s_q);
        for (int c = tid; c < HEADS_PER_CTA * D / 8; c += WARPS * 32) {
            const bool ok = c / (D / 8) < nheads;
            cp_async16(qdst + c * 16, ok ? qsrc + c * 16 : qsrc, ok ? 16 : 0);
        }
        cp_async_commit();
    }
    // Per-lane source pointers of this warp's next tile to fetch, advanced a tile stride at a time.
    int next_t0 = start + warp * TILE;
    const long long first = (long long)next_t0 * (F::STEP_BYTES / TILE) + lane * 16;
    const u8* k_src = kc + first;
    const u8* v_src = vc + first;
    const u32* p_src = F::QUANTIZED ? (lane < 4 ? kp : vp) + next_t0 + 4 * (lane & 3) : nullptr;
    auto fetch = [&](u32 stage) {
        F::load_tile(stage, k_src, v_src, p_src, end - next_t0, lane);
        k_src += WARPS * F::STEP_BYTES;
        v_src += WARPS * F::STEP_BYTES;
        if (F::QUANTIZED) p_src += WARPS * TILE;
        next_t0 += WARPS * TILE;
    };
#pragma unroll
    for (int i = 0; i < F::NST - 1; ++i) {
        if (i < mine) fetch(ring + i * F::STAGE);
        cp_async_commit();
    }
    cp_async_wait<F::NST - 1>();
    __syncthreads();

    u32 qa[F::STEPS][2];
    float qsum = 0.f;
#pragma unroll
    for (int s = 0; s < F::STEPS; ++s) {
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            const int d = F::q_d(s, tig, kk);
            const u16 lo = s_q[gid * D + d], hi = s_q[gid * D + d + F::Q_PAIR];
            qa[s][kk] = (u32)lo | ((u32)hi << 16);
            qsum += half_to_float(lo) + half_to_float(hi);
        }
    }
    qsum += __shfl_xor_sync(0xffffffffu, qsum, 1);
    qsum += __shfl_xor_sync(0xffffffffu, qsum, 2);

    float m = NEG_BIG, l = 0.f;  // running max (log2 units) and partial sum, head gid
    float o[F::MTILES + 1][4];
#pragma unroll
    for (int i = 0; i < F::MTILES + 1; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

    for (int it = 0; it < mine; ++it) {
        const int ahead = it + F::NST - 1;
        if (ahead < mine) fetch(ring + (ahead % F::NST) * F::STAGE);
        cp_async_commit();
        cp_async_wait<F::NST - 1>();
        __syncwarp();

        const int stage = (it % F::NST) * F::STAGE;
        const int t0 = start + (warp + it * WARPS) * TILE;
        float acc[2][4];
        float logit[2][2];
        float sv[2][2];
        u32 zbits[2] = {0u, 0u};
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            if constexpr (F::QUANTIZED) {
                F::scores(acc[n], ring_ptr + stage, n, qa, gid, tig);
                const uint2 kpw = *reinterpret_cast<const uint2*>(ring_ptr + stage + F::OFF_KP +
                                                                  (n * 8 + 2 * tig) * 4);
                const uint2 vpw = *reinterpret_cast<const uint2*>(ring_ptr + stage + F::OFF_VP +
                                                                  (n * 8 + 2 * tig) * 4);
                const u32 kw[2] = {kpw.x, kpw.y}, vw[2] = {vpw.x, vpw.y};
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const float sk = half_to_float(kw[j] & 0xFFFF) * scale_log2;
                    const float zk = half_to_float(kw[j] >> 16);
                    logit[n][j] = sk * fmaf(-zk, qsum, acc[n][j]);
                    sv[n][j] = half_to_float(vw[j] & 0xFFFF);
                }
                zbits[n] = (vw[0] >> 16) | (vw[1] & 0xFFFF0000u);
            } else {
                F::scores(acc[n], ring + stage, n, qa, lane);
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    logit[n][j] = acc[n][j] * scale_log2;
                    sv[n][j] = 1.f;
                }
            }
#pragma unroll
            for (int j = 0; j < 2; ++j)
                if (t0 + n * 8 + 2 * tig + j >= end) logit[n][j] = -__int_as_float(0x7f800000);
        }

        // Online softmax for head gid over this tile (4 values here, the rest in the quad).
        float tmax = fmaxf(fmaxf(logit[0][0], logit[0][1]), fmaxf(logit[1][0], logit[1][1]));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float m_new = fmaxf(m, tmax);
        const bool grew = __any_sync(0xffffffffu, m_new > m);
        const float alpha = fast_exp2(m - m_new);
        m = m_new;
        float p[2][2];
        float psum = 0.f;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                p[n][j] = fast_exp2(logit[n][j] - m);
                psum += p[n][j];
            }
        l = l * alpha + psum;
        if (grew) {  // rarely after the first tiles: skip the rescale while no max moves
            // The output accumulator holds heads 2tig, 2tig+1: their factors live in quads
            // 2tig, 2tig+1.
            const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * tig);
            const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * tig + 4);
#pragma unroll
            for (int i = 0; i < F::MTILES + 1; ++i) {
                o[i][0] *= alpha0; o[i][1] *= alpha1;
                o[i][2] *= alpha0; o[i][3] *= alpha1;
            }
        }
        const u32 pb0 = pack_half2(p[0][0] * sv[0][0], p[0][1] * sv[0][1]);
        const u32 pb1 = pack_half2(p[1][0] * sv[1][0], p[1][1] * sv[1][1]);
        if constexpr (F::QUANTIZED)
            F::accumulate(o, ring_ptr + stage, pb0, pb1, zbits[0], zbits[1], gid, tig);
        else
            F::accumulate(o, ring + stage, pb0, pb1, lane);
        __syncwarp();
    }
    cp_async_wait<0>();

    // Merge the warps through shared memory (the rings are free now).
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    __syncthreads();
    float* s_o = reinterpret_cast<float*>(rings);              // [WARPS][8][D]
    float* s_m = s_o + WARPS * HEADS_PER_CTA * D;              // [WARPS][8]
    float* s_l = s_m + WARPS * HEADS_PER_CTA;                  // [WARPS][8]
    {
        float* mine_o = s_o + warp * HEADS_PER_CTA * D;
        const float c0 = F::QUANTIZED ? o[F::MTILES][0] : 0.f;
        const float c1 = F::QUANTIZED ? o[F::MTILES][1] : 0.f;
#pragma unroll
        for (int mt = 0; mt < F::MTILES; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int d = F::out_d(mt, gid, r);
                mine_o[(2 * tig) * D + d] = o[mt][2 * r] - c0;
                mine_o[(2 * tig + 1) * D + d] = o[mt][2 * r + 1] - c1;
            }
        if (tig == 0) {
            s_m[warp * HEADS_PER_CTA + gid] = m;
            s_l[warp * HEADS_PER_CTA + gid] = l;
        }
    }
    __syncthreads();

    const long long head_row0 = (long long)b * q_heads + head0;  // row of (b, head0) in q / out
    for (int i = tid; i < nheads * D; i += WARPS * 32) {
        const int h = i / D, d = i % D;
        float mx = NEG_BIG;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, s_m[w * HEADS_PER_CTA + h]);
        float sum = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = fast_exp2(s_m[w * HEADS_PER_CTA + h] - mx);
            sum += f * s_l[w * HEADS_PER_CTA + h];
            acc += f * s_o[(w * HEADS_PER_CTA + h) * D + d];
        }
        if (nsplit_b == 1) {
            out[(head_row0 + h) * D + d] = float_to_half(sum > 0.f ? acc / sum : 0.f);
        } else {
            const long long pr = (head_row0 + h) * splits + split;
            part_o[pr * D + d] = acc / sum;
            if (d == 0) part_lse[pr] = mx + fast_log2(sum);
        }
    }
    if (nsplit_b == 1) return;

    // Split-K: the last CTA of this (sequence, head block) merges the partials.
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    const int ticket = b * kv_heads * head_blocks + blockIdx.y;
    if (tid == 0) s_last = atomicAdd(tickets + ticket, 1) == nsplit_b - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // Weights of the partials: all log-sum-exps loaded at once, then one pass per head.
    float* s_w = s_l + WARPS * HEADS_PER_CTA;  // [8][splits]
    for (int i = tid; i < nheads * nsplit_b; i += WARPS * 32) {
        const int h = i / nsplit_b, sp = i % nsplit_b;
        s_w[i] = load_cg(part_lse + (head_row0 + h) * splits + sp);
    }
    __syncthreads();
    if (tid < nheads) {
        float* w = s_w + tid * nsplit_b;
        float mx = NEG_BIG, sum = 0.f;
        for (int sp = 0; sp < nsplit_b; ++sp) mx = fmaxf(mx, w[sp]);
        for (int sp = 0; sp < nsplit_b; ++sp) sum += (w[sp] = fast_exp2(w[sp] - mx));
        const float inv = 1.f / sum;
        for (int sp = 0; sp < nsplit_b; ++sp) w[sp] *= inv;
    }
    __syncthreads();
    for (int i = tid; i < nheads * D; i += WARPS * 32) {
        const int h = i / D, d = i % D;
        const float* po = part_o + (head_row0 + h) * splits * D + d;
        const float* w = s_w + h * nsplit_b;
        float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
        int sp = 0;
        for (; sp + 4 <= nsplit_b; sp += 4) {  // four loads in flight
            const float p0 = load_cg(po + sp * D), p1 = load_cg(po + (sp + 1) * D);
            const float p2 = load_cg(po + (sp + 2) * D), p3 = load_cg(po + (sp + 3) * D);
            acc0 += w[sp] * p0; acc1 += w[sp + 1] * p1;
            acc2 += w[sp + 2] * p2; acc3 += w[sp + 3] * p3;
        }
        for (; sp < nsplit_b; ++sp) acc0 += w[sp] * load_cg(po + sp * D);
        out[(head_row0 + h) * D + d] = float_to_half((acc0 + acc1) + (acc2 + acc3));
    }
    if (tid == 0) tickets[ticket] = 0;
}

// MIN_CTAS: CTAs per SM the register budget must allow. Ring depths: 4 stages (3 tiles in flight
// per warp) when many CTAs share an SM; 8 (7 in flight) for grids of at most 2 CTAs per SM, where
// one CTA's bytes in flight bound its speed; fp16 3 (its tiles are 4x larger).
#define DEFINE_DECODE(NAME, FMT, D, MIN_CTAS)                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_CTAS) NAME(                     \
        const u16* q, const u8* k, const u32* k_params, const u8* v, const u32* v_params,         \
        const int* lengths, int kv_heads, int group, int head_blocks, int capacity, int chunk,    \
        int splits, float scale_log2, u16* out, float* part_o, float* part_lse, int* tickets) {   \
        decode_attention<FMT, D>(q, k, k_params, v, v_params, lengths, kv_heads, group,           \
                                 head_blocks, capacity, chunk, splits, scale_log2, out, part_o,   \
                                 part_lse, tickets);                                              \
    }

#ifndef KV4_MIN_CTAS  // -DKV4_MIN_CTAS=5 trades register spills for a fifth CTA per SM
#define KV4_MIN_CTAS 4
#endif
typedef KV4<64, 4> KV4_64;
typedef KV4<128, 4> KV4_128;
typedef KV4<64, 8> KV4_DEEP_64;
typedef KV4<128, 8> KV4_DEEP_128;
typedef KV16<64, 3> KV16_64;
typedef KV16<128, 3> KV16_128;
DEFINE_DECODE(decode_attention_kv4_d64, KV4_64, 64, KV4_MIN_CTAS)
DEFINE_DECODE(decode_attention_kv4_d128, KV4_128, 128, KV4_MIN_CTAS)
DEFINE_DECODE(decode_attention_kv4deep_d64, KV4_DEEP_64, 64, 2)
DEFINE_DECODE(decode_attention_kv4deep_d128, KV4_DEEP_128, 128, 2)
DEFINE_DECODE(decode_attention_fp16_d64, KV16_64, 64, 2)
DEFINE_DECODE(decode_attention_fp16_d128, KV16_128, 128, 2)
