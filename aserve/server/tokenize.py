"""POST /tokenize and /detokenize, with vLLM's request and response bodies."""

from aiohttp import web

from aserve.server import protocol
from aserve.server.chat import read_json
from aserve.server.chat_prompt import chat_inputs
from aserve.server.errors import APIError, json_response
from aserve.server.serving import ServingState


async def tokenize(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(protocol.TokenizeRequest, await read_json(request))
    state.check_model(req.model, generate=False)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give either prompt or messages", param="prompt")
    if req.messages is not None:
        chat = protocol.ChatCompletionRequest(messages=req.messages, tools=req.tools)
        messages, tools = chat_inputs(chat, state.template_tools)
        tokens = await state.encode_chat(messages, tools, req.add_generation_prompt, bool(req.add_special_tokens),
                                         req.chat_template_kwargs, req.continue_final_message)
    else:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = await state.encode_prompt(req.prompt, add_special)
    body = {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}
    if req.return_token_strs:
        body["token_strs"] = state.tokenizer.convert_ids_to_tokens(tokens)
    return json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(protocol.DetokenizeRequest, await read_json(request))
    state.check_model(req.model, generate=False)
    if bad := [t for t in req.tokens if t >= state.vocab_size]:
        raise APIError(f"token id {bad[0]} is out of range; the vocabulary has {state.vocab_size} tokens",
                       param="tokens")
    return json_response({"prompt": await state.decode(req.tokens)})
