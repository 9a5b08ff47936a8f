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

`paged_attention` uses the kernel for CPU tensors once it has built (with
torch.utils.cpp_extension, at first use, for this CPU: `-march=native`; about 30 s, then
0.15 s to load from torch's build cache), and the torch path otherwise (CUDA tensors, or a
machine where the build failed). The torch path is also the reference the kernel is tested
against. bench/paged_attention.py compares both with the contiguous-slot layout.

The kernel is made for decode. It also serves a prefill chunk (one query per token, each
with its own context length), but it reads the context once per token there, where SDPA
over a contiguous copy runs matrix products: 1.2-2x slower than that.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("aserve")

_SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# -fopenmp-simd honours the `omp simd` pragmas: vectorized float reductions without -ffast-math.
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd"]
# The torch path gathers each query token's blocks; this bounds that copy (elements).
_GATHER_BUDGET = 1 << 24

_build_lock = threading.Lock()
# A build killed midway leaves torch's lock file behind, and every later start would wait on
# it forever; a build takes under a minute, so a lock this old is stale.
_STALE_LOCK_SECONDS = 600


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"  # not Linux: the best there is


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for at::parallel_for. With torch's OpenMP backend it is a
    `#pragma omp parallel` compiled into the caller, so without -fopenmp it runs on one thread.
    The link names the OpenMP runtime torch itself loaded (pip wheels bundle their own
    libgomp): one thread pool in the process, sized by torch.set_num_threads."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []  # the native backend's at::parallel_for lives in libtorch
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if any(name in Path(path).name for name in ("libgomp", "libiomp", "libomp")):
                return ["-fopenmp"], [path]
    except OSError:
        pass
    return ["-fopenmp"], ["-fopenmp"]


def _extension_name(cflags: list[str], ldflags: list[str]) -> str:
    """`-march=native` code must never run on another CPU, and torch's build cache
    (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) may be shared with one, so the
    name carries a hash of the CPU's flags, the source, the build flags and torch's version."""
    digest = hashlib.sha256()
    for part in (_cpu_flags(), _SOURCE.read_text(), " ".join(cflags + ldflags), torch.__version__):
        digest.update(part.encode())
    return f"aserve_paged_attention_{digest.hexdigest()[:12]}"


def _reason(exc: BaseException) -> str:
    """The compiler's error lines rather than the whole build log that torch puts in the message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    text = "; ".join((errors or lines or [type(exc).__name__])[:3])
    return text if len(text) <= 500 else text[:500] + "..."


def _load() -> ModuleType | None:
    """The kernel's module, built (or loaded from torch's build cache) once per process; None
    if that failed."""
    with _build_lock:
        return _build()


@functools.cache
def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        omp_cflags, ldflags = _openmp_flags()
        cflags = _CFLAGS + omp_cflags
        name = _extension_name(cflags, ldflags)
        build_dir = Path(get_default_build_root()) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
                    build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # a missing compiler or ninja, a compile error, a bad cache...
        log.warning("paged attention kernel unavailable, using the torch path: %s", _reason(exc))
        return None


def kernel_available() -> bool:
    """Whether the CPU kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def attention_backend(device: torch.device) -> str:
    """What backend "auto" uses for tensors on `device`: "kernel" or "torch"."""
    return "kernel" if device.type == "cpu" and kernel_available() else "torch"


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_rows: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    backend: str = "auto") -> torch.Tensor:
    """Attention of each query token over its row's cached positions [0, context_lens[t]).

    q: [T, num_heads, head_dim], the caches' dtype. k_cache, v_cache: [num_blocks,
    num_kv_heads, block_size, head_dim], contiguous. block_tables: int32 [R, max_blocks]
    (padding: any valid block id). query_rows, context_lens: int32 [T]; a prefill chunk gives
    each of its tokens context_len = its position + 1. Query head h reads kv head
    h // (num_heads // num_kv_heads). Returns [T, num_heads, head_dim] in q's dtype;
    scores, softmax and sums are float32. Positions past a context and blocks outside it
    never affect the result, whatever they hold.

    backend: "auto" (the kernel for CPU tensors when it builds), "kernel" (raises if it
    cannot build) or "torch".
    """
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"backend must be 'auto', 'kernel' or 'torch', not {backend!r}")
    if backend == "auto":
        backend = attention_backend(q.device)
    if backend == "kernel":
        if (module := _load()) is None:
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
