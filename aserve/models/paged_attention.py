"""Attention over a paged KV cache: a C++ kernel for the CPU, plain torch elsewhere.

The KV cache is a pool of fixed-size blocks, `[num_blocks, num_kv_heads, block_size,
head_dim]` per layer, and each sequence owns a list of blocks (its row of `block_tables`).
Memory is then handed out a block at a time instead of a max-length slot per sequence, and
blocks can be shared between sequences (a common prefix) or reused once freed.

Decode attention is bound by memory bandwidth: every step reads each running sequence's
whole cache once to produce one token. Plain torch can only attend over a paged cache by
first gathering each sequence's blocks into a contiguous copy and then running two matmuls,
so every step copies the entire context (a write and a second read of everything the
matmuls read anyway). The kernel reads keys and values in place, block by block, and reads
each of them once per group of query heads that share it (grouped-query attention).

`paged_attention` uses the kernel for CPU tensors once it has built (cpu_kernels.py), and
the torch path otherwise (CUDA tensors, or a
machine where the build failed). The torch path is also the reference the kernel is tested
against. bench/paged_attention.py compares both with the contiguous-slot layout.

The kernel also serves prefill chunks over cached positions (one query per token, each with
its own context length): a run of tokens of one row is attended together, in tiles of up to
32 query vectors (16 on AVX2), as small matrix products (csrc/paged_attention.cpp); with
bfloat16 caches on a CPU with AVX512-BF16 those products take bfloat16 pairs, twice the
multiply-adds per instruction, and only the softmax weights are rounded to bfloat16 for the
weighted sum (as GPU flash attention does).
"""

from __future__ import annotations

import torch

from aserve.models import cpu_kernels

# The torch path gathers each query token's blocks; this bounds that copy (elements).
_GATHER_BUDGET = 1 << 24


def attention_backend(device: torch.device) -> str:
    """What backend "auto" uses for tensors on `device`: "kernel" or "torch"."""
    return "kernel" if device.type == "cpu" and cpu_kernels.kernel_available() else "torch"


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_rows: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    backend: str = "auto") -> torch.Tensor:
    """Attention of each query token over its row's cached positions [0, context_lens[t]).

    q: [T, num_heads, head_dim], the caches' dtype. k_cache, v_cache: [num_blocks,
    num_kv_heads, block_size, head_dim], contiguous. block_tables: int32 [R, max_blocks]
    (padding: any valid block id). query_rows, context_lens: int32 [T]; a prefill chunk gives
    each of its tokens context_len = its position + 1. Query head h reads kv head
    h // (num_heads // num_kv_heads). Returns [T, num_heads, head_dim] in q's dtype;
    scores, softmax and sums are float32. Positions past every context of a row and blocks
    outside them never affect the result, whatever they hold. (Within a prefill chunk, a
    position one token may not see but a later token of the chunk does is weighed 0 for the
    first; a NaN or inf value there reaches both in the kernel.)

    backend: "auto" (the kernel for CPU tensors when it builds), "kernel" (raises if it
    cannot build) or "torch".
    """
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"backend must be 'auto', 'kernel' or 'torch', not {backend!r}")
    if backend == "auto":
        backend = attention_backend(q.device)
    if backend == "kernel":
        if (module := cpu_kernels.load()) is None:
            raise RuntimeError("the paged attention kernel is unavailable (its build failed; see the log)")
        return module.paged_attention(q, k_cache, v_cache, block_tables, query_rows, context_lens, scale)
    return _torch_paged_attention(q, k_cache, v_cache, block_tables, query_rows, context_lens, scale)


def _torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           query_rows: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Gathers each query token's cached rows over its block table's whole width (no host sync
    to find the longest context) into a float32 copy, and runs a masked softmax. The copy is
    per token, so a prefill chunk costs chunk x context; tokens go in batches to bound it."""
    T, H, D = q.shape
    _, kv_heads, block_size, _ = k_cache.shape
    group, span = H // kv_heads, block_tables.shape[1] * block_size
    out = torch.empty_like(q)
    positions = torch.arange(span, device=q.device)
    heads = torch.arange(kv_heads, device=q.device).view(1, kv_heads, 1)
    k_rows, v_rows = k_cache.view(-1, D), v_cache.view(-1, D)  # one row per (block, kv head, offset)
    step = max(1, _GATHER_BUDGET // (span * kv_heads * D))
    for t0 in range(0, T, step):
        lens = context_lens[t0 : t0 + step]
        n = lens.shape[0]
        valid = positions < lens.unsqueeze(1)  # [n, span]
        # Past its context a token reads its position 0 instead: a real, finite row, which the
        # softmax weighs 0. Reading the stale row itself would not do: 0 * NaN is NaN.
        pos = torch.where(valid, positions, 0)
        blocks = block_tables[query_rows[t0 : t0 + step].long()].long().gather(1, pos // block_size)  # [n, span]
        index = ((blocks.unsqueeze(1) * kv_heads + heads) * block_size + (pos % block_size).unsqueeze(1)).view(-1)
        keys = k_rows.index_select(0, index).view(n, kv_heads, span, D).float()
        values = v_rows.index_select(0, index).view(n, kv_heads, span, D).float()
        qf = q[t0 : t0 + step].float().view(n, kv_heads, group, D)  # HF's GQA layout: head h reads kv head h // group
        scores = torch.matmul(qf, keys.transpose(-1, -2)) * scale  # [n, kv_heads, group, span]
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        out[t0 : t0 + step] = torch.matmul(torch.softmax(scores, dim=-1), values).view(n, H, D).to(q.dtype)
    return out
