/* RMSNorm forward and backward on the CPU (sourcelm/model/native.py builds and loads it), with the
   semantics of HF's DeepSeek-V3 RMSNorm, which `norm_rope.RMSNorm` keeps as its torch code:
     y = w * round_to_x_dtype(x * rstd),   rstd = 1 / sqrt(mean(x^2) + eps)   (fp32 arithmetic)
   for x [rows, dim] in bf16 or fp32 and an fp32 weight w [dim]; y is fp32 (the promoted dtype) or, for a
   norm whose output only feeds bf16 matmuls, y rounded to bf16 (the cast autocast would apply next).
   Backward, from dy [rows, dim] (fp32, or bf16 with a bf16 y: the same values, bf16 is exact in fp32):
     g    = round_to_x_dtype(dy * w)            (autograd rounds the gradient of the cast's output)
     dx   = rstd * (g - xhat * sum(g * xhat) / dim),   xhat = x * rstd, written in x's dtype
     dw   = sum over rows of dy * round_to_x_dtype(xhat)

   Why by hand: in torch the forward is six elementwise passes and the backward about ten, each over a
   [rows, dim] activation (1-2 MB for the tiny preset, 17 norms a step); here the forward reads x once
   and the backward reads x and dy once. dw sums over rows: blocks of NORM_BLOCK rows write partial sums
   that are then added in block order, so the result does not depend on the thread count. */

#include <math.h>

#include "common.h"

#define NORM_BLOCK 32

static inline __attribute__((always_inline)) void forward_row(const void *restrict x, const float *restrict w,
                                                              int64_t dim, float eps, void *restrict y,
                                                              float *restrict rstd, int bf16, int y_bf16) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < dim; j++) {
        const float v = load(x, j, bf16);
        ss += v * v;
    }
    const float s = 1.0f / sqrtf(ss / (float)dim + eps);
    *rstd = s;
#pragma omp simd
    for (int64_t j = 0; j < dim; j++) {
        const float h = load(x, j, bf16) * s;
        store(y, j, w[j] * (bf16 ? round_to_bf16(h) : h), y_bf16);
    }
}

/* one row's dx, and its dy * round(xhat) added into `part` */
static inline __attribute__((always_inline)) void backward_row(const void *restrict x, const float *restrict w,
                                                               float s, const void *restrict dy, int64_t dim,
                                                               void *restrict dx, float *restrict part, int bf16,
                                                               int dy_bf16) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < dim; j++) {
        const float xhat = load(x, j, bf16) * s, d = load(dy, j, dy_bf16);
        const float g = d * w[j];
        dot += (bf16 ? round_to_bf16(g) : g) * xhat;
        part[j] += d * (bf16 ? round_to_bf16(xhat) : xhat);
    }
    const float c = dot / (float)dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; j++) {
        const float xhat = load(x, j, bf16) * s;
        const float g = load(dy, j, dy_bf16) * w[j];
        store(dx, j, s * ((bf16 ? round_to_bf16(g) : g) - xhat * c), bf16);
    }
}

static inline __attribute__((always_inline)) const void *row_at(const void *p, int64_t r, int64_t dim, int bf16) {
    return bf16 ? (const void *)((const uint16_t *)p + r * dim) : (const void *)((const float *)p + r * dim);
}

static void sum_partials(const float *dw_partial, int64_t blocks, int64_t dim, float *dw) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < dim; j++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < blocks; b++)
            acc += dw_partial[b * dim + j];
        dw[j] = acc;
    }
}

/* The parallel loops are written out in each exported function, not in a shared helper: OpenMP outlines
   a parallel region before inlining, so a shared one would get `bf16` as a runtime value and gcc then
   vectorises only one of the two dtypes' loops (the fp32 ones ran scalar, 5x slower). Names: the dtype
   of x, then that of y (forward) or dy (backward). */
#define RMS_NORM(XT, YT, X_BF16, Y_BF16)                                                                 \
    void rms_norm_forward_##XT##_##YT(const void *x, const float *w, int64_t rows, int64_t dim, float eps, \
                                      void *y, float *rstd) {                                           \
        const int64_t y_size = Y_BF16 ? 2 : 4;                                                          \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++)                \
            forward_row(row_at(x, r, dim, X_BF16), w, dim, eps, (char *)y + r * dim * y_size, rstd + r,  \
                        X_BF16, Y_BF16);                                                                \
    }                                                                                                   \
    void rms_norm_backward_##XT##_##YT(const void *x, const float *w, const float *rstd, const void *dy,  \
                                       int64_t rows, int64_t dim, void *dx, float *dw_partial, float *dw) { \
        const int64_t blocks = (rows + NORM_BLOCK - 1) / NORM_BLOCK;                                    \
        _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < blocks; b++) {            \
            float *part = dw_partial + b * dim;                                                         \
            memset(part, 0, (size_t)dim * sizeof(float));                                               \
            const int64_t end = (b + 1) * NORM_BLOCK < rows ? (b + 1) * NORM_BLOCK : rows;              \
            for (int64_t r = b * NORM_BLOCK; r < end; r++)                                              \
                backward_row(row_at(x, r, dim, X_BF16), w, rstd[r], row_at(dy, r, dim, Y_BF16), dim,     \
                             (void *)row_at(dx, r, dim, X_BF16), part, X_BF16, Y_BF16);                 \
        }                                                                                               \
        sum_partials(dw_partial, blocks, dim, dw);                                                      \
    }

RMS_NORM(f32, f32, 0, 0)
RMS_NORM(f32, bf16, 0, 1)
RMS_NORM(bf16, f32, 1, 0)
RMS_NORM(bf16, bf16, 1, 1)
