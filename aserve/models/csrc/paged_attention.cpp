// Paged attention on the CPU: one query token against its sequence's keys and values,
// read in place from a pool of fixed-size cache blocks. Why this exists and how it is
// built: aserve/models/paged_attention.py.
//
// Layout: k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim] (contiguous);
// position p of block-table row r is at block block_tables[r, p / block_size], offset
// p % block_size. Query t reads row query_rows[t], positions [0, context_lens[t]).
//
// One work item is (query token, kv head): the scores of the whole query-head group are
// computed against each key as it is read, so each key and value is loaded once per group.
// Softmax is two-pass over a per-thread score buffer (scores, then exp and sum, then the
// weighted sum of values), all in float32. Nothing outside [0, context_len) is ever loaded
// (only prefetched, within the context's blocks), so stale NaN/inf in reused blocks cannot
// leak in.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// The hot loops use GCC/Clang vector extensions: one Vec is 16 floats, an AVX-512 register or
// two AVX2 ones (the compiler splits it for the target). Plain loops get the sums of dot
// products wrong for speed: without -ffast-math a float reduction cannot be reordered, and
// `omp simd` reductions end in a scalar chain of 16 adds per dot product.
constexpr int64_t kW = 16;
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
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// acc[g, :] += sum_j w[g * w_stride + j] * values[j, :] for NG query heads and the n rows of
// one block: the accumulators stay in registers over the block (two per head, for rows j and
// j + 1, so consecutive multiply-adds do not wait on each other).
template <int NG>
void weighted_sum(float* acc, const float* w, int64_t w_stride, const float* values, int64_t n, int64_t D) {
  int64_t c = 0;
  for (; c + kW <= D; c += kW) {
    Vec a[NG], b[NG];
    for (int g = 0; g < NG; ++g) a[g] = load(acc + g * D + c), b[g] = Vec{};
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const Vec v0 = load(values + j * D + c), v1 = load(values + (j + 1) * D + c);
      for (int g = 0; g < NG; ++g) a[g] += w[g * w_stride + j] * v0, b[g] += w[g * w_stride + j + 1] * v1;
    }
    if (j < n) {
      const Vec v0 = load(values + j * D + c);
      for (int g = 0; g < NG; ++g) a[g] += w[g * w_stride + j] * v0;
    }
    for (int g = 0; g < NG; ++g) store(acc + g * D + c, a[g] + b[g]);
  }
  for (; c < D; ++c)  // head_dim not a multiple of 16
    for (int g = 0; g < NG; ++g)
      for (int64_t j = 0; j < n; ++j) acc[g * D + c] += w[g * w_stride + j] * values[j * D + c];
}

// exp(x) for the x <= 0 of a softmax after subtracting the max. glibc's vector expf is only
// declared under -ffast-math, so a loop calling std::exp stays scalar; this branch-free
// Cephes expf (relative error ~1e-7) vectorizes. x < -87 (and -inf) give ~1e-38 instead
// of 0, which is below anything a float32 sum of terms including exp(0) = 1 can register.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float shift = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + shift) - shift;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln 2, in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return y * pow2;
}

// A block's rows as float32: float32 caches are used in place, others converted into `buf`.
inline const float* to_float(const float* src, float*, int64_t) { return src; }

inline const float* to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(s[i]) << 16;  // bfloat16 is the top half of a float32
    float f;
    std::memcpy(&f, &bits, sizeof f);
    dst[i] = f;
  }
  return dst;
}

inline const float* to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  // c10::Half converts one value at a time; the F16C/AVX-512 instructions convert 8/16.
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  return dst;
}

// Blocks sit at random places in the pool, and a 4 KiB block is too short for the hardware
// prefetcher to ramp up on (measured: ~6 GB/s per core against ~19 GB/s for a sequential
// read). So the loops ask for the block ~8 KiB ahead, into L2, as they go.
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, 0, 2);
}

template <typename scalar_t>
struct Problem {
  const scalar_t *q, *k, *v;
  scalar_t* out;
  const int32_t *tables, *rows, *lens;
  int64_t H, D, KVH, BS, G, max_blocks;
  float scale;

  const scalar_t* block_ptr(const scalar_t* cache, const int32_t* table, int64_t b, int64_t kvh) const {
    return cache + (int64_t(table[b]) * KVH + kvh) * BS * D;
  }
};

// One (query token, kv head) item. scratch: [G*D] scaled queries, [G*D] accumulators,
// [BS*D] a converted block, [G] maxima, then [G, len] scores.
template <typename scalar_t>
void attend(const Problem<scalar_t>& p, int64_t t, int64_t kvh, float* scratch) {
  const int64_t D = p.D, G = p.G, BS = p.BS, len = p.lens[t];
  const int64_t blocks = (len + BS - 1) / BS;
  const int64_t block_bytes = BS * D * int64_t(sizeof(scalar_t));
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / block_bytes);
  const int32_t* table = p.tables + int64_t(p.rows[t]) * p.max_blocks;
  float* qf = scratch;
  float* acc = qf + G * D;
  float* buf = acc + G * D;
  float* maxes = buf + BS * D;
  float* scores = maxes + G;

  // HF's GQA layout: query heads kvh*G .. kvh*G+G-1 read kv head kvh.
  const scalar_t* qt = p.q + (t * p.H + kvh * G) * D;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qt[i]) * p.scale;
  std::fill(maxes, maxes + G, -std::numeric_limits<float>::infinity());
  for (int64_t b = 0; b < std::min(ahead, blocks); ++b) prefetch(p.block_ptr(p.k, table, b, kvh), block_bytes);

  // Pass 1: scores of the group's heads against each key, and their maxima.
  for (int64_t b = 0; b < blocks; ++b) {
    if (b + ahead < blocks) prefetch(p.block_ptr(p.k, table, b + ahead, kvh), block_bytes);
    const int64_t start = b * BS, n = std::min(BS, len - start);  // never past the context
    const float* keys = to_float(p.block_ptr(p.k, table, b, kvh), buf, n * D);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < G; ++g) {
        const float s = dot(qf + g * D, keys + j * D, D);
        scores[g * len + start + j] = s;
        maxes[g] = std::max(maxes[g], s);
      }
  }
  for (int64_t b = 0; b < std::min(ahead, blocks); ++b) prefetch(p.block_ptr(p.v, table, b, kvh), block_bytes);

  // Softmax weights, left unnormalized: 1 / sum scales the output once at the end.
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * len;
    const float m = maxes[g];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      s[i] = exp_nonpositive(s[i] - m);
      sum += s[i];
    }
    maxes[g] = 1.f / sum;
  }

  // Pass 2: weighted sum of the values, heads in groups of up to 4 (accumulators in registers).
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    if (b + ahead < blocks) prefetch(p.block_ptr(p.v, table, b + ahead, kvh), block_bytes);
    const int64_t start = b * BS, n = std::min(BS, len - start);
    const float* values = to_float(p.block_ptr(p.v, table, b, kvh), buf, n * D);
    for (int64_t g = 0; g < G; g += 4) {
      float* a = acc + g * D;
      const float* w = scores + g * len + start;
      switch (std::min<int64_t>(4, G - g)) {
        case 4: weighted_sum<4>(a, w, len, values, n, D); break;
        case 3: weighted_sum<3>(a, w, len, values, n, D); break;
        case 2: weighted_sum<2>(a, w, len, values, n, D); break;
        default: weighted_sum<1>(a, w, len, values, n, D); break;
      }
    }
  }
  scalar_t* ot = p.out + (t * p.H + kvh * G) * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) ot[g * D + d] = static_cast<scalar_t>(acc[g * D + d] * maxes[g]);
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& query_rows, const at::Tensor& context_lens,
         float scale, at::Tensor& out) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), BS = k_cache.size(2);
  const Problem<scalar_t> p{q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                            query_rows.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(),
                            H, D, KVH, BS, H / KVH, block_tables.size(1), scale};
  int64_t max_len = 0;
  for (int64_t t = 0; t < T; ++t) max_len = std::max<int64_t>(max_len, p.lens[t]);

  const int64_t items = T * KVH;
  // Items differ in cost (context lengths vary; a prefill chunk's tokens grow by one position
  // each), so threads claim them one at a time instead of taking equal slices.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(items, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(2 * p.G * D + BS * D + p.G + p.G * max_len);  // once per thread and call
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;)
      attend(p, item / KVH, item % KVH, scratch.data());
  });
}

}  // namespace

namespace aserve {

at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables_in, const at::Tensor& query_rows_in,
                           const at::Tensor& context_lens_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "q must be [T, heads, head_dim] and caches [blocks, kv_heads, block_size, head_dim]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "the paged attention kernel runs on the CPU");
  TORCH_CHECK(q_in.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must have one dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  for (const auto* idx : {&block_tables_in, &query_rows_in, &context_lens_in})
    TORCH_CHECK(idx->scalar_type() == at::kInt && idx->device().is_cpu(), "index tensors must be int32 on the CPU");
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const int64_t num_blocks = k_cache.size(0), KVH = k_cache.size(1), BS = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q and the caches differ");
  TORCH_CHECK(BS > 0, "block_size must be positive");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables_in.dim() == 2 && query_rows_in.dim() == 1 && context_lens_in.dim() == 1 &&
                  query_rows_in.size(0) == T && context_lens_in.size(0) == T,
              "block_tables must be [rows, max_blocks], query_rows and context_lens [T]");
  const at::Tensor q = q_in.contiguous(), block_tables = block_tables_in.contiguous();
  const at::Tensor query_rows = query_rows_in.contiguous(), context_lens = context_lens_in.contiguous();

  // Validated here, once, so the parallel loop reads only memory that exists.
  const int64_t R = block_tables.size(0), max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* rows = query_rows.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(rows[t] >= 0 && rows[t] < R, "query_rows[", t, "] = ", rows[t], " is not a row of block_tables");
    TORCH_CHECK(lens[t] >= 1 && lens[t] <= max_blocks * BS, "context_lens[", t, "] = ", lens[t],
                " is outside [1, max_blocks * block_size]");
    const int32_t* table = tables + int64_t(rows[t]) * max_blocks;
    for (int64_t b = 0; b * BS < lens[t]; ++b)
      TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "block_tables[", rows[t], ", ", b, "] = ", table[b],
                  " is not a block of the cache");
  }

  at::Tensor out = at::empty_like(q);
  if (T == 0) return out;
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k_cache, v_cache, block_tables, query_rows, context_lens, s, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k_cache, v_cache, block_tables, query_rows, context_lens, s, out); break;
    case at::kHalf: run<c10::Half>(q, k_cache, v_cache, block_tables, query_rows, context_lens, s, out); break;
    default: TORCH_CHECK(false, "paged attention supports float32, bfloat16 and float16, not ", q.scalar_type());
  }
  return out;
}

}  // namespace aserve
