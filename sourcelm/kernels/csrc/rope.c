/* MLA's rotary embedding on the CPU (sourcelm/model/native.py builds and loads it), with the semantics of
   `norm_rope.apply_rope`: interleaved pairs (x[2i], x[2i+1]) of a row's last d values turn by the angle of
   position t, and the result is written de-interleaved, real parts then imaginary parts:
     y[i]       = x[2i] cos[t, i] - x[2i+1] sin[t, i]
     y[i + d/2] = x[2i+1] cos[t, i] + x[2i] sin[t, i]          (i < d/2; fp32, rounded once to x's dtype)
   Backward, the transposed rotation back into the interleaved layout:
     dx[2i]   =  dy[i] cos + dy[i + d/2] sin
     dx[2i+1] = -dy[i] sin + dy[i + d/2] cos
   x is a strided view [n0, n1, T, d] (the rotary slice of the queries or keys, unit stride along d);
   y, dy and dx are contiguous. cos/sin are fp32 [T, d/2].

   Why by hand: in torch this is two strided slices, four products, two sums, a cat and a cast, each a
   pass over a small tensor that costs more in dispatch than in arithmetic (0.9 ms a layer forward for the
   tiny preset's queries and keys); here each row is read once and written once. */

#include "common.h"

static inline __attribute__((always_inline)) void forward_row(const void *restrict x, const float *restrict c,
                                                              const float *restrict s, int64_t half,
                                                              void *restrict y, int bf16) {
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float re = load(x, 2 * i, bf16), im = load(x, 2 * i + 1, bf16);
        store(y, i, re * c[i] - im * s[i], bf16);
        store(y, i + half, im * c[i] + re * s[i], bf16);
    }
}

static inline __attribute__((always_inline)) void backward_row(const void *restrict dy, const float *restrict c,
                                                               const float *restrict s, int64_t half,
                                                               void *restrict dx, int bf16) {
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float g_re = load(dy, i, bf16), g_im = load(dy, i + half, bf16);
        store(dx, 2 * i, g_re * c[i] + g_im * s[i], bf16);
        store(dx, 2 * i + 1, g_im * c[i] - g_re * s[i], bf16);
    }
}

#define ROPE(TAG, BF16)                                                                                     \
    void rope_forward_##TAG(const void *x, int64_t n0, int64_t n1, int64_t t_len, int64_t d, int64_t s0,        \
                        int64_t s1, int64_t st, const float *cos, const float *sin, void *y) {             \
        const int64_t rows = n0 * n1 * t_len, half = d / 2, size = BF16 ? 2 : 4;                           \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++) {                   \
            const int64_t t = r % t_len, j = (r / t_len) % n1, i = r / (t_len * n1);                         \
            forward_row((const char *)x + (i * s0 + j * s1 + t * st) * size, cos + t * half, sin + t * half, \
                        half, (char *)y + r * d * size, BF16);                                              \
        }                                                                                                   \
    }                                                                                                       \
    void rope_backward_##TAG(const void *dy, int64_t rows, int64_t t_len, int64_t d, const float *cos,          \
                         const float *sin, void *dx) {                                                     \
        const int64_t half = d / 2, size = BF16 ? 2 : 4;                                                    \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++) {                   \
            const int64_t t = r % t_len;                                                                    \
            backward_row((const char *)dy + r * d * size, cos + t * half, sin + t * half, half,             \
                         (char *)dx + r * d * size, BF16);                                                  \
        }                                                                                                   \
    }

ROPE(bf16, 1)
ROPE(f32, 0)
