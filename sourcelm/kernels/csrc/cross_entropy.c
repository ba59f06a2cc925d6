/* The fused loss's per-chunk step on the CPU (sourcelm/model/native.py builds and loads it).

   For each row r of logits [rows, vocab] (bf16 or fp32) with label t = labels[r]:
     loss[r] = logsumexp(x_r) - x_r[t]
     grad[r] = softmax(x_r) - onehot(t), written in the logits' dtype (if grad is not NULL)
   Rows whose label is `ignore` get loss 0 and a zero gradient row. All arithmetic is fp32.
   grad may be the logits themselves: each element is read before it is written (no `restrict`).

   Why by hand: in torch this is a cast, a log-softmax, a gather, an exp, a scatter and a cast back, six
   passes over a [rows, vocab] block that does not stay in cache (2-8 MB per chunk); here each row is read
   twice while it sits in L1/L2 and written once, and its exponentials, kept in a per-thread fp32 row,
   are not computed again for the gradient (the tiny preset's 2048 x 8192 bf16 logits: 5.1 against 7.3
   ms). exp is a Cephes-style polynomial (range reduction by ln 2, degree-6 polynomial, ~1 ulp on the
   range softmax uses) so that every loop vectorises without -ffast-math or a vector math library. A row
   is handled by one thread from start to end, so the results do not depend on the thread count. NaN or
   +inf in a row make its loss NaN, which the trainer's non-finite check catches. */

#include <math.h>
#include <stdlib.h>

#include "common.h"

/* one row */
static inline __attribute__((always_inline)) void row(const void *x, int64_t target, int64_t vocab,
                                                      int64_t ignore, void *grad, float *restrict loss,
                                                      float *restrict e, int bf16) {
    if (target == ignore) {
        if (grad)
            memset(grad, 0, (size_t)vocab * (bf16 ? 2 : 4));
        *loss = 0.0f;
        return;
    }
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < vocab; j++) {
        const float v = load(x, j, bf16);
        m = v > m ? v : m;
    }
    float s = 0.0f;
    if (grad && e) {  /* keep the exponentials (fp32, one row: in L1/L2) for the gradient pass */
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < vocab; j++) {
            e[j] = exp_nonpositive(load(x, j, bf16) - m);
            s += e[j];
        }
    } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < vocab; j++)
            s += exp_nonpositive(load(x, j, bf16) - m);
    }
    const float x_t = load(x, target, bf16);
    *loss = m + logf(s) - x_t;
    if (grad) {
        const float inv = 1.0f / s;
        if (e) {
#pragma omp simd
            for (int64_t j = 0; j < vocab; j++)
                store(grad, j, e[j] * inv, bf16);
        } else {  /* no scratch row (allocation failed): the exponentials again */
#pragma omp simd
            for (int64_t j = 0; j < vocab; j++)
                store(grad, j, exp_nonpositive(load(x, j, bf16) - m) * inv, bf16);
        }
        store(grad, target, exp_nonpositive(x_t - m) * inv - 1.0f, bf16);
    }
}

#define CROSS_ENTROPY(TAG, T, BF16)                                                                         \
    void cross_entropy_rows_##TAG(const T *logits, const int64_t *labels, int64_t rows, int64_t vocab,         \
                                  int64_t ignore, T *grad, float *loss) {                                    \
        _Pragma("omp parallel") {                                                                           \
            float *e = grad ? malloc((size_t)vocab * sizeof(float)) : NULL;                                 \
            _Pragma("omp for schedule(static)") for (int64_t r = 0; r < rows; r++)                          \
                row(logits + r * vocab, labels[r], vocab, ignore, grad ? grad + r * vocab : NULL, loss + r,  \
                    e, BF16);                                                                               \
            free(e);                                                                                        \
        }                                                                                                   \
    }

CROSS_ENTROPY(bf16, uint16_t, 1)
CROSS_ENTROPY(f32, float, 0)
