// Programmatic dependent launch (sm_90), shared by the quantize and small-M GEMM kernels.
// A kernel launched with programmatic stream serialization (atom_lab.kernel_ops.launch_pdl) may
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

// pdl_wait() in a block of its own (behind a branch on a launch argument ptxas cannot fold), so
// that ptxas keeps the loads issued before it ahead of it instead of hoisting the wait above them
// (seen in SASS: ACQBULK scheduled first). `cond` is true in every real launch.
__device__ __forceinline__ void pdl_wait_after_issued_loads(bool cond) {
    if (cond) pdl_wait();
}

