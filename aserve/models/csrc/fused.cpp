// The small ops of a decoder layer, one pass over memory and one call each. At one decoding
// sequence a layer's activations are a few KiB, so each torch op costs its dispatch, not
// its arithmetic: the norm alone was 9 ops. Why and what they replace: aserve/models/fused.py,
// whose torch versions are the reference these are tested against. All math is float32.

#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"
#include "simd.h"

namespace {

namespace simd = aserve::simd;
using simd::hsum;
using simd::kW;
using simd::load;
using simd::load_f;
using simd::store_f;
using simd::Vec;

// Each loop runs over whole vectors (simd.h), then the last D % kW values one at a time: the
// scalar version of each was 10-20x slower in bfloat16 (a value-at-a-time conversion and a
// scalar std::exp), 17% of a batch-64 decode step of the default model.

template <typename scalar_t>
void rms_norm_rows(scalar_t* x, scalar_t* residual, const float* w, scalar_t* out, int64_t T, int64_t D,
                   float eps) {
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* xr = x + t * D;
      scalar_t* rr = residual ? residual + t * D : nullptr;
      // residual += x first, rounded to the residual's dtype as an unfused add would be
      if (rr) {
        int64_t i = 0;
        for (; i + kW <= D; i += kW) store_f(rr + i, load_f(rr + i) + load_f(xr + i));
        for (; i < D; ++i) rr[i] = static_cast<scalar_t>(static_cast<float>(rr[i]) + static_cast<float>(xr[i]));
      }
      const scalar_t* src = rr ? rr : xr;
      Vec acc = {};
      int64_t i = 0;
      for (; i + kW <= D; i += kW) {
        const Vec v = load_f(src + i);
        acc += v * v;
      }
      float sum = hsum(acc);
      for (; i < D; ++i) sum += static_cast<float>(src[i]) * static_cast<float>(src[i]);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(D) + eps);
      scalar_t* o = out + t * D;
      for (i = 0; i + kW <= D; i += kW) store_f(o + i, load_f(src + i) * inv * load(w + i));
      for (; i < D; ++i) o[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * inv * w[i]);
    }
  });
}

template <typename scalar_t>
void rope_store_rows(scalar_t* qkv, const int64_t* pos, const float* cos, const float* sin, int64_t T, int64_t H,
                     int64_t KVH, int64_t D, scalar_t* kc, scalar_t* vc, const int64_t* blocks,
                     const int64_t* offsets, int64_t BS) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* row = qkv + t * width;
      const float* c = cos + pos[t] * D;
      const float* s = sin + pos[t] * D;
      for (int64_t h = 0; h < H + KVH; ++h) {  // q heads, then k heads: rotate-half RoPE
        scalar_t* x = row + h * D;
        int64_t i = 0;
        for (; i + kW <= half; i += kW) {
          const Vec a = load_f(x + i), b = load_f(x + i + half);
          store_f(x + i, a * load(c + i) - b * load(s + i));
          store_f(x + i + half, b * load(c + i + half) + a * load(s + i + half));
        }
        for (; i < half; ++i) {
          const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + half]);
          x[i] = static_cast<scalar_t>(a * c[i] - b * s[i]);
          x[i + half] = static_cast<scalar_t>(b * c[i + half] + a * s[i + half]);
        }
      }
      for (int64_t h = 0; h < KVH; ++h) {  // cache layout [blocks, kv_heads, block_size, head_dim]
        const int64_t at = ((blocks[t] * KVH + h) * BS + offsets[t]) * D;
        std::copy(row + (H + h) * D, row + (H + h + 1) * D, kc + at);
        std::copy(row + (H + KVH + h) * D, row + (H + KVH + h + 1) * D, vc + at);
      }
    }
  });
}

template <typename scalar_t>
void silu_mul_rows(const scalar_t* gu, scalar_t* out, int64_t T, int64_t I) {
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* g = gu + t * 2 * I;
      scalar_t* o = out + t * I;
      int64_t i = 0;
      for (; i + kW <= I; i += kW) {
        const Vec a = load_f(g + i);
        store_f(o + i, a / (1.f + simd::exp_approx(-a)) * load_f(g + I + i));
      }
      for (; i < I; ++i) {
        const float a = static_cast<float>(g[i]);
        o[i] = static_cast<scalar_t>(a / (1.f + simd::exp_approx(-a)) * static_cast<float>(g[I + i]));
      }
    }
  });
}

#define ASERVE_DISPATCH(dtype, name, ...)                                                          \
  switch (dtype) {                                                                                 \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }                               \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__; break; }                    \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__; break; }                            \
    default: TORCH_CHECK(false, name " supports float32, bfloat16 and float16, not ", dtype);      \
  }

void check_cpu_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, " must be a contiguous CPU tensor");
}

}  // namespace

namespace aserve {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const std::optional<at::Tensor>& residual) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x must be [T, D], weight [D]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32");
  if (residual) {
    check_cpu_contiguous(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x in shape and dtype");
  }
  at::Tensor out = at::empty_like(x);
  ASERVE_DISPATCH(x.scalar_type(), "rms_norm",
                  rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                                          weight.data_ptr<float>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                                          static_cast<float>(eps)));
  return out;
}

void rope_store(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                int64_t num_heads, int64_t num_kv_heads, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& token_blocks, const at::Tensor& token_offsets) {
  for (const auto* t : {&qkv, &positions, &cos, &sin, &k_cache, &v_cache, &token_blocks, &token_offsets})
    check_cpu_contiguous(*t, "every rope_store argument");
  const int64_t T = qkv.size(0), D = cos.size(1), BS = k_cache.size(2), num_blocks = k_cache.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * D && D % 2 == 0,
              "qkv must be [T, (heads + 2 * kv_heads) * head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == num_kv_heads &&
                  k_cache.size(3) == D && k_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.scalar_type() == qkv.scalar_type(),
              "caches must be [blocks, kv_heads, block_size, head_dim] in qkv's dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes() && sin.scalar_type() == at::kFloat,
              "cos and sin must be float32 [positions, head_dim]");
  for (const auto* t : {&positions, &token_blocks, &token_offsets})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == T, "index tensors must be int64 [T]");
  // Validated here, once, so the parallel loop writes only memory that exists.
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* blocks = token_blocks.data_ptr<int64_t>();
  const int64_t* offsets = token_offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t], " is outside the RoPE table");
    TORCH_CHECK(blocks[t] >= 0 && blocks[t] < num_blocks && offsets[t] >= 0 && offsets[t] < BS,
                "token ", t, " has no place in the cache");
  }
  ASERVE_DISPATCH(qkv.scalar_type(), "rope_store",
                  rope_store_rows<scalar_t>(qkv.data_ptr<scalar_t>(), pos, cos.data_ptr<float>(),
                                            sin.data_ptr<float>(), T, num_heads, num_kv_heads, D,
                                            k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), blocks,
                                            offsets, BS));
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cpu_contiguous(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gate_up.options());
  ASERVE_DISPATCH(gate_up.scalar_type(), "silu_mul",
                  silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, I));
  return out;
}

}  // namespace aserve
