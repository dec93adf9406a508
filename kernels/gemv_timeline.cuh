// Per-CTA phase timeline of the small-M GEMM kernels, compiled in only with -DGEMV_TIMELINE
// (experiments/bench_gemm.py --timeline builds that variant of the modules). Without the macro
// every TL_* expands to nothing and the kernels' signatures are unchanged.
//
// A record is TL_WORDS u64 a CTA: %globaltimer (ns, comparable across SMs and launches) of the
// TL_POINTS points, then %clock64 of the same points (cycles of this SM), then the SM id.
// Points: 0 entry, 1 prologue done (loads issued / barriers set up), 2 first weight data consumed
// (earliest warp), 3 last weight data consumed (latest warp), 4 compute done (latest warp),
// 5 reduction done, 6 last store issued. "Consumed" reads the timer behind a predicate that
// depends on the loaded (or computed) register, so the read waits for the data.
#pragma once

#define TL_POINTS 7
#define TL_WORDS (2 * TL_POINTS + 1)

#ifdef GEMV_TIMELINE
#define TL_ARG , unsigned long long *__restrict__ tl_buf
#define TL_PASS , tl_buf

struct TlCta {
    unsigned long long gt[TL_POINTS], ck[TL_POINTS];
};
__shared__ TlCta tl_s;  // this CTA's record while it runs

// Timer reads ordered after `dep` is available (dep equal to the odd constant gives 0: ignorable).
__device__ __forceinline__ unsigned long long tl_gt_after(unsigned dep) {
    unsigned long long t;
    asm volatile(
        "{\n .reg .pred p;\n setp.eq.u32 p, %1, 0x9E3779B9;\n @p mov.u64 %0, 0;\n"
        " @!p mov.u64 %0, %%globaltimer;\n}\n"
        : "=l"(t)
        : "r"(dep)
        : "memory");
    return t;
}
__device__ __forceinline__ unsigned long long tl_ck_after(unsigned dep) {
    unsigned long long t;
    asm volatile(
        "{\n .reg .pred p;\n setp.eq.u32 p, %1, 0x9E3779B9;\n @p mov.u64 %0, 0;\n"
        " @!p mov.u64 %0, %%clock64;\n}\n"
        : "=l"(t)
        : "r"(dep)
        : "memory");
    return t;
}

// Points 0 and 2 keep the earliest warp, the others the latest.
#define TL_EARLIEST(P) ((P) == 0 || (P) == 2)
// At kernel entry, in every thread: initialise the record, one CTA barrier, mark point 0.
#define TL_BEGIN                                                                               \
    do {                                                                                       \
        const unsigned long long tl_g0_ = tl_gt_after(0u), tl_c0_ = tl_ck_after(0u);           \
        if (threadIdx.x < TL_POINTS) {                                                         \
            const unsigned long long v0 = TL_EARLIEST(threadIdx.x) ? ~0ull : 0ull;            \
            tl_s.gt[threadIdx.x] = v0;                                                         \
            tl_s.ck[threadIdx.x] = v0;                                                         \
        }                                                                                      \
        __syncthreads();                                                                       \
        if ((threadIdx.x & 31) == 0) {                                                         \
            atomicMin(&tl_s.gt[0], tl_g0_);                                                    \
            atomicMin(&tl_s.ck[0], tl_c0_);                                                    \
        }                                                                                      \
    } while (0)
// Record point P (lane 0 of the calling warp), after the 32-bit value DEP is available.
#define TL_MARK(P, DEP)                                                                        \
    do {                                                                                       \
        const unsigned tl_dep_ = (DEP);                                                        \
        const unsigned long long tl_g_ = tl_gt_after(tl_dep_), tl_c_ = tl_ck_after(tl_dep_);  \
        if ((threadIdx.x & 31) == 0) {                                                         \
            if (TL_EARLIEST(P)) {                                                              \
                atomicMin(&tl_s.gt[P], tl_g_);                                                 \
                atomicMin(&tl_s.ck[P], tl_c_);                                                 \
            } else {                                                                           \
                atomicMax(&tl_s.gt[P], tl_g_);                                                 \
                atomicMax(&tl_s.ck[P], tl_c_);                                                 \
            }                                                                                  \
        }                                                                                      \
    } while (0)
// Write the record (one thread, after every point was marked and made visible to it).
#define TL_STORE                                                                               \
    do {                                                                                       \
        unsigned long long* tl_r_ =                                                            \
            tl_buf + (blockIdx.y * (unsigned long long)gridDim.x + blockIdx.x) * TL_WORDS;      \
        for (int i = 0; i < TL_POINTS; ++i) {                                                  \
            tl_r_[i] = tl_s.gt[i];                                                             \
            tl_r_[TL_POINTS + i] = tl_s.ck[i];                                                 \
        }                                                                                      \
        unsigned smid;                                                                         \
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));                                      \
        tl_r_[2 * TL_POINTS] = smid;                                                           \
    } while (0)
// At the end of a kernel that every thread reaches: one barrier, thread 0 writes the record.
#define TL_END                                                                                 \
    do {                                                                                       \
        __syncthreads();                                                                       \
        if (threadIdx.x == 0) TL_STORE;                                                        \
    } while (0)
#else
#define TL_ARG
#define TL_PASS
#define TL_BEGIN \
    do {         \
    } while (0)
#define TL_MARK(P, DEP) \
    do {                \
    } while (0)
#define TL_STORE \
    do {         \
    } while (0)
#define TL_END \
    do {       \
    } while (0)
#endif
