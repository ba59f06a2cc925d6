/* Helpers shared by the AMX kernels (grouped_gemm.c, causal_attention.c): the tile set-up, a 32 x 32
   block product, and the AVX-512 shuffles that pack operands into AMX's pair layout.

   AMX multiplies a 16 x 32 bf16 tile of A by a 32 x 16 tile of B held in pairs along the contraction
   ("VNNI": row i of the B tile holds, for 16 columns j, the two bf16 B[2i][j], B[2i+1][j]) into a 16 x 16
   fp32 tile. A 32 x 32 output block uses four accumulator tiles, two A and two B tiles (all eight). Only
   included where the compiler targets AMX (the callers check `AMX_KERNELS`). */

#ifndef SOURCELM_KERNELS_AMX_H
#define SOURCELM_KERNELS_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out the AMX register state only to processes that ask for it (once per process) */
static inline int request_amx(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* every tile 16 rows x 64 bytes (per thread: tile state is per thread) */
static inline void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = 16;
        c.bytes_per_row[i] = 64;
    }
    _tile_loadconfig(&c);
}

/* c (fp32, 32 x 32, rows ldc bytes apart) = a[32 x k] (rows lda bytes apart) . b, where b holds the k x 32
   operand in pairs: k/2 rows ldb bytes apart, 32 pairs per row; k a multiple of 32, the contraction in steps
   of 32 in order */
static inline void product32(const uint16_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int64_t k, float *c,
                             int64_t ldc) {
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
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16, ldc);
    _tile_stored(2, (char *)c + 16 * ldc, ldc);
    _tile_stored(3, (char *)(c + 16) + 16 * ldc, ldc);
}

/* 16 bf16 <-> 16 fp32; the stores round to nearest even, as torch's conversion */
static inline __m512 load16_bf16(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

static inline void store16_bf16(uint16_t *dst, __m512 v) { _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(v)); }

/* the first n < 16 lanes only */
static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 load16_bf16_masked(const uint16_t *src, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src)), 16));
}

static inline void store16_bf16_masked(uint16_t *dst, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* the product rounded to bf16 into dst[32 x 32] (row stride ldc elements) */
static inline void block32(const uint16_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int64_t k,
                           uint16_t *dst, int64_t ldc) {
    float c[32][32] __attribute__((aligned(64)));
    product32(a, lda, b, ldb, k, &c[0][0], 128);
    for (int i = 0; i < 32; i++) {
        store16_bf16(dst + i * ldc, _mm512_load_ps(c[i]));
        store16_bf16(dst + i * ldc + 16, _mm512_load_ps(c[i] + 16));
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

/* 32 rows of src (ld elements apart; cols a multiple of 16) -> dst[c][0..31] = src[0..31][c] for every column c
   (dst rows ld_dst elements apart): the pairs of rows, transposed as 32-bit elements */
static inline void transpose_32_rows(const uint16_t *src, int64_t ld, int64_t cols, uint16_t *dst, int64_t ld_dst) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; i++)
            r[i] = pairs16(src + 2 * i * ld + c0, src + (2 * i + 1) * ld + c0);
        transpose16(r);
        for (int i = 0; i < 16; i++)
            _mm512_storeu_si512(dst + (c0 + i) * ld_dst, r[i]);
    }
}

/* src [rows, cols] (ld elements apart; rows and cols multiples of 16), viewed as 32-bit pairs along a row ->
   dst [cols/2, rows] (ld_dst elements apart): the pairs transposed, the B operand of src^T */
static inline void transpose_pairs(const uint16_t *src, int64_t ld, int64_t rows, int64_t cols, uint32_t *dst,
                                   int64_t ld_dst) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c0 = 0; c0 < cols / 2; c0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_loadu_si512((const uint32_t *)(src + (r0 + i) * ld) + c0);
            transpose16(r);
            for (int i = 0; i < 16; i++)
                _mm512_storeu_si512(dst + (c0 + i) * ld_dst + r0, r[i]);
        }
}

#endif
