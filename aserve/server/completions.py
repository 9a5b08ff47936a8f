"""POST /v1/completions: the legacy text-completion endpoint, as OpenAI and vLLM serve it.

`prompt` is a string, a list of strings, a list of token ids or a list of lists of them;
each prompt gets n choices, numbered prompt-major. `echo` puts the prompt in front of the
text, and with `logprobs` the prompt's tokens get logprobs too (the first one null: nothing
predicts it), which needs the whole prompt computed, so such a request skips the prefix cache.
"""

import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from aserve.engine.engine_loop import RequestOutput
from aserve.server import generation, objects, protocol
from aserve.server.chat import read_json
from aserve.server.errors import APIError, json_response
from aserve.server.logprobs import completion_logprobs
from aserve.server.middleware import request_id
from aserve.server.serving import RequestRecord, ServingState
from aserve.server.streaming import write_stream

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for this endpoint


async def prompt_ids(state: ServingState, prompt: str | list) -> list[list[int]]:
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    ids = [await state.encode_prompt(p) if isinstance(p, str) else p for p in prompts]
    for i, tokens in enumerate(ids):
        if bad := [t for t in tokens if not 0 <= t < state.vocab_size]:
            raise APIError(f"prompt: token id {bad[0]} is out of range; the vocabulary has {state.vocab_size} tokens",
                           param="prompt" if len(ids) == 1 else f"prompt[{i}]")
    return ids


async def completions(request: web.Request) -> web.StreamResponse:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_completion_request(await read_json(request))
    lora = await state.loaded_adapter(state.check_model(req.model))
    texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
    state.check_prompt_chars(sum(map(len, texts)), "prompt")
    prompts = await prompt_ids(state, req.prompt)
    grammar = await generation.compile_response_format(state, req.response_format)
    echo_logprobs = req.logprobs if req.echo else None
    params = generation.sampling_params(req, max(map(len, prompts)), state,
                                        max_tokens=req.requested_max_tokens or DEFAULT_MAX_TOKENS,
                                        logprobs=req.logprobs, prompt_logprobs=echo_logprobs)
    n = req.n or 1
    echoes = [await state.decode(p) for p in prompts] if req.echo else None
    rid = f"cmpl-{uuid.uuid4().hex}"
    with state.admit(n * len(prompts), request_id(request), rid) as record:
        outputs = generation.start(state, rid, prompts, params, n, grammar, record, req.cache_salt, lora)
        reply = _Reply(state, req, rid, int(time.time()), state.served_name(lora), prompts, echoes, n)
        if req.stream:
            return await reply.stream(request, outputs, record)
        return json_response(reply.complete(await generation.collect(outputs, n * len(prompts))))


class _Reply:
    def __init__(self, state: ServingState, req: protocol.CompletionRequest, rid: str, created: int, model: str,
                 prompts: list[list[int]], echoes: list[str] | None, n: int) -> None:
        self.state, self.req, self.rid, self.created = state, req, rid, created
        self.model = model  # the name the response gives: the adapter asked for, else the base model
        self.prompts, self.echoes, self.n = prompts, echoes, n
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.n] if self.echoes is not None else ""

    def _logprobs(self, index: int, choice: generation.Choice, offset: int, first: bool,
                  prompt_logprobs: list | None) -> dict | None:
        """Logprobs of what `choice` holds: its new tokens, and on the first output of an
        echoed choice the prompt's tokens before them (`prompt_logprobs`: the prompt's first
        choice's, which computed the prompt for all n)."""
        if self.req.logprobs is None:
            return None
        tokens, entries = [e.token for e in choice.logprobs], list(choice.logprobs)
        if first and self.echoes is not None:
            prompt = self.prompts[index // self.n]
            tokens, entries = prompt + tokens, (prompt_logprobs or [None] * len(prompt)) + entries
        return completion_logprobs(tokens, entries, self.state.token_text, offset)

    def complete(self, choices: list[generation.Choice]) -> dict:
        body = [objects.completion_choice(c.index, self._echo(c.index) + c.text, c.finish_reason,
                                          self._logprobs(c.index, c, 0, True,
                                                         choices[c.index - c.index % self.n].prompt_logprobs))
                for c in choices]
        return objects.completion(self.rid, self.model, self.created, body, _usage(choices, self.n))

    async def stream(self, request: web.Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
                     record: RequestRecord) -> web.StreamResponse:
        choices = [generation.Choice(i) for i in range(self.n * len(self.prompts))]
        offsets = [0] * len(choices)  # text_offset of each choice's next token
        prompt_logprobs: dict[int, list] = {}  # by prompt, from its first choice, which computed it
        # An echoed choice's first chunk carries its prompt's logprobs, which come with the first
        # choice's first output: later choices' outputs wait here until then.
        held: dict[int, list[tuple[int, RequestOutput]]] = {}
        echoes_logprobs = self.echoes is not None and self.req.logprobs is not None

        def render(i: int, out: RequestOutput) -> list[dict]:
            p = i // self.n
            if out.prompt_logprobs is not None and i % self.n == 0:
                prompt_logprobs[p] = out.prompt_logprobs
            if echoes_logprobs and p not in prompt_logprobs:
                held.setdefault(p, []).append((i, out))
                return []
            return [chunk for j, o in [(i, out), *held.pop(p, [])] for chunk in one(j, o)]

        def one(i: int, out: RequestOutput) -> list[dict]:
            first = choices[i].completion_tokens == 0 and not choices[i].text
            piece = generation.Choice(i)
            piece.add(out)
            choices[i].add(out)
            text = (self._echo(i) if first else "") + out.text
            logprobs = self._logprobs(i, piece, offsets[i], first, prompt_logprobs.get(i // self.n))
            if logprobs is not None:
                offsets[i] += sum(map(len, logprobs["tokens"]))
            if not (text or logprobs or out.finish_reason):
                return []
            choice = objects.completion_choice(i, text, out.finish_reason, logprobs)
            return [objects.completion(self.rid, self.model, self.created, [choice], None)]

        def closing() -> list[dict]:
            if not self.include_usage:
                return []
            return [objects.usage_chunk(self.rid, self.model, self.created, _usage(choices, self.n),
                                        "text_completion")]

        return await write_stream(request, self.state, self.rid, outputs, render, record, closing=closing)


def _usage(choices: list[generation.Choice], n: int) -> dict:
    leaders = choices[::n]  # each prompt once, however many choices
    return objects.usage(sum(c.prompt_tokens for c in leaders), sum(c.completion_tokens for c in choices),
                         sum(c.cached_tokens for c in leaders))
