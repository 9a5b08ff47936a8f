"""The CUDA path, on a GPU (marker `cuda`; skipped where torch sees none). `bash deploy/gpu/check.sh`
runs these with the paged-attention CUDA test and the 1B-shape benchmark as one run on a lent
GPU machine. Each compares CUDA with what the CPU path computes, or checks what must hold on
any device."""

import asyncio
import json

import pytest
import torch

from aserve.config import load_config
from aserve.engine.block_manager import BlockManager
from aserve.engine.engine_loop import GenerationRequest
from aserve.engine.kv_cache import KVCache
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.launch import build_state
from aserve.models.loader import load_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _runner(model_dir, device: str) -> ModelRunner:
    loaded = load_model(model_dir, device, "float32", 256)
    kv = KVCache.allocate(loaded.args, 64 * KVCache.bytes_per_block(loaded.args, 16, loaded.dtype), 16,
                          loaded.dtype, loaded.device)
    return ModelRunner(loaded.model, kv, BlockManager(kv.num_blocks, kv.block_size, prefix_caching=False),
                       loaded.device, seed=0)


def _logits_of_a_schedule(runner: ModelRunner) -> list[torch.Tensor]:
    """Every step's logits (on the CPU) for: a 40-token prompt in two chunks (the second over
    cached positions), a 10-token prompt joining with that second chunk, then 4 decode steps."""
    captured: list[torch.Tensor] = []
    runner.fault_hook = lambda scheduled, logits: captured.append(logits.float().cpu())
    a = Sequence("a", [(5 * i) % 97 + 3 for i in range(40)], SamplingParams(max_tokens=8, temperature=0))
    b = Sequence("b", [(11 * i) % 89 + 3 for i in range(10)], SamplingParams(max_tokens=8, temperature=0))
    for seq in (a, b):
        seq.status = SequenceStatus.RUNNING
        assert runner.blocks.allocate(seq, reuse=False)

    def step(items: list[ScheduledSeq]) -> None:
        out = runner.run(items)
        for item, token in zip(items, out.tokens):
            item.seq.num_computed += item.num_tokens
            if token is not None:
                item.seq.output_ids.append(token)

    step([ScheduledSeq(a, 24)])
    step([ScheduledSeq(a, 16), ScheduledSeq(b, 10)])
    for _ in range(4):
        for seq in (a, b):
            assert runner.blocks.reserve(seq, seq.num_computed + 1)
        step([ScheduledSeq(a, 1), ScheduledSeq(b, 1)])
    return captured


def test_prefill_chunks_and_decodes_on_cuda_give_the_cpus_logits(tiny_llama_dir):
    cpu = _logits_of_a_schedule(_runner(tiny_llama_dir, "cpu"))
    cuda = _logits_of_a_schedule(_runner(tiny_llama_dir, "cuda"))
    assert len(cuda) == len(cpu) == 6
    for got, expected in zip(cuda, cpu):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


async def _generate(engine, rid: str, prompt: list[int], params: SamplingParams, guide=None) -> tuple[str, list]:
    text, logprobs = "", []
    async for out in engine.generate(GenerationRequest(rid, prompt, params, guide=guide)):
        text += out.text
        logprobs.extend(out.logprobs or [])
    return text, logprobs


async def test_the_engine_samples_on_cuda_in_bfloat16(tiny_llama_dir):
    """Seeded sampling (top-p, top-k, penalties) is reproducible, logprobs are real
    log-probabilities, and a JSON-schema grammar's mask holds: all of it on the device."""
    config = load_config(None, {"model": {"path": str(tiny_llama_dir), "device": "cuda", "dtype": "bfloat16",
                                          "max_model_len": 256},
                                # The second request must compute what the first did, not copy its cached keys.
                                "engine": {"seed": 0, "enable_prefix_caching": False}})
    state = build_state(config)
    engine = state.engine
    assert engine.runner.device.type == "cuda"
    task = asyncio.create_task(engine.run())
    try:
        params = dict(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=7, frequency_penalty=0.5,
                      logprobs=3, ignore_eos=True)
        first = await _generate(engine, "s1", [5, 6, 7, 8], SamplingParams(**params))
        again = await _generate(engine, "s2", [5, 6, 7, 8], SamplingParams(**params))
        assert first[0] == again[0] and len(first[1]) == 24
        assert all(lp.logprob <= 0 and len(lp.top) == 3 for lp in first[1])
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                  "additionalProperties": False}
        grammar = await state.compile_grammar({"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
        text, _ = await _generate(engine, "g", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0),
                                  guide=state.guided.guide(grammar))
        assert isinstance(json.loads(text)["n"], int)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
