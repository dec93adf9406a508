// Diagnostic: how fast can a kernel just read a buffer (the paged KV pool) in the attention
// bench's timing? Threads walk 16-byte words keeping UNROLL loads in flight (ld.global.nc, no L1
// allocation) and fold them into one word; one word a CTA is written so the loads cannot be
// dropped. bench_attention.py --ablate times it beside the decode kernels. The bulk probe moves
// the same ranges through the decode kernel's copy engine instead (cp.async.bulk into per-warp
// rings on mbarriers, no math), so the two read paths are compared with nothing else different.
#include "mbarrier.cuh"

#ifndef BULK_NW
#define BULK_NW 8        // warps a CTA of the bulk probe
#endif
#ifndef BULK_NST
#define BULK_NST 4       // ring stages a warp
#endif
#ifndef BULK_CHUNK
#define BULK_CHUNK 2176  // bytes a copy (one paged block of head_dim 128)
#endif

// XOR of the words i, i + stride, ... below end, UNROLL loads in flight a thread.
template <int UNROLL>
__device__ __forceinline__ unsigned read_words(const uint4* __restrict__ src, long long i,
                                               long long end, long long stride) {
    unsigned acc = 0;
    for (; i + (UNROLL - 1) * stride < end; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                         : "l"(src + i + u * stride));
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < end; i += stride) {
        const uint4 v = src[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    return acc;
}

__device__ __forceinline__ void sink_word(unsigned acc, unsigned* __restrict__ sink) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) atomicXor(sink + blockIdx.x, acc);
}

// One grid-stride sweep over the whole buffer.
extern "C" __global__ void __launch_bounds__(256) read_probe_v16(const uint4* __restrict__ src,
                                                                 long long n16,
                                                                 unsigned* __restrict__ sink) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    sink_word(read_words<4>(src, (long long)blockIdx.x * blockDim.x + threadIdx.x, n16, stride),
              sink);
}

// CTA c reads one contiguous range [c * per_cta, (c + 1) * per_cta) of the words, as a decode
// CTA takes one sequence's blocks: many separate streams instead of one sweep. _uN: N loads in
// flight a thread (16 N bytes; 4 KN a CTA of 256).
#define DEFINE_RANGES(NAME, U)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) NAME(const uint4* __restrict__ src,        \
                                                           long long n16, long long per_cta,      \
                                                           unsigned* __restrict__ sink) {         \
        const long long begin = blockIdx.x * per_cta, end = min(begin + per_cta, n16);            \
        sink_word(read_words<U>(src, begin + threadIdx.x, end, 256), sink);                      \
    }
DEFINE_RANGES(read_probe_ranges, 4)
DEFINE_RANGES(read_probe_ranges_u8, 8)
DEFINE_RANGES(read_probe_ranges_u16, 16)

// CTA c copies the same range as read_probe_ranges, BULK_CHUNK bytes a copy: warp w takes chunks
// w, w + BULK_NW, ... into its BULK_NST-stage ring, waits for each on its stage's mbarrier, reads
// one word of it and refills the stage (the decode kernel's loop without the math).
extern "C" __global__ void __launch_bounds__(BULK_NW * 32) bulk_probe_ranges(
    const unsigned char* __restrict__ src, long long bytes, long long per_cta,
    unsigned* __restrict__ sink) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) unsigned long long bars[BULK_NW * BULK_NST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long begin = blockIdx.x * per_cta, end = min(begin + per_cta, bytes);
    const int chunks = (int)((end - begin) / BULK_CHUNK);
    const int mine = chunks > warp ? (chunks - warp + BULK_NW - 1) / BULK_NW : 0;
    const unsigned stage0 = (unsigned)__cvta_generic_to_shared(ring) + warp * BULK_NST * BULK_CHUNK;
    const unsigned bar0 = (unsigned)__cvta_generic_to_shared(bars) + warp * BULK_NST * 8;
    if (lane == 0) {
        for (int i = 0; i < BULK_NST; ++i) mbar_init(bar0 + 8 * i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    auto issue = [&](int j) {
        if (lane == 0) {
            const unsigned bar = bar0 + 8 * (j % BULK_NST);
            mbar_expect_tx(bar, BULK_CHUNK);
            bulk_copy(stage0 + (j % BULK_NST) * BULK_CHUNK,
                      src + begin + (long long)(warp + j * BULK_NW) * BULK_CHUNK, BULK_CHUNK, bar);
        }
    };
    for (int j = 0; j < BULK_NST && j < mine; ++j) issue(j);
    unsigned acc = 0;
    for (int j = 0; j < mine; ++j) {
        mbar_wait(bar0 + 8 * (j % BULK_NST), (j / BULK_NST) & 1);
        acc ^= *reinterpret_cast<const unsigned*>(ring + (warp * BULK_NST + j % BULK_NST) *
                                                  BULK_CHUNK + 4 * lane);
        fence_proxy_async();
        __syncwarp();
        if (j + BULK_NST < mine) issue(j + BULK_NST);
    }
    sink_word(acc, sink);
}
