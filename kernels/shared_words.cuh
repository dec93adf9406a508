// A thread's 16-byte (4 words) or 8-byte (2 words) slice of a shared-memory row, as 32-bit
// words: shared by the W4A4 kernels (through w4a4_common.cuh) and the decode attention.
#pragma once

template <int WORDS>
__device__ __forceinline__ void shared_words(const unsigned char* p, unsigned (&w)[WORDS]) {
    if constexpr (WORDS == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        w[0] = v.x; w[1] = v.y;
    }
}
