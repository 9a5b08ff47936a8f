"""OpenAI chat messages (and tools) into what the model's chat template renders.

A template that renders tools (as Qwen's and Llama 3's do: told by rendering it with a probe
tool and without, once at start; a template that merely mentions the word may not) gets them
through `apply_chat_template(..., tools=...)`, and histories with tool calls and tool results
as they are. A template that does not (SmolLM2's, plain ChatML) would silently drop them, so
the tools are described in the system message in the Hermes format that the Hermes tool
parser reads back, and earlier calls and results are written into the turns as text.
"""

import json
from typing import Any

from aserve.server.protocol import ChatCompletionRequest, ChatMessage

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


_PROBE_TOOL = {"type": "function", "function": {"name": "aserve_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template puts the tools it is given into the prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "hi"}]
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that raises on tools (or at all) cannot be given them
        return False
    return "aserve_probe_tool" in with_tools and "aserve_probe_tool" not in without


def chat_inputs(req: ChatCompletionRequest, renders_tools: bool) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """(messages, tools) for apply_chat_template; tools is None when the template gets none."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()] if req.tool_choice != "none" else []
    if renders_tools:
        return [_native(m, i) for i, m in enumerate(req.messages)], tools or None
    messages = [_as_text(m, i) for i, m in enumerate(req.messages)]
    if tools:
        prompt = _TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _role(m: ChatMessage) -> str:
    return "system" if m.role == "developer" else m.role


def _native(m: ChatMessage, index: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": _role(m), "content": m.text(index)}
    if m.name is not None:
        message["name"] = m.name
    if m.tool_calls:
        # Templates render arguments as an object (`| tojson`), as transformers documents.
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _as_text(m: ChatMessage, index: int) -> dict[str, Any]:
    content = m.text(index)
    if m.tool_calls:
        calls = [json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                            ensure_ascii=False) for c in m.tool_calls]
        content = "\n".join([content, *(f"<tool_call>\n{c}\n</tool_call>" for c in calls)]).strip()
    if m.role == "tool":  # as Qwen's template writes a tool result: inside a user turn
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    message = {"role": _role(m), "content": content}
    if m.name is not None:
        message["name"] = m.name
    return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: passed on as the client wrote it
