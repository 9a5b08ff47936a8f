"""Our Llama-family forward over the paged KV cache computes what transformers computes."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from aserve.engine.block_manager import BlockManager
from aserve.engine.kv_cache import KVCache
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.models.loader import UnsupportedModelError, load_model, read_hf_config
from aserve.models.onednn_linear import OneDNNLinear, onednn_available

ARCH_FIXTURES = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir"]


def _seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=8, temperature=0), status=SequenceStatus.RUNNING)


def _logits(runner: ModelRunner, scheduled: list[ScheduledSeq]) -> torch.Tensor:
    for item in scheduled:  # blocks handed out step by step: the sequences' blocks interleave
        assert runner.blocks.reserve(item.seq, item.seq.num_computed + item.num_tokens)
    with torch.inference_mode():
        out = runner.model(runner._build_batch(scheduled)[0], runner.kv_cache.k, runner.kv_cache.v)
    for item in scheduled:
        item.seq.num_computed += item.num_tokens
    return out


@functools.cache
def _hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _reference(path, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return _hf_model(path)(torch.tensor([ids])).logits[0]


@pytest.fixture(params=ARCH_FIXTURES)
def model_dir(request):
    return request.getfixturevalue(request.param)


def _runner(path, block_size: int = 4, max_model_len: int = 128, **load_options) -> ModelRunner:
    loaded = load_model(path, "cpu", "float32", max_model_len, **load_options)
    kv = KVCache.allocate(loaded.args, 128 * KVCache.bytes_per_block(loaded.args, block_size, loaded.dtype), block_size,
                          loaded.dtype, loaded.device)
    return ModelRunner(loaded.model, kv, BlockManager(kv.num_blocks, block_size), loaded.device, seed=0)


def test_prefill_logits_match_transformers(model_dir):
    runner = _runner(model_dir)
    prompt = list(range(3, 20))
    seq = _seq("a", prompt)
    logits = _logits(runner, [ScheduledSeq(seq, len(prompt))])
    torch.testing.assert_close(logits[0], _reference(model_dir, prompt)[-1], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_gives_the_same_logits_as_one_chunk(model_dir):
    runner = _runner(model_dir)
    prompt = list(range(5, 85))
    seq = _seq("a", prompt)
    # The three attention paths: a first chunk over its own keys, a long later chunk over its
    # gathered blocks, a short later chunk through the paged op.
    for n in (10, 40):
        _logits(runner, [ScheduledSeq(seq, n)])
    last = _logits(runner, [ScheduledSeq(seq, 30)])
    torch.testing.assert_close(last[0], _reference(model_dir, prompt)[-1], atol=1e-4, rtol=1e-4)


def test_batched_decode_of_different_lengths_matches_transformers(model_dir):
    runner = _runner(model_dir)
    short, long = [7, 8, 9], list(range(10, 40))
    a, b = _seq("a", short), _seq("b", long)
    _logits(runner, [ScheduledSeq(a, len(short)), ScheduledSeq(b, len(long))])
    a.output_ids.append(11)
    b.output_ids.append(12)
    # One step mixing two decodes and a new prefill.
    c = _seq("c", [4, 5, 6, 7])
    logits = _logits(runner, [ScheduledSeq(a, 1), ScheduledSeq(b, 1), ScheduledSeq(c, 4)])
    torch.testing.assert_close(logits[0], _reference(model_dir, short + [11])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], _reference(model_dir, long + [12])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2], _reference(model_dir, [4, 5, 6, 7])[-1], atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused_with_its_name(tmp_path, tiny_llama_dir):
    import json
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*not supported"):
        read_hf_config(tmp_path / "m")


def test_random_weights_give_the_configs_shape_without_reading_weight_files(tmp_path, tiny_qwen2_dir):
    import shutil

    shutil.copy(tiny_qwen2_dir / "config.json", tmp_path / "config.json")  # no safetensors at all
    loaded = load_model(tmp_path, "cpu", "float32", 64, random_weights=True)
    real = load_model(tiny_qwen2_dir, "cpu", "float32", 64)
    assert loaded.args == real.args  # the Qwen2 layout (QKV bias, tied embeddings) follows from the config
    kv = KVCache.allocate(loaded.args, 2**20, 16, loaded.dtype, loaded.device)
    runner = ModelRunner(loaded.model, kv, BlockManager(kv.num_blocks, 16), loaded.device)
    logits = _logits(runner, [ScheduledSeq(_seq("a", [3, 4, 5]), 3)])
    assert logits.shape == (1, real.args.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_float32_cpu_linears_are_prepacked_for_onednn(tiny_llama_dir):
    # The logits tests above then check the packed path against transformers.
    model = load_model(tiny_llama_dir, "cpu", "float32", 64).model
    kinds = {type(m) for m in model.modules()}
    assert OneDNNLinear in kinds and torch.nn.Linear not in kinds


def test_fp16_quantization_replaces_every_linear_and_keeps_logits_close(model_dir):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    runner = _runner(model_dir, quantization="fp16")
    linears = [m for m in runner.model.modules() if isinstance(m, (torch.nn.Linear, OneDNNLinear))]
    quantized = [m for m in runner.model.modules() if isinstance(m, DynamicQuantizedLinear)]
    assert linears == [] and len(quantized) == 4 * runner.model.args.num_layers + 1  # qkv, o, gate_up, down; lm_head
    assert {m._packed_params.dtype for m in quantized} == {torch.float16}
    prompt = list(range(3, 20))
    logits = _logits(runner, [ScheduledSeq(_seq("a", prompt), len(prompt))])
    reference = _reference(model_dir, prompt)[-1]
    # float16 weights keep ~3 significant digits, so logits move by ~1e-3 of their scale.
    torch.testing.assert_close(logits[0], reference, atol=2e-3 * reference.abs().max().item(), rtol=0)
    assert logits[0].argmax() == reference.argmax()


@pytest.mark.parametrize(("mode", "dtype", "message"), [
    ("int8", "float32", "unknown quantization 'int8'"),
    ("fp16", "bfloat16", "needs dtype float32"),
])
def test_unusable_quantization_is_refused_with_the_reason(tiny_llama_dir, mode, dtype, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_llama_dir, "cpu", dtype, 128, quantization=mode)


def _with_rope(source, tmp_path, **config_changes):
    """A copy of a tiny model whose config.json sets RoPE as real model files do."""
    import json
    import shutil

    out = tmp_path / "rope-model"
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


ORIGINAL = 32  # the scaled variants' original context: the prompts below run well past it


@pytest.mark.parametrize("rope", [
    {"rope_theta": 500000.0},
    {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}},
    {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": ORIGINAL}},
], ids=["theta", "linear", "llama3", "yarn"])
def test_rope_variants_match_transformers_past_the_original_context(tiny_llama_dir, tmp_path, rope):
    model = _with_rope(tiny_llama_dir, tmp_path, **rope)
    runner = _runner(model)
    prompt = [3 + (i * 7) % 200 for i in range(120)]  # 120 positions: past ORIGINAL, and sure to differ
    logits = _logits(runner, [ScheduledSeq(_seq("a", prompt), len(prompt))])
    torch.testing.assert_close(logits[0], _reference(model, prompt)[-1], atol=1e-4, rtol=1e-4)


def test_the_default_rope_variant_is_not_what_the_others_compute(tiny_llama_dir, tmp_path):
    # Guards the test above: the variants change the logits, so serving one as another would show.
    prompt = [3 + (i * 7) % 200 for i in range(120)]
    plain = _reference(tiny_llama_dir, prompt)[-1]
    theta = _reference(_with_rope(tiny_llama_dir, tmp_path, rope_theta=500000.0), prompt)[-1]
    assert (plain - theta).abs().max() > 1e-2


@pytest.mark.parametrize(("rope", "message"), [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                       "original_max_position_embeddings": ORIGINAL}}, "longrope"),
])
def test_rope_variants_that_depend_on_the_length_are_refused_at_start(tiny_llama_dir, tmp_path, rope, message):
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(_with_rope(tiny_llama_dir, tmp_path, rope_theta=10000.0, **rope), "cpu", "float32", 128)


def test_a_sliding_window_is_the_context_and_more_is_refused(tiny_qwen2_dir, tmp_path):
    model = _with_rope(tiny_qwen2_dir, tmp_path, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert load_model(model, "cpu", "float32", 0).max_model_len == 64
    with pytest.raises(UnsupportedModelError, match="sliding window of 64 tokens"):
        load_model(model, "cpu", "float32", 128)
    # Within the window attention is exact: the logits are transformers' own (sliding) ones.
    runner = _runner(model, max_model_len=64)
    prompt = [3 + (i * 7) % 200 for i in range(60)]
    logits = _logits(runner, [ScheduledSeq(_seq("a", prompt), len(prompt))])
    torch.testing.assert_close(logits[0], _reference(model, prompt)[-1], atol=1e-4, rtol=1e-4)
