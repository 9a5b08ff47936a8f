// y = x W^T for W held as int8 with one float32 scale per group of G weights along a row:
// GGUF's Q8_0 (G = 32) and Q6_K (G = 16, its 6-bit values fit int8) exactly as stored. torch's
// own int8 weight-only kernel takes one scale per row only, which would mean re-quantizing.
// Made for decoding (a few rows of x): every weight is read once per call and each row of x
// stays in L1 while a weight row is used. Larger batches use a dense copy (models/quantize.py).

#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "ops.h"
#include "simd.h"

namespace {

namespace simd = aserve::simd;

using simd::hsum;
using simd::kW;
using simd::load;
using simd::Vec;
typedef int8_t Bytes __attribute__((vector_size(kW)));

// kW int8 -> kW floats. GCC turns __builtin_convertvector on these types into scalar code,
// 4x slower than the widening instructions AVX-512 and AVX2 have for it.
inline Vec load_int8(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  Bytes b;
  __builtin_memcpy(&b, p, sizeof b);
  const Vec f = __builtin_convertvector(b, Vec);
#endif
  Vec v;
  __builtin_memcpy(&v, &f, sizeof v);
  return v;
}

constexpr int64_t kMaxRows = 8;  // rows of x per pass over a weight row

// R rows of x against weight rows [begin, end): R is a compile-time constant so that the R
// accumulators live in registers.
template <int R, typename scalar_t>
void rows_pass(const float* x, const int8_t* q, const float* scales, scalar_t* out, int64_t N, int64_t K, int64_t G,
               int64_t begin, int64_t end) {
  const int64_t groups = K / G;
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* qn = q + n * K;
    const float* sn = scales + n * groups;
    Vec acc[R] = {};
    for (int64_t g = 0; g < groups; ++g) {
      Vec part[R] = {};  // the group's dot products, scaled once at its end
      for (int64_t i = g * G; i < (g + 1) * G; i += kW) {
        const Vec w = load_int8(qn + i);
        for (int r = 0; r < R; ++r) part[r] += w * load(x + r * K + i);
      }
      for (int r = 0; r < R; ++r) acc[r] += part[r] * sn[g];
    }
    for (int r = 0; r < R; ++r) out[r * N + n] = static_cast<scalar_t>(hsum(acc[r]));
  }
}

template <typename scalar_t>
void run(const float* x, const int8_t* q, const float* scales, scalar_t* out, int64_t M, int64_t N, int64_t K,
         int64_t G) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const float* xm = x + m0 * K;
      scalar_t* om = out + m0 * N;
      switch (std::min(kMaxRows, M - m0)) {
        case 1: rows_pass<1>(xm, q, scales, om, N, K, G, begin, end); break;
        case 2: rows_pass<2>(xm, q, scales, om, N, K, G, begin, end); break;
        case 3: rows_pass<3>(xm, q, scales, om, N, K, G, begin, end); break;
        case 4: rows_pass<4>(xm, q, scales, om, N, K, G, begin, end); break;
        case 5: rows_pass<5>(xm, q, scales, om, N, K, G, begin, end); break;
        case 6: rows_pass<6>(xm, q, scales, om, N, K, G, begin, end); break;
        case 7: rows_pass<7>(xm, q, scales, om, N, K, G, begin, end); break;
        default: rows_pass<8>(xm, q, scales, om, N, K, G, begin, end); break;
      }
    }
  });
}

}  // namespace

namespace aserve {

at::Tensor int8_group_mm(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scales_in,
                         int64_t group) {
  TORCH_CHECK(x_in.dim() == 2 && q_in.dim() == 2 && scales_in.dim() == 2, "x, q and scales must be 2-D");
  TORCH_CHECK(x_in.device().is_cpu() && q_in.device().is_cpu() && scales_in.device().is_cpu(),
              "int8_group_mm runs on the CPU");
  TORCH_CHECK(q_in.scalar_type() == at::kChar && scales_in.scalar_type() == at::kFloat,
              "q must be int8 and scales float32");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = q_in.size(0);
  TORCH_CHECK(group > 0 && group % 16 == 0 && K % group == 0, "the group must be a multiple of 16 dividing K");
  TORCH_CHECK(q_in.size(1) == K && scales_in.size(0) == N && scales_in.size(1) == K / group,
              "q must be [N, K] and scales [N, K / group] for x [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), q = q_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = at::empty({M, N}, x_in.options());
  switch (x_in.scalar_type()) {
    case at::kFloat:
      run<float>(x.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr<float>(), out.data_ptr<float>(), M, N,
                 K, group);
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(x.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                         out.data_ptr<c10::BFloat16>(), M, N, K, group);
      break;
    case at::kHalf:
      run<c10::Half>(x.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr<float>(), out.data_ptr<c10::Half>(),
                     M, N, K, group);
      break;
    default: TORCH_CHECK(false, "int8_group_mm supports float32, bfloat16 and float16 x, not ", x_in.scalar_type());
  }
  return out;
}

}  // namespace aserve
