/* AdamW on a block of fp32 master weights (sourcelm/train/optim.py calls it through sourcelm/model/native.py;
   elsewhere torch's fused AdamW runs). For each element, the decoupled-decay form torch uses:
     g = grad * grad_mult                      (grad_mult: the clip factor)
     p = p * (1 - lr * weight_decay)
     m = m + (1 - beta1) * (g - m)
     v = beta2 * v + (1 - beta2) * g * g
     p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
   with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) computed by the caller.

   Why by hand: the gradient may be bf16, as backward leaves it for a weight whose forward copy is bf16,
   and the update then writes that bf16 copy for the next forward (`copy`, else NULL). torch's fused
   kernel takes neither: it would need a pass casting every gradient to fp32 first and another casting
   every updated weight back, each over all matmul weights every step.

   One call updates every block of a step (a list of them: the caller cuts the flat buffers into blocks
   inside one parameter each, the same cuts on every rank), one thread per block at a time. Elementwise,
   over 64-element chunks counted from the block's start (only its last chunk is short), so the bits
   depend neither on the thread count nor on which rank updates the block.

   The moments m and v are fp32, or bf16 as the report keeps them (`moments_bf16`): read into fp32, updated
   in fp32 as above, and rounded to nearest even on the store, as torch's fp32 -> bf16 cast rounds. The fp32
   case compiles to the same code as before the option existed. */

#include <stdlib.h>

#include "common.h"

#define CHUNK 64

/* one block of the flat buffers, as the caller lays it out (nine 8-byte fields) */
typedef struct {
    float *p;
    const void *g;
    void *m, *v; /* fp32, or bf16 when moments_bf16 */
    uint16_t *copy; /* NULL: no compute copy */
    int64_t n, grad_bf16, decayed, moments_bf16;
} adamw_block;

typedef struct {
    float grad_mult, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
} adamw_args;

static inline __attribute__((always_inline)) void update(float *restrict p, const void *restrict g,
                                                         void *restrict m, void *restrict v,
                                                         uint16_t *restrict copy, int64_t n, float decay,
                                                         const adamw_args *a, int grad_bf16, int moments_bf16) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const float gi = load(g, i, grad_bf16) * a->grad_mult;
        const float m0 = load(m, i, moments_bf16), v0 = load(v, i, moments_bf16);
        const float mi = m0 + a->one_minus_beta1 * (gi - m0);
        const float vi = a->beta2 * v0 + a->one_minus_beta2 * gi * gi;
        const float pi = p[i] * decay - a->step_size * mi / (sqrtf(vi) / a->bc2_sqrt + a->eps);
        store(m, i, mi, moments_bf16);
        store(v, i, vi, moments_bf16);
        p[i] = pi;
        if (copy)
            copy[i] = f32_to_bf16(pi);
    }
}

static void update_block(const adamw_block *b, const adamw_args *a, float decay) {
    const int64_t moment_bytes = b->moments_bf16 ? 2 : 4;
    for (int64_t lo = 0; lo < b->n; lo += CHUNK) {
        const int64_t len = b->n - lo < CHUNK ? b->n - lo : CHUNK;
        const char *g = (const char *)b->g + lo * (b->grad_bf16 ? 2 : 4);
        char *m = (char *)b->m + lo * moment_bytes, *v = (char *)b->v + lo * moment_bytes;
        uint16_t *copy = b->copy ? b->copy + lo : 0;
        /* full chunks: one specialisation per dtype combination, so the loads and stores vectorise */
        if (len == CHUNK && b->moments_bf16 && b->grad_bf16)
            update(b->p + lo, g, m, v, copy, CHUNK, decay, a, 1, 1);
        else if (len == CHUNK && b->moments_bf16)
            update(b->p + lo, g, m, v, copy, CHUNK, decay, a, 0, 1);
        else if (len == CHUNK && b->grad_bf16)
            update(b->p + lo, g, m, v, copy, CHUNK, decay, a, 1, 0);
        else if (len == CHUNK)
            update(b->p + lo, g, m, v, copy, CHUNK, decay, a, 0, 0);
        else
            update(b->p + lo, g, m, v, copy, len, decay, a, (int)b->grad_bf16, (int)b->moments_bf16);
    }
}

void adamw_blocks(const adamw_block *blocks, int64_t count, float lr, float beta1, float beta2, float eps,
                  float weight_decay, float step_size, float bc2_sqrt, float grad_mult) {
    const adamw_args a = {grad_mult, 1.0f - lr * weight_decay, 1.0f - beta1, beta2, 1.0f - beta2,
                          step_size, bc2_sqrt, eps};
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; i++)
        update_block(&blocks[i], &a, blocks[i].decayed ? a.decay : 1.0f);
}

/* Σ x² over `count` tensors (desc: pointer, length, bf16? per tensor), in fp64: fp32 partial sums over
   fixed 4096-element chunks of each tensor, added in order, so the result does not depend on the thread
   count. For the gradient norm, which must read bf16 gradients without a cast pass too. Returns -1 when
   it cannot allocate its partial sums. */
#define SQ_CHUNK 4096

double sum_squares(const int64_t *desc, int64_t count) {
    int64_t chunks = 0;
    for (int64_t t = 0; t < count; t++)
        chunks += (desc[3 * t + 1] + SQ_CHUNK - 1) / SQ_CHUNK;
    double *partial = malloc((chunks ? chunks : 1) * sizeof(double));
    int64_t *first = malloc((count ? count : 1) * sizeof(int64_t)); /* each tensor's first chunk */
    if (!partial || !first) {
        free(partial);
        free(first);
        return -1.0;
    }
    for (int64_t t = 0, c = 0; t < count; t++) {
        first[t] = c;
        c += (desc[3 * t + 1] + SQ_CHUNK - 1) / SQ_CHUNK;
    }
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t t = 0, lo_t = 0, hi_t = count - 1; /* the tensor holding global chunk c: last with first <= c */
        while (lo_t <= hi_t) {
            const int64_t mid = (lo_t + hi_t) / 2;
            if (first[mid] <= c) {
                t = mid;
                lo_t = mid + 1;
            } else {
                hi_t = mid - 1;
            }
        }
        const void *x = (const void *)desc[3 * t];
        const int64_t n = desc[3 * t + 1], lo = (c - first[t]) * SQ_CHUNK, hi = n - lo < SQ_CHUNK ? n : lo + SQ_CHUNK;
        float acc = 0.0f;
        if (desc[3 * t + 2]) {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = lo; i < hi; i++) {
                const float xi = load(x, i, 1);
                acc += xi * xi;
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = lo; i < hi; i++) {
                const float xi = load(x, i, 0);
                acc += xi * xi;
            }
        }
        partial[c] = acc;
    }
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++)
        total += partial[c];
    free(partial);
    free(first);
    return total;
}
