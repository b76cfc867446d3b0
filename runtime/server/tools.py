"""Tool calls: the model's `[TOOL_CALLS][{"name": …, "arguments": {…}}]` output as OpenAI `tool_calls`,
and what `tool_choice` adds to the prompt (a forced `[TOOL_CALLS]` start for "required" or a named
function, nothing for "auto", no tools at all for "none")."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from runtime.server.schemas import ResponseFunction, ResponseToolCall

ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """Mistral's tool-call ids are 9 alphanumerics."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


def forced_prefix(tool_choice: Any, spm: bool) -> str:
    """Text the answer must start with (after the `[TOOL_CALLS]` token) for a named function."""
    if isinstance(tool_choice, dict) or hasattr(tool_choice, "function"):
        function = tool_choice["function"] if isinstance(tool_choice, dict) else tool_choice.function
        return (" " if spm else "") + '[{"name": ' + json.dumps(function["name"]) + ', "arguments": '
    return ""


def parse_tool_calls(text: str) -> list[ResponseToolCall] | None:
    """The calls in the text after `[TOOL_CALLS]`, or None if it is not a JSON list of calls."""
    start = text.find("[")
    if start < 0:
        return None
    try:
        calls, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    out = []
    for index, call in enumerate(calls):
        arguments = call.get("arguments", {})
        out.append(
            ResponseToolCall(
                index=index,
                id=str(call.get("id") or new_call_id()),
                function=ResponseFunction(
                    name=call["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)
                ),
            )
        )
    return out
