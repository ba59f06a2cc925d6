/* The routed experts' matmuls on Intel AMX (sourcelm/model/amx.py calls them): for rows grouped
   by expert (group e holds rows ends[e-1] .. ends[e]), in bf16 with fp32 accumulation,

     forward            out[r]  = x[r] . W_e^T           x [P, K], W [E, N, K], out [P, N]
     input gradient     gx[r]   = g[r] . W_e             g [P, N], gx [P, K]
     weight gradient    gW[e]   = sum over r in e of g[r]^T x[r]       gW [E, N, K] (zero for an empty group)

   Why by hand: torch runs a grouped matmul on the CPU as one oneDNN call per group, and each call costs
   about 20 us of set-up before any arithmetic (measured: a bf16 64x64x64 matmul takes 19 us, 512x256x256 55 us
   on 1 or 2 threads alike). With 16 experts, two projections and three matmuls each that is ~100 calls per
   MoE layer per step. Here one call per matmul covers every group: the tiny preset's gate/up projection
   (8192 rows, 256 x 256) forward 0.54 against 1.0 ms, forward + backward 1.9 against 3.5 ms.

   Each 32 x 32 output block is one AMX block product (amx.h): the contraction in steps of 32, fp32
   throughout, the block rounded to bf16 once at the end. Operands that are not in AMX's layouts are packed
   first (AVX-512 shuffles, one pass): W^T pairs for the forward, row pairs of W for the input gradient,
   g^T and row pairs of x for the weight gradient.

   Every output block is computed by one thread from start to end, with the contraction in a fixed order,
   so the results do not depend on the thread count. Requires every group size, N and K to be multiples
   of 32 (the caller checks; the CPU layout pads groups to 64 rows). */

#include <stdlib.h>

#include "common.h"

#if AMX_KERNELS

#include "amx.h"

/* whether this process may use AMX (asked of the OS once; amx.py caches the answer) */
int amx_kernels_ready(void) { return request_amx(); }

static inline int64_t group_of(const int64_t *ends, int64_t row, int64_t e) {
    while (ends[e] <= row)
        e++;
    return e;
}

/* the work of a parallel loop over 32 x 32 output blocks of [rows, cols] grouped by row: block (r0, c0) of
   group e is c[r0.., c0..] = a[r0.., :k] . b_e[.., c0..] */
static void grouped_blocks(const uint16_t *a, int64_t k, const uint32_t *b, int64_t b_group, int64_t cols,
                           const int64_t *ends, int64_t n_groups, uint16_t *c) {
    const int64_t col_blocks = cols / 32, rows = ends[n_groups - 1], items = rows / 32 * col_blocks;
    const int64_t ahead = (32 + col_blocks - 1) / col_blocks;  /* rows of the next block each item prefetches */
    configure_tiles();
    int64_t e = 0;
#pragma omp for schedule(static)  /* each thread's items ascend, so its group only moves forward */
    for (int64_t item = 0; item < items; item++) {
        const int64_t r0 = item / col_blocks * 32, c0 = item % col_blocks * 32;
        for (int64_t r = r0 + 32 + item % col_blocks * ahead, i = 0; i < ahead && r < rows && r < r0 + 64; i++, r++)
            for (int64_t byte = 0; byte < k * 2; byte += 64)
                _mm_prefetch((const char *)(a + r * k) + byte, _MM_HINT_T0);
        e = group_of(ends, r0, e);
        block32(a + r0 * k, k * 2, b + e * b_group + c0, cols * 4, k, c + r0 * cols + c0, cols);
    }
    _tile_release();
}

void grouped_gemm_forward(const uint16_t *x, const uint16_t *w, const int64_t *ends, int64_t n_groups, int64_t n,
                          int64_t k, uint32_t *packed, uint16_t *out) {
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t e = 0; e < n_groups; e++)  /* packed[e] [k/2, n] = W_e^T in pairs */
            transpose_pairs(w + e * n * k, k, n, k, packed + e * n * k / 2, n);
        grouped_blocks(x, k, packed, n * k / 2, n, ends, n_groups, out);
    }
}

void grouped_gemm_input_grad(const uint16_t *g, const uint16_t *w, const int64_t *ends, int64_t n_groups, int64_t n,
                             int64_t k, uint32_t *packed, uint16_t *gx) {
#pragma omp parallel
    {
        /* packed[e] [n/2, k] = W_e's rows in pairs: W_e is already the [n, k] operand */
#pragma omp for schedule(static)
        for (int64_t e = 0; e < n_groups; e++)
            pair_rows(w + e * n * k, n / 2, k, packed + e * n * k / 2);
        grouped_blocks(g, n, packed, n * k / 2, k, ends, n_groups, gx);
    }
}

/* g_t [n, rows] = g^T and x_pairs [rows/2, k] = x's rows in pairs: scratch the caller provides */
void grouped_gemm_weight_grad(const uint16_t *g, const uint16_t *x, const int64_t *ends, int64_t n_groups, int64_t n,
                              int64_t k, uint16_t *g_t, uint32_t *x_pairs, uint16_t *gw) {
    const int64_t rows = ends[n_groups - 1];
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < rows; r0 += 32) {
            pair_rows(x + r0 * k, 16, k, x_pairs + r0 / 2 * k);
            transpose_32_rows(g + r0 * n, n, n, g_t + r0, rows);
        }
        configure_tiles();
        const int64_t nb = n / 32, kb = k / 32;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * nb * kb; item++) {
            const int64_t e = item / (nb * kb), n0 = item / kb % nb * 32, k0 = item % kb * 32;
            const int64_t start = e ? ends[e - 1] : 0;
            uint16_t *dst = gw + e * n * k + n0 * k + k0;
            if (ends[e] == start) {
                for (int i = 0; i < 32; i++)
                    memset(dst + i * k, 0, 64);
            } else {
                block32(g_t + n0 * rows + start, rows * 2, x_pairs + start / 2 * k + k0, k * 4, ends[e] - start, dst, k);
            }
        }
        _tile_release();
    }
}

#else  /* no AMX where this was built: amx_kernels_ready() says so and amx.py never calls the rest */

int amx_kernels_ready(void) { return 0; }

void grouped_gemm_forward(const uint16_t *x, const uint16_t *w, const int64_t *ends, int64_t n_groups, int64_t n,
                          int64_t k, uint32_t *packed, uint16_t *out) {
    abort();
}

void grouped_gemm_input_grad(const uint16_t *g, const uint16_t *w, const int64_t *ends, int64_t n_groups, int64_t n,
                             int64_t k, uint32_t *packed, uint16_t *gx) {
    abort();
}

void grouped_gemm_weight_grad(const uint16_t *g, const uint16_t *x, const int64_t *ends, int64_t n_groups, int64_t n,
                              int64_t k, uint16_t *g_t, uint32_t *x_pairs, uint16_t *gw) {
    abort();
}

#endif
