"""What a backend is given: token ids plus the images their `[IMG]` tokens stand for.

A `Prompt` is built from chat messages (through the model's chat template, images expanded to
mistral-common's `[IMG]…[IMG_BREAK]…[IMG_END]` grid) or from raw token ids. Each image carries the
hash of its preprocessed pixels: backends key their feature caches and prefix reuse on it, so the
same picture in a later turn is neither re-encoded nor re-run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pixtral.image import ImageError, ImageSpec, preprocess
from pixtral.tokenizer import PixtralTokenizer


@dataclass(frozen=True)
class PromptImage:
    """One preprocessed picture: normalised pixels [3, rows·16, cols·16] and their content hash."""

    pixels: np.ndarray
    key: str
    patch_size: int = 16

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches."""
        return self.pixels.shape[1] // self.patch_size, self.pixels.shape[2] // self.patch_size

    @property
    def patches(self) -> int:
        rows, cols = self.grid
        return rows * cols


def prepare_image(image: Image.Image, spec: ImageSpec = ImageSpec()) -> PromptImage:
    """Preprocess exactly as mistral-common (16-px grid, bicubic, CLIP normalisation) and hash."""
    pixels = preprocess(image, spec)
    return PromptImage(pixels, hashlib.sha256(pixels.tobytes()).hexdigest(), spec.patch_size)


@dataclass(frozen=True)
class Prompt:
    """Token ids; the n-th run of `[IMG]` tokens belongs to `images[n]` (row-major patches)."""

    token_ids: tuple[int, ...]
    images: tuple[PromptImage, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    def position_keys(self, image_token: int) -> list[Hashable]:
        """A key per position: the token id, or (image hash, patch index) at `[IMG]` positions.
        Two prompts share a cached prefix exactly as far as their keys agree."""
        keys: list[Hashable] = []
        images = iter(self.images)
        image, patch = None, 0
        for token in self.token_ids:
            if token != image_token:
                keys.append(token)
                continue
            if image is None or patch == image.patches:
                image, patch = next(images, None), 0
                if image is None:
                    raise ImageError(
                        f"the prompt has more [IMG] tokens than its {len(self.images)} image(s) have patches"
                    )
            keys.append((image.key, patch))
            patch += 1
        if next(images, None) is not None or (image is not None and patch != image.patches):
            raise ImageError(
                f"the prompt's [IMG] tokens do not match the patch grids of its {len(self.images)} image(s)"
            )
        return keys


def image_parts(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image parts of a conversation, in the order the chat template places them."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts += [p for p in content if isinstance(p, dict) and str(p.get("type", "")).startswith("image")]
    return parts


def question_messages(question: str, image: PromptImage | None = None) -> list[dict[str, Any]]:
    """A user turn asking `question`, after the picture when there is one."""
    content: Any = [{"type": "image"}, {"type": "text", "text": question}] if image is not None else question
    return [{"role": "user", "content": content}]


def answer_ids(
    tokenizer: PixtralTokenizer, messages: list[dict[str, Any]], answer: str, grids: list[tuple[int, int]]
) -> tuple[list[int], int]:
    """Token ids of `messages` followed by the assistant's `answer` (and `</s>`), and where the answer starts."""
    prompt = tokenizer.encode_chat(messages, grids)
    full = tokenizer.encode_chat(messages + [{"role": "assistant", "content": answer}], grids)
    if full[: len(prompt)] != prompt:
        raise AssertionError("the chat template's prompt is not a prefix of prompt + answer")
    return full, len(prompt)


def chat_prompt(
    tokenizer: PixtralTokenizer,
    messages: list[dict[str, Any]],
    images: Sequence[PromptImage] = (),
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
) -> Prompt:
    """The prompt for a conversation whose image parts are `images`, in order."""
    ids = tokenizer.encode_chat(
        messages, [image.grid for image in images], tools, continue_final_message=continue_final_message
    )
    return Prompt(tuple(ids), tuple(images))
