"""`/v1/chat/completions` and `/v1/completions`: requests to prompts and generation params, generation
on the held model, and the OpenAI responses — whole, or as SSE chunks ending in `data: [DONE]`.

Streams are spec-complete (`id`, `object`, `created`, `model` in every chunk); a long prefill or a
queue wait sends SSE keep-alive comments; an error after the stream began is sent as an OpenAI
error event followed by `[DONE]`; a client that goes away cancels its generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request

from ..engine import Engine, GenerationParams, Usage
from ..errors import UserError
from ..prompt import Prompt
from ..sampling import SamplingParams
from .config import ServerConfig
from .generation import ChoiceResult, Generation, GenerationCancelled, total_usage
from .images import load_image_url
from .models import Loaded, ModelHost
from .schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    Message,
    PromptTokensDetails,
    ResponseMessage,
    SamplingFields,
    TextCompletion,
    TokenLogprob,
    TopLogprob,
)
from .schemas import Usage as UsageBody
from .tools import forced_prefix, parse_tool_calls

DISCONNECT_POLL_SECONDS = 0.5


def generation_params(body: SamplingFields, config: ServerConfig, choice: int, logprobs: int | None, default_max: int | None = None) -> GenerationParams:
    """OpenAI/TabbyAPI fields -> GenerationParams (OpenAI's defaults: temperature 1, nothing truncated)."""
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    requested = body.max_completion_tokens or body.max_tokens or default_max
    cap = config.limits.max_new_tokens
    sampling = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature, top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p or 0.0, typical=1.0 if body.typical is None else body.typical,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, penalty_range=body.penalty_range or 0,
        seed=None if body.seed is None else (body.seed + choice) % 2**63,
    )  # fmt: skip
    return GenerationParams(max_new_tokens=min(x for x in (requested, cap) if x) if (requested or cap) else None,
                            stop=tuple(s for s in stops if isinstance(s, str)), stop_token_ids=tuple(s for s in stops if isinstance(s, int)),
                            sampling=sampling, logprobs=logprobs, ignore_eos=body.ignore_eos or body.ban_eos_token)  # fmt: skip


def check_choices(n: int, config: ServerConfig) -> None:
    if n > config.limits.max_n:
        raise UserError(f"n: {n} choices, more than this server's {config.limits.max_n}")


def _template_message(message: Message) -> dict[str, Any]:
    """A request message as the chat template reads it (`developer` is OpenAI's newer `system`)."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    if isinstance(message.content, list):
        out["content"] = [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image_url", "image_url": {"url": p.url}}
                          for p in message.content]  # fmt: skip
    else:
        out["content"] = message.content
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in message.tool_calls]  # fmt: skip
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_prompt(loaded: Loaded, body: ChatCompletionRequest, config: ServerConfig) -> tuple[Prompt, bool]:
    """The prompt (images fetched, checked and preprocessed: call off the event loop), and whether
    the answer starts inside a tool call. Raises UserError for anything the request gets wrong."""
    if len(body.messages) > config.limits.max_messages:
        raise UserError(f"messages: {len(body.messages)} messages, more than this server's {config.limits.max_messages}")
    check_choices(body.n, config)
    if body.response_format is not None and body.response_format.type != "text":
        raise UserError(f"response_format {body.response_format.type!r} is not supported (no constrained decoding); use 'text'")
    parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content if p.type != "text"]
    engine = loaded.engine
    messages = [_template_message(m) for m in body.messages]
    tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
    engine.check_text_fits(messages, tools)  # the cheapest refusal first: before images and tokenizing
    if parts and not (engine.backend.has_vision and config.model.vision):
        reason = "this model has no vision tower" if not engine.backend.has_vision else "vision is disabled on this server (model.vision)"
        raise UserError(f"messages contain {len(parts)} image(s) but {reason}; send text only")
    if len(parts) > config.images.max_images_per_request:
        raise UserError(f"messages contain {len(parts)} images, more than this server's {config.images.max_images_per_request}")
    images = [load_image_url(p.url, config.images) for p in parts]
    prompt = engine.chat_prompt(messages, images, tools, body.continue_final_message)
    forced = bool(tools) and body.tool_choice not in (None, "auto")
    if forced:
        tokenizer = engine.tokenizer
        prefix = forced_prefix(body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice,
                               tokenizer.vocab_size == 32768)  # fmt: skip
        extra = [tokenizer.tool_calls_id] + (tokenizer.encode(prefix) if prefix else [])
        prompt = Prompt(prompt.token_ids + tuple(extra), prompt.images)
    engine.check_fits(prompt)
    return prompt, forced


def usage_body(usage: Usage) -> UsageBody:
    total = usage.prefill_seconds + usage.decode_seconds
    return UsageBody(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens), prompt_time=usage.prefill_seconds,
                     completion_time=usage.decode_seconds, total_time=total,
                     prompt_tokens_per_sec=(usage.prompt_tokens - usage.cached_tokens) / usage.prefill_seconds if usage.prefill_seconds else 0.0,
                     completion_tokens_per_sec=usage.decode_tokens_per_second)  # fmt: skip


def _token_text(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(engine: Engine, steps: list) -> ChoiceLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = _token_text(engine, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for step in steps:
        head = entry(step.token_id, step.logprob if step.logprob is not None else 0.0)
        content.append(TokenLogprob(**head.model_dump(), top_logprobs=[entry(t, lp) for t, lp in step.top_logprobs]))
    return ChoiceLogprobs(content=content)


class Run:
    """The choices of one request, generated one after another on one slot."""

    def __init__(self, host: ModelHost, loaded: Loaded, request: Request, config: ServerConfig):
        self.host, self.loaded, self.request, self.config = host, loaded, request, config
        self.id_prefix = secrets.token_hex(12)
        self.created = int(time.time())

    async def choice_chunks(self, prompt: Prompt, params: GenerationParams, result: ChoiceResult, forced_tools: bool) -> AsyncIterator[str | None]:
        """Content deltas of one choice (None: keep-alive); fills `result`. Stops, cancelling the
        generation, if the client goes away."""
        result.in_tools = forced_tools
        metrics = self.request.app.state.metrics
        generation = Generation(self.loaded.engine, prompt, params).start()
        self.host.generations.add(generation)
        metrics.in_flight.inc()
        last_sent = time.monotonic()
        try:
            async for item in generation.items(min(self.config.network.keepalive_seconds, DISCONNECT_POLL_SECONDS)):
                if item is None:  # silence: is the client still there, and is a keep-alive due?
                    if await self.request.is_disconnected():
                        metrics.disconnects.inc()
                        return
                    if time.monotonic() - last_sent >= self.config.network.keepalive_seconds:
                        last_sent = time.monotonic()
                        yield None
                    continue
                last_sent = time.monotonic()
                if isinstance(item, BaseException):
                    raise item
                delta = result.feed(item, self.loaded.engine.tokenizer.tool_calls_id)
                if delta:
                    yield delta
            if generation.first_chunk_at is not None:
                metrics.first_token.observe(generation.first_chunk_at - generation.started)
            self.host.failures.clear()
        except (asyncio.CancelledError, GeneratorExit):  # a streaming client went away: its response is cancelled or closed
            metrics.disconnects.inc()
            raise
        except (UserError, GenerationCancelled):
            raise
        except Exception as err:
            self.host.failures.append(f"generation failed: {type(err).__name__}: {err}")
            raise
        finally:
            generation.cancel()
            self.host.generations.discard(generation)
            metrics.in_flight.dec()
            if result.usage is not None:
                metrics.prompt_tokens.inc(result.usage.prompt_tokens)
                metrics.cached_tokens.inc(result.usage.cached_tokens)
                metrics.completion_tokens.inc(result.usage.completion_tokens)
                metrics.images.inc(result.usage.images_encoded)

    def finish(self, result: ChoiceResult, forced_prefix_text: str = "") -> tuple[str | None, list | None, str | None]:
        """(content, tool_calls, finish_reason) of a finished choice."""
        text = "".join(result.text)
        if result.in_tools:
            calls = parse_tool_calls(forced_prefix_text + "".join(result.tool_text))
            if calls:
                return (text or None), calls, "tool_calls"
            text += forced_prefix_text + "".join(result.tool_text)  # not a valid call: the text as it came, our opening included
        return text, None, result.finish_reason


async def chat_completion(run: Run, body: ChatCompletionRequest, prompt: Prompt, forced: bool) -> ChatCompletion:
    engine, choices, usages = run.loaded.engine, [], []
    prefix = _forced_text(engine, prompt, forced)
    slots = await run.host.acquire_slot()
    try:
        for index in range(body.n):
            params = generation_params(body, run.config, index, (body.top_logprobs or 0) if body.logprobs else None)
            result = ChoiceResult(index)
            async with contextlib.aclosing(run.choice_chunks(prompt, params, result, forced)) as chunks:
                async for _ in chunks:
                    pass
            if result.usage is None:
                raise asyncio.CancelledError  # the client went away
            content, calls, finish = run.finish(result, prefix)
            choices.append(ChatChoice(index=index, message=ResponseMessage(content=content, tool_calls=calls), finish_reason=finish,
                                      logprobs=_chat_logprobs(engine, result.logprobs) if body.logprobs else None, stop_str=result.stop_string))  # fmt: skip
            usages.append(result.usage)
    finally:
        slots.release()
    return ChatCompletion(id=f"chatcmpl-{run.id_prefix}", created=run.created, model=run.loaded.name, choices=choices,
                          usage=usage_body(total_usage(usages)))  # fmt: skip


def _forced_text(engine: Engine, prompt: Prompt, forced: bool) -> str:
    """The start of a forced tool call that the prompt already holds (after `[TOOL_CALLS]`)."""
    if not forced:
        return ""
    ids = list(prompt.token_ids)
    return engine.tokenizer.decode(ids[len(ids) - ids[::-1].index(engine.tokenizer.tool_calls_id) :])


async def queue_for_slot(run: Run) -> AsyncIterator[asyncio.Semaphore | None]:
    """Wait for a generation slot, yielding None every keep-alive interval, then the slot (the
    caller releases it). A client that leaves while queued withdraws: no slot is taken later."""
    wait = asyncio.ensure_future(run.host.acquire_slot())
    try:
        while not (await asyncio.wait({wait}, timeout=run.config.network.keepalive_seconds))[0]:
            yield None
    except BaseException:  # cancelled or closed while queued
        if wait.done() and not wait.cancelled() and wait.exception() is None:
            wait.result().release()  # granted in the same instant: give it back
        wait.cancel()
        raise
    yield wait.result()


def sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def error_event(err: BaseException) -> str:
    kind = "invalid_request_error" if isinstance(err, UserError) else "service_unavailable" if isinstance(err, GenerationCancelled) else "server_error"
    return sse({"error": {"message": str(err) or type(err).__name__, "type": kind, "param": None, "code": None}})


async def chat_stream(run: Run, body: ChatCompletionRequest, prompt: Prompt, forced: bool) -> AsyncIterator[str]:
    engine, usages = run.loaded.engine, []
    prefix = _forced_text(engine, prompt, forced)
    ident = f"chatcmpl-{run.id_prefix}"

    def chunk(choices: list[ChunkChoice], usage: UsageBody | None = None) -> str:
        return sse(ChatCompletionChunk(id=ident, created=run.created, model=run.loaded.name, choices=choices, usage=usage))

    slots = None
    try:
        async with aclosing(queue_for_slot(run)) as queue:
            async for slots in queue:
                if slots is None:
                    yield ": keep-alive\n\n"
        for index in range(body.n):
            params = generation_params(body, run.config, index, (body.top_logprobs or 0) if body.logprobs else None)
            result = ChoiceResult(index)
            yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
            seen = 0
            async with contextlib.aclosing(run.choice_chunks(prompt, params, result, forced)) as deltas:  # closed with the response
                async for delta in deltas:
                    if delta is None:
                        yield ": keep-alive\n\n"
                        continue
                    logprobs = _chat_logprobs(engine, result.logprobs[seen:]) if body.logprobs else None
                    seen = len(result.logprobs)
                    yield chunk([ChunkChoice(index=index, delta=Delta(content=delta), logprobs=logprobs)])
            if result.usage is None:
                return  # the client went away
            _, calls, finish = run.finish(result, prefix)
            tail = Delta(tool_calls=calls) if calls else Delta()
            yield chunk([ChunkChoice(index=index, delta=tail, finish_reason=finish)])
            usages.append(result.usage)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage_body(total_usage(usages)))
    except asyncio.CancelledError:
        raise
    except Exception as err:  # after the stream began: an OpenAI error event, then [DONE]
        yield error_event(err)
    finally:
        if slots is not None:
            slots.release()
    yield "data: [DONE]\n\n"


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


def _completion_logprobs(engine: Engine, steps: list) -> CompletionLogprobs:
    out, offset = CompletionLogprobs(), 0
    for step in steps:
        text = _token_text(engine, step.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(step.logprob if step.logprob is not None else 0.0)
        out.top_logprobs.append({_token_text(engine, t): lp for t, lp in step.top_logprobs})
        out.text_offset.append(offset)
        offset += len(text)
    return out


async def text_completion(run: Run, body: CompletionRequest, prompts: list[Prompt]) -> TextCompletion | AsyncIterator[str]:
    """Non-streaming: the TextCompletion; streaming: the SSE lines."""
    engine = run.loaded.engine
    ident = f"cmpl-{run.id_prefix}"

    async def generate() -> AsyncIterator[tuple[int, str | None, ChoiceResult | None]]:
        slots = None
        async with aclosing(queue_for_slot(run)) as queue:
            async for slots in queue:
                if slots is None:
                    yield -1, None, None  # queued: a keep-alive
        assert slots is not None
        try:
            for p, prompt in enumerate(prompts):
                for i in range(body.n):
                    index = p * body.n + i
                    result = ChoiceResult(index)
                    choice = run.choice_chunks(prompt, generation_params(body, run.config, i, body.logprobs, 16), result, False)
                    async with contextlib.aclosing(choice) as deltas:
                        async for delta in deltas:
                            yield index, delta, result
                    if result.usage is None:
                        return
                    yield index, "", result
        finally:
            slots.release()

    if not body.stream:
        results: dict[int, ChoiceResult] = {}
        async for index, _, result in generate():
            if result is not None:
                results[index] = result
        choices = [CompletionChoice(index=i, text="".join(r.text), finish_reason=r.finish_reason,
                                    logprobs=_completion_logprobs(engine, r.logprobs) if body.logprobs is not None else None)
                   for i, r in sorted(results.items())]  # fmt: skip
        if len(choices) != len(prompts) * body.n:
            raise asyncio.CancelledError
        usages = [r.usage for r in results.values() if r.usage]
        return TextCompletion(id=ident, created=run.created, model=run.loaded.name, choices=choices, usage=usage_body(total_usage(usages)))

    async def lines() -> AsyncIterator[str]:
        usages = []
        try:
            async for index, delta, result in generate():
                if delta is None:
                    yield ": keep-alive\n\n"
                elif delta:
                    yield sse(TextCompletion(id=ident, created=run.created, model=run.loaded.name,
                                             choices=[CompletionChoice(index=index, text=delta, finish_reason=None)]))  # fmt: skip
                elif result is not None and result.usage is not None:
                    usages.append(result.usage)
                    yield sse(TextCompletion(id=ident, created=run.created, model=run.loaded.name,
                                             choices=[CompletionChoice(index=index, text="", finish_reason=result.finish_reason)]))  # fmt: skip
            if body.stream_options and body.stream_options.include_usage and usages:
                yield sse(TextCompletion(id=ident, created=run.created, model=run.loaded.name, choices=[], usage=usage_body(total_usage(usages))))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            yield error_event(err)
        yield "data: [DONE]\n\n"

    return lines()
