"""The small ops of a decoder layer, fused: one call and one pass over memory each.

At one decoding sequence a layer's activations are a few KiB, and each torch op costs its
dispatch (a few microseconds) rather than its arithmetic. The float32 RMSNorm was 9 ops,
RoPE on q and k plus the two cache writes 14, silu(gate) * up 3: with 30 layers, about 4,600
ops per step, half the batch-1 step of the 4-bit default model on the 2-core machine this was
measured on. The C++ versions (csrc/fused.cpp, built with the other CPU kernels) do each in
one call; the torch versions here are the reference they are tested against, and what runs
on CUDA or where the build failed.

Numerics, both versions: float32 math, rounded once to the activations' dtype on output;
a fused residual add rounds the sum to the residual's dtype, as a separate add would.
"""

import torch
import torch.nn.functional as F

from aserve.models import cpu_kernels


def _kernels(x: torch.Tensor):
    return cpu_kernels.load() if x.device.type == "cpu" else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [T, D] (weight float32 [D]). With `residual`: first residual += x in
    place, then the norm of the sum (a decoder layer's residual add and next norm)."""
    if (k := _kernels(x)) is not None:
        return k.rms_norm(x.contiguous(), weight, eps, residual)
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, token_blocks: torch.Tensor,
               token_offsets: torch.Tensor) -> None:
    """qkv [T, (heads + 2 kv_heads) * head_dim]: rotate-half RoPE on its q and k heads in
    place (cos/sin float32 [positions, head_dim]), then each token's k and v into the cache
    [blocks, kv_heads, block_size, head_dim] at (token_blocks[t], token_offsets[t])."""
    if (k := _kernels(qkv)) is not None:
        k.rope_store(qkv, positions, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, token_blocks, token_offsets)
        return
    T, D = qkv.shape[0], cos.shape[1]
    qk = qkv[:, : (num_heads + num_kv_heads) * D].view(T, -1, D)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    xf = qk.float()
    half = D // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    qk.copy_(xf * c + rotated * s)
    k = qkv[:, num_heads * D : (num_heads + num_kv_heads) * D].view(T, num_kv_heads, D)
    v = qkv[:, (num_heads + num_kv_heads) * D :].view(T, num_kv_heads, D)
    k_cache[token_blocks, :, token_offsets] = k
    v_cache[token_blocks, :, token_offsets] = v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [T, 2I] gate/up projection."""
    if (k := _kernels(gate_up)) is not None:
        return k.silu_mul(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
