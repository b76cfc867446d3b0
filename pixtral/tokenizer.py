"""The tokenizer of a model directory: encode/decode, chat rendering, and `[IMG]` expansion.

Special ids are looked up by their strings, never assumed: `[IMG_BREAK]`/`[IMG_END]` are 12/13 on
12B and 14/15 on Large. The chat template writes one `[IMG]` per image; `encode_chat` replaces the
n-th placeholder by the n-th image's full grid of tokens.

Message text is always text (as mistral-common, which never parses specials out of content): before
rendering, every special-token string inside a message, tool or call is broken by a private-use
mark (`_escape`), so only the template's own markers match specials in the rendered prompt; the
text between two specials is then encoded with specials as plain text and the mark removed. That
equals tokenizing the whole prompt at once, as the template was written for, run by run.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, pre_tokenizers

from pixtral.chat_template import render_chat
from pixtral.errors import UserError
from pixtral.image import ImageTokenIds, image_token_ids

IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
MARK = "\ue000"  # private use: breaks a special-token string inside user text; doubled when the user wrote it
_UNMARK = re.compile(MARK + "(" + MARK + ")?")


class TokenizerError(UserError):
    """Missing or inconsistent tokenizer files."""


class PixtralTokenizer:
    """Wraps `tokenizer.json` plus the chat template of one model directory."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found; the model directory needs an HF tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.bos_token = _token_str(config.get("bos_token"), "<s>")
        self.eos_token = _token_str(config.get("eos_token"), "</s>")
        self.chat_template = _read_chat_template(model_dir, config)
        self.bos_id = self._require(self.bos_token)
        self.eos_id = self._require(self.eos_token)
        self.image_ids = ImageTokenIds(self._require(IMG), self._require(IMG_BREAK), self._require(IMG_END))
        self.tool_calls_id: int | None = self.tokenizer.token_to_id("[TOOL_CALLS]")  # starts the model's tool calls
        # SentencePiece adds its dummy-prefix "▁" to every text; HF's Metaspace ("first") skips it when
        # the text already starts with a space, so " x" would lose one "▁" (mistral-common: "▁▁x")
        pre = self.tokenizer.pre_tokenizer
        self._space_prefix = isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first"
        specials = sorted(
            (t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special), key=len, reverse=True
        )
        self._special = re.compile("|".join(map(re.escape, specials)))
        stat = path.stat()
        self._file_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def _require(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer.json has no {token!r} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """No token covers more UTF-8 bytes of input than this (a vocabulary string's own byte length
        bounds it: byte-level pieces are one char per byte, "▁" is 3 bytes for a 1-byte space)."""
        return max(len(piece.encode("utf-8")) for piece in self.tokenizer.get_vocab())

    def min_tokens(self, text_bytes: int) -> int:
        """A lower bound on the tokens of `text_bytes` bytes of text, without tokenizing it."""
        return -(-text_bytes // self.max_token_bytes)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (as mistral-common encodes it); special-token strings become special ids
        (a raw prompt, as TabbyAPI's completions take it)."""
        return self.tokenizer.encode(self._with_dummy_prefix(text), add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` with every special-token string in it encoded as ordinary text."""
        return _plain_tokenizers(self._file_key)[0].encode(self._with_dummy_prefix(text), add_special_tokens=False).ids

    def _with_dummy_prefix(self, text: str) -> str:
        """Text that starts a prompt: keep SentencePiece's dummy "▁" where Metaspace would skip it."""
        return " " + text if self._space_prefix and text.startswith((" ", "▁")) else text

    def _escape(self, value: Any) -> Any:
        """`value` (a message, part, tool or call, recursively) with special-token strings broken."""
        if isinstance(value, str):
            return self._special.sub(lambda m: m.group(0)[0] + MARK + m.group(0)[1:], value.replace(MARK, MARK + MARK))
        if isinstance(value, dict):
            return {k: self._escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape(v) for v in value]
        return value

    def _encode_rendered(self, prompt: str) -> list[int]:
        """A rendered, image-expanded prompt: its specials are the template's; runs between are text."""
        ids: list[int] = []
        start = 0
        for match in self._special.finditer(prompt):
            ids += self._encode_run(prompt[start : match.start()], start == 0)
            ids.append(self.tokenizer.token_to_id(match.group(0)))
            start = match.end()
        return ids + self._encode_run(prompt[start:], start == 0)

    def _encode_run(self, run: str, first: bool) -> list[int]:
        if not run:
            return []
        text = _UNMARK.sub(lambda m: MARK if m.group(1) else "", run)
        if first:
            return self.encode_text(text)
        return _plain_tokenizers(self._file_key)[1].encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt string for a conversation, with one `[IMG]` per image; special-token strings in
        the messages and tools are broken by MARK (see the module docstring)."""
        if not self.chat_template:
            raise TokenizerError("the model directory has no chat template (chat_template.json)")
        messages, tools = self._escape(messages), self._escape(tools)
        try:
            return render_chat(
                self.chat_template, messages, bos_token=self.bos_token, eos_token=self.eos_token, tools=tools, **kwargs
            )
        except TemplateError as err:
            raise TokenizerError(f"chat template: {err}") from err

    def expand_images(self, prompt: str, grids: list[tuple[int, int]]) -> str:
        """Replace the n-th `[IMG]` placeholder by the token string of image n's (rows, cols) grid."""
        pieces = prompt.split(IMG)
        if len(pieces) - 1 != len(grids):
            raise TokenizerError(f"prompt has {len(pieces) - 1} image placeholders but {len(grids)} images were given")
        out = [pieces[0]]
        for (rows, cols), tail in zip(grids, pieces[1:]):
            out.append("".join(map(self.tokenizer.id_to_token, image_token_ids(rows, cols, self.image_ids))) + tail)
        return "".join(out)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        grids: list[tuple[int, int]] = (),
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of a conversation whose images have the given patch grids, in order. No text of
        a message or tool becomes a control token: only the template's markers are specials."""
        return self._encode_rendered(self.expand_images(self.render(messages, tools, **kwargs), list(grids)))


@functools.lru_cache(maxsize=8)
def _plain_tokenizers(file_key: tuple[str, int, int]) -> tuple[Tokenizer, Tokenizer]:
    """tokenizer.json read with specials as plain text: for a prompt's first run, and for the runs
    after a special, where a whole-prompt encode adds no SentencePiece dummy prefix (Metaspace
    "first" is for offset 0 only). Built on first use, once per file (each costs a full load)."""
    first, rest = Tokenizer.from_file(file_key[0]), Tokenizer.from_file(file_key[0])
    first.encode_special_tokens = rest.encode_special_tokens = True
    pre = rest.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        rest.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=pre.replacement, prepend_scheme="never", split=pre.split
        )
    return first, rest


def _token_str(value: Any, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} as older transformers write it
        return value.get("content", default)
    return value or default


def _read_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    path = model_dir / "chat_template.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return tokenizer_config.get("chat_template")
