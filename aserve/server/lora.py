"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's runtime LoRA updates.

Routed only with --allow-runtime-lora-updating true (or ASERVE_ALLOW_RUNTIME_LORA_UPDATING=true),
as vLLM gates them; behind --api-key like every route. An adapter is read and checked against
the model on the tokenize thread (file I/O, never on the event loop), then served by name;
the step loop puts it in a slot when a request first needs it. Unloading removes the name at
once: new requests for it get 404, while requests already queued or running finish on it
(they hold the adapter itself, engine/lora_slots.py).
"""

import logging

from aiohttp import web

from aserve.models.lora import LoRAError
from aserve.server import protocol
from aserve.server.chat import read_json
from aserve.server.errors import APIError
from aserve.server.serving import ServingState

log = logging.getLogger("aserve")


def _registry(state: ServingState):
    if state.lora is None:
        raise APIError("LoRA is not enabled on this server; start it with --enable-lora true", param="lora_name")
    return state.lora


async def load_lora_adapter(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(protocol.LoadLoRARequest, await read_json(request))
    registry = _registry(state)
    if req.lora_name == state.model_name or req.lora_name in registry.adapters:
        raise APIError(f"the name {req.lora_name!r} is already served; unload it first", param="lora_name")
    try:
        adapter = await state.in_tokenize_thread(registry.read, req.lora_name, req.lora_path)
    except LoRAError as exc:
        raise APIError(str(exc), param="lora_path") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # unreadable or malformed files
        raise APIError(f"{req.lora_path}: cannot read the adapter: {type(exc).__name__}: {exc}",
                       param="lora_path") from exc
    if req.lora_name in registry.adapters:  # loaded by a concurrent request meanwhile
        raise APIError(f"the name {req.lora_name!r} is already served; unload it first", param="lora_name")
    registry.add(adapter)
    log.info("LoRA adapter %r loaded from %s", adapter.name, adapter.path)
    return web.Response(text=f"Success: LoRA adapter '{adapter.name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(protocol.UnloadLoRARequest, await read_json(request))
    registry = _registry(state)
    if registry.remove(req.lora_name) is None:
        raise APIError(f"the LoRA adapter {req.lora_name!r} cannot be found", status=404, param="lora_name",
                       code="model_not_found")
    log.info("LoRA adapter %r unloaded", req.lora_name)
    return web.Response(text=f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def add_lora_routes(app: web.Application) -> None:
    app.add_routes([web.post("/v1/load_lora_adapter", load_lora_adapter),
                    web.post("/v1/unload_lora_adapter", unload_lora_adapter)])
