/* The routed experts' row movements on the CPU (sourcelm/model/native.py builds and loads it; the torch
   code they stand for is in sourcelm/model/grouped_experts.py, `_Dispatch` and `_Combine`).

   Rows of `dim` values, bf16 or fp32 on either side; all arithmetic fp32, rounded once on the store.
   Indices outside [0, n) name the sentinel: a zero row (a padding row, or a slot computed elsewhere).

     gather_rows:  out[r] = w[s] * src[s / div],  s = index[r]      (w NULL: 1; src has n_src rows,
                   slots s in [0, n_src * div))
                   dispatch forward (div = K: token of a slot) and the combine's gradient per grouped row
                   (w = the slot weights)
     sum_rows:     out[t] = sum over j < k of w[t*k + j] * src[index[t*k + j]]     (w NULL: 1)
                   dispatch backward (a token's K slot gradients) and combine forward (weighted outputs)
     slot_dots:    out[s] = <src[index[s]], grad[s / k]>
                   the combine's gradient for the slot weights

   Why by hand: in torch each is a gather (`index_select`) into a [tokens * K, dim] temporary, then a
   cast, a product or a reduction over it: three or four passes over 8 MB per MoE layer and direction.
   Here each output row is read from its sources and written once. One thread computes a whole output
   row, summing in slot order, so results do not depend on the thread count. */

#include "common.h"

static inline __attribute__((always_inline)) void gather_row(const void *restrict src, int64_t n_src,
                                                             const int64_t *restrict index, int64_t div,
                                                             const float *restrict w, int64_t r, int64_t dim,
                                                             void *restrict out, int s_bf16, int d_bf16) {
    const int64_t s = index[r];
    void *o = (char *)out + r * dim * (d_bf16 ? 2 : 4);
    if (s < 0 || s >= n_src * div) {
        memset(o, 0, (size_t)dim * (d_bf16 ? 2 : 4));
        return;
    }
    const float scale = w ? w[s] : 1.0f;
    const void *x = (const char *)src + (s / div) * dim * (s_bf16 ? 2 : 4);
#pragma omp simd
    for (int64_t j = 0; j < dim; j++)
        store(o, j, scale * load(x, j, s_bf16), d_bf16);
}

static inline __attribute__((always_inline)) void sum_row(const void *restrict src, int64_t n_src,
                                                          const int64_t *restrict index, const float *restrict w,
                                                          int64_t t, int64_t k, int64_t dim, float *restrict acc,
                                                          void *restrict out, int s_bf16, int d_bf16) {
    for (int64_t j = 0; j < dim; j++)
        acc[j] = 0.0f;
    for (int64_t i = t * k; i < (t + 1) * k; i++) {
        const int64_t s = index[i];
        if (s < 0 || s >= n_src)
            continue;
        const float scale = w ? w[i] : 1.0f;
        const void *x = (const char *)src + s * dim * (s_bf16 ? 2 : 4);
#pragma omp simd
        for (int64_t j = 0; j < dim; j++)
            acc[j] += scale * load(x, j, s_bf16);
    }
    void *o = (char *)out + t * dim * (d_bf16 ? 2 : 4);
#pragma omp simd
    for (int64_t j = 0; j < dim; j++)
        store(o, j, acc[j], d_bf16);
}

static inline __attribute__((always_inline)) float slot_dot(const void *restrict src, int64_t n_src,
                                                            const int64_t *restrict index,
                                                            const void *restrict grad, int64_t s, int64_t k,
                                                            int64_t dim, int bf16) {
    const int64_t row = index[s];
    if (row < 0 || row >= n_src)
        return 0.0f;
    const void *x = (const char *)src + row * dim * (bf16 ? 2 : 4);
    const void *g = (const char *)grad + (s / k) * dim * (bf16 ? 2 : 4);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < dim; j++)
        dot += load(x, j, bf16) * load(g, j, bf16);
    return dot;
}

/* One exported function per dtype pair, each with its own parallel loop, so that every pair gets
   vectorised loops (an OpenMP region shared through a runtime flag is vectorised for one only). */
#define GATHER_ROWS(NAME, S_BF16, D_BF16)                                                                   \
    void NAME(const void *src, int64_t n_src, const int64_t *index, int64_t div, const float *w,           \
              int64_t rows, int64_t dim, void *out) {                                                       \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++)                     \
            gather_row(src, n_src, index, div, w, r, dim, out, S_BF16, D_BF16);                              \
    }

#define SUM_ROWS(NAME, S_BF16, D_BF16)                                                                      \
    void NAME(const void *src, int64_t n_src, const int64_t *index, const float *w, int64_t tokens,         \
              int64_t k, int64_t dim, void *out) {                                                          \
        _Pragma("omp parallel") {                                                                           \
            float acc[dim];                                                                                 \
            _Pragma("omp for schedule(static)") for (int64_t t = 0; t < tokens; t++)                        \
                sum_row(src, n_src, index, w, t, k, dim, acc, out, S_BF16, D_BF16);                         \
        }                                                                                                   \
    }

#define SLOT_DOTS(NAME, BF16)                                                                               \
    void NAME(const void *src, int64_t n_src, const int64_t *index, const void *grad, int64_t slots,        \
              int64_t k, int64_t dim, float *out) {                                                         \
        _Pragma("omp parallel for schedule(static)") for (int64_t s = 0; s < slots; s++)                    \
            out[s] = slot_dot(src, n_src, index, grad, s, k, dim, BF16);                                     \
    }

GATHER_ROWS(gather_rows_f32_f32, 0, 0)
GATHER_ROWS(gather_rows_f32_bf16, 0, 1)
GATHER_ROWS(gather_rows_bf16_f32, 1, 0)
GATHER_ROWS(gather_rows_bf16_bf16, 1, 1)
SUM_ROWS(sum_rows_f32_f32, 0, 0)
SUM_ROWS(sum_rows_f32_bf16, 0, 1)
SUM_ROWS(sum_rows_bf16_f32, 1, 0)
SUM_ROWS(sum_rows_bf16_bf16, 1, 1)
SLOT_DOTS(slot_dots_f32, 0)
SLOT_DOTS(slot_dots_bf16, 1)
