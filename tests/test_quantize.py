"""Quantized weights: GGUF blocks decoded exactly, served by weight-only kernels, chosen per layer."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from aserve.engine.block_manager import BlockManager
from aserve.engine.kv_cache import KVCache
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.models.gguf import Int4Groups, decode_int4, decode_int8, unpermute_rope_rows
from aserve.models.loader import load_model, resolve_dtype
from aserve.models import quantize as quant
from aserve.models.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from aserve.models.store import GGUF_NAME

BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 144}
BLOCK_WEIGHTS = {Q.Q4_0: 32, Q.Q4_1: 32, Q.Q4_K: 256}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in `qtype`'s layout, with its float16 fields set to sane numbers."""
    rng = np.random.default_rng(seed)
    n = cols // BLOCK_WEIGHTS[qtype]
    blocks = rng.integers(0, 256, size=(rows, n, BLOCK_BYTES[qtype]), dtype=np.uint8)
    halves = 2 if qtype in (Q.Q4_1, Q.Q4_K) else 1  # d, and m / dmin where the type has one
    floats = rng.uniform(-0.05, 0.05, size=(rows, n, halves)).astype(np.float16)
    blocks[..., : 2 * halves] = floats.view(np.uint8).reshape(rows, n, 2 * halves)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_4bit_gguf_blocks_decode_to_exactly_what_gguf_dequantizes(qtype):
    blocks = random_blocks(qtype, rows=6, cols=512)
    groups = decode_int4(qtype, blocks, rows=6)
    reference = torch.from_numpy(dequantize(blocks, qtype)).reshape(6, 512)
    assert groups.q.shape == (6, 512) and int(groups.q.max()) <= 15
    torch.testing.assert_close(groups.dequantize(), reference, rtol=1e-6, atol=1e-7)


def _gguf_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_rope_row_order_of_gguf_q_and_k_is_undone():
    w = torch.randn(4 * 16, 32)
    assert torch.equal(unpermute_rope_rows(_gguf_permute(w, 4), 4), w)
    groups = quantize_int4(w)
    permuted = Int4Groups(*(_gguf_permute(t, 4) for t in (groups.q, groups.scales, groups.zeros)))
    assert torch.equal(unpermute_rope_rows(permuted, 4).dequantize(), groups.dequantize())


def test_round_to_nearest_4bit_is_within_half_a_step_of_every_weight():
    w = torch.randn(16, 128)
    groups = quantize_int4(w)
    step = groups.scales.repeat_interleave(32, dim=1)
    assert bool(((groups.dequantize() - w).abs() <= step / 2 + 1e-6).all())


def test_int4_linear_computes_x_times_its_dequantized_weight():
    groups = quantize_int4(torch.randn(48, 96))
    layer = Int4Linear(96, 48, bias=False)
    layer.load_state_dict(Int4Linear.buffers_from(groups))
    layer.to(torch.bfloat16)
    x = torch.randn(5, 96).bfloat16()
    reference = x.float() @ groups.dequantize().bfloat16().float().t()
    torch.testing.assert_close(layer(x).float(), reference, atol=0.05 * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K])
def test_8bit_group_gguf_blocks_decode_to_exactly_what_gguf_dequantizes(qtype):
    rng = np.random.default_rng(1)
    if qtype == Q.Q8_0:
        blocks = quantize(rng.standard_normal((4, 256)).astype(np.float32), qtype)
    else:  # random 6-bit values and int8 sub-scales, a sane float16 d at the end of each block
        blocks = rng.integers(0, 256, size=(4, 1, 210), dtype=np.uint8)
        blocks[..., 208:210] = np.full((4, 1, 1), 0.01, np.float16).view(np.uint8)
        blocks = blocks.reshape(4, -1)
    groups = decode_int8(qtype, blocks, rows=4)
    reference = torch.from_numpy(dequantize(blocks, qtype)).reshape(4, 256)
    assert groups.group == {Q.Q8_0: 32, Q.Q6_K: 16}[qtype]
    assert torch.equal(groups.dequantize(), reference)


def test_round_to_nearest_int8_groups_are_within_half_a_step_of_every_weight():
    w = torch.randn(16, 128)
    groups = quantize_int8(w, 32)
    step = groups.scales.repeat_interleave(32, dim=1)
    assert bool(((groups.dequantize() - w).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # the kernel takes up to 8 rows of x per pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_group_linear_computes_x_times_its_dequantized_weight(rows, dtype):
    groups = quantize_int8(torch.randn(40, 96), group=16)
    layer = Int8Linear(96, 40, bias=True, group=16)
    layer.load_state_dict({**Int8Linear.buffers_from(groups), "bias": torch.arange(40.0)})
    layer.to(dtype)
    layer.scales = layer.scales.float()
    x = torch.randn(rows, 96).to(dtype)
    reference = x.float() @ groups.dequantize().t() + torch.arange(40.0)
    tolerance = 1e-4 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(layer(x).float(), reference, atol=tolerance * reference.abs().max().item(), rtol=0)


def _logits(path, dtype: str, quantization: str, prompt: list[int]) -> tuple[torch.Tensor, dict[str, int]]:
    loaded = load_model(path, "cpu", dtype, 64, quantization=quantization)
    kv = KVCache.allocate(loaded.args, 32 * KVCache.bytes_per_block(loaded.args, 4, loaded.dtype), 4,
                          loaded.dtype, loaded.device)
    runner = ModelRunner(loaded.model, kv, BlockManager(kv.num_blocks, 4), loaded.device, seed=0)
    seq = Sequence("a", prompt, SamplingParams(max_tokens=4, temperature=0), status=SequenceStatus.RUNNING)
    assert runner.blocks.reserve(seq, len(prompt))
    with torch.inference_mode():
        out = runner.model(runner._build_batch([ScheduledSeq(seq, len(prompt))])[0], kv.k, kv.v)
    return out[0], loaded.linears


LINEAR_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_1,
                "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def _copy_without_weights(source, out) -> dict[str, torch.Tensor]:
    """Copies a model directory but its weights, which it returns for the caller to rewrite."""
    out.mkdir()
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    return load_file(source / "model.safetensors")


@pytest.fixture
def gguf_model_dir(tiny_llama_dir, tmp_path):
    """The tiny llama with its linears quantized the way llama.cpp writes them (q/k rows
    permuted; Q4_0, Q4_1 and Q8_0), as model.gguf beside safetensors holding exactly the
    de-quantized weights, as store.py leaves a converted GGUF."""
    out = tmp_path / "gguf-model"
    tensors = _copy_without_weights(tiny_llama_dir, out)
    writer = GGUFWriter(out / GGUF_NAME, "llama")
    heads = {"attn_q": 4, "attn_k": 2}
    for layer in range(2):
        for part, qtype in LINEAR_TYPES.items():
            name = f"model.layers.{layer}.{HF_NAMES[part]}.weight"
            w = tensors[name]
            stored = _gguf_permute(w, heads[part]) if part in heads else w
            blocks = quantize(stored.numpy(), qtype)
            writer.add_tensor(f"blk.{layer}.{part}.weight", blocks, raw_dtype=qtype)
            dense = torch.from_numpy(dequantize(blocks, qtype)).reshape(w.shape)
            tensors[name] = unpermute_rope_rows(dense, heads[part]) if part in heads else dense
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(tensors, out / "model.safetensors")
    return out


def test_gguf_linears_are_served_as_the_file_stores_them_and_compute_the_same_logits(gguf_model_dir):
    prompt = list(range(3, 20))
    quantized, kinds = _logits(gguf_model_dir, "bfloat16", "auto", prompt)
    dense, dense_kinds = _logits(gguf_model_dir, "bfloat16", "none", prompt)
    # 4-bit q/k/v, o, gate/up per layer; Q8_0 down projections as int8; lm_head was float.
    assert kinds == {"int4": 6, "int8": 2, "dense": 1} and dense_kinds == {"dense": 9}
    torch.testing.assert_close(quantized, dense, atol=0.03 * dense.abs().max().item(), rtol=0)
    assert quantized.argmax() == dense.argmax()


def test_float32_keeps_a_gguf_dense_because_the_kernels_need_half_precision(gguf_model_dir):
    _, kinds = _logits(gguf_model_dir, "float32", "auto", [3, 4, 5])
    assert set(kinds) == {"dense"}


def test_int4_mode_quantizes_every_linear_of_a_dense_model_round_to_nearest(tiny_llama_dir, tmp_path):
    # The reference: the same model with every linear weight replaced by its 4-bit rounding.
    rounded = tmp_path / "rounded"
    tensors = _copy_without_weights(tiny_llama_dir, rounded)
    for name, w in tensors.items():
        if w.dim() == 2 and "embed" not in name and "lm_head" not in name:  # a 500-row head: int8
            tensors[name] = quantize_int4(w).dequantize()
    save_file(tensors, rounded / "model.safetensors")
    prompt = list(range(3, 20))
    quantized, kinds = _logits(tiny_llama_dir, "bfloat16", "int4", prompt)
    reference, _ = _logits(rounded, "bfloat16", "none", prompt)
    assert kinds == {"int4": 8, "int8": 1}
    torch.testing.assert_close(quantized, reference, atol=0.03 * reference.abs().max().item(), rtol=0)


def test_int4_dummy_weights_are_drawn_in_4_bits(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, "cpu", "bfloat16", 64, random_weights=True, quantization="int4")
    assert loaded.linears.get("dense", 0) == 0
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.packed.dtype == torch.uint8


def test_auto_dtype_follows_the_cpus_bfloat16_support(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu"))[0] == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu"))[0] == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu"))[0] == torch.float32


def _int4_layer(n: int = 48, k: int = 96) -> Int4Linear:
    layer = Int4Linear(k, n, bias=False)
    layer.load_state_dict(Int4Linear.buffers_from(quantize_int4(torch.randn(n, k))))
    return layer.to(torch.bfloat16)


def test_a_dense_copy_is_the_kernels_own_weight_and_serves_only_large_batches(monkeypatch):
    layer = _int4_layer()
    model = torch.nn.Sequential(layer)
    monkeypatch.setattr(quant, "crossover", lambda layer, dtype: 8)  # the timing itself varies by machine
    assert "for batches of 8+ rows" in quant.add_dense_copies(model, 1 << 20, torch.bfloat16)
    calls = []
    monkeypatch.setattr(layer, "quantized", lambda x: calls.append(x.shape[0]) or Int4Linear.quantized(layer, x))
    small, large = torch.randn(7, 96).bfloat16(), torch.randn(8, 96).bfloat16()
    layer(small), layer(large)
    assert calls == [7]
    expected = Int4Linear.quantized(layer, large).float()  # the same weights; bfloat16 sums in another order
    torch.testing.assert_close(layer.dense(large).float(), expected,
                               atol=0.02 * expected.abs().max().item(), rtol=0)


def test_no_dense_copies_when_they_would_not_fit_the_budget():
    layer = _int4_layer()
    note = quant.add_dense_copies(torch.nn.Sequential(layer), 48 * 96 * 2 - 1, torch.bfloat16)
    assert "no dense copies" in note and layer.dense is None
