"""A local chat session: the conversation, images waiting for the next message, save and load.

The CLI (`pixtral-exl2 chat`) reads lines and renders; this holds the state and talks to the engine.
Conversations are saved as OpenAI-style JSON with images by path (`file://` URLs), so a saved chat
can be sent to `pixtral-exl2 serve` as is (with local files enabled) or loaded again here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pixtral.errors import UserError
from pixtral.image import open_image
from pixtral.outputs import atomic_write_json
from pixtral.prompt import PromptImage, image_parts, prepare_image
from runtime.engine import Chunk, Engine, GenerationParams


class ChatError(UserError):
    """A chat command that cannot be carried out (bad file, unknown command)."""


def path_url(path: Path) -> str:
    return path.resolve().as_uri()


def url_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme not in ("file", ""):
        raise ChatError(f"image {url!r}: only local files (file:// URLs or paths) can be loaded in the chat")
    return Path(unquote(parsed.path))


@dataclass
class ChatSession:
    """One conversation with the model; `ask` streams the reply and records it."""

    engine: Engine
    params: GenerationParams
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Path] = field(default_factory=list)  # images for the next user message
    _images: dict[str, PromptImage] = field(default_factory=dict)  # file URL -> preprocessed

    def _load_image(self, path: Path) -> PromptImage:
        url = path_url(path)
        if url not in self._images:
            self._images[url] = prepare_image(open_image(path))
        return self._images[url]

    def attach(self, path: str | Path) -> PromptImage:
        """Queue an image for the next message (read and checked now)."""
        path = Path(path).expanduser()
        self.engine.require_vision()
        image = self._load_image(path)
        self.pending.append(path)
        return image

    def set_system(self, text: str) -> None:
        """Set (or replace) the system prompt that opens the conversation."""
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """Forget the conversation but keep the system prompt."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.pending = []

    def ask(self, text: str) -> Iterator[Chunk]:
        """Send a user message (with the pending images) and stream the reply; on failure the
        conversation is left as it was."""
        parts = [{"type": "image_url", "image_url": {"url": path_url(p)}} for p in self.pending]
        content: str | list[dict[str, Any]] = parts + [{"type": "text", "text": text}] if parts else text
        messages = self.messages + [{"role": "user", "content": content}]
        images = [self._load_image(url_path(part["image_url"]["url"])) for part in image_parts(messages)]
        prompt = self.engine.chat_prompt(messages, images)
        reply = []
        for chunk in self.engine.stream(prompt, self.params):
            reply.append(chunk.text)
            yield chunk
        self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
        self.pending = []

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        atomic_write_json(path, {"messages": self.messages})
        return path

    def load(self, path: str | Path) -> int:
        """Replace the conversation with a saved one; returns its message count."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ChatError(f"{path}: cannot read a saved chat ({err.strerror or err})") from err
        except ValueError as err:
            raise ChatError(f"{path}: not a saved chat (invalid JSON: {err})") from err
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool") for m in messages
        ):
            raise ChatError(f'{path}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        for part in image_parts(messages):
            url = (part.get("image_url") or {}).get("url", "")
            self._load_image(url_path(url))  # every picture must still be there
        self.messages, self.pending = messages, []
        return len(messages)
