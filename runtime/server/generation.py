"""Running engine streams for the HTTP layer: one worker thread per generation, chunks handed to the
event loop through an asyncio queue, cancellation from the loop (a client gone, an unload).

The engine is synchronous (it iterates a backend's token stream); these threads keep it off the
event loop, so the server keeps answering — /health included — while models compute.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pixtral.prompt import Prompt
from runtime.engine import Chunk, Engine, GenerationParams, Usage

END = object()  # the worker is done


class GenerationCancelled(Exception):
    """A generation stopped by the server (the model was unloaded)."""


class Generation:
    """One engine stream in a worker thread."""

    def __init__(self, engine: Engine, prompt: Prompt, params: GenerationParams):
        self.engine, self.prompt, self.params = engine, prompt, params
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.last_progress = time.monotonic()
        self.started = time.monotonic()
        self.first_chunk_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> Generation:
        self._thread.start()
        return self

    def cancel(self, reason: str | None = None) -> None:
        """Stop generating; with a `reason`, the request gets it as an error (an unload, not a client gone)."""
        if reason is not None and not self.cancelled.is_set():
            self._put(GenerationCancelled(reason))
        self.cancelled.set()

    def _put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def _run(self) -> None:
        stream = self.engine.stream(self.prompt, self.params)
        try:
            for chunk in stream:
                self.last_progress = time.monotonic()
                self._put(chunk)
                if self.cancelled.is_set():
                    break
        except BaseException as err:  # handed to the request, which maps it to an HTTP error
            self._put(err)
        finally:
            stream.close()
            self._put(END)

    async def items(self, keepalive: float) -> AsyncIterator[Chunk | BaseException | None]:
        """Chunks and errors as they come; None every `keepalive` seconds of silence."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), keepalive)
            except asyncio.TimeoutError:
                yield None
                continue
            if item is END:
                return
            if self.first_chunk_at is None:
                self.first_chunk_at = time.monotonic()
            yield item  # type: ignore[misc]


@dataclass
class ChoiceResult:
    """What one choice produced, assembled from its chunks."""

    index: int
    text: list[str] = field(default_factory=list)
    tool_text: list[str] = field(default_factory=list)
    in_tools: bool = False
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None
    usage: Usage | None = None

    def feed(self, chunk: Chunk, tool_calls_id: int | None) -> str:
        """Route the chunk's text to the content or, after `[TOOL_CALLS]`, to the tool-call buffer;
        returns the content delta."""
        self.logprobs += chunk.logprobs
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_string, self.usage = chunk.finish_reason, chunk.stop_string, chunk.usage
        if tool_calls_id is not None and tool_calls_id in chunk.token_ids and not self.in_tools:
            self.in_tools = True  # the token decodes to nothing; text in its chunk was held back from before it
            self.text.append(chunk.text)
            return chunk.text
        (self.tool_text if self.in_tools else self.text).append(chunk.text)
        return "" if self.in_tools else chunk.text


def total_usage(usages: list[Usage]) -> Usage:
    """The usage of several choices of one request (prompt counted once, as OpenAI does)."""
    first = usages[0]
    return Usage(
        first.prompt_tokens,
        sum(u.completion_tokens for u in usages),
        first.cached_tokens,
        sum(u.images_encoded for u in usages),
        sum(u.prefill_seconds for u in usages),
        sum(u.decode_seconds for u in usages),
    )
