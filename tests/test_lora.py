"""LoRA adapters: our logits with an adapter are PEFT's own, in any mix of adapters in a step."""

import asyncio

import aiohttp
import pytest
import pytest_asyncio
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from aserve.engine.block_manager import BlockManager
from aserve.engine.kv_cache import KVCache
from aserve.engine.lora_slots import AdapterSlots
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq, Scheduler
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.models import lora
from aserve.models.loader import load_model
from test_api import chat, post, serve, slow_engine

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir, out, seed: int, r: int = 4, targets=TARGETS, **config):
    """A PEFT LoRA adapter for the tiny model, with random (not zero) B so that it changes the output."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                 init_lora_weights=False, **config))
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.fixture
def adapters(tiny_llama_dir, tmp_path):
    return {name: (tmp_path / name, make_adapter(tiny_llama_dir, tmp_path / name, seed))
            for name, seed in (("first", 1), ("second", 2))}


def _runner(model_dir, adapter_dirs: dict, max_loras: int = 2):
    loaded = load_model(model_dir, "cpu", "float32", 128)
    registry = lora.LoRARegistry(loaded.args, max_rank=8)
    for name, path in adapter_dirs.items():
        registry.add(registry.read(name, path))
    context = lora.wrap_model(loaded.model, loaded.args, max_loras, 8, torch.float32)
    loaded.model.lora = context
    slots = AdapterSlots(max_loras)
    kv = KVCache.allocate(loaded.args, 256 * KVCache.bytes_per_block(loaded.args, 4, loaded.dtype), 4,
                          loaded.dtype, loaded.device)
    runner = ModelRunner(loaded.model, kv, BlockManager(kv.num_blocks, 4), loaded.device, seed=0, loras=slots)
    runner.adapters = registry.adapters  # by name, for _logits
    return runner


def _logits(runner: ModelRunner, prompts: list[tuple[list[int], str | None]]) -> list[torch.Tensor]:
    """One prefill step for all prompts together; the logits at every position of each."""
    seqs = []
    for i, (prompt, name) in enumerate(prompts):
        adapter = None if name is None else runner.adapters[name]
        seq = Sequence(f"s{i}", prompt, SamplingParams(max_tokens=1, temperature=0), status=SequenceStatus.RUNNING,
                       lora=adapter)
        if adapter is not None:
            seq.lora_slot = runner.loras.acquire(adapter)
        assert runner.blocks.reserve(seq, len(prompt))
        seqs.append(seq)
    while runner.loras.loading:  # a layer at a time, as between forwards under load
        runner.load_adapters(0)
    batch, _ = runner._build_batch([ScheduledSeq(s, len(s.prompt_ids)) for s in seqs])
    batch.logits_indices = torch.arange(batch.input_ids.numel())
    with torch.inference_mode():
        out = runner.model(batch, runner.kv_cache.k, runner.kv_cache.v)
    rows, start = [], 0
    for s in seqs:  # long prompts are dense chunks after the paged ones, here all start at 0: step order
        rows.append(out[start:start + len(s.prompt_ids)])
        start += len(s.prompt_ids)
    return rows


def _peft_logits(peft_model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return peft_model(torch.tensor([prompt])).logits[0]


def test_logits_with_an_adapter_equal_peft_and_each_row_gets_only_its_own(tiny_llama_dir, adapters):
    runner = _runner(tiny_llama_dir, {name: path for name, (path, _) in adapters.items()})
    base_prompt, first_prompt, second_prompt = list(range(3, 40)), list(range(50, 90)), list(range(7, 45))
    base, first, second = _logits(runner, [(base_prompt, None), (first_prompt, "first"), (second_prompt, "second")])
    for logits, prompt, (_, peft_model) in ((first, first_prompt, adapters["first"]),
                                            (second, second_prompt, adapters["second"])):
        reference = _peft_logits(peft_model, prompt)
        torch.testing.assert_close(logits, reference, atol=1e-4 * reference.abs().max().item(), rtol=1e-4)
    with adapters["first"][1].disable_adapter():
        reference = _peft_logits(adapters["first"][1], base_prompt)
    torch.testing.assert_close(base, reference, atol=1e-4 * reference.abs().max().item(), rtol=1e-4)


def test_rslora_and_partial_targets_scale_and_place_like_peft(tiny_llama_dir, tmp_path):
    peft_model = make_adapter(tiny_llama_dir, tmp_path / "rs", seed=3, r=8, targets=["k_proj", "up_proj"],
                              use_rslora=True)
    runner = _runner(tiny_llama_dir, {"rs": tmp_path / "rs"})
    prompt = list(range(3, 30))
    (logits,) = _logits(runner, [(prompt, "rs")])
    reference = _peft_logits(peft_model, prompt)
    torch.testing.assert_close(logits, reference, atol=1e-4 * reference.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize(("config", "message"), [
    (dict(r=16), "rank 16 exceeds max_lora_rank 8"),
    (dict(use_dora=True), "DoRA"),
])
def test_adapters_that_cannot_be_served_are_refused_with_the_reason(tiny_llama_dir, tmp_path, config, message):
    make_adapter(tiny_llama_dir, tmp_path / "bad", seed=4, **{"r": 4, **config})
    args = load_model(tiny_llama_dir, "cpu", "float32", 64).args
    with pytest.raises(lora.LoRAError, match=message):
        lora.load_adapter("bad", tmp_path / "bad", args, max_rank=8)


def test_an_adapter_for_another_model_is_refused_naming_the_shapes(tiny_llama_dir, tmp_path):
    make_adapter(tiny_llama_dir, tmp_path / "other", seed=5)
    weights = load_file(tmp_path / "other" / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("mlp.down_proj.lora_B.weight"))
    weights[key] = torch.zeros(96, 4)  # a hidden size of 96: another base model's
    save_file(weights, tmp_path / "other" / "adapter_model.safetensors")
    args = load_model(tiny_llama_dir, "cpu", "float32", 64).args
    with pytest.raises(lora.LoRAError, match=r"B \(96, 4\).*B \(64, 4\).*another model"):
        lora.load_adapter("other", tmp_path / "other", args, max_rank=8)


def test_slots_go_to_waiting_adapters_least_recently_used_first():
    first, second, third = (lora.LoRAAdapter(name, f"/{name}", 4, serial) for serial, name in enumerate("abc", 1))
    slots = AdapterSlots(max_loras=2)
    a, b = slots.acquire(first), slots.acquire(second)
    assert slots.acquire(third) is None  # both slots serve running sequences
    slots.release(a)
    assert slots.acquire(third) == a
    assert slots.acquire(first) is None
    slots.release(b)
    assert slots.acquire(first) == b
    assert {slot: adapter.name for slot, (adapter, _) in slots.loading.items()} == {a: "c", b: "a"}


def test_a_slot_is_filled_a_layer_per_call_when_the_budget_is_spent(tiny_llama_dir, adapters):
    runner = _runner(tiny_llama_dir, {"first": adapters["first"][0]})
    slot = runner.loras.acquire(runner.adapters["first"])
    for _ in range(len(runner.model.layers) - 1):
        runner.load_adapters(0)
        assert not runner.loras.ready(slot)
    runner.load_adapters(0)
    assert runner.loras.ready(slot)


def test_an_adapters_sequence_waits_for_its_slot_while_base_model_sequences_run():
    slots = AdapterSlots(max_loras=1)
    s = Scheduler(BlockManager(64, 4), 4, 64, 64, [2], loras=slots)
    adapter = lora.LoRAAdapter("a", "/a", 4, serial=1)
    params = SamplingParams(max_tokens=4, temperature=0)
    s.add(Sequence("lora", [10, 11, 12], params, lora=adapter))
    s.add(Sequence("base", [10, 11, 12], params))
    assert [item.seq.request_id for item in s.schedule()] == ["base"]  # "lora" admitted, its slot filling
    slots.loading.clear()  # what the model runner does once every layer is filled
    assert "lora" in [item.seq.request_id for item in s.schedule()]


def test_a_one_token_prompt_does_not_decode_before_its_slot_is_full():
    # A prompt of one token (or one the prefix cache covers) goes straight to decoding.
    slots = AdapterSlots(max_loras=1)
    s = Scheduler(BlockManager(64, 4), 4, 64, 64, [2], loras=slots)
    s.add(Sequence("one", [10], SamplingParams(max_tokens=4), lora=lora.LoRAAdapter("a", "/a", 4, serial=1)))
    assert s.schedule() == [] and s.schedule() == []  # admitted; its slot is still filling
    slots.loading.clear()
    assert [item.seq.request_id for item in s.schedule()] == ["one"]


def test_past_max_cpu_loras_the_least_recently_used_adapter_leaves_memory(tiny_llama_dir, adapters, tmp_path):
    make_adapter(tiny_llama_dir, tmp_path / "third", seed=3)
    args = load_model(tiny_llama_dir, "cpu", "float32", 64).args
    registry = lora.LoRARegistry(args, max_rank=8, max_cpu_loras=2)
    for name, path in (("first", adapters["first"][0]), ("second", adapters["second"][0]), ("third", tmp_path / "third")):
        registry.add(registry.read(name, path))
    assert registry.in_memory() == ["second", "third"]
    evicted = registry.adapters["first"]
    assert evicted.weights == {} and evicted.serial == 1  # still served: name, path and serial kept
    registry.use(registry.adapters["second"])
    back = registry.reload(evicted)
    registry.reloaded(evicted, back)
    assert registry.in_memory() == ["second", "first"]  # third was the least recently used
    assert back.serial == 1 and registry.adapters["first"] is back
    assert all(torch.equal(back.weights[k][1], w[1]) for k, w in registry.read("first", adapters["first"][0]).weights.items())


def test_a_request_holds_its_adapter_when_the_registry_evicts_it(tiny_llama_dir, adapters):
    args = load_model(tiny_llama_dir, "cpu", "float32", 64).args
    registry = lora.LoRARegistry(args, max_rank=8, max_cpu_loras=1)
    registry.add(registry.read("first", adapters["first"][0]))
    held = registry.adapters["first"]  # what a queued request holds
    registry.add(registry.read("second", adapters["second"][0]))
    assert registry.adapters["first"].weights == {} and held.weights  # the request's copy keeps its weights


# ---------------------------------------------------------------------------- through the server


@pytest_asyncio.fixture
async def client():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest_asyncio.fixture
async def lora_server(tiny_llama_dir, adapters):
    modules = ",".join(f"{name}={path}" for name, (path, _) in adapters.items())
    async with serve(tiny_llama_dir, {"enable_lora": True, "lora_modules": modules, "max_loras": 2,
                                      "max_lora_rank": 8}) as server:
        yield server


async def _chat(client, server, model: str, prompt: str, **body) -> dict:
    return await chat(client, server, model=model, messages=[{"role": "user", "content": prompt}],
                      **{"temperature": 0, "max_tokens": 12, **body})


async def test_adapters_are_listed_as_models_whose_parent_is_the_base(lora_server, client, adapters):
    async with client.get(lora_server.url + "/v1/models") as resp:
        data = (await resp.json())["data"]
    assert [m["id"] for m in data] == [lora_server.model, "first", "second"]
    assert [(m["parent"], m["root"]) for m in data[1:]] == [(lora_server.model, str(adapters[n][0]))
                                                           for n in ("first", "second")]
    async with client.get(lora_server.url + "/v1/models/second") as resp:
        assert (await resp.json())["parent"] == lora_server.model


async def test_each_adapter_answers_as_itself_alone_or_in_a_mixed_batch(lora_server, client):
    prompt = "Tell me about the sea."
    alone = {model: await _chat(client, lora_server, model, prompt) for model in (lora_server.model, "first", "second")}
    texts = {model: body["choices"][0]["message"]["content"] for model, body in alone.items()}
    assert len(set(texts.values())) == 3  # each adapter changes the output
    assert [body["model"] for body in alone.values()] == [lora_server.model, "first", "second"]
    together = await asyncio.gather(*(_chat(client, lora_server, model, prompt, n=2, cache_salt=f"mix{i}")
                                      for i, model in enumerate([lora_server.model, "first", "second", "first"])))
    for model, body in zip([lora_server.model, "first", "second", "first"], together):
        assert [c["message"]["content"] for c in body["choices"]] == [texts[model]] * 2


async def test_an_adapter_never_reuses_the_base_models_cached_prompt(lora_server, client):
    prompt = "cached " * 40
    await _chat(client, lora_server, lora_server.model, prompt)
    adapter = await _chat(client, lora_server, "first", prompt)
    again = await _chat(client, lora_server, "first", prompt)
    assert adapter["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_an_unknown_model_is_a_404_naming_what_is_served(lora_server, client):
    reply = await post(client, lora_server.url, {"model": "third", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status == 404
    assert "'first', 'second'" in reply.body["error"]["message"]


async def test_an_adapter_evicted_from_memory_is_read_back_and_answers_the_same(tiny_llama_dir, adapters, client):
    modules = ",".join(f"{name}={path}" for name, (path, _) in adapters.items())
    async with serve(tiny_llama_dir, {"enable_lora": True, "lora_modules": modules, "max_loras": 1,
                                      "max_cpu_loras": 1, "max_lora_rank": 8}) as server:
        assert server.state.lora.in_memory() == ["second"]
        first = await _chat(client, server, "first", "Tell me about the sea.")
        assert server.state.lora.in_memory() == ["first"]
        second = await _chat(client, server, "second", "Tell me about the sea.")
        again = await _chat(client, server, "first", "Tell me about the sea.")
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert second["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
        # the same load read back: its cached prompt blocks still serve it
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_an_evicted_adapter_whose_files_are_gone_is_a_500_and_the_server_keeps_serving(
        tiny_llama_dir, adapters, client):
    modules = ",".join(f"{name}={path}" for name, (path, _) in adapters.items())
    async with serve(tiny_llama_dir, {"enable_lora": True, "lora_modules": modules, "max_loras": 1,
                                      "max_cpu_loras": 1, "max_lora_rank": 8}) as server:
        (adapters["first"][0] / "adapter_model.safetensors").unlink()
        reply = await post(client, server.url, {"model": "first", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status == 500 and reply.body["error"]["code"] == "lora_load_failed"
        assert "could not be read back" in reply.body["error"]["message"]
        await _chat(client, server, "second", "still there?")


# ---------------------------------------------------------------------------- runtime updates


@pytest_asyncio.fixture
async def updatable_server(tiny_llama_dir, adapters):
    async with serve(tiny_llama_dir, {"enable_lora": True, "lora_modules": f"first={adapters['first'][0]}",
                                      "max_loras": 2, "max_lora_rank": 8},
                     allow_runtime_lora_updating=True) as server:
        yield server


async def _models(client, server) -> list[str]:
    async with client.get(server.url + "/v1/models") as resp:
        return [m["id"] for m in (await resp.json())["data"]]


async def test_an_adapter_loaded_at_run_time_is_served_like_one_given_at_start(updatable_server, client, adapters):
    reply = await post(client, updatable_server.url, {"lora_name": "again", "lora_path": str(adapters["first"][0])},
                       path="/v1/load_lora_adapter")
    assert reply.status == 200, reply.body
    assert await _models(client, updatable_server) == [updatable_server.model, "first", "again"]
    first = await _chat(client, updatable_server, "first", "Tell me about the sea.")
    again = await _chat(client, updatable_server, "again", "Tell me about the sea.")
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another load: its own cache


@pytest.mark.parametrize(("body", "message"), [
    ({"lora_name": "x", "lora_path": "/no/such/dir"}, "no adapter_config.json"),
    ({"lora_name": "first", "lora_path": "/no/such/dir"}, "already served"),
    ({"lora_name": "x"}, "lora_path"),
])
async def test_a_bad_load_is_a_400_and_the_server_keeps_serving(updatable_server, client, body, message):
    reply = await post(client, updatable_server.url, body, path="/v1/load_lora_adapter")
    assert reply.status == 400 and message in str(reply.body), reply.body
    assert await _models(client, updatable_server) == [updatable_server.model, "first"]
    await _chat(client, updatable_server, "first", "still there?")


async def test_a_too_high_rank_is_refused_naming_both_ranks(updatable_server, client, tiny_llama_dir, tmp_path):
    make_adapter(tiny_llama_dir, tmp_path / "big", seed=6, r=16)
    reply = await post(client, updatable_server.url, {"lora_name": "big", "lora_path": str(tmp_path / "big")},
                       path="/v1/load_lora_adapter")
    assert reply.status == 400 and "rank 16 exceeds max_lora_rank 8" in reply.body["error"]["message"]


async def test_unloading_lets_running_requests_finish_and_then_the_name_is_gone(updatable_server, client,
                                                                                monkeypatch):
    slow_engine(updatable_server.state, monkeypatch, 0.005)  # 200 tokens: a second at least
    running = asyncio.create_task(_chat(client, updatable_server, "first", "A long answer, please.", max_tokens=200,
                                        ignore_eos=True))
    while updatable_server.state.engine.stats()["running"] == 0:
        await asyncio.sleep(0.01)
    reply = await post(client, updatable_server.url, {"lora_name": "first"}, path="/v1/unload_lora_adapter")
    assert reply.status == 200
    body = await running
    assert body["usage"]["completion_tokens"] == 200 and body["model"] == "first"
    assert await _models(client, updatable_server) == [updatable_server.model]
    gone = await post(client, updatable_server.url, {"model": "first", "messages": [{"role": "user", "content": "x"}]})
    assert gone.status == 404
    again = await post(client, updatable_server.url, {"lora_name": "first"}, path="/v1/unload_lora_adapter")
    assert again.status == 404


async def test_runtime_updates_are_not_routed_unless_allowed(lora_server, client):
    reply = await post(client, lora_server.url, {"lora_name": "x", "lora_path": "/x"}, path="/v1/load_lora_adapter")
    assert reply.status == 404


async def test_metrics_count_running_and_waiting_requests_per_adapter(tiny_llama_dir, adapters, client, monkeypatch):
    modules = ",".join(f"{name}={path}" for name, (path, _) in adapters.items())
    # One adapter slot: "second" waits while "first" runs.
    async with serve(tiny_llama_dir, {"enable_lora": True, "lora_modules": modules, "max_loras": 1,
                                      "max_lora_rank": 8}) as lora_server:
        slow_engine(lora_server.state, monkeypatch, 0.005)
        tasks = [asyncio.create_task(_chat(client, lora_server, model, "Go on.", max_tokens=150, ignore_eos=True))
                 for model in ("first", "first", "second")]
        while lora_server.state.engine.stats()["running"] < 2:
            await asyncio.sleep(0.01)
        async with client.get(lora_server.url + "/metrics") as resp:
            text = await resp.text()
        await asyncio.gather(*tasks)
    assert f'aserve:lora_requests_running{{lora_name="first",model_name="{lora_server.model}"}} 2.0' in text
    assert f'aserve:lora_requests_waiting{{lora_name="second",model_name="{lora_server.model}"}} 1.0' in text
    assert 'vllm:lora_requests_info{max_lora="1",running_lora_adapters="first",waiting_lora_adapters="second"}' in text
