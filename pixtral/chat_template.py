"""The extended Pixtral chat template (Jinja) and a renderer with HF's Jinja settings.

Where mistral-common accepts a conversation, the rendered text tokenizes to exactly its ids:
12B (tekken) follows instruct V3 (no spaces around specials; every system message is joined into
the last user turn); Large (SentencePiece) follows V7 (`[SYSTEM_PROMPT]` blocks in place; its
tokenizer.json adds SentencePiece's dummy prefix to each text run between specials, as mistral-common
does per chunk, so no space is written for it).
Mistral's `[text, image]` -> `[image, text]` swap and the `\\n\\n` join of adjacent text chunks are kept.

Extensions beyond mistral-common (documented layout, ../shared/spec/pixtral.md §4.3):
  * system messages anywhere, including after assistant and tool turns (V7: a block in place);
  * consecutive user messages are not merged: each gets its own `[INST] … [/INST]`, so two user
    turns appear as `…[/INST][INST]…`;
  * images (`[IMG]` placeholders, expanded by the processor) in user, assistant and tool messages;
  * an assistant turn may carry content and tool calls (content first, then `[TOOL_CALLS]`);
  * `continue_final_message=true` leaves a final assistant turn open (no `</s>`);
  * string content holding exllamav2 embedding aliases (`<$EMB_n$>`, as TabbyAPI's exl2 branch
    flattens image and text parts) is laid out as the parts would be: pictures unspaced, text
    chunks as text parts, Mistral's [text, image] swap.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_TEMPLATE = r"""
{%- set ns = namespace(last_user=-1, first_user=-1, systems=[]) %}
{%- for message in messages %}
    {%- if message.role == "user" %}{% set ns.last_user = loop.index0 %}{% if ns.first_user < 0 %}{% set ns.first_user = loop.index0 %}{% endif %}{% endif %}
    {%- if message.role == "system" %}{% set ns.systems = ns.systems + [message.content if message.content is string else (message.content | selectattr("type", "equalto", "text") | map(attribute="text") | join("\n\n"))] %}{% endif %}
    {%- if message.role not in ["system", "user", "assistant", "tool"] %}{{ raise_exception("unsupported message role: " ~ message.role) }}{% endif %}
{%- endfor %}
{#- chunks: [kind, value] pairs, "text" or "image" (value: what stands for the picture) #}
{%- macro render_chunks(chunks, lead) %}
    {%- if chunks | length == 2 and chunks[0][0] == "text" and chunks[1][0] == "image" %}
        {%- set chunks = [chunks[1], chunks[0]] %}
    {%- endif %}
    {{- lead }}
    {%- for chunk in chunks %}
        {%- if chunk[0] == "image" %}{{ chunk[1] }}{% elif chunk[1] %}{{ chunk[1] }}{% endif %}
    {%- endfor %}
{%- endmacro %}
{%- macro render_content(content, lead) %}
    {%- if content is string and EMBEDDING_ALIAS in content %}
        {#- a string holding exllamav2 embedding aliases (<$EMB_n$>): TabbyAPI flattens content parts so #}
        {%- set pieces = content.split(EMBEDDING_ALIAS) %}
        {%- set acc = namespace(chunks=[["text", pieces[0]]] if pieces[0] else []) %}
        {%- for piece in pieces[1:] %}
            {%- set id_and_rest = piece.split("$>", 1) %}
            {%- set acc.chunks = acc.chunks + [["image", EMBEDDING_ALIAS ~ id_and_rest[0] ~ "$>"]] %}
            {%- if id_and_rest | length > 1 and id_and_rest[1] %}{% set acc.chunks = acc.chunks + [["text", id_and_rest[1]]] %}{% endif %}
        {%- endfor %}
        {{- render_chunks(acc.chunks, lead) }}
    {%- elif content is string %}
        {{- lead }}{{ content }}
    {%- elif content is none %}
        {{- lead }}
    {%- else %}
        {%- set acc = namespace(chunks=[], text=none) %}
        {%- for part in content %}
            {%- if part.type == "text" %}
                {%- set acc.text = part.text if acc.text is none else acc.text ~ "\n\n" ~ part.text %}
            {%- elif part.type.startswith("image") %}
                {%- if acc.text is not none %}{% set acc.chunks = acc.chunks + [["text", acc.text]] %}{% set acc.text = none %}{% endif %}
                {%- set acc.chunks = acc.chunks + [["image", "[IMG]"]] %}
            {%- else %}
                {{- raise_exception("unsupported content part type: " ~ part.type) }}
            {%- endif %}
        {%- endfor %}
        {%- if acc.text is not none %}{% set acc.chunks = acc.chunks + [["text", acc.text]] %}{% endif %}
        {{- render_chunks(acc.chunks, lead) }}
    {%- endif %}
{%- endmacro %}
{%- macro tool_call_json(call) %}
    {%- set function = call.function if call.function is defined else call %}
    {%- set arguments = function.arguments if function.arguments is defined else {} %}
    {{- '{"name": ' ~ (function.name | tojson) ~ ', "arguments": ' }}
    {{- arguments if arguments is string else (arguments | tojson) }}
    {%- if call.id is defined and call.id and call.id != "null" %}{{ ', "id": ' ~ (call.id | tojson) }}{% endif %}
    {{- '}' }}
{%- endmacro %}
{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == "system" %}
        {%- if not MERGE_SYSTEM %}[SYSTEM_PROMPT]{{ render_content(message.content, "") }}[/SYSTEM_PROMPT]{% endif %}
    {%- elif message.role == "user" %}
        {%- if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
        {%- set lead = (ns.systems | join("\n\n")) ~ "\n\n" if MERGE_SYSTEM and ns.systems and loop.index0 == ns.last_user else "" %}
        {{- "[INST]" ~ render_content(message.content, lead) ~ "[/INST]" }}
    {%- elif message.role == "assistant" %}
        {#- consecutive plain assistant turns are one turn, joined by a blank line (as mistral-common) #}
        {%- set plain = not message.tool_calls and message.content is string %}
        {%- set prev = messages[loop.index0 - 1] if loop.index0 > 0 else {} %}
        {%- set next = messages[loop.index0 + 1] if not loop.last else {} %}
        {%- set joins_previous = plain and prev.role == "assistant" and not prev.tool_calls and prev.content is string %}
        {%- set joins_next = plain and next.role == "assistant" and not next.tool_calls and next.content is string %}
        {#- V3 opens a conversation that starts with the assistant with an empty user turn #}
        {%- if MERGE_SYSTEM and not joins_previous and (ns.first_user < 0 or loop.index0 < ns.first_user) %}[INST][/INST]{% endif %}
        {%- if joins_previous %}
            {{- "\n\n" ~ message.content.rstrip(" ") }}
        {%- elif message.content is string %}
            {{- message.content.rstrip(" ") }}
        {%- elif message.content %}
            {{- render_content(message.content, "") }}
        {%- endif %}
        {%- if message.tool_calls %}
            {{- "[TOOL_CALLS][" }}
            {%- for call in message.tool_calls %}{{ tool_call_json(call) }}{% if not loop.last %}, {% endif %}{% endfor %}
            {{- "]" }}
        {%- endif %}
        {%- if not joins_next and not (loop.last and continue_final_message) %}{{ eos_token }}{% endif %}
    {%- elif message.role == "tool" %}
        {%- set call_id = message.tool_call_id if message.tool_call_id is defined and message.tool_call_id else "" %}
        {%- if TOOL_RESULT_JSON %}
            {%- set text = message.content if message.content is string else (message.content | selectattr("type", "equalto", "text") | map(attribute="text") | join("")) %}
            {%- set stripped = text.strip() %}
            {%- set payload = text if (stripped.startswith("{") and stripped.endswith("}")) or (stripped.startswith("[") and stripped.endswith("]")) else (text | tojson) %}
            {{- '[TOOL_RESULTS]{"content": ' ~ payload ~ ', "call_id": ' ~ (call_id | tojson) ~ '}' }}
            {%- if message.content is not string %}{% for part in message.content if part.type.startswith("image") %}[IMG]{% endfor %}{% endif %}
            {{- "[/TOOL_RESULTS]" }}
        {%- else %}
            {{- "[TOOL_RESULTS]" ~ call_id ~ "[TOOL_CONTENT]" ~ render_content(message.content, "") ~ "[/TOOL_RESULTS]" }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if MERGE_SYSTEM and ns.systems and ns.last_user < 0 %}{{ "[INST]" ~ (ns.systems | join("\n\n")) ~ "\n\n[/INST]" }}{% endif %}
"""

# per tokenizer kind: (systems join the last user turn, V3 tool-result JSON)
_FLAVOURS = {"tekken": (True, True), "spm": (False, False)}
# how exllamav2 names an image embedding in text (generator/dynamic_embeddings.py: "<$EMB_{first_index}$>");
# TabbyAPI flattens a message's parts into one string with these in place of the pictures
EMBEDDING_ALIAS = "<$EMB_"


def chat_template(kind: str) -> str:
    """The Jinja chat template for a tokenizer kind ("tekken" for 12B, "spm" for Large)."""
    if kind not in _FLAVOURS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_FLAVOURS)}")
    merge_system, tool_json = _FLAVOURS[kind]
    header = (
        f"{{%- set MERGE_SYSTEM = {str(merge_system).lower()} %}}"
        f"{{%- set TOOL_RESULT_JSON = {str(tool_json).lower()} %}}"
        f"{{%- set EMBEDDING_ALIAS = {json.dumps(EMBEDDING_ALIAS)} %}}"
    )
    return header + _TEMPLATE.strip() + "\n"


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Template:
    """Compiling the template costs ~0.1 s; a model directory has one, so keep it compiled."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
) -> str:
    """Render `messages` with HF's chat-template Jinja settings (trim/lstrip blocks, tojson)."""
    return _compiled(template).render(
        messages=messages,
        tools=tools,
        bos_token=bos_token,
        eos_token=eos_token,
        continue_final_message=continue_final_message,
        add_generation_prompt=True,
    )
