"""Requests to prompts and generation params: the chat and completion routes' translation of an
OpenAI/TabbyAPI body (every refusal here is a UserError: HTTP 400 before anything runs)."""

from __future__ import annotations

from typing import Any

from pixtral.errors import UserError
from pixtral.prompt import Prompt
from runtime.engine import GenerationParams
from runtime.sampling import SamplingParams
from runtime.server.config import ServerConfig
from runtime.server.images import load_image_url
from runtime.server.models import Loaded
from runtime.server.schemas import ChatCompletionRequest, CompletionRequest, Message, SamplingFields
from runtime.server.tools import forced_prefix


def generation_params(
    body: SamplingFields, config: ServerConfig, choice: int, logprobs: int | None, default_max: int | None = None
) -> GenerationParams:
    """OpenAI/TabbyAPI fields -> GenerationParams (OpenAI's defaults: temperature 1, nothing truncated)."""
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    requested = body.max_completion_tokens or body.max_tokens or default_max
    cap = config.limits.max_new_tokens
    sampling = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0,
        typical=1.0 if body.typical is None else body.typical,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        penalty_range=body.penalty_range or 0,
        seed=None if body.seed is None else (body.seed + choice) % 2**63,
    )
    return GenerationParams(
        max_new_tokens=min(x for x in (requested, cap) if x) if (requested or cap) else None,
        stop=tuple(s for s in stops if isinstance(s, str)),
        stop_token_ids=tuple(s for s in stops if isinstance(s, int)),
        sampling=sampling,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos or body.ban_eos_token,
    )


def check_choices(n: int, config: ServerConfig) -> None:
    if n > config.limits.max_n:
        raise UserError(f"n: {n} choices, more than this server's {config.limits.max_n}")


def template_message(message: Message) -> dict[str, Any]:
    """A request message as the chat template reads it (`developer` is OpenAI's newer `system`)."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    if isinstance(message.content, list):
        out["content"] = [
            {"type": "text", "text": p.text} if p.type == "text" else {"type": "image_url", "image_url": {"url": p.url}}
            for p in message.content
        ]
    else:
        out["content"] = message.content
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_prompt(loaded: Loaded, body: ChatCompletionRequest, config: ServerConfig) -> tuple[Prompt, bool]:
    """The prompt (images fetched, checked and preprocessed: call off the event loop), and whether
    the answer starts inside a tool call. Raises UserError for anything the request gets wrong."""
    if len(body.messages) > config.limits.max_messages:
        raise UserError(
            f"messages: {len(body.messages)} messages, more than this server's {config.limits.max_messages}"
        )
    check_choices(body.n, config)
    if body.response_format is not None and body.response_format.type != "text":
        raise UserError(
            f"response_format {body.response_format.type!r} is not supported (no constrained decoding); use 'text'"
        )
    parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content if p.type != "text"]
    engine = loaded.engine
    messages = [template_message(m) for m in body.messages]
    tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
    engine.check_text_fits(messages, tools)  # the cheapest refusal first: before images and tokenizing
    if parts:
        engine.require_vision()  # before fetching or decoding any of them
    if len(parts) > config.images.max_images_per_request:
        raise UserError(
            f"messages contain {len(parts)} images, more than this server's {config.images.max_images_per_request}"
        )
    images = [load_image_url(p.url, config.images) for p in parts]
    prompt = engine.chat_prompt(messages, images, tools, body.continue_final_message)
    forced = bool(tools) and body.tool_choice not in (None, "auto")
    if forced:
        tokenizer = engine.tokenizer
        prefix = forced_prefix(
            body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice,
            tokenizer.vocab_size == 32768,
        )
        extra = [tokenizer.tool_calls_id] + (tokenizer.encode(prefix) if prefix else [])
        prompt = Prompt(prompt.token_ids + tuple(extra), prompt.images)
    engine.check_fits(prompt)
    return prompt, forced


def completion_prompts(loaded: Loaded, body: CompletionRequest, config: ServerConfig) -> list[Prompt]:
    """One prompt per string (BOS first, as exllamav2 and TabbyAPI add it), or the token ids given."""
    check_choices(body.n, config)
    if body.suffix or body.echo:
        raise UserError("suffix and echo are not supported")
    tokenizer = loaded.engine.tokenizer
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
        vocab = tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.prompt):  # type: ignore[operator]
            raise UserError(f"prompt: token ids must be in [0, {vocab})")
        prompts = [Prompt(tuple(body.prompt))]  # type: ignore[arg-type]
    else:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        for text in texts:
            loaded.engine.check_text_fits(text)
        prompts = [Prompt(tuple([tokenizer.bos_id] + tokenizer.encode(t))) for t in texts]  # type: ignore[arg-type]
    for prompt in prompts:
        loaded.engine.check_fits(prompt)
    return prompts
