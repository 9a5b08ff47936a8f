// The CPU kernels aserve builds at first use (aserve/models/cpu_kernels.py), one module.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace aserve {

// paged_attention.cpp
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_rows,
                           const at::Tensor& context_lens, double scale);

// fused.cpp: the small per-layer ops of a decoder layer, one pass each (aserve/models/fused.py)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const std::optional<at::Tensor>& residual);
void rope_store(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& k_cache,
                const at::Tensor& v_cache, const at::Tensor& token_blocks, const at::Tensor& token_offsets);
at::Tensor silu_mul(const at::Tensor& gate_up);

// int8_groups.cpp: x [M, K] times int8 weights [N, K] with float32 scales [N, K / group]
at::Tensor int8_group_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t group);

}  // namespace aserve
