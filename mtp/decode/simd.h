// The vector type and operations mtp's CPU kernels (rowdot.cpp, attend.cpp) are written in: AVX-512
// where the machine has it (16 floats a vector), else AVX2 with FMA (8).
#pragma once
#include <immintrin.h>

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
#error "mtp's CPU kernels need AVX2 and FMA, or AVX-512"
#endif

// the sum of 8 lanes, in a fixed order
static inline float sum8(__m256 a) {
    __m128 c = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    c = _mm_add_ps(c, _mm_movehl_ps(c, c));
    c = _mm_add_ss(c, _mm_movehdup_ps(c));
    return _mm_cvtss_f32(c);
}

#if defined(__AVX512F__)
#define VW 16
typedef __m512 V;
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vload(const float *p) { return _mm512_loadu_ps(p); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vset1(float a) { return _mm512_set1_ps(a); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
static inline void vstore(float *p, V a) { _mm512_storeu_ps(p, a); }
static inline float vsum(V v) { return sum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
#else
#define VW 8
typedef __m256 V;
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vload(const float *p) { return _mm256_loadu_ps(p); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vset1(float a) { return _mm256_set1_ps(a); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
static inline void vstore(float *p, V a) { _mm256_storeu_ps(p, a); }
static inline float vsum(V v) { return sum8(v); }
#endif
