"""The OpenAI response pieces built from the engine's results: usage, logprobs, SSE events."""

from __future__ import annotations

import json
from typing import Any

from pixtral.errors import UserError
from pixtral.prompt import Prompt
from runtime.engine import Engine, Usage
from runtime.server.generation import GenerationCancelled
from runtime.server.schemas import ChoiceLogprobs, CompletionLogprobs, PromptTokensDetails, TokenLogprob, TopLogprob
from runtime.server.schemas import Usage as UsageBody


def usage_body(usage: Usage) -> UsageBody:
    total = usage.prefill_seconds + usage.decode_seconds
    return UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        prompt_time=usage.prefill_seconds,
        completion_time=usage.decode_seconds,
        total_time=total,
        prompt_tokens_per_sec=(usage.prompt_tokens - usage.cached_tokens) / usage.prefill_seconds
        if usage.prefill_seconds
        else 0.0,
        completion_tokens_per_sec=usage.decode_tokens_per_second,
    )


def token_text(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(engine: Engine, steps: list) -> ChoiceLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(engine, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for step in steps:
        head = entry(step.token_id, step.logprob if step.logprob is not None else 0.0)
        content.append(TokenLogprob(**head.model_dump(), top_logprobs=[entry(t, lp) for t, lp in step.top_logprobs]))
    return ChoiceLogprobs(content=content)


def completion_logprobs(engine: Engine, steps: list) -> CompletionLogprobs:
    out, offset = CompletionLogprobs(), 0
    for step in steps:
        text = token_text(engine, step.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(step.logprob if step.logprob is not None else 0.0)
        out.top_logprobs.append({token_text(engine, t): lp for t, lp in step.top_logprobs})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def forced_text(engine: Engine, prompt: Prompt, forced: bool) -> str:
    """The start of a forced tool call that the prompt already holds (after `[TOOL_CALLS]`)."""
    if not forced:
        return ""
    ids = list(prompt.token_ids)
    return engine.tokenizer.decode(ids[len(ids) - ids[::-1].index(engine.tokenizer.tool_calls_id) :])


def sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def error_event(err: BaseException) -> str:
    kind = (
        "invalid_request_error"
        if isinstance(err, UserError)
        else "service_unavailable"
        if isinstance(err, GenerationCancelled)
        else "server_error"
    )
    return sse({"error": {"message": str(err) or type(err).__name__, "type": kind, "param": None, "code": None}})
