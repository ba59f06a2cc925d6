/* SwiGLU's elementwise part on the CPU (sourcelm/model/native.py builds and loads it; the torch code is
   `swiglu.swiglu`'s). A row of gu holds the gate projection then the up projection, n values each:
     h = silu(g) * u,   silu(g) = g * s,   s = sigmoid(g)
   Backward, from dh:
     dg = dh * u * s * (1 + g * (1 - s)),   du = dh * g * s
   written into one row of dgu in the same two halves, so the fused gate/up matmul's backward takes it
   as it is. All arithmetic fp32, rounded once on the store. gu is [rows, 2n] with row stride `ld`; h, dh
   and dgu are contiguous.

   Why by hand: torch runs silu and a product forward, two products and silu's backward in backward, each
   a pass over [rows, n] into its own temporary (and in bf16 each rounds). Here each row is read once
   and written once each way. Elementwise, so results do not depend on the thread count. */

#include "common.h"

static inline __attribute__((always_inline)) float sigmoid(float x) {
    const float e = exp_nonpositive(-fabsf(x));  /* exp(-|x|), in (0, 1] */
    const float r = 1.0f / (1.0f + e);
    return x >= 0.0f ? r : e * r;
}

static inline __attribute__((always_inline)) void forward_row(const void *restrict gu, int64_t n, void *restrict h,
                                                              int bf16) {
    const char *up = (const char *)gu + n * (bf16 ? 2 : 4);
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        const float g = load(gu, j, bf16);
        store(h, j, g * sigmoid(g) * load(up, j, bf16), bf16);
    }
}

static inline __attribute__((always_inline)) void backward_row(const void *restrict gu, const void *restrict dh,
                                                               int64_t n, void *restrict dgu, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    const char *up = (const char *)gu + n * size;
    char *dup = (char *)dgu + n * size;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        const float g = load(gu, j, bf16), u = load(up, j, bf16), d = load(dh, j, bf16), s = sigmoid(g);
        store(dgu, j, d * u * s * (1.0f + g * (1.0f - s)), bf16);
        store(dup, j, d * g * s, bf16);
    }
}

#define SWIGLU(TAG, BF16)                                                                                   \
    void swiglu_forward_##TAG(const void *gu, int64_t rows, int64_t n, int64_t ld, void *h) {               \
        const int64_t size = BF16 ? 2 : 4;                                                                  \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++)                     \
            forward_row((const char *)gu + r * ld * size, n, (char *)h + r * n * size, BF16);               \
    }                                                                                                       \
    void swiglu_backward_##TAG(const void *gu, const void *dh, int64_t rows, int64_t n, int64_t ld,          \
                               void *dgu) {                                                                 \
        const int64_t size = BF16 ? 2 : 4;                                                                  \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++)                     \
            backward_row((const char *)gu + r * ld * size, (const char *)dh + r * n * size, n,              \
                         (char *)dgu + r * 2 * n * size, BF16);                                             \
    }

SWIGLU(bf16, 1)
SWIGLU(f32, 0)
