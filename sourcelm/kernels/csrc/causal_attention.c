/* Causal attention on Intel AMX, forward and backward (sourcelm/model/amx.py builds the call).

   Per (batch, head) unit u, with T rows, q and k of width D, v of width Dv:
     s = scale * q k^T, masked above the diagonal      p = softmax(s) per row, fp32, kept in bf16
     o = p v
   and backward, from do:
     dp = do v^T      ds = p * (dp - rowsum(p * dp)) * scale      dq = ds k      dk = ds^T q      dv = p^T do
   q, k [B*H, T, D], v [B*H, T, Dv] contiguous; o and do in the [B, T, H, Dv] layout (heads last: what the
   output projection reads, so no transpose copy around the kernel); p [B*H, T, T] (zero above the diagonal);
   dq, dk, dv like q, k, v.

   Why by hand: as batched matmuls around a softmax (attention.bmm_causal) a layer of the tiny preset
   costs ten torch calls each way, every one a pass over [B*H, T, T] scores of which half are masked.
   Here a unit's scores are made one 32-row block at a time, only up to the diagonal block, and
   normalised while they sit in L1; the products skip the blocks above the diagonal. The tiny preset's
   layer (B 8, 4 heads, T 256, D 48, Dv 32, 2 threads) forward + backward: 1.9 against 3.2 ms.

   The products are AMX block products (amx.h), fp32 accumulation; the scores and the softmax are fp32
   (not rounded to bf16 first, as the flash kernels do), p and ds are rounded to bf16 once for the
   products that read them. A unit is computed by one thread from start to end, in a fixed order, so
   the results do not depend on the thread count. Requires T and Dv multiples of 32 and D of 16 (the
   caller checks); q and k are zero-padded to a multiple of 32 inside. */

#include <stdlib.h>

#include "common.h"

#if AMX_KERNELS

#include "amx.h"

#define ROUND32(x) (((x) + 31) / 32 * 32)

/* dst rows [32 x 32 block] <- c (bf16), the 16-column halves below `cols` only (cols a multiple of 16) */
static inline void store_block(const float c[32][32], uint16_t *dst, int64_t ld, int64_t cols) {
    for (int i = 0; i < 32; i++)
        for (int h = 0; h < 2 && 16 * h < cols; h++)
            store16_bf16(dst + i * ld + 16 * h, _mm512_load_ps(c[i] + 16 * h));
}

/* dst <- c^T (bf16): dst[j][i] = c[i][j], the rows i below `rows` only (a multiple of 16) */
static inline void store_block_transposed(const float c[32][32], uint16_t *dst, int64_t ld, int64_t rows) {
    for (int qi = 0; qi < 2 && 16 * qi < rows; qi++)
        for (int qj = 0; qj < 2; qj++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_castps_si512(_mm512_load_ps(c[16 * qi + i] + 16 * qj));
            transpose16(r);
            for (int j = 0; j < 16; j++)
                store16_bf16(dst + (16 * qj + j) * ld + 16 * qi, _mm512_castsi512_ps(r[j]));
        }
}

/* x [t, w] contiguous -> out [t, wp], zero columns from w on */
static void pad_columns(const uint16_t *x, int64_t t, int64_t w, int64_t wp, uint16_t *out) {
    for (int64_t i = 0; i < t; i++) {
        memcpy(out + i * wp, x + i * w, w * 2);
        memset(out + i * wp + w, 0, (wp - w) * 2);
    }
}

/* one row of scores (fp32, len valid) -> its softmax in bf16 into p, zeros up to t */
static inline void softmax_row(float *row, int64_t len, int64_t t, float scale, uint16_t *p) {
    float m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; j++)
        m = row[j] > m ? row[j] : m;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; j++) {
        row[j] = exp_nonpositive((row[j] - m) * scale);
        sum += row[j];
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int64_t j = 0; j < len; j += 16)
        store16_bf16_masked(p + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), inv), first_lanes(len - j));
    memset(p + len, 0, (t - len) * 2);
}

/* ds = p * (dp - sum(p * dp)) * scale over the len valid columns, in bf16, zeros up to t */
static inline void softmax_grad_row(const uint16_t *p, const float *dp, int64_t len, int64_t t, float scale,
                                    uint16_t *ds) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
        const __mmask16 m = first_lanes(len - j);
        acc = _mm512_fmadd_ps(load16_bf16_masked(p + j, m), _mm512_maskz_loadu_ps(m, dp + j), acc);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sc = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < len; j += 16) {
        const __mmask16 m = first_lanes(len - j);
        const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + j), total);
        store16_bf16_masked(ds + j, _mm512_mul_ps(_mm512_mul_ps(load16_bf16_masked(p + j, m), g), sc), m);
    }
    memset(ds + len, 0, (t - len) * 2);
}

int causal_attention_forward(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t batch, int64_t heads,
                             int64_t t, int64_t d, int64_t dv, float scale, uint16_t *o, uint16_t *p) {
    const int64_t dp = ROUND32(d), ld_o = heads * dv;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        uint16_t *qp = malloc(t * dp * 2);           /* q zero-padded to dp columns */
        uint16_t *kpad = malloc(t * dp * 2);         /* k zero-padded */
        uint32_t *kt = malloc(dp / 2 * t * 4);       /* k^T in pairs */
        uint32_t *vp = malloc(t / 2 * dv * 4);       /* v in row pairs */
        float *s = aligned_alloc(64, 32 * t * 4);    /* one block row of scores: [32][t] */
        float(*c)[32] = aligned_alloc(64, 32 * 32 * 4);
        failed = !(qp && kpad && kt && vp && s && c);
        if (!failed)
            configure_tiles();
#pragma omp for schedule(static)
        for (int64_t u = 0; u < batch * heads; u++) {
            if (failed)
                continue;
            const uint16_t *vu = v + u * t * dv;
            uint16_t *ou = o + u / heads * t * ld_o + u % heads * dv, *pu = p + u * t * t;
            pad_columns(q + u * t * d, t, d, dp, qp);
            pad_columns(k + u * t * d, t, d, dp, kpad);
            transpose_pairs(kpad, dp, t, dp, kt, t);
            pair_rows(vu, t / 2, dv, vp);
            for (int64_t ib = 0; ib < t; ib += 32) {
                for (int64_t jb = 0; jb <= ib; jb += 32)  /* the scores up to the diagonal block */
                    product32(qp + ib * dp, dp * 2, kt + jb, t * 4, dp, s + jb, t * 4);
                for (int64_t i = 0; i < 32; i++)  /* row ib + i attends to columns 0 .. ib + i */
                    softmax_row(s + i * t, ib + i + 1, t, scale, pu + (ib + i) * t);
                for (int64_t cb = 0; cb < dv; cb += 32) {
                    product32(pu + ib * t, t * 2, vp + cb, dv * 4, ib + 32, &c[0][0], 128);
                    store_block(c, ou + ib * ld_o + cb, ld_o, 32);
                }
            }
        }
        if (!failed)
            _tile_release();
        free(qp), free(kpad), free(kt), free(vp), free(s), free(c);
    }
    return failed ? -1 : 0;
}

int causal_attention_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *p,
                              const uint16_t *dout, int64_t batch, int64_t heads, int64_t t, int64_t d, int64_t dv,
                              float scale, uint16_t *dq, uint16_t *dk, uint16_t *dvout) {
    const int64_t dp = ROUND32(d), ld_o = heads * dv;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        uint16_t *pad = malloc(t * dp * 2);          /* q or k zero-padded to dp columns */
        uint32_t *vt = malloc(dv / 2 * t * 4);       /* v^T in pairs */
        uint32_t *kp = malloc(t / 2 * dp * 4);       /* k in row pairs */
        uint16_t *qt = malloc(dp * t * 2);           /* q^T, zero rows from d on */
        uint16_t *dot = malloc(dv * t * 2);          /* do^T */
        uint16_t *ds = malloc(t * t * 2);            /* ds, bf16 */
        uint32_t *dsp = malloc(t / 2 * t * 4);       /* ds in row pairs */
        uint32_t *pp = malloc(t / 2 * t * 4);        /* p in row pairs */
        float *s = aligned_alloc(64, 32 * t * 4);    /* one block row of dp */
        float(*c)[32] = aligned_alloc(64, 32 * 32 * 4);
        failed = !(pad && vt && kp && qt && dot && ds && dsp && pp && s && c);
        if (!failed)
            configure_tiles();
#pragma omp for schedule(static)
        for (int64_t u = 0; u < batch * heads; u++) {
            if (failed)
                continue;
            const uint16_t *vu = v + u * t * dv, *pu = p + u * t * t;
            const uint16_t *du = dout + u / heads * t * ld_o + u % heads * dv;
            transpose_pairs(vu, dv, t, dv, vt, t);
            pad_columns(k + u * t * d, t, d, dp, pad);
            pair_rows(pad, t / 2, dp, kp);
            for (int64_t ib = 0; ib < t; ib += 32) {
                for (int64_t jb = 0; jb <= ib; jb += 32)
                    product32(du + ib * ld_o, ld_o * 2, vt + jb, t * 4, dv, s + jb, t * 4);
                for (int64_t i = 0; i < 32; i++)
                    softmax_grad_row(pu + (ib + i) * t, s + i * t, ib + i + 1, t, scale, ds + (ib + i) * t);
                for (int64_t db = 0; db < dp; db += 32) {
                    product32(ds + ib * t, t * 2, kp + db, dp * 4, ib + 32, &c[0][0], 128);
                    store_block(c, dq + u * t * d + ib * d + db, d, d - db);
                }
            }
            /* dk^T = q^T ds and dv^T = do^T p, key block jb summed over the query rows from jb on */
            pair_rows(ds, t / 2, t, dsp);
            pair_rows(pu, t / 2, t, pp);
            pad_columns(q + u * t * d, t, d, dp, pad);
            for (int64_t r0 = 0; r0 < t; r0 += 32) {
                transpose_32_rows(pad + r0 * dp, dp, dp, qt + r0, t);
                transpose_32_rows(du + r0 * ld_o, ld_o, dv, dot + r0, t);
            }
            for (int64_t jb = 0; jb < t; jb += 32) {
                for (int64_t db = 0; db < d; db += 32) {
                    product32(qt + db * t + jb, t * 2, dsp + jb / 2 * t + jb, t * 4, t - jb, &c[0][0], 128);
                    store_block_transposed(c, dk + u * t * d + jb * d + db, d, d - db);
                }
                for (int64_t cb = 0; cb < dv; cb += 32) {
                    product32(dot + cb * t + jb, t * 2, pp + jb / 2 * t + jb, t * 4, t - jb, &c[0][0], 128);
                    store_block_transposed(c, dvout + u * t * dv + jb * dv + cb, dv, 32);
                }
            }
        }
        if (!failed)
            _tile_release();
        free(pad), free(vt), free(kp), free(qt), free(dot), free(ds), free(dsp), free(pp), free(s), free(c);
    }
    return failed ? -1 : 0;
}

#else  /* no AMX where this was built: amx.py never calls these (amx_kernels_ready() is 0) */

int causal_attention_forward(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t batch, int64_t heads,
                             int64_t t, int64_t d, int64_t dv, float scale, uint16_t *o, uint16_t *p) {
    abort();
}

int causal_attention_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *p,
                              const uint16_t *dout, int64_t batch, int64_t heads, int64_t t, int64_t d, int64_t dv,
                              float scale, uint16_t *dq, uint16_t *dk, uint16_t *dvout) {
    abort();
}

#endif
