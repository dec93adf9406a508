// Integer aliases and fp16 <-> fp32 conversions on raw 16-bit words, shared by the KV cache
// kernels (kv_quant_append.cu, decode_attention.cu). Included through NVRTC's -I<kernels dir>.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

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
