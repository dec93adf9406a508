// Diagnostic: how fast can a kernel just read a buffer (the paged KV pool) in the attention
// bench's timing? Threads walk 16-byte words keeping UNROLL loads in flight (ld.global.nc, no L1
// allocation) and fold them into one word; one word a CTA is written so the loads cannot be
// dropped. bench_attention.py --ablate times it beside the decode kernels.
#define UNROLL 4

// XOR of the words i, i + stride, ... below end.
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
    sink_word(read_words(src, (long long)blockIdx.x * blockDim.x + threadIdx.x, n16, stride), sink);
}

// CTA c reads one contiguous range [c * per_cta, (c + 1) * per_cta) of the words, as a decode
// CTA takes one sequence's blocks: many separate streams instead of one sweep.
extern "C" __global__ void __launch_bounds__(256) read_probe_ranges(const uint4* __restrict__ src,
                                                                    long long n16,
                                                                    long long per_cta,
                                                                    unsigned* __restrict__ sink) {
    const long long begin = blockIdx.x * per_cta, end = min(begin + per_cta, n16);
    sink_word(read_words(src, begin + threadIdx.x, end, 256), sink);
}
