"""A Llama-family decoder (Llama, Mistral, SmolLM, Qwen2/2.5, Qwen3) in plain PyTorch.

The forward runs over the engine's paged KV cache (see batch.py) instead of transformers'
per-call caches, so sequences can join and leave a running batch without any copying.
Q/K/V and gate/up projections are fused into one matmul each, as gpt-fast does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aserve.models.batch import ForwardBatch
from aserve.models.paged_attention import paged_attention


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
        # k_cache: [blocks, kv_heads, block_size, head_dim]; each token goes to its position's place.
        k_cache[batch.token_blocks, :, batch.token_offsets] = k
        v_cache[batch.token_blocks, :, batch.token_offsets] = v

        out = torch.empty_like(q)
        P = batch.num_paged
        if P:
            out[:P] = paged_attention(q[:P], k_cache, v_cache, batch.block_tables, batch.query_rows,
                                      batch.context_lens, self.scale)
        offset = P
        for chunk in batch.prefills:
            end = chunk.start + chunk.length
            rows = slice(offset, offset + chunk.length)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            if chunk.start == 0:
                # Nothing cached before it: attend over the chunk's own keys/values, no gather.
                kp, vp = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                # A later chunk of a long prompt: its sequence's blocks, gathered into one
                # contiguous run (a copy of the context, cheap next to n tokens attending over it);
                # token i sees every cached position up to start + i.
                kp, vp = (_gather(cache, chunk.blocks, end) for cache in (k_cache, v_cache))
                rows_pos = torch.arange(chunk.length, device=x.device).unsqueeze(1) + chunk.start
                mask = torch.arange(end, device=x.device).unsqueeze(0) <= rows_pos
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[rows] = op[0].transpose(0, 1)
            offset += chunk.length
        return self.o_proj(out.view(T, -1))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[1, kv_heads, length, head_dim]: positions [0, length) of a sequence held in `blocks`."""
    kv_heads, head_dim = cache.shape[1], cache.shape[3]
    gathered = torch.index_select(cache.transpose(0, 1), 1, blocks)  # [kv_heads, n blocks, block_size, hd], contiguous
    return gathered.view(kv_heads, -1, head_dim)[:, :length].unsqueeze(0)


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
