"""Our Llama-family forward over the slot KV cache computes what transformers computes."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from aserve.engine.kv_cache import KVCache
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.models.batch import ForwardBatch
from aserve.models.loader import UnsupportedModelError, load_model, read_hf_config
from aserve.models.onednn_linear import OneDNNLinear, onednn_available

ARCH_FIXTURES = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir"]


def _seq(rid: str, prompt: list[int], slot: int) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=8, temperature=0), status=SequenceStatus.RUNNING, slot=slot)


def _logits(runner: ModelRunner, scheduled: list[ScheduledSeq]) -> torch.Tensor:
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


def _runner(path, **load_options) -> ModelRunner:
    loaded = load_model(path, "cpu", "float32", 128, **load_options)
    kv = KVCache.allocate(loaded.args, 4, loaded.max_model_len, loaded.dtype, loaded.device)
    return ModelRunner(loaded.model, kv, loaded.device, seed=0)


def test_prefill_logits_match_transformers(model_dir):
    runner = _runner(model_dir)
    prompt = list(range(3, 20))
    seq = _seq("a", prompt, slot=1)
    logits = _logits(runner, [ScheduledSeq(seq, len(prompt))])
    torch.testing.assert_close(logits[0], _reference(model_dir, prompt)[-1], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_gives_the_same_logits_as_one_chunk(model_dir):
    runner = _runner(model_dir)
    prompt = list(range(5, 30))
    seq = _seq("a", prompt, slot=2)
    for n in (10, 10):
        _logits(runner, [ScheduledSeq(seq, n)])
    last = _logits(runner, [ScheduledSeq(seq, 5)])
    torch.testing.assert_close(last[0], _reference(model_dir, prompt)[-1], atol=1e-4, rtol=1e-4)


def test_batched_decode_of_different_lengths_matches_transformers(model_dir):
    runner = _runner(model_dir)
    short, long = [7, 8, 9], list(range(10, 40))
    a, b = _seq("a", short, slot=3), _seq("b", long, slot=0)
    _logits(runner, [ScheduledSeq(a, len(short)), ScheduledSeq(b, len(long))])
    a.output_ids.append(11)
    b.output_ids.append(12)
    # One step mixing two decodes (slots 3 and 0, so idle slots 1-2 sit between) and a new prefill.
    c = _seq("c", [4, 5, 6, 7], slot=1)
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
    runner = ModelRunner(loaded.model, KVCache.allocate(loaded.args, 1, 64, loaded.dtype, loaded.device), loaded.device)
    logits = _logits(runner, [ScheduledSeq(_seq("a", [3, 4, 5], slot=0), 3)])
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
    logits = _logits(runner, [ScheduledSeq(_seq("a", prompt, slot=0), len(prompt))])
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


def test_bfloat16_decode_attention_keeps_its_scores_in_float32(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, "cpu", "float32", 64)
    attn, args = loaded.model.layers[0].self_attn, loaded.args
    group = args.num_heads // args.num_kv_heads
    gen = torch.Generator().manual_seed(0)
    # Large scores, as real models have: rounded to bfloat16, they move the softmax visibly.
    q = (torch.randn(2, args.num_heads, args.head_dim, generator=gen) * 6).bfloat16()
    k = (torch.randn(3, args.num_kv_heads, 64, args.head_dim, generator=gen) * 6).bfloat16()
    v = torch.randn(3, args.num_kv_heads, 64, args.head_dim, generator=gen).bfloat16()
    lens = torch.tensor([1, 50, 30])  # slot 0 idle; the two decodes sit in slots 2 and 1
    hidden = torch.arange(50) >= lens[:, None]
    bias = torch.zeros(3, 50, dtype=torch.bfloat16).masked_fill_(hidden, float("-inf"))[:, None, None, :]
    batch = ForwardBatch(input_ids=torch.zeros(2, dtype=torch.long), positions=torch.zeros(2, dtype=torch.long),
                         token_slots=torch.tensor([2, 1]), decode_slots=torch.tensor([2, 1]), decode_rows=3,
                         decode_bias=bias, prefills=[], logits_indices=torch.tensor([0, 1]))

    def exact(i: int, slot: int) -> torch.Tensor:  # float64 attention over the same bfloat16 inputs
        keys = k[slot, :, : lens[slot]].double().repeat_interleave(group, 0)  # [heads, n, head_dim]
        values = v[slot, :, : lens[slot]].double().repeat_interleave(group, 0)
        scores = (q[i].double() * attn.scale).unsqueeze(1) @ keys.transpose(-1, -2)  # [heads, 1, n]
        return (torch.softmax(scores, dim=-1) @ values).squeeze(1)

    out = attn._decode_attention(q, batch, k, v).double()
    # bfloat16 matmuls for the scores were off by up to 0.20 here; SDPA by 0.008.
    torch.testing.assert_close(out, torch.stack([exact(0, 2), exact(1, 1)]), atol=0.03, rtol=0)
