// Helpers shared by the W4A4 GEMM kernels (w4a4_gemm.cu, w4a4_gemm_sm90.cu, w4a4_gemv.cu).
// Included through NVRTC's -I<kernels dir> (atom_lab/cuda.py); header-only, no state.
#pragma once

#include "mbarrier.cuh"
#include "shared_words.cuh"

// Int32 accumulators that start from the bits of 12582912.0f read back as 12582912 + dot (exact for
// |dot| < 2^22), so int -> float costs one FADD instead of a conversion.
#define MAGIC_I 0x4B400000
#define MAGIC_F 12582912.0f

// A 32-bit word of 8 signed nibbles -> two int8x4 words holding 16 * code in exact two's
// complement: the even elements and the odd ones (products come out 256x too large).
#define UNPACK_MASK 0xF0F0F0F0u
__device__ __forceinline__ unsigned evens(unsigned w) { return (w << 4) & UNPACK_MASK; }
__device__ __forceinline__ unsigned odds(unsigned w) { return w & UNPACK_MASK; }

// 16-byte global -> shared copy; `valid == false` zero-fills the destination.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }


// A thread's packed words of one row and group: 16 bytes (G = 128) or 8 (G = 64); zeros if !valid.
template <int WORDS>
__device__ __forceinline__ void load_words(const unsigned char* p, bool valid, unsigned (&w)[WORDS]) {
    if constexpr (WORDS == 4) {
        const uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else {
        const uint2 v = valid ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0, 0);
        w[0] = v.x; w[1] = v.y;
    }
}
