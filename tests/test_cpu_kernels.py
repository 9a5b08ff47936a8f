"""aserve's CPU kernels: built once per CPU and source, a warning and the torch path when the
build fails, and the fused decoder-layer ops equal to their torch references."""

import functools
import logging
import shutil

import pytest
import torch

from aserve.models import cpu_kernels, fused
from aserve.models import paged_attention as pa
from test_paged_attention import CONTEXTS, assert_matches, make_case


@pytest.fixture(scope="module")
def kernels():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja on PATH: the torch path is the only one")
    module = cpu_kernels.load()
    assert module is not None
    return module


def _without_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)


DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("size", [96, 100])  # whole vectors, and a tail shorter than one
def test_rms_norm_kernel_equals_the_torch_reference(kernels, monkeypatch, dtype, with_residual, size):
    x, weight = torch.randn(5, size).to(dtype), torch.rand(size) + 0.5
    residual = torch.randn(5, size).to(dtype) if with_residual else None
    out_residual = None if residual is None else residual.clone()
    out = fused.rms_norm(x, weight, 1e-6, out_residual)
    _without_kernels(monkeypatch)
    ref_residual = None if residual is None else residual.clone()
    reference = fused.rms_norm(x, weight, 1e-6, ref_residual)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference, **TOLERANCE[dtype])
    if residual is not None:  # the sum is left in the residual, rounded as a separate add rounds it
        assert torch.equal(out_residual, ref_residual) and torch.equal(ref_residual, residual + x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 72])  # half a head shorter than a vector; whole vectors and a tail
def test_rope_store_kernel_rotates_q_and_k_in_place_and_fills_the_cache_like_torch(kernels, monkeypatch, dtype, D):
    T, H, KVH, BS = 6, 4, 2, 4
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)
    angles = torch.rand(32, D // 2) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    positions = torch.tensor([0, 3, 7, 8, 30, 31])
    blocks, offsets = torch.tensor([2, 0, 5, 5, 1, 3]), torch.tensor([0, 3, 1, 2, 3, 0])
    results = []
    for kernel in (True, False):
        if not kernel:
            _without_kernels(monkeypatch)
        k_cache, v_cache = torch.zeros(6, KVH, BS, D, dtype=dtype), torch.zeros(6, KVH, BS, D, dtype=dtype)
        rotated = qkv.clone()
        fused.rope_store(rotated, positions, cos, sin, H, KVH, k_cache, v_cache, blocks, offsets)
        results.append((rotated, k_cache, v_cache))
    for out, reference in zip(results[0], results[1]):
        torch.testing.assert_close(out, reference, **TOLERANCE[dtype])
    # v is stored as it came, k as rotated; q and k of position 0 are unchanged (angle 0 rotates nothing)
    assert torch.equal(results[0][2][2, :, 0], qkv[0, (H + KVH) * D :].view(KVH, D))
    assert torch.equal(results[0][1][0, :, 3], results[0][0][1, H * D : (H + KVH) * D].view(KVH, D))
    cos[0], sin[0] = 1.0, 0.0
    again = qkv[:1].clone()
    fused.rope_store(again, positions[:1], cos, sin, H, KVH, *(torch.zeros(6, KVH, BS, D, dtype=dtype),) * 2,
                     blocks[:1], offsets[:1])
    assert torch.equal(again[0], qkv[0])


def test_rope_store_kernel_keeps_a_nan_a_nan_in_bfloat16(kernels):
    # A NaN whose payload is all ones (0x7FFFFFFF) in the float32 cos table reaches q and k as
    # that NaN; rounding it to bfloat16 like a number would carry it into the sign bit: -0.
    T, H, KVH, D, BS = 1, 2, 1, 32, 4
    qkv = torch.ones(T, (H + 2 * KVH) * D, dtype=torch.bfloat16)
    cos, sin = torch.ones(4, D), torch.zeros(4, D)
    cos.view(torch.int32)[0] = 0x7FFFFFFF
    cache = torch.zeros(2, KVH, BS, D, dtype=torch.bfloat16)
    kernels.rope_store(qkv, torch.tensor([0]), cos, sin, H, KVH, cache, cache.clone(), torch.tensor([0]),
                       torch.tensor([0]))
    assert qkv[:, : (H + KVH) * D].isnan().all()


def test_rope_store_kernel_refuses_a_token_with_no_place_in_the_cache(kernels):
    qkv, cos = torch.randn(1, 4 * 16), torch.ones(8, 16)
    cache = torch.zeros(2, 1, 4, 16)
    with pytest.raises(RuntimeError, match="no place in the cache"):
        kernels.rope_store(qkv, torch.tensor([0]), cos, cos, 2, 1, cache, cache.clone(), torch.tensor([2]),
                           torch.tensor([0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_kernel_equals_the_torch_reference(kernels, monkeypatch, dtype):
    gate_up = (torch.randn(3, 2 * 40) * 4).to(dtype)  # a whole vector and a tail, with AVX-512 or AVX2
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps: silu -> about -0, and x
    out = fused.silu_mul(gate_up)
    _without_kernels(monkeypatch)
    torch.testing.assert_close(out, fused.silu_mul(gate_up), **TOLERANCE[dtype])
    gate, up = gate_up.float().chunk(2, -1)
    torch.testing.assert_close(out.float(), gate * torch.sigmoid(gate) * up, **TOLERANCE[dtype])


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_build", functools.cache(cpu_kernels._build.__wrapped__))  # a fresh cache, dropped after
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension 'x':\n[1/2] c++ ...\npaged_attention.cpp:1: error: boom\nninja: build stopped")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    case = make_case(9, 3, 64, 16, CONTEXTS)
    with caplog.at_level(logging.WARNING, logger="aserve"):
        for _ in range(3):
            assert_matches(pa.paged_attention(*case.args()), case)
        assert not cpu_kernels.kernel_available()
    assert len(calls) == 1
    warnings = [r for r in caplog.records if r.name == "aserve" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "error: boom" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="unavailable"):
        pa.paged_attention(*case.args(), backend="kernel")


def test_extension_name_changes_with_cpu_and_source(monkeypatch, tmp_path):
    flags = cpu_kernels._openmp_flags()
    name = cpu_kernels._extension_name(*flags)
    assert name.startswith("aserve_cpu_kernels_") and name == cpu_kernels._extension_name(*flags)
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : fpu sse sse2")
    other_cpu = cpu_kernels._extension_name(*flags)
    edited = tmp_path / "fused.cpp"
    edited.write_text(cpu_kernels._SOURCES[0].read_text() + "\n// edited\n")
    monkeypatch.setattr(cpu_kernels, "_SOURCES", [edited, *cpu_kernels._SOURCES[1:]])
    assert len({name, other_cpu, cpu_kernels._extension_name(*flags)}) == 3
