// Programmatic dependent launch (sm_90), shared by the quantize, small-M GEMM and decode kernels.
// A kernel launched with programmatic stream serialization (atom_lab.cuda.launch_pdl) may
// start while the kernel before it in the stream still runs: it must call pdl_wait() before
// touching anything that kernel writes. pdl_launch_dependents() lets such a next kernel start
// before this one ends. In a plain launch, with no dependent, and before sm_90 (no such launch),
// both are no-ops.
#pragma once

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// pdl_wait() that ptxas cannot schedule before the loads folded into `folded` have arrived. ptxas
// may sink .nc loads below griddepcontrol.wait (SASS of streamt: every weight load behind the
// ACQBULK, which loses what the early start bought); a branch on their XOR pins them ahead of it.
// `live` is true in every real launch, so the wait always runs.
__device__ __forceinline__ void pdl_wait_after_arrival(unsigned folded, bool live) {
    if (live | (folded == 0x9E3779B9u)) pdl_wait();
}

// A coherent load (ld.global, not .nc) of what the previous kernel may have written: an .nc load
// (__ldg, or a const __restrict__ argument) promises data no one writes while the kernel runs, and
// ptxas may then schedule it above griddepcontrol.wait (w4a4_gemv.cu's load_fresh_words: it did).
__device__ __forceinline__ int load_fresh_s32(const int* p) {
    int v;
    asm("ld.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
