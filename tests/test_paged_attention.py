"""aserve.models.paged_attention: the CPU kernel and the torch path against a float64
reference computed from each row's dense keys and values."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch

from aserve.models import cpu_kernels
from aserve.models import paged_attention as pa

CONTEXTS = [1, 15, 16, 17, 300]
SHAPES = [(4, 4, 32), (9, 3, 64), (8, 2, 40)]  # (heads, kv_heads, head_dim): GQA groups 1, 3 (SmolLM2-135M), 4
POISONS = [float("nan"), float("inf"), float("-inf")]


@dataclass
class Case:
    q: torch.Tensor  # [T, heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_rows: torch.Tensor
    context_lens: torch.Tensor
    dense_k: torch.Tensor  # [rows, kv_heads, max_context, head_dim]: what the cache holds, per row
    dense_v: torch.Tensor
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_rows, self.context_lens, self.scale)


def make_case(heads: int, kv_heads: int, head_dim: int, block_size: int, contexts: list[int], *,
              tables: str = "permuted", dtype: torch.dtype = torch.float32, poison: float | None = float("nan"),
              queries: list[tuple[int, int]] | None = None, seed: int = 0) -> Case:
    """Rows with the given context lengths in a paged cache. Everything in the cache that is
    not some row's position [0, context) (the tail of last blocks, unused blocks, the block
    the tables are padded with) holds `poison`. tables: "permuted" (each row's blocks drawn at
    random from a pool twice the size needed: non-contiguous, out of order, with gaps) or
    "shared" (every row starts with row 0's first blocks, as a shared prefix would).
    queries: (row, context_len) per query token; default one per row over its whole context."""
    gen = torch.Generator().manual_seed(seed)
    rows, max_ctx = len(contexts), max(contexts)
    blocks_per_row = [-(-c // block_size) for c in contexts]
    max_blocks = max(blocks_per_row) + 2  # padded beyond the longest row
    dense_k = torch.randn(rows, kv_heads, max_ctx, head_dim, generator=gen).to(dtype)
    dense_v = torch.randn(rows, kv_heads, max_ctx, head_dim, generator=gen).to(dtype)

    num_blocks = 2 * sum(blocks_per_row) + 2
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    pad_block = pool.pop()  # never holds data: padding must not be read
    table = torch.full((rows, max_blocks), pad_block, dtype=torch.int32)
    for r, n in enumerate(blocks_per_row):
        table[r, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
    if tables == "shared":
        for r in range(1, rows):  # share the first full blocks of row 0 that fit in row r
            shared = min(contexts[0], contexts[r]) // block_size
            table[r, :shared] = table[0, :shared]
            dense_k[r, :, : shared * block_size] = dense_k[0, :, : shared * block_size]
            dense_v[r, :, : shared * block_size] = dense_v[0, :, : shared * block_size]

    fill = 0.0 if poison is None else poison
    k_cache = torch.full((num_blocks, kv_heads, block_size, head_dim), fill, dtype=dtype)
    v_cache = torch.full_like(k_cache, fill)
    for r, ctx in enumerate(contexts):
        for p in range(ctx):
            block, offset = table[r, p // block_size], p % block_size
            k_cache[block, :, offset] = dense_k[r, :, p]
            v_cache[block, :, offset] = dense_v[r, :, p]

    queries = queries or [(r, c) for r, c in enumerate(contexts)]
    q = torch.randn(len(queries), heads, head_dim, generator=gen).to(dtype)
    return Case(q, k_cache, v_cache, table, torch.tensor([r for r, _ in queries], dtype=torch.int32),
                torch.tensor([c for _, c in queries], dtype=torch.int32), dense_k, dense_v, head_dim ** -0.5)


def reference(case: Case) -> torch.Tensor:
    """float64 attention straight from the dense per-row keys and values."""
    T, heads, _ = case.q.shape
    kv_head = torch.arange(heads) // (heads // case.dense_k.shape[1])  # HF's GQA layout
    out = torch.empty(case.q.shape, dtype=torch.float64)
    for t in range(T):
        row, ctx = int(case.query_rows[t]), int(case.context_lens[t])
        k = case.dense_k[row, :, :ctx].double()[kv_head]  # [heads, ctx, head_dim]
        v = case.dense_v[row, :, :ctx].double()[kv_head]
        scores = torch.einsum("hd,hcd->hc", case.q[t].double(), k) * case.scale
        out[t] = torch.einsum("hc,hcd->hd", torch.softmax(scores, dim=-1), v)
    return out


def assert_matches(out: torch.Tensor, case: Case, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    torch.testing.assert_close(out.double(), reference(case), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def kernel() -> None:
    if not cpu_kernels.kernel_available():
        pytest.skip("the paged attention kernel did not build here (see the warning on the 'aserve' logger)")


def test_kernel_builds_where_a_compiler_and_ninja_exist():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja on PATH: the torch path is the only one")
    assert cpu_kernels.kernel_available()


@pytest.mark.parametrize("tables", ["permuted", "shared"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_matches_reference(request, backend, shape, block_size, tables):
    if backend == "kernel":
        request.getfixturevalue("kernel")
    case = make_case(*shape, block_size, CONTEXTS, tables=tables)
    assert_matches(pa.paged_attention(*case.args(), backend=backend), case)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_prefill_chunk_is_causal(request, backend):
    if backend == "kernel":
        request.getfixturevalue("kernel")
    # Row 1 holds 50 positions; its chunk is positions 30..49, each token seeing itself and
    # what precedes it. Decode tokens of rows 0 and 2 share the call.
    chunk = [(1, p + 1) for p in range(30, 50)]
    case = make_case(9, 3, 64, 16, [40, 50, 7], queries=[(0, 40)] + chunk + [(2, 7)])
    out = pa.paged_attention(*case.args(), backend=backend)
    assert_matches(out, case)
    # The first chunk token differs from one that (wrongly) saw the whole row.
    full = make_case(9, 3, 64, 16, [40, 50, 7], queries=[(0, 40), (1, 50)] + chunk[1:] + [(2, 7)])
    assert not torch.allclose(out[1], pa.paged_attention(*full.args(), backend=backend)[1], atol=1e-3)


@pytest.mark.parametrize("chunk", [2, 5, 11, 40, 100])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_chunks_of_several_rows_between_decodes(kernel, shape, chunk):
    """The kernel's tiles: each row's chunk (tokens seeing positions up to their own, the
    rows' tails poisoned) split into tiles of query vectors, next to lone decode tokens."""
    rows = [chunk + 33, 70, chunk + 5]
    chunks = [[(r, rows[r] - chunk + i + 1) for i in range(chunk)] for r in (0, 2)]
    case = make_case(*shape, 16, rows, queries=chunks[0] + [(1, 70)] + chunks[1], tables="shared")
    assert_matches(pa.paged_attention(*case.args(), backend="kernel"), case)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 1e-3, 2**-7), (torch.float16, 1e-4, 2**-10)])
@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_reduced_precision_caches(request, backend, dtype, atol, rtol, shape):
    """Inputs are exact in the reference (it reads the same rounded values), so what remains
    is float32 accumulation, the output's rounding to the dtype (half a unit in the last
    place) and, with bfloat16 tiles on AVX512-BF16, the softmax weights rounded to bfloat16
    for the weighted sum (head_dim 32 and 64; 40 keeps them float32)."""
    if backend == "kernel":
        request.getfixturevalue("kernel")
    # A chunk too, for the kernel's tiles; it ends 11 positions into a block: an odd row out
    # of the bfloat16 tiles' pairs of rows, its partner never read from the poisoned tail.
    chunk = [(4, p + 1) for p in range(259, 299)]
    case = make_case(*shape, 16, CONTEXTS, dtype=dtype, queries=[(r, c) for r, c in enumerate(CONTEXTS)] + chunk)
    assert_matches(pa.paged_attention(*case.args(), backend=backend), case, atol=atol, rtol=rtol)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stale_values_outside_contexts_never_leak(request, backend, poison, dtype):
    """Tails of last blocks, blocks no table uses and the padding block hold NaN/inf: the
    output is the same, bit for bit, as with zeros there. Chunks too (the kernel's tiles)."""
    if backend == "kernel":
        request.getfixturevalue("kernel")
    # Row 3's chunk ends one position into a block: the odd row out of the bfloat16 tiles'
    # pairs, whose partner would be the poisoned tail.
    queries = [(r, c) for r, c in enumerate(CONTEXTS)] + [(3, 16), (3, 17)] + [(4, p + 1) for p in range(259, 299)]
    poisoned = make_case(9, 3, 64, 16, CONTEXTS, poison=poison, dtype=dtype, queries=queries)
    clean = make_case(9, 3, 64, 16, CONTEXTS, poison=None, dtype=dtype, queries=queries)
    assert poisoned.k_cache.isnan().any() or poisoned.k_cache.isinf().any()
    out = pa.paged_attention(*poisoned.args(), backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out, pa.paged_attention(*clean.args(), backend=backend))
    assert_matches(out, poisoned, **({} if dtype == torch.float32 else dict(atol=1e-3, rtol=2**-7)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_uses_the_torch_path_on_cuda(dtype):
    case = make_case(9, 3, 64, 16, CONTEXTS, dtype=dtype)
    args = [x.cuda() if isinstance(x, torch.Tensor) else x for x in case.args()]
    out = pa.paged_attention(*args)
    assert out.device.type == "cuda"
    if dtype == torch.bfloat16 or torch.backends.cuda.matmul.allow_tf32:  # TF32 products: 10-bit mantissas
        assert_matches(out.cpu(), case, atol=2e-3, rtol=2**-7)
    else:
        assert_matches(out.cpu(), case)


def test_auto_uses_the_kernel_on_cpu(kernel, monkeypatch):
    case = make_case(9, 3, 64, 16, CONTEXTS)
    expected = pa.paged_attention(*case.args(), backend="kernel")

    def no_torch_path(*args):
        raise AssertionError("the torch path ran although the kernel is available")

    monkeypatch.setattr(pa, "_torch_paged_attention", no_torch_path)
    assert torch.equal(pa.paged_attention(*case.args()), expected)


def test_kernel_takes_a_strided_query(kernel):
    """q as the model produces it: a view into a fused QKV projection, not contiguous."""
    case = make_case(9, 3, 64, 16, CONTEXTS)
    T, heads, head_dim = case.q.shape
    qkv = torch.randn(T, (heads + 6) * head_dim)
    qkv[:, : heads * head_dim] = case.q.view(T, -1)
    case.q = qkv[:, : heads * head_dim].view(T, heads, head_dim)
    assert not case.q.is_contiguous()
    assert_matches(pa.paged_attention(*case.args(), backend="kernel"), case)


def test_kernel_result_does_not_depend_on_thread_count(kernel):
    case = make_case(9, 3, 64, 16, CONTEXTS, queries=[(r % 5, 1 + (7 * r) % CONTEXTS[r % 5]) for r in range(40)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = pa.paged_attention(*case.args(), backend="kernel")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pa.paged_attention(*case.args(), backend="kernel"), single)


@pytest.mark.parametrize("field, value, message", [
    ("block_tables", 10_000, "is not a block of the cache"),
    ("query_rows", 5, "is not a row of block_tables"),
    ("context_lens", 0, "outside"),
])
def test_kernel_rejects_indices_outside_the_cache(kernel, field, value, message):
    case = make_case(9, 3, 64, 16, CONTEXTS)
    getattr(case, field).view(-1)[0] = value
    with pytest.raises(RuntimeError, match=message):
        pa.paged_attention(*case.args(), backend="kernel")


def test_unknown_backend_is_rejected():
    case = make_case(4, 4, 32, 16, [5])
    with pytest.raises(ValueError, match="backend"):
        pa.paged_attention(*case.args(), backend="cuda")


@pytest.mark.parametrize("backend, width, head_dim, longest", [
    ("kernel", 16, 64, float("inf")), ("kernel", 8, 64, 32), ("kernel", 16, 40, 1), ("kernel", 8, 40, 32),
    ("kernel", 8, 36, 1), ("torch", 16, 64, 1)])
def test_chunks_attend_through_the_kernel_by_its_vector_width(monkeypatch, backend, width, head_dim, longest):
    """Chunks over cached positions use the kernel's tiles at any length where it is built for
    AVX-512, only short ones on AVX2 (where SDPA won past that), none where the head size is not
    whole vectors (no tiles), and never the torch path."""
    from aserve.engine import model_runner

    monkeypatch.setattr(model_runner, "attention_backend", lambda device: backend)
    monkeypatch.setattr(cpu_kernels, "vector_width", lambda: width)
    assert model_runner.paged_chunk_max(torch.device("cpu"), head_dim) == longest
