// Quantize-and-append for the paged 4-bit KV cache (formats.KVQuantized, one group per head).
//
// One warp quantizes one (sequence, kv head, new token) row of head_dim FP16 values and writes it at
// position p = lengths[b] + t of that sequence: slot p % 16 of block block_table[b][h][p / 16].
// The pool is [num_blocks][16 D + 128] bytes; a block (16 tokens of one KV head) holds K codes
// [16][D/2], V codes [16][D/2], then the 16 K and the 16 V param words (fp16 scale in the low
// half, fp16 zero in the high half), the layout decode_attention.cu's paged builds read.
// blockIdx.y picks K (0) or V (1), so one launch appends both.
//
// Arithmetic is encode_kv's, bit for bit: the range always contains 0 (hi = max(max, 0) * clip,
// lo = min(min, 0) * clip); scale = (hi - lo) / qmax in fp32, clamped to 1e-5, rounded to fp16;
// zero = clamp(rint(-lo / float(scale)), 0, qmax) (clamped with selects, as torch does: a row with
// lo = 0 keeps the zero point -0.0, so the cache bytes equal the reference encoder's);
// code = clamp(rint(x / float(scale)) + zero, 0, qmax) with true IEEE division (no fast math).

#define APPEND_WARPS 8
#define MIN_SCALE 1e-5f

#include "fp16_bits.cuh"  // u8/u16/u32, half_to_float, float_to_half

__device__ __forceinline__ int code_of(float x, float scale, float zero, int qmax) {
    float q = rintf(x / scale) + zero;
    return (int)fminf(fmaxf(q, 0.f), (float)qmax);
}

// E = head_dim / 32 consecutive values per lane: 2 (head_dim 64) or 4 (head_dim 128).
template <int D>
__device__ void quant_append_row(const u16* __restrict__ src, u8* __restrict__ codes,
                                 u32* __restrict__ params, int qmax, float clip) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    float x[E];
    if (E == 4) {
        uint2 raw = reinterpret_cast<const uint2*>(src)[lane];
        x[0] = half_to_float(raw.x & 0xFFFF);
        x[1] = half_to_float(raw.x >> 16);
        x[2] = half_to_float(raw.y & 0xFFFF);
        x[3] = half_to_float(raw.y >> 16);
    } else {
        u32 raw = reinterpret_cast<const u32*>(src)[lane];
        x[0] = half_to_float(raw & 0xFFFF);
        x[1] = half_to_float(raw >> 16);
    }
    float mx = x[0], mn = x[0];
#pragma unroll
    for (int e = 1; e < E; ++e) {
        mx = fmaxf(mx, x[e]);
        mn = fminf(mn, x[e]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    }
    const float xmax = fmaxf(mx, 0.f) * clip, xmin = fminf(mn, 0.f) * clip;
    const u16 scale_h = float_to_half(fmaxf((xmax - xmin) / (float)qmax, MIN_SCALE));
    const float scale = half_to_float(scale_h);
    float zero = rintf(-xmin / scale);
    zero = zero < 0.f ? 0.f : (zero > (float)qmax ? (float)qmax : zero);
    u32 packed = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) packed |= (u32)code_of(x[e], scale, zero, qmax) << (4 * e);
    if (E == 4)
        reinterpret_cast<u16*>(codes)[lane] = (u16)packed;
    else
        codes[lane] = (u8)packed;
    if (lane == 0) *params = (u32)scale_h | ((u32)float_to_half(zero) << 16);
}

// new_k / new_v: [batch, heads, T, D] fp16 contiguous. counts[b] <= T new tokens of sequence b are
// written at lengths[b] .. lengths[b] + counts[b] - 1 (the caller has allocated their blocks and
// then advances lengths).
template <int D>
__device__ void quant_append(const u16* __restrict__ new_k, const u16* __restrict__ new_v,
                             const int* __restrict__ counts, const int* __restrict__ lengths,
                             const int* __restrict__ block_table, u8* __restrict__ pool, int batch,
                             int heads, int T, int max_blocks, int qmax, float clip) {
    constexpr int BLOCK = 16 * D + 128;
    const long long row = (long long)blockIdx.x * APPEND_WARPS + (threadIdx.x >> 5);
    if (row >= (long long)batch * heads * T) return;
    const int t = (int)(row % T);
    const long long bh = row / T;  // b * heads + h
    const int b = (int)(bh / heads);
    if (t >= counts[b]) return;
    const int pos = lengths[b] + t, slot = pos % 16;
    const int block = block_table[bh * max_blocks + pos / 16];
    u8* base = pool + (long long)block * BLOCK;
    const bool is_v = blockIdx.y == 1;
    quant_append_row<D>((is_v ? new_v : new_k) + row * D, base + (is_v ? 8 * D : 0) + slot * (D / 2),
                        reinterpret_cast<u32*>(base + 16 * D + (is_v ? 64 : 0)) + slot, qmax, clip);
}

#define DEFINE_APPEND(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(APPEND_WARPS * 32) kv_quant_append_d##D(        \
        const u16* new_k, const u16* new_v, const int* counts, const int* lengths,                \
        const int* block_table, u8* pool, int batch, int heads, int T, int max_blocks, int qmax,  \
        float clip) {                                                                             \
        quant_append<D>(new_k, new_v, counts, lengths, block_table, pool, batch, heads, T,        \
                        max_blocks, qmax, clip);                                                  \
    }

DEFINE_APPEND(64)
DEFINE_APPEND(128)
