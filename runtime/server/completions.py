"""`/v1/chat/completions` and `/v1/completions`: generation on the held model for a translated request
(requests.py), and the OpenAI responses (responses.py) — whole, or as SSE chunks ending in `data: [DONE]`.

Streams are spec-complete (`id`, `object`, `created`, `model` in every chunk); a long prefill or a
queue wait sends SSE keep-alive comments; an error after the stream began is sent as an OpenAI
error event followed by `[DONE]`; a client that goes away cancels its generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request

from pixtral.errors import UserError
from pixtral.prompt import Prompt
from runtime.engine import GenerationParams
from runtime.server.config import ServerConfig
from runtime.server.generation import ChoiceResult, Generation, GenerationCancelled, total_usage
from runtime.server.models import Loaded, ModelHost
from runtime.server.requests import generation_params
from runtime.server.responses import chat_logprobs, completion_logprobs, error_event, forced_text, sse, usage_body
from runtime.server.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ResponseMessage,
    TextCompletion,
)
from runtime.server.schemas import Usage as UsageBody
from runtime.server.tools import parse_tool_calls

DISCONNECT_POLL_SECONDS = 0.5


class Run:
    """The choices of one request, generated one after another on one slot."""

    def __init__(self, host: ModelHost, loaded: Loaded, request: Request, config: ServerConfig):
        self.host, self.loaded, self.request, self.config = host, loaded, request, config
        self.id_prefix = secrets.token_hex(12)
        self.created = int(time.time())

    async def choice_chunks(
        self, prompt: Prompt, params: GenerationParams, result: ChoiceResult, forced_tools: bool
    ) -> AsyncIterator[str | None]:
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
        # a streaming client went away: its response is cancelled or closed
        except (asyncio.CancelledError, GeneratorExit):
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
            # not a valid call: the text as it came, our opening included
            text += forced_prefix_text + "".join(result.tool_text)
        return text, None, result.finish_reason


async def chat_completion(run: Run, body: ChatCompletionRequest, prompt: Prompt, forced: bool) -> ChatCompletion:
    engine, choices, usages = run.loaded.engine, [], []
    prefix = forced_text(engine, prompt, forced)
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
            choices.append(
                ChatChoice(
                    index=index,
                    message=ResponseMessage(content=content, tool_calls=calls),
                    finish_reason=finish,
                    logprobs=chat_logprobs(engine, result.logprobs) if body.logprobs else None,
                    stop_str=result.stop_string,
                )
            )
            usages.append(result.usage)
    finally:
        slots.release()
    return ChatCompletion(
        id=f"chatcmpl-{run.id_prefix}",
        created=run.created,
        model=run.loaded.name,
        choices=choices,
        usage=usage_body(total_usage(usages)),
    )


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


async def chat_stream(run: Run, body: ChatCompletionRequest, prompt: Prompt, forced: bool) -> AsyncIterator[str]:
    engine, usages = run.loaded.engine, []
    prefix = forced_text(engine, prompt, forced)
    ident = f"chatcmpl-{run.id_prefix}"

    def chunk(choices: list[ChunkChoice], usage: UsageBody | None = None) -> str:
        return sse(
            ChatCompletionChunk(id=ident, created=run.created, model=run.loaded.name, choices=choices, usage=usage)
        )

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
            async with contextlib.aclosing(
                run.choice_chunks(prompt, params, result, forced)
            ) as deltas:  # closed with the response
                async for delta in deltas:
                    if delta is None:
                        yield ": keep-alive\n\n"
                        continue
                    logprobs = chat_logprobs(engine, result.logprobs[seen:]) if body.logprobs else None
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


@dataclass(frozen=True)
class KeepAlive:
    """Nothing to send yet (queued, or a long prefill): an SSE comment keeps the connection."""


@dataclass(frozen=True)
class TextDelta:
    index: int  # the choice: prompt · n + choice
    text: str


@dataclass(frozen=True)
class ChoiceDone:
    result: ChoiceResult  # finished: its finish_reason and usage are set


async def text_completion(
    run: Run, body: CompletionRequest, prompts: list[Prompt]
) -> TextCompletion | AsyncIterator[str]:
    """Non-streaming: the TextCompletion; streaming: the SSE lines."""
    engine = run.loaded.engine
    ident = f"cmpl-{run.id_prefix}"

    async def generate() -> AsyncIterator[KeepAlive | TextDelta | ChoiceDone]:
        slots = None
        async with aclosing(queue_for_slot(run)) as queue:
            async for slots in queue:
                if slots is None:
                    yield KeepAlive()  # queued
        assert slots is not None
        try:
            for p, prompt in enumerate(prompts):
                for i in range(body.n):
                    index = p * body.n + i
                    result = ChoiceResult(index)
                    choice = run.choice_chunks(
                        prompt, generation_params(body, run.config, i, body.logprobs, 16), result, False
                    )
                    async with contextlib.aclosing(choice) as deltas:
                        async for delta in deltas:
                            yield KeepAlive() if delta is None else TextDelta(index, delta)
                    if result.usage is None:
                        return  # the client went away
                    yield ChoiceDone(result)
        finally:
            slots.release()

    if not body.stream:
        results: dict[int, ChoiceResult] = {}
        async for event in generate():
            if isinstance(event, ChoiceDone):
                results[event.result.index] = event.result
        choices = [
            CompletionChoice(
                index=i,
                text="".join(r.text),
                finish_reason=r.finish_reason,
                logprobs=completion_logprobs(engine, r.logprobs) if body.logprobs is not None else None,
            )
            for i, r in sorted(results.items())
        ]
        if len(choices) != len(prompts) * body.n:
            raise asyncio.CancelledError
        usages = [r.usage for r in results.values() if r.usage]
        return TextCompletion(
            id=ident, created=run.created, model=run.loaded.name, choices=choices, usage=usage_body(total_usage(usages))
        )

    async def lines() -> AsyncIterator[str]:
        usages = []
        try:
            async for event in generate():
                if isinstance(event, KeepAlive):
                    yield ": keep-alive\n\n"
                elif isinstance(event, TextDelta):
                    yield sse(
                        TextCompletion(
                            id=ident,
                            created=run.created,
                            model=run.loaded.name,
                            choices=[CompletionChoice(index=event.index, text=event.text, finish_reason=None)],
                        )
                    )
                else:
                    done = event.result
                    usages.append(done.usage)
                    yield sse(
                        TextCompletion(
                            id=ident,
                            created=run.created,
                            model=run.loaded.name,
                            choices=[CompletionChoice(index=done.index, text="", finish_reason=done.finish_reason)],
                        )
                    )
            if body.stream_options and body.stream_options.include_usage and usages:
                yield sse(
                    TextCompletion(
                        id=ident,
                        created=run.created,
                        model=run.loaded.name,
                        choices=[],
                        usage=usage_body(total_usage(usages)),
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception as err:
            yield error_event(err)
        yield "data: [DONE]\n\n"

    return lines()
