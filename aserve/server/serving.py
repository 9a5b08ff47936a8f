"""What the handlers share: the engine, the tokenizer and the served model's identity."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from aserve.engine.engine_loop import EngineLoop
from aserve.server.errors import APIError


@dataclass(eq=False)
class ServingState:
    KEY: ClassVar[web.AppKey["ServingState"]]

    engine: EngineLoop
    tokenizer: Any  # a transformers tokenizer: chat template + encode
    model_name: str
    max_model_len: int
    # Templates and tokenization of long prompts take milliseconds: keep them off the event loop.
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-tokenize"))
    engine_task: asyncio.Task | None = None
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's "created"

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenize_pool, self._encode_chat, messages)

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError("this model has no chat template; the chat endpoint cannot format messages",
                           code="chat_template_missing")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise jinja errors for histories they reject
            raise APIError(f"the chat template rejected these messages: {exc}", param="messages") from None
        # The template already wrote any BOS it wants; encoding must not add a second one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def engine_alive(self) -> bool:
        return self.engine.healthy and self.engine_task is not None and not self.engine_task.done()

    def check_engine(self) -> None:
        if not self.engine_alive():
            raise APIError("the engine is not running", status=503, code="engine_unavailable")

    def check_model(self, model: str | None) -> None:
        # An omitted model means the one we serve, as vLLM does.
        if model is not None and model != self.model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           status=404, param="model", code="model_not_found")


ServingState.KEY = web.AppKey("serving_state", ServingState)
