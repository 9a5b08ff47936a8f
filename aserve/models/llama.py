"""A Llama-family decoder (Llama, Mistral, SmolLM, Qwen2/2.5, Qwen3) in plain PyTorch.

The forward runs over the engine's paged KV cache (see batch.py) instead of transformers'
per-call caches, so sequences can join and leave a running batch without any copying.
Q/K/V and gate/up projections are fused into one matmul each, as gpt-fast does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aserve.models import fused
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
    """Normalizes in float32 whatever the activations' dtype, as the reference models do; the
    weight stays float32 (the loader keeps it so)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps, residual)


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

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a = self.args
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.split[0], self.split[1]
        if a.qk_norm:  # Qwen3: each head of q and k normalized before RoPE
            for part, norm in ((slice(0, q_size), self.q_norm), (slice(q_size, q_size + kv_size), self.k_norm)):
                qkv[:, part] = norm(qkv[:, part].reshape(-1, a.head_dim)).view(T, -1)
        # RoPE on q and k in place, and k, v into their places in the paged cache.
        fused.rope_store(qkv, batch.positions, *rope, a.num_heads, a.num_kv_heads, k_cache, v_cache,
                         batch.token_blocks, batch.token_offsets)
        q = qkv[:, :q_size].view(T, a.num_heads, a.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(T, a.num_kv_heads, a.head_dim)
        v = qkv[:, q_size + kv_size :].view(T, a.num_kv_heads, a.head_dim)

        P = batch.num_paged
        if P == T:  # decode steps: no dense prefill chunk
            return self.o_proj(paged_attention(q, k_cache, v_cache, batch.block_tables, batch.query_rows,
                                               batch.context_lens, self.scale).view(T, -1))
        out = torch.empty_like(q)
        if P:
            out[:P] = paged_attention(q[:P], k_cache, v_cache, batch.block_tables, batch.query_rows,
                                      batch.context_lens, self.scale)
        offset = P
        for chunk in batch.prefills:
            rows = slice(offset, offset + chunk.length)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            if chunk.start == 0:
                # Nothing cached before it: attend over the chunk's own keys/values, no gather.
                kp, vp = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                op = chunk_attention(qp, k_cache, v_cache, chunk.blocks, chunk.start, self.scale)
            out[rows] = op[0].transpose(0, 1)
            offset += chunk.length
        return self.o_proj(out.view(T, -1))


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                    start: int, scale: float) -> torch.Tensor:
    """A later chunk of a long prompt, q [1, heads, n, head_dim] at positions [start, start + n):
    its sequence's `blocks` gathered into one contiguous run, then SDPA, token i seeing every
    position up to start + i. Returns [1, heads, n, head_dim]."""
    end = start + q.shape[2]
    kp, vp = (_gather(cache, blocks, end) for cache in (k_cache, v_cache))
    rows_pos = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + start
    mask = torch.arange(end, device=q.device).unsqueeze(0) <= rows_pos
    return F.scaled_dot_product_attention(q, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[1, kv_heads, length, head_dim]: positions [0, length) of a sequence held in `blocks`."""
    kv_heads, head_dim = cache.shape[1], cache.shape[3]
    # Select the blocks first, then put kv heads first: index_select over the pool transposed
    # would copy the whole pool (every block of the layer) to make it contiguous first, which
    # cost 11.5 ms per call for a 2 GiB pool against 0.08 ms this way.
    gathered = cache.index_select(0, blocks).transpose(0, 1).contiguous()  # [kv_heads, n blocks, block_size, hd]
    return gathered.view(kv_heads, -1, head_dim)[:, :length].unsqueeze(0)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block. The residual stream is carried between layers and each add is
    fused into the norm that follows it: the layer takes its input norm's input unadded
    (`x`, the previous layer's MLP output, to be added to `residual` in place) and returns its
    own MLP output the same way."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: x is the embedding, the residual stream starts there
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, batch, k_cache, v_cache, rope)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


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
        self.lora = None  # a lora.LoRAContext once adapters are enabled (lora.wrap_model)

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits [B, vocab] for the tokens in batch.logits_indices."""
        return self.forward_pooled(batch, k_cache, v_cache)[0]

    def forward_pooled(self, batch: ForwardBatch, k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 logits [B, vocab] for batch.logits_indices, float32 final hidden states
        [E, hidden] for batch.pooling_indices or None): last-token pooling for embeddings, as
        vLLM pools decoder models."""
        if self.lora is not None:
            self.lora.set_rows(batch.lora_slots)
        x, residual = self.embed_tokens(batch.input_ids), None
        rope = (self.rope_cos, self.rope_sin)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, batch, k_cache[i], v_cache[i], rope)
        x = self.norm(x, residual)
        pooled = x[batch.pooling_indices].float() if batch.pooling_indices is not None else None
        return self.lm_head(x[batch.logits_indices]).float(), pooled
