// One float vector type for the hot loops, as wide as the CPU the module is built for
// (-march=native): 16 floats with AVX-512, 8 otherwise (one AVX2 register). GCC/Clang vector
// extensions then compile to that register size. A 16-float type on an AVX2 build is lowered
// through the stack, not as two registers, once it sits in arrays of accumulators: measured
// 4-25x slower (the kernels built with -march=haswell, on the AVX-512 EPYC of 2026-12-04).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace aserve::simd {

#if defined(__AVX512F__)
constexpr int64_t kW = 16;
#else
constexpr int64_t kW = 8;
#endif
typedef float Vec __attribute__((vector_size(kW * sizeof(float))));
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Vec4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kW * sizeof(int32_t))));
typedef uint32_t UVec __attribute__((vector_size(kW * sizeof(uint32_t))));
typedef uint16_t HVec __attribute__((vector_size(kW * sizeof(uint16_t))));

inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof v); }

inline float hsum(Vec v) {
#if defined(__AVX512F__)
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const Vec8 a = v;
#endif
  const Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// kW values of an activation or cache tensor as float32, and back, rounded as torch rounds.
// bfloat16 is the top half of a float32, so both ways are a few integer vector ops; float16
// loads with the F16C/AVX-512 conversions where the CPU has them (c10::Half converts one value
// at a time) and stores a value at a time (rare on CPUs).
inline Vec load_f(const float* p) { return load(p); }

inline Vec load_f(const c10::BFloat16* p) {
  HVec h;
  __builtin_memcpy(&h, p, sizeof h);
  const UVec bits = __builtin_convertvector(h, UVec) << 16;
  Vec v;
  __builtin_memcpy(&v, &bits, sizeof v);
  return v;
}

inline Vec load_f(const c10::Half* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float f[kW];
  for (int64_t i = 0; i < kW; ++i) f[i] = static_cast<float>(p[i]);
#endif
  Vec v;
  __builtin_memcpy(&v, &f, sizeof v);
  return v;
}

// v rounded to bfloat16 to nearest even, in the top half of each 32-bit lane (the bottom half
// is left over). Every NaN becomes torch's 0x7FC0: rounding would carry a payload of all ones
// into the sign bit and make it -0.
inline UVec bf16_rounded(Vec v) {
  UVec bits;
  __builtin_memcpy(&bits, &v, sizeof bits);
  const UVec rounded = bits + (((bits >> 16) & 1u) + 0x7FFFu);
  const UVec nan = (UVec)(v != v);  // all ones in a NaN lane
  return (rounded & ~nan) | (nan & 0x7FC00000u);
}

inline void store_f(float* p, Vec v) { store(p, v); }

inline void store_f(c10::BFloat16* p, Vec v) {
  const HVec h = __builtin_convertvector(bf16_rounded(v) >> 16, HVec);
  __builtin_memcpy(p, &h, sizeof h);
}

inline void store_f(c10::Half* p, Vec v) {
  float f[kW];
  store(f, v);
  for (int64_t i = 0; i < kW; ++i) p[i] = static_cast<c10::Half>(f[i]);
}

// exp(x), x clamped to [-87, 88], for a float or a Vec. glibc's vector expf is only declared
// under -ffast-math, so std::exp in a loop stays scalar; this branch-free Cephes expf
// (relative error ~1e-7) vectorizes. Below -87 (and -inf) it gives ~1e-38 instead of 0, which
// no float32 sum that includes a term near 1 can register; above 88 it gives ~1.7e38, not inf.
template <typename F>
inline F exp_approx(F x) {
  using I = std::conditional_t<std::is_same_v<F, float>, int32_t, IVec>;
  const F lo = F{} - 87.f, hi = F{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const F shift = F{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const F n = (x * 1.44269504088896341f + shift) - shift;  // round(x / ln 2)
  const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln 2, in two parts
  F y = F{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  I e;
  if constexpr (std::is_same_v<F, float>)
    e = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  else
    e = (__builtin_convertvector(n, IVec) + 127) << 23;
  F pow2;
  std::memcpy(&pow2, &e, sizeof pow2);
  return y * pow2;
}

}  // namespace aserve::simd
