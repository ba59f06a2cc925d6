/* Helpers shared by the CPU kernels (see sourcelm/model/native.py): bf16 <-> fp32, typed loads and
   stores, and a vectorisable exp. Each kernel passes `bf16` as a constant at its call sites, so every
   dtype gets its own vectorised loops. */

#ifndef SOURCELM_KERNELS_COMMON_H
#define SOURCELM_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* the matmul kernels need AMX (tiles, bf16) and AVX-512 bf16 conversions; elsewhere they are stubs that
   report themselves unavailable */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define AMX_KERNELS 1
#else
#define AMX_KERNELS 0
#endif

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

/* round to nearest even, as torch's conversion does for finite values */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* the value a float has once stored in bf16 */
static inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline __attribute__((always_inline)) float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void store(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* exp(x) for x <= 0 (x - max of the row); clamped at -87, where exp is at the bottom of the normal range */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);  /* x = n ln2 + r, |r| <= ln2 / 2 */
    float r = x - n * 0.693359375f;                            /* ln2 in two parts (Cody-Waite) */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_f32((uint32_t)((int32_t)n + 127) << 23);  /* times 2^n */
}

#endif
