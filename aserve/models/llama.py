"""A Llama-family decoder (Llama, Mistral, SmolLM, Qwen2/2.5, Qwen3) in plain PyTorch.

The forward runs over the engine's slot KV cache (see batch.py) instead of transformers'
per-call caches, so sequences can join and leave a running batch without any copying.
Q/K/V and gate/up projections are fused into one matmul each, as gpt-fast does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aserve.models.batch import ForwardBatch


@dataclass(frozen=True, slots=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    tie_word_embeddings: bool

    @property
    def attention_context_per_token(self) -> float:
        """How many cached positions a token must attend over before its attention costs as
        much as its matmuls: 2 FLOPs per weight, 4 per head dimension per cached position."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weights = self.hidden_size * (q + 2 * kv) + q * self.hidden_size + 3 * self.hidden_size * self.intermediate_size
        return weights / (2 * self.num_heads * self.head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 whatever the weights' dtype, as the reference models do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]. HF checkpoints use the rotate-half layout.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        q_size = args.num_heads * args.head_dim
        kv_size = args.num_kv_heads * args.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(args.hidden_size, q_size + 2 * kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.scale = args.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        a = self.args
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(T, a.num_heads, a.head_dim)
        k = k.view(T, a.num_kv_heads, a.head_dim)
        v = v.view(T, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # k_cache: [slots, kv_heads, max_len, head_dim]; write each token at (its slot, its position).
        k_cache[batch.token_slots, :, batch.positions] = k
        v_cache[batch.token_slots, :, batch.positions] = v

        out = torch.empty_like(q)
        D = batch.num_decodes
        if D:
            out[:D] = self._decode_attention(q[:D], batch, k_cache, v_cache)
        offset = D
        for chunk in batch.prefills:
            end = chunk.start + chunk.length
            qp = q[offset : offset + chunk.length].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            kp = k_cache[chunk.slot : chunk.slot + 1, :, :end]
            vp = v_cache[chunk.slot : chunk.slot + 1, :, :end]
            if chunk.start == 0:
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                # A later chunk of a long prompt: token i sees every cached position up to start + i.
                rows = torch.arange(chunk.length, device=x.device).unsqueeze(1) + chunk.start
                mask = torch.arange(end, device=x.device).unsqueeze(0) <= rows
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[offset : offset + chunk.length] = op[0].transpose(0, 1)
            offset += chunk.length
        return self.o_proj(out.view(T, -1))

    def _decode_attention(self, q: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> torch.Tensor:
        """All decodes of the step in two batched matmuls over a *view* of cache rows
        [0, decode_rows): no gather copy of anyone's cache. Rows of idle slots carry zero
        queries whose output is dropped. Grouped-query heads are folded into the query
        dimension, so each cached key and value is read once for its whole head group:
        1.5x faster than SDPA's q_len=1 path on CPU, where decode attention is bound by
        reading the cache. Below float32 (bfloat16 on CUDA), SDPA takes the same folded
        layout (no enable_gqa, which would rule out its masked kernels): its kernels keep the
        scores in float32, where a bfloat16 matmul rounds them first (25x the error against
        float64 in tests/test_model.py)."""
        a = self.args
        rows, ctx = batch.decode_rows, batch.decode_bias.shape[-1]
        group = a.num_heads // a.num_kv_heads
        qd = q.new_zeros(rows, a.num_kv_heads, group, a.head_dim)
        # HF's GQA layout: query head h reads kv head h // group.
        qd[batch.decode_slots] = q.view(-1, a.num_kv_heads, group, a.head_dim)
        keys, values = k_cache[:rows, :, :ctx], v_cache[:rows, :, :ctx]
        if q.dtype == torch.float32:
            scores = torch.matmul(qd * self.scale, keys.transpose(-1, -2))  # [rows, kv_heads, group, ctx]
            out = torch.matmul(torch.softmax(scores + batch.decode_bias, dim=-1), values)
        else:
            out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.decode_bias,
                                                 scale=self.scale)
        return out[batch.decode_slots].view(-1, a.num_heads, a.head_dim)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, batch, k_cache, v_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_tables(inv_freq: torch.Tensor, scaling: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] for every position the cache can hold, in float32."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope_cos = self.rope_sin = torch.empty(0)

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits [B, vocab] for the tokens in batch.logits_indices."""
        x = self.embed_tokens(batch.input_ids)
        cos = self.rope_cos[batch.positions].unsqueeze(1).to(x.dtype)
        sin = self.rope_sin[batch.positions].unsqueeze(1).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, k_cache[i], v_cache[i])
        x = self.norm(x[batch.logits_indices])
        return self.lm_head(x).float()
