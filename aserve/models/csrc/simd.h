// One float vector type for the hot loops, as wide as the CPU the module is built for
// (-march=native): 16 floats with AVX-512, 8 otherwise (one AVX2 register). GCC/Clang vector
// extensions then compile to that register size. A 16-float type on an AVX2 build is lowered
// through the stack, not as two registers, once it sits in arrays of accumulators: measured
// 4-25x slower (the kernels built with -march=haswell, on the AVX-512 EPYC of 2026-12-04).
#pragma once

#include <cstdint>

namespace aserve::simd {

#if defined(__AVX512F__)
constexpr int64_t kW = 16;
#else
constexpr int64_t kW = 8;
#endif
typedef float Vec __attribute__((vector_size(kW * sizeof(float))));
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Vec4 __attribute__((vector_size(4 * sizeof(float))));

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

}  // namespace aserve::simd
