/* Helpers shared by the CPU kernels (see sourcelm/model/native.py): bf16 <-> fp32 and typed loads and
   stores. Each kernel passes `bf16` as a constant at its call sites, so every dtype gets its own
   vectorised loops. */

#ifndef SOURCELM_KERNELS_COMMON_H
#define SOURCELM_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>

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

#endif
