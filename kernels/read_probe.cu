// Diagnostic: how fast can a kernel just read a buffer (the paged KV pool) in the attention
// bench's timing? Each thread of a grid-stride loop keeps UNROLL 16-byte loads in flight
// (ld.global.nc, no L1 allocation) and folds them into one word; one word a CTA is written so
// the loads cannot be dropped. bench_attention.py --ablate times it beside the decode kernels.
#define UNROLL 4

extern "C" __global__ void __launch_bounds__(256) read_probe_v16(const uint4* __restrict__ src,
                                                                 long long n16,
                                                                 unsigned* __restrict__ sink) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + (UNROLL - 1) * stride < n16; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                         : "l"(src + i + u * stride));
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) {
        const uint4 v = src[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 16);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 8);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 4);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 2);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 1);
    if ((threadIdx.x & 31) == 0) atomicXor(sink + blockIdx.x, acc);
}

// The same reads, but CTA c takes one contiguous range of the buffer (as a decode CTA takes one
// sequence's blocks), its threads striding through it: many separate streams instead of one
// sweep. A range's 16-byte words [c * per_cta, (c + 1) * per_cta).
extern "C" __global__ void __launch_bounds__(256) read_probe_ranges(const uint4* __restrict__ src,
                                                                    long long n16,
                                                                    long long per_cta,
                                                                    unsigned* __restrict__ sink) {
    const long long begin = blockIdx.x * per_cta, end = min(begin + per_cta, n16);
    unsigned acc = 0;
    long long i = begin + threadIdx.x;
    for (; i + (UNROLL - 1) * 256 < end; i += UNROLL * 256) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                         : "l"(src + i + u * 256));
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < end; i += 256) {
        const uint4 v = src[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 16);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 8);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 4);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 2);
    acc ^= __shfl_xor_sync(0xffffffffu, acc, 1);
    if ((threadIdx.x & 31) == 0) atomicXor(sink + blockIdx.x, acc);
}
