"""The engine: a prompt in, a stream of text pieces out, over either backend.

`Engine.stream` is the one generation path; `Engine.generate` collects it. The engine turns token ids
into text incrementally (never splitting a UTF-8 character), applies stop strings (a stop string split
across tokens is caught, and no part of it is emitted), stop token ids and the token budget, and
reports why it stopped with token counts and timings. A prompt longer than the context is refused
before any work; nothing is ever truncated silently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pixtral.errors import UserError
from pixtral.image import ImageError
from pixtral.prompt import Prompt, PromptImage, chat_prompt
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends.base import Backend, GenerationRequest, TokenStep
from runtime.sampling import SamplingParams


class ContextError(UserError):
    """A prompt (plus at least one new token) that does not fit the context."""


@dataclass(frozen=True)
class GenerationParams:
    """When to stop and how to sample."""

    max_new_tokens: int | None = None  # None: up to the end of the context
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # besides EOS
    sampling: SamplingParams = SamplingParams()
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: plus the n most likely
    ignore_eos: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the cache
    images_encoded: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def decode_tokens_per_second(self) -> float:
        return (
            (self.completion_tokens - 1) / self.decode_seconds
            if self.completion_tokens > 1 and self.decode_seconds > 0
            else 0.0
        )


@dataclass
class Chunk:
    """A piece of output: new text, the tokens behind it, and on the last chunk why and usage."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenStep] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) | "length"
    stop_string: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenStep]
    stop_string: str | None = None


class TextStream:
    """Token ids -> text pieces, decoding a short window so each step costs O(1), and holding back
    a piece that ends in an incomplete UTF-8 sequence until its next byte arrives."""

    def __init__(self, tokenizer: PixtralTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports the first stop string found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string if one completed)."""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index, stop = min(hits)
            emit, self.pending = self.pending[:index], ""
            return emit, stop
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        emit, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return emit, None

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit


class Engine:
    """Generation over one backend and the model's tokenizer (chat template included)."""

    def __init__(self, backend: Backend, tokenizer: PixtralTokenizer, images_refused: str | None = None):
        """`images_refused`: why this engine takes no images although the model could (a server's
        setting), or None."""
        self.backend = backend
        self.tokenizer = tokenizer
        self.images_refused = images_refused

    # what the model is, for those who serve it (the backend stays behind the engine)
    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    @property
    def has_vision(self) -> bool:
        """The model has a vision tower (whether this engine takes images: `require_vision`)."""
        return self.backend.has_vision

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def attention(self) -> str:
        return self.backend.attention

    @property
    def batches(self) -> bool:
        """Concurrent requests run together (else one at a time)."""
        return self.backend.batches

    @property
    def num_layers(self) -> int:
        return self.backend.cfg.text.num_hidden_layers

    def healthy(self) -> bool:
        return self.backend.healthy()

    def close(self) -> None:
        self.backend.close()

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        images: Sequence[PromptImage] = (),
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> Prompt:
        """The prompt of a conversation whose image parts are `images` (in order)."""
        if images:
            self.require_vision()
        return chat_prompt(self.tokenizer, messages, images, tools, continue_final_message)

    def check_text_fits(self, *texts: Any) -> None:
        """Refuse, before any costly work on a request (tokenizing megabytes takes seconds, decoding
        images too), text that cannot fit the context whatever its tokens: counting bytes is cheap."""
        least = self.tokenizer.min_tokens(_text_bytes(texts))
        if least >= self.max_seq_len:
            raise ContextError(
                f"the prompt is at least {least} tokens (its text alone) but the context holds "
                f"{self.max_seq_len}; shorten it or raise the context length"
            )

    def require_vision(self) -> None:
        """Refuse images on a model without a vision tower, or where they are refused (`images_refused`):
        the one place that decides; callers may ask before costly work on the images."""
        if not self.backend.has_vision:
            raise ImageError(
                "this model has no vision tower (its checkpoint holds no vision_tower.* tensors); it cannot take images"
            )
        if self.images_refused:
            raise ImageError(self.images_refused)

    def check_fits(self, prompt: Prompt) -> int:
        """Refuse an empty prompt or one that leaves no room for a new token; return the room left."""
        if not len(prompt):
            raise ContextError("the prompt is empty")
        room = self.max_seq_len - len(prompt)
        if room < 1:
            raise ContextError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.max_seq_len} "
                "(prompt plus at least one new token); shorten it or raise the context length"
            )
        return room

    def stream(self, prompt: Prompt, params: GenerationParams = GenerationParams()) -> Iterator[Chunk]:
        """Generate, yielding chunks as text becomes final; the last chunk has finish_reason and usage."""
        room = self.check_fits(prompt)
        budget = min(room, params.max_new_tokens) if params.max_new_tokens is not None else room
        eos = set() if params.ignore_eos else {self.tokenizer.eos_id}
        stop_ids = frozenset(eos | set(params.stop_token_ids))
        request = GenerationRequest(
            prompt, params.sampling, budget, stop_ids, params.logprobs or 0, params.logprobs is not None
        )
        started = time.perf_counter()
        tokens = self.backend.stream(request)
        text, stops = TextStream(self.tokenizer), StopMatcher(params.stop)
        count, first_token_at, finish, stop_string = 0, None, "length", None
        try:
            for step in tokens:
                count += 1
                first_token_at = first_token_at or time.perf_counter()
                if step.token_id in stop_ids:
                    finish = "stop"
                    break
                piece, stop_string = stops.feed(text.push(step.token_id))
                if stop_string is not None:
                    finish = "stop"
                    yield Chunk(piece, [step.token_id], [step] if request.want_logprobs else [])
                    break
                yield Chunk(piece, [step.token_id], [step] if request.want_logprobs else [])
        finally:
            tokens.close()
        ended = time.perf_counter()
        stats = tokens.stats
        first = first_token_at or ended
        usage = Usage(len(prompt), count, stats.cached_tokens, stats.images_encoded, first - started, ended - first)
        yield Chunk("" if stop_string else stops.flush(), finish_reason=finish, stop_string=stop_string, usage=usage)

    def generate(self, prompt: Prompt, params: GenerationParams = GenerationParams()) -> Completion:
        """The whole completion at once (the stream, collected)."""
        pieces, ids, logprobs = [], [], []
        for chunk in self.stream(prompt, params):
            pieces.append(chunk.text)
            ids += chunk.token_ids
            logprobs += chunk.logprobs
            last = chunk
        assert last.usage is not None and last.finish_reason is not None
        return Completion("".join(pieces), ids, last.finish_reason, last.usage, logprobs, last.stop_string)


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in `value` (messages, parts, tools), recursively; an image part's
    URL is no text of the prompt."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for k, v in value.items() if k != "image_url")
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0
