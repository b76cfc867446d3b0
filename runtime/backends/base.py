"""The small interface the engine drives: a prompt in, a stream of sampled tokens out.

A backend owns the model, its cache and the sampling loop (exllamav2 samples inside its dynamic
generator; the reference backend with runtime.sampling). Text, stop strings and usage are the
engine's, so both backends behave the same to every caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

from pixtral.config import PixtralConfig
from pixtral.model import PixtralModel
from pixtral.prompt import Prompt, PromptImage
from runtime.sampling import SamplingParams

Encoded = TypeVar("Encoded")


@dataclass(frozen=True)
class TokenStep:
    """One sampled token, with its log-probability under the model (raw logits) when asked for."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class PrefillStats:
    """Filled in by the backend once the prompt is in its cache (before the first token)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions reused from an earlier request's cache
    images_encoded: int = 0  # pictures run through the vision tower for this request
    seconds: float = 0.0


@dataclass
class TokenStream:
    """An iterator of TokenSteps that can be cancelled (`close()`) at any point."""

    steps: Iterator[TokenStep]
    stats: PrefillStats = field(default_factory=PrefillStats)

    def __iter__(self) -> Iterator[TokenStep]:
        return self.steps

    def close(self) -> None:
        close = getattr(self.steps, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class GenerationRequest:
    """What a backend needs to generate: the prompt and when to stop sampling."""

    prompt: Prompt
    sampling: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    logprobs: int = 0  # top alternatives to report per token (0: only the sampled token's, when `want_logprobs`)
    want_logprobs: bool = False


class Backend(ABC):
    """A loaded model that generates; `name`, `cfg`, `max_seq_len`, `has_vision` describe it,
    `attention` says which attention runs, `batches` whether concurrent requests run together."""

    name: str
    cfg: PixtralConfig
    max_seq_len: int
    has_vision: bool
    attention: str = "PyTorch (causal)"
    batches: bool = False

    @abstractmethod
    def stream(self, request: GenerationRequest) -> TokenStream:
        """Start generating; tokens come as the stream is iterated. Stops after a stop token (which
        is yielded) or `max_new_tokens`; closing the stream cancels the request."""

    @abstractmethod
    def logits(self, prompt: Prompt) -> Tensor:
        """Next-token logits at every prompt position, [T, vocab] float32 on the CPU (for evaluation)."""

    def logits_at(self, items: list[tuple[Prompt, list[int]]]) -> list[Tensor]:
        """For each (prompt, positions): the logits at those positions, [len(positions), vocab] float32
        on the CPU. Backends that can batch prompts override this (evaluation scores thousands)."""
        return [self.logits(prompt)[positions] for prompt, positions in items]

    @abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes held: `weights`, `kv_cache` (allocated now), `kv_per_token`."""

    def healthy(self) -> bool:
        """Whether it can still generate (a backend with a generator thread: that the thread runs)."""
        return True

    def close(self) -> None:
        """Release the model (the server's unload)."""


class ImageCache(Generic[Encoded]):
    """What a backend keeps per picture (features, an embedding object), by content hash, the
    least recently used dropped beyond `size`: a picture in a later turn is not encoded again."""

    def __init__(self, size: int = 32):
        self.size = size
        self._entries: OrderedDict[str, Encoded] = OrderedDict()

    def lookup(
        self, images: Sequence[PromptImage], encode: Callable[[list[PromptImage]], list[Encoded]]
    ) -> tuple[list[Encoded], int]:
        """One entry per image, in order; `encode` gets the missing pictures (each once) in one call.
        Returns the entries and how many pictures were encoded."""
        missing = list({image.key: image for image in images if image.key not in self._entries}.values())
        if missing:
            for image, entry in zip(missing, encode(missing)):
                self._entries[image.key] = entry
        for image in images:
            self._entries.move_to_end(image.key)
        found = [self._entries[image.key] for image in images]
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return found, len(missing)

    def clear(self) -> None:
        self._entries.clear()


def encode_images(model: PixtralModel, images: list[PromptImage], device: torch.device | str) -> list[Tensor]:
    """Projected features of each picture [patches, text hidden], all in one block-diagonal pass."""
    pixels = [torch.from_numpy(image.pixels).to(device) for image in images]
    return list(torch.split(model.image_features(pixels), [image.patches for image in images]))
