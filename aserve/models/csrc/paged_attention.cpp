// Paged attention on the CPU: one query token against its sequence's keys and values,
// read in place from a pool of fixed-size cache blocks. Why this exists and how it is
// built: aserve/models/paged_attention.py.
//
// Layout: k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim] (contiguous);
// position p of block-table row r is at block block_tables[r, p / block_size], offset
// p % block_size. Query t reads row query_rows[t], positions [0, context_lens[t]).
//
// Two kinds of work item, claimed by threads one at a time:
// - A lone query token (a decode) and one kv head: the scores of the whole query-head group
//   are computed against each key as it is read, so each key and value is loaded once per
//   group. Softmax is two-pass over a per-thread score buffer (scores, then exp and sum,
//   then the weighted sum of values), all in float32.
// - A tile of consecutive query tokens of one row (a prefill chunk over cached positions)
//   and one kv head: up to 2 Vecs of query vectors (tokens x the head group) are attended together,
//   flash-attention style (an online softmax, block by block). Each block is converted once
//   for the whole tile (with AVX512-BF16 and bfloat16 caches: keys read as they are, values
//   interleaved in pairs of rows) and the products run as small register-tiled matrix products, where
//   the per-token path would read and convert the context once per token and reduce each
//   dot product across a vector: 3-4x faster for a chunk of 20 tokens (bench/paged_attention.py
//   --chunk).
// Nothing outside [0, context_len) is ever loaded (only prefetched, within the context's
// blocks), so stale NaN/inf in reused blocks cannot leak in. A tile reads its row up to its
// longest context: positions its shorter tokens must not see are in that row's context (the
// chunk's own keys and values), weighed exactly 0, but a NaN or inf value there would still
// reach them (0 * inf): the same values reach the tile's longest token anyway.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>


namespace {

namespace simd = aserve::simd;

// The hot loops use GCC/Clang vector extensions (simd.h: Vec is one AVX-512 register, or one
// AVX2 register). Plain loops get the sums of dot products wrong for speed: without
// -ffast-math a float reduction cannot be reordered, and `omp simd` reductions end in a scalar
// chain of adds per dot product.
using simd::hsum;
using simd::kW;
using simd::load;
using simd::store;
using simd::Vec;

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
  for (; c < D; ++c)  // head_dim not a multiple of the vector width
    for (int g = 0; g < NG; ++g)
      for (int64_t j = 0; j < n; ++j) acc[g * D + c] += w[g * w_stride + j] * values[j * D + c];
}

// exp(x) for the x <= 0 of a softmax after subtracting the max (simd.h).
inline float exp_nonpositive(float x) { return simd::exp_approx(x); }

// A block's rows as float32: float32 caches are used in place, others converted into `buf`.
inline const float* to_float(const float* src, float*, int64_t) { return src; }

template <typename scalar_t>
inline const float* to_float(const scalar_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(dst + i, simd::load_f(src + i));
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

// Query vectors a tile attends together: lanes of one or two Vecs (32 or 16).
constexpr int64_t kTileLanes = 2 * kW;

// Register tiles of the two products: at most 16 Vec accumulators with their operands fit the
// 32 AVX-512 registers; AVX2 has 16.
constexpr int kScoreKeys = 4;  // keys per score tile (x the tile's lane Vecs)
constexpr int kSumLanes = 4;   // query vectors per weighted-sum tile
#if defined(__AVX512F__)
constexpr int kSumChunks = 4;  // Vec chunks of head_dim per weighted-sum tile
#else
constexpr int kSumChunks = 2;
#endif

// scores[j, lane] = sum_d keys[j, d] * qt[d, lane] for n keys and NV lane Vecs (qt is the
// tile's queries transposed, [D, NV * kW]): each key element is broadcast against a whole Vec
// of queries, so no dot product is ever reduced across a vector.
template <int NV>
void tile_scores(const float* qt, const float* keys, int64_t n, int64_t D, float* scores) {
  constexpr int64_t NL = NV * kW;
  int64_t j = 0;
  for (; j + kScoreKeys <= n; j += kScoreKeys) {
    Vec acc[kScoreKeys][NV] = {};
    for (int64_t d = 0; d < D; ++d) {
      Vec qv[NV];
      for (int v = 0; v < NV; ++v) qv[v] = load(qt + d * NL + v * kW);
      for (int k = 0; k < kScoreKeys; ++k) {
        const float kd = keys[(j + k) * D + d];
        for (int v = 0; v < NV; ++v) acc[k][v] += kd * qv[v];
      }
    }
    for (int k = 0; k < kScoreKeys; ++k)
      for (int v = 0; v < NV; ++v) store(scores + (j + k) * NL + v * kW, acc[k][v]);
  }
  for (; j < n; ++j) {
    Vec acc[NV] = {};
    for (int64_t d = 0; d < D; ++d)
      for (int v = 0; v < NV; ++v) acc[v] += keys[j * D + d] * load(qt + d * NL + v * kW);
    for (int v = 0; v < NV; ++v) store(scores + j * NL + v * kW, acc[v]);
  }
}

// acc[lane, :] = acc[lane, :] * alpha[lane] + sum_j w[j, lane] * values[j, :] for lanes
// [l0, l0 + NQ) and head_dim chunks [c0, c0 + NC * kW).
template <int NQ, int NC>
void tile_sum(float* acc, const float* alpha, const float* w, int64_t NL, const float* values, int64_t n,
              int64_t D, int64_t l0, int64_t c0) {
  Vec a[NQ][NC];
  for (int q = 0; q < NQ; ++q)
    for (int c = 0; c < NC; ++c) a[q][c] = load(acc + (l0 + q) * D + c0 + c * kW) * alpha[l0 + q];
  for (int64_t j = 0; j < n; ++j) {
    Vec v[NC];
    for (int c = 0; c < NC; ++c) v[c] = load(values + j * D + c0 + c * kW);
    for (int q = 0; q < NQ; ++q) {
      const float wq = w[j * NL + l0 + q];
      for (int c = 0; c < NC; ++c) a[q][c] += wq * v[c];
    }
  }
  for (int q = 0; q < NQ; ++q)
    for (int c = 0; c < NC; ++c) store(acc + (l0 + q) * D + c0 + c * kW, a[q][c]);
}

template <int NQ>
void tile_sum_lanes(float* acc, const float* alpha, const float* w, int64_t NL, const float* values, int64_t n,
                    int64_t D, int64_t l0) {
  int64_t c0 = 0;
  for (; c0 + kSumChunks * kW <= D; c0 += kSumChunks * kW)
    tile_sum<NQ, kSumChunks>(acc, alpha, w, NL, values, n, D, l0, c0);
  for (; c0 < D; c0 += kW) tile_sum<NQ, 1>(acc, alpha, w, NL, values, n, D, l0, c0);  // tiles need D % kW == 0
}

#if defined(__AVX512BF16__)
// The tile's two products in bfloat16 pairs (AVX512-BF16's dot product of pairs,
// vdpbf16ps): twice the multiply-adds of a float32 FMA per instruction, and the keys are read
// as they lie in the cache, with no conversion. Scores, softmax and sums stay float32; only
// the softmax weights are rounded to bfloat16 for the weighted sum, as flash attention does
// on GPUs. Needs head_dim % 32 == 0.
constexpr bool kBf16Pairs = true;
constexpr int kPairKeys = 8;  // keys per score tile (x the tile's lane Vecs): 16 accumulators at NV = 2

inline uint32_t word(const c10::BFloat16* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// scores[j, lane] = scale * sum_d keys[j, d] * q[lane, d], qp[dp * NL + lane] holding the
// pair (q[lane, 2dp], q[lane, 2dp + 1]).
template <int NV>
void tile_scores_bf16(const uint32_t* qp, const c10::BFloat16* keys, int64_t n, int64_t D, float scale,
                      float* scores) {
  constexpr int64_t NL = NV * kW;
  const __m512 scaled = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + kPairKeys <= n; j += kPairKeys) {
    __m512 acc[kPairKeys][NV];
    for (int k = 0; k < kPairKeys; ++k)
      for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_setzero_ps();
    for (int64_t dp = 0; dp < D / 2; ++dp) {
      __m512bh qv[NV];
      for (int v = 0; v < NV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qp + dp * NL + v * kW);
      for (int k = 0; k < kPairKeys; ++k) {
        const __m512bh kd = (__m512bh)_mm512_set1_epi32(int32_t(word(keys + (j + k) * D + 2 * dp)));
        for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_dpbf16_ps(acc[k][v], qv[v], kd);
      }
    }
    for (int k = 0; k < kPairKeys; ++k)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(scores + (j + k) * NL + v * kW, _mm512_mul_ps(acc[k][v], scaled));
  }
  for (; j < n; ++j) {
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t dp = 0; dp < D / 2; ++dp) {
      const __m512bh kd = (__m512bh)_mm512_set1_epi32(int32_t(word(keys + j * D + 2 * dp)));
      for (int v = 0; v < NV; ++v)
        acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_loadu_si512(qp + dp * NL + v * kW), kd);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(scores + j * NL + v * kW, _mm512_mul_ps(acc[v], scaled));
  }
}

// The block's n value rows in pairs of rows: vp[(jp * D + c) * 2 + i] = values[2jp + i, c]; a
// missing last row (n odd) is zeros, never read from the cache.
inline void pair_values(const c10::BFloat16* values, int64_t n, int64_t D, c10::BFloat16* vp) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t jp = 0; 2 * jp < n; ++jp) {
    const c10::BFloat16* r0 = values + 2 * jp * D;
    const bool second = 2 * jp + 1 < n;
    for (int64_t c = 0; c < D; c += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + c);
      const __m512i b = second ? _mm512_loadu_si512(r0 + D + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + (jp * D + c) * 2, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vp + (jp * D + c + 16) * 2, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// The weights w[j, lane] (float32) of rows 2jp and 2jp + 1 as one bfloat16 pair per lane,
// rounded as simd::store_f rounds: wp[jp * NL + lane].
template <int NV>
void pair_weights(const float* w, int64_t n, uint32_t* wp) {
  constexpr int64_t NL = NV * kW;
  for (int64_t jp = 0; 2 * jp < n; ++jp)
    for (int v = 0; v < NV; ++v) {
      const simd::UVec a = simd::bf16_rounded(load(w + 2 * jp * NL + v * kW));
      const simd::UVec b = 2 * jp + 1 < n ? simd::bf16_rounded(load(w + (2 * jp + 1) * NL + v * kW)) : simd::UVec{};
      const simd::UVec pair = (a >> 16) | (b & 0xFFFF0000u);
      std::memcpy(wp + jp * NL + v * kW, &pair, sizeof pair);
    }
}

// acc[lane, :] = acc[lane, :] * alpha[lane] + sum_j w[j, lane] * values[j, :] for lanes
// [l0, l0 + NQ) and head_dim chunks [c0, c0 + NC * kW), from the paired values and weights.
template <int NQ, int NC>
void tile_sum_bf16(float* acc, const float* alpha, const uint32_t* wp, int64_t NL, const c10::BFloat16* vp,
                   int64_t pairs, int64_t D, int64_t l0, int64_t c0) {
  __m512 a[NQ][NC];
  for (int q = 0; q < NQ; ++q)
    for (int c = 0; c < NC; ++c)
      a[q][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (l0 + q) * D + c0 + c * kW), _mm512_set1_ps(alpha[l0 + q]));
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512bh v[NC];
    for (int c = 0; c < NC; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + (jp * D + c0 + c * kW) * 2);
    for (int q = 0; q < NQ; ++q) {
      const __m512bh wq = (__m512bh)_mm512_set1_epi32(int32_t(wp[jp * NL + l0 + q]));
      for (int c = 0; c < NC; ++c) a[q][c] = _mm512_dpbf16_ps(a[q][c], v[c], wq);
    }
  }
  for (int q = 0; q < NQ; ++q)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + (l0 + q) * D + c0 + c * kW, a[q][c]);
}
#else
constexpr bool kBf16Pairs = false;
#endif

// One tile: query vectors [lane0, lane0 + nq) of the run of tokens of one row that starts at
// t0, for kv head kvh; vector i is token t0 + i / G, head i % G of the group.
// scratch: [D, NL] transposed queries, [NL, D] accumulators, [BS, D] x 2 converted keys and
// values, [BS, NL] scores, then maxima, sums, rescales and context lengths per lane.
// PAIRS (bfloat16 caches with AVX512-BF16): the products in bfloat16 pairs, above; the
// scratch then holds the paired queries, values and weights where the float32 copies would be.
template <typename scalar_t, int NV, bool PAIRS>
void attend_tile(const Problem<scalar_t>& p, int64_t t0, int64_t lane0, int64_t nq, int64_t kvh, float* scratch) {
  constexpr int64_t NL = NV * kW;
  const int64_t D = p.D, G = p.G, BS = p.BS;
  float* qt = scratch;
  float* acc = qt + D * NL;
  float* kbuf = acc + NL * D;
  float* vbuf = kbuf + BS * D;
  float* s = vbuf + BS * D;
  float* m = s + BS * NL;
  float* l = m + NL;
  float* alpha = l + NL;
  float* lens = alpha + NL;

  int64_t len = 0;  // the tile's longest context
  for (int64_t lane = 0; lane < NL; ++lane) {
    const bool real = lane < nq;
    const int64_t t = t0 + (lane0 + lane) / G;
    // Lanes past the tile's queries attend to position 0 with a zero query: finite, unused.
    lens[lane] = real ? float(p.lens[t]) : 1.f;
    if (real) len = std::max<int64_t>(len, p.lens[t]);
    const scalar_t* qv = p.q + (t * p.H + kvh * G + (lane0 + lane) % G) * D;
#if defined(__AVX512BF16__)
    if constexpr (PAIRS) {
      uint32_t* qp = reinterpret_cast<uint32_t*>(qt);
      for (int64_t dp = 0; dp < D / 2; ++dp) qp[dp * NL + lane] = real ? word(qv + 2 * dp) : 0u;
    } else
#endif
      for (int64_t d = 0; d < D; ++d) qt[d * NL + lane] = real ? static_cast<float>(qv[d]) * p.scale : 0.f;
    m[lane] = -std::numeric_limits<float>::max();
    l[lane] = 0.f;
  }
  std::fill(acc, acc + NL * D, 0.f);
  const int32_t* table = p.tables + int64_t(p.rows[t0]) * p.max_blocks;
  const int64_t blocks = (len + BS - 1) / BS;
  const int64_t block_bytes = BS * D * int64_t(sizeof(scalar_t));

  for (int64_t b = 0; b < blocks; ++b) {
    if (b + 1 < blocks) {
      prefetch(p.block_ptr(p.k, table, b + 1, kvh), block_bytes);
      prefetch(p.block_ptr(p.v, table, b + 1, kvh), block_bytes);
    }
    const int64_t start = b * BS, n = std::min(BS, len - start);  // never past the longest context
#if defined(__AVX512BF16__)
    if constexpr (PAIRS)
      tile_scores_bf16<NV>(reinterpret_cast<const uint32_t*>(qt), p.block_ptr(p.k, table, b, kvh), n, D, p.scale, s);
    else
#endif
      tile_scores<NV>(qt, to_float(p.block_ptr(p.k, table, b, kvh), kbuf, n * D), n, D, s);

    // Online softmax: the block's maxima, the rescale of what was summed so far, then the
    // weights, exactly 0 for positions a lane must not see.
    float* fresh = alpha;  // the new maxima first, then the rescales
    std::copy(m, m + NL, fresh);
    for (int64_t j = 0; j < n; ++j) {
      const float pos = float(start + j);
#pragma omp simd
      for (int64_t lane = 0; lane < NL; ++lane)
        if (pos < lens[lane]) fresh[lane] = std::max(fresh[lane], s[j * NL + lane]);
    }
#pragma omp simd
    for (int64_t lane = 0; lane < NL; ++lane) {
      const float fresh_max = fresh[lane];
      alpha[lane] = exp_nonpositive(m[lane] - fresh_max);
      m[lane] = fresh_max;
      l[lane] *= alpha[lane];
    }
    for (int64_t j = 0; j < n; ++j) {
      const float pos = float(start + j);
#pragma omp simd
      for (int64_t lane = 0; lane < NL; ++lane) {
        const float w = pos < lens[lane] ? exp_nonpositive(s[j * NL + lane] - m[lane]) : 0.f;
        s[j * NL + lane] = w;
        l[lane] += w;
      }
    }

#if defined(__AVX512BF16__)
    if constexpr (PAIRS) {
      c10::BFloat16* vp = reinterpret_cast<c10::BFloat16*>(vbuf);
      uint32_t* wp = reinterpret_cast<uint32_t*>(kbuf);
      pair_values(p.block_ptr(p.v, table, b, kvh), n, D, vp);
      pair_weights<NV>(s, n, wp);
      for (int64_t l0 = 0; l0 < nq; l0 += kSumLanes) {
        int64_t c0 = 0;
        for (; c0 + 4 * kW <= D; c0 += 4 * kW) tile_sum_bf16<kSumLanes, 4>(acc, alpha, wp, NL, vp, (n + 1) / 2, D, l0, c0);
        if (c0 < D) tile_sum_bf16<kSumLanes, 2>(acc, alpha, wp, NL, vp, (n + 1) / 2, D, l0, c0);  // D % 64 == 32
      }
      continue;
    }
#endif
    const float* values = to_float(p.block_ptr(p.v, table, b, kvh), vbuf, n * D);
    for (int64_t l0 = 0; l0 < nq; l0 += kSumLanes) tile_sum_lanes<kSumLanes>(acc, alpha, s, NL, values, n, D, l0);
  }

  for (int64_t lane = 0; lane < nq; ++lane) {
    scalar_t* ot = p.out + ((t0 + (lane0 + lane) / G) * p.H + kvh * G + (lane0 + lane) % G) * D;
    const float inv = 1.f / l[lane];
    for (int64_t d = 0; d < D; ++d) ot[d] = static_cast<scalar_t>(acc[lane * D + d] * inv);
  }
}

struct Item {
  int64_t t0, lane0, nq, kvh;  // nq == 0: token t0 alone, the per-token path
};

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

  // Consecutive tokens of one row (a prefill chunk) go in tiles of up to kTileLanes query vectors
  // (token, head of the group), split evenly; the tiles come first, as they cost the most, and
  // lone tokens (decodes) after them.
  std::vector<Item> items, singles;
  const bool tiled = D % kW == 0;
  for (int64_t t = 0; t < T;) {
    int64_t end = t + 1;
    while (end < T && p.rows[end] == p.rows[t]) ++end;
    if (end - t > 1 && tiled) {
      const int64_t vectors = (end - t) * p.G, n_tiles = (vectors + kTileLanes - 1) / kTileLanes;
      for (int64_t i = 0; i < n_tiles; ++i) {
        const int64_t lane0 = vectors * i / n_tiles, nq = vectors * (i + 1) / n_tiles - lane0;
        for (int64_t kvh = 0; kvh < KVH; ++kvh) items.push_back({t, lane0, nq, kvh});
      }
    } else {
      for (int64_t u = t; u < end; ++u)
        for (int64_t kvh = 0; kvh < KVH; ++kvh) singles.push_back({u, 0, 0, kvh});
    }
    t = end;
  }
  items.insert(items.end(), singles.begin(), singles.end());

  // bfloat16 pairs where the CPU has them (and head_dim is whole 32-value chunks).
  constexpr bool kPairs = kBf16Pairs && std::is_same_v<scalar_t, c10::BFloat16>;
  const bool pairs = kPairs && D % 32 == 0;

  // Items differ in cost (context lengths vary; a prefill chunk's tokens grow by one position
  // each), so threads claim them one at a time instead of taking equal slices.
  std::atomic<int64_t> next{0};
  const int64_t n_items = int64_t(items.size());
  const int64_t workers = std::min<int64_t>(n_items, at::get_num_threads());
  const int64_t single_scratch = 2 * p.G * D + BS * D + p.G + p.G * max_len;
  const int64_t tile_scratch = 2 * D * kTileLanes + 2 * BS * D + BS * kTileLanes + 4 * kTileLanes;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(std::max(single_scratch, tile_scratch));  // once per thread and call
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const Item& item = items[i];
      if (item.nq == 0)
        attend(p, item.t0, item.kvh, scratch.data());
      else if (pairs && item.nq <= kW)
        attend_tile<scalar_t, 1, kPairs>(p, item.t0, item.lane0, item.nq, item.kvh, scratch.data());
      else if (pairs)
        attend_tile<scalar_t, 2, kPairs>(p, item.t0, item.lane0, item.nq, item.kvh, scratch.data());
      else if (item.nq <= kW)
        attend_tile<scalar_t, 1, false>(p, item.t0, item.lane0, item.nq, item.kvh, scratch.data());
      else
        attend_tile<scalar_t, 2, false>(p, item.t0, item.lane0, item.nq, item.kvh, scratch.data());
    }
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
