/* The routed experts' matmuls on Intel AMX (sourcelm/model/native.py builds and loads it): for rows grouped
   by expert (group e holds rows ends[e-1] .. ends[e]), in bf16 with fp32 accumulation,

     forward            out[r]  = x[r] . W_e^T           x [P, K], W [E, N, K], out [P, N]
     input gradient     gx[r]   = g[r] . W_e             g [P, N], gx [P, K]
     weight gradient    gW[e]   = sum over r in e of g[r]^T x[r]       gW [E, N, K] (zero for an empty group)

   Why by hand: torch runs a grouped matmul on the CPU as one oneDNN call per group, and each call costs
   about 20 us of set-up before any arithmetic (measured: a bf16 64x64x64 matmul takes 19 us, 512x256x256 55 us
   on 1 or 2 threads alike). With 16 experts, two projections and three matmuls each that is ~100 calls per
   MoE layer per step. Here one call per matmul covers every group: the tiny preset's gate/up projection
   (8192 rows, 256 x 256) forward 0.54 against 1.0 ms, forward + backward 1.9 against 3.5 ms.

   AMX multiplies a 16 x 32 bf16 tile of A by a 32 x 16 tile of B held in pairs along the contraction
   ("VNNI": row i of the B tile holds, for 16 columns j, the two bf16 B[2i][j], B[2i+1][j]) into a 16 x 16
   fp32 tile. Each output block of 32 x 32 uses four accumulator tiles, two A and two B tiles (all eight);
   the contraction runs in steps of 32, fp32 throughout, and the block is rounded to bf16 once at the end.
   Operands that are not in those layouts are packed first (AVX-512 shuffles, one pass): W^T pairs for the
   forward, row pairs of W for the input gradient, g^T and row pairs of x for the weight gradient.

   Every output block is computed by one thread from start to end, with the contraction in a fixed order,
   so the results do not depend on the thread count. Requires every group size, N and K to be multiples
   of 32 (the caller checks; the CPU layout pads groups to 64 rows). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out the AMX register state only to processes that ask for it (once per process) */
int grouped_gemm_ready(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* every tile 16 rows x 64 bytes (per thread: tile state is per thread) */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = 16;
        c.bytes_per_row[i] = 64;
    }
    _tile_loadconfig(&c);
}

/* c[32 x 32] (bf16, row stride ldc elements) = a[32 x k] (rows lda bytes apart) . b, where b holds the k x 32
   operand in pairs: k/2 rows ldb bytes apart, 32 pairs per row */
static inline void block32(const uint16_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int64_t k,
                           uint16_t *c, int64_t ldc) {
    float acc[4][16][16] __attribute__((aligned(64)));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < k; s += 32) {
        _tile_loadd(4, a + s, lda);
        _tile_loadd(5, (const char *)(a + s) + 16 * lda, lda);
        _tile_loadd(6, (const char *)b + s / 2 * ldb, ldb);
        _tile_loadd(7, (const char *)b + s / 2 * ldb + 64, ldb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    _tile_stored(2, acc[2], 64);
    _tile_stored(3, acc[3], 64);
    for (int t = 0; t < 4; t++) {
        uint16_t *dst = c + (t >> 1) * 16 * ldc + (t & 1) * 16;
        for (int i = 0; i < 16; i++)  /* round to nearest even, as torch's conversion */
            _mm256_storeu_si256((__m256i *)(dst + i * ldc), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(acc[t][i])));
    }
}

/* r[0..15], 16 x 16 32-bit elements: row i becomes column i */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* 16 bf16 of row a and 16 of row b -> the 16 pairs (a[j], b[j]) */
static inline __m512i pairs16(const uint16_t *a, const uint16_t *b) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                                          _mm256_loadu_si256((const __m256i *)b), 1);
    return _mm512_permutexvar_epi16(order, ab);
}

/* src [2m, c] bf16 -> dst [m, c] pairs of rows (2i, 2i+1) */
static inline void pair_rows(const uint16_t *src, int64_t m, int64_t c, uint32_t *dst) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < c; j += 16)
            _mm512_storeu_si512(dst + i * c + j, pairs16(src + 2 * i * c + j, src + (2 * i + 1) * c + j));
}

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
        /* packed[e] [k/2, n] = W_e^T in pairs: the 16 x 16 transpose of W_e's rows read as 32-bit pairs */
#pragma omp for collapse(3) schedule(static)
        for (int64_t e = 0; e < n_groups; e++)
            for (int64_t n0 = 0; n0 < n; n0 += 16)
                for (int64_t p0 = 0; p0 < k / 2; p0 += 16) {
                    const uint32_t *src = (const uint32_t *)(w + e * n * k) + n0 * (k / 2) + p0;
                    uint32_t *dst = packed + e * n * (k / 2) + p0 * n + n0;
                    __m512i r[16];
                    for (int i = 0; i < 16; i++)
                        r[i] = _mm512_loadu_si512(src + i * (k / 2));
                    transpose16(r);
                    for (int i = 0; i < 16; i++)
                        _mm512_storeu_si512(dst + i * n, r[i]);
                }
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
            for (int64_t n0 = 0; n0 < n; n0 += 16) {  /* pairs of g's rows, transposed: 32 rows of g^T's column */
                __m512i r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = pairs16(g + (r0 + 2 * i) * n + n0, g + (r0 + 2 * i + 1) * n + n0);
                transpose16(r);
                for (int i = 0; i < 16; i++)
                    _mm512_storeu_si512(g_t + (n0 + i) * rows + r0, r[i]);
            }
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

#else  /* no AMX where this was built: grouped_gemm_ready() says so and native.py never calls the rest */

int grouped_gemm_ready(void) { return 0; }

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
