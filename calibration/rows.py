"""Calibration rows: fixed-length token sequences, some opening with image conversations.

A text row is BOS + text tokens. An image row holds one or more chat turns
`[INST][IMG]…question[/INST]answer</s>` (the `[IMG]` grid expanded exactly as at run time) and is
filled up with text. Images are shrunk first so that they take at most `image_token_share` of a
row, and a turn is never cut: the decoder must see each picture's full patch grid. Image rows are
spread evenly, so the first `measure_rows` rows (the measurement set) contain both kinds.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from calibration.render import ImageSample
from calibration.sources import (
    CalibrationError,
    default_image_samples,
    read_image_samples,
    read_texts,
    standard_text_files,
)
from pixtral.image import patch_grid
from pixtral.prompt import prepare_image, question_messages
from pixtral.tokenizer import PixtralTokenizer


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on; frozen into the job so a resumed run uses the same data."""

    rows: int = 100  # rows for the quantization pass
    measure_rows: int = 16  # the first rows, also used to measure every option
    length: int = 2048  # tokens per row
    image_fraction: float = 0.25  # share of rows that open with image conversations; 0 = text only
    image_token_share: float = 0.5  # at most this share of a row's tokens per picture
    random_rows: int = 1  # rows of uniform random token ids: rare tokens get Hessian mass too
    text_sources: tuple[str, ...] = ()  # files or folders; () = exllamav2's standard calibration text
    image_sources: tuple[str, ...] = ()  # image folders or jsonl; () = shipped photos + drawn charts/pages
    seed: int = 0
    # weight of image-token rows in every Hessian and measured error (text tokens weigh 1): below 1
    # protects the language path, which MBQ measured >10x as sensitive as the image tokens. 0.1 won
    # bench/calibration_modes.py on the demo model; 0.03 then beat 0.1 on text and image KL alike
    # (bench/quality_ab.py; bench/README.md, "Quality at equal size")
    image_token_weight: float = 0.03

    def dataset_name(self) -> str:
        text = ",".join(self.text_sources) or "(default)"
        images = ",".join(self.image_sources) or ("(default)" if self.image_fraction > 0 else "none")
        return f"text={text}; images={images}"


@dataclass
class CalibrationRow:
    input_ids: torch.Tensor  # [length] int64
    images: list[np.ndarray] = field(default_factory=list)  # [3, H, W] float32 pixels, in prompt order
    kind: str = "text"  # "text" | "image" | "random"


def load_texts(spec: CalibrationSpec) -> list[list[str]]:
    """Documents grouped by source, so rows can draw from every source in turn."""
    if spec.text_sources:
        return [read_texts(source) for source in spec.text_sources]
    from calibration.sources import split_documents

    return [split_documents(path.read_text(encoding="utf-8")) for path in standard_text_files().values()]


class TextStreams:
    """Token streams, one per source, each walking its documents in a seeded shuffled order."""

    def __init__(self, sources: list[list[str]], tokenizer: PixtralTokenizer, seed: int):
        rng = random.Random(seed)
        self._docs = [[docs[i] for i in rng.sample(range(len(docs)), len(docs))] for docs in sources]
        self._tokenizer = tokenizer
        self._streams = [self._stream(i) for i in range(len(sources))]

    def _stream(self, source: int) -> Iterator[int]:
        for doc in self._docs[source]:
            yield from self._tokenizer.encode(doc + "\n\n")

    def take(self, row: int, count: int) -> list[int]:
        """`count` tokens for row `row`: from source row % n, then from the others if it runs dry."""
        out: list[int] = []
        for offset in range(len(self._streams)):
            out += itertools.islice(self._streams[(row + offset) % len(self._streams)], count - len(out))
            if len(out) == count:
                break
        return out


def fit_image(image: Image.Image, max_tokens: int) -> Image.Image:
    """Shrink `image` (keeping its aspect) until its Pixtral grid takes at most `max_tokens` tokens."""
    width, height = image.size
    scale = 1.0
    while True:
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        rows, cols = patch_grid(w, h)
        if rows * (cols + 1) <= max_tokens or (w == 1 and h == 1):
            break
        scale *= math.sqrt(max_tokens / (rows * (cols + 1))) * 0.97
    return image if (w, h) == image.size else image.resize((w, h), Image.Resampling.BICUBIC)


def _image_turn(
    sample: ImageSample, tokenizer: PixtralTokenizer, max_tokens: int, bos: bool
) -> tuple[list[int], np.ndarray]:
    picture = prepare_image(fit_image(sample.image, max_tokens))
    messages = question_messages(sample.question, picture) + [{"role": "assistant", "content": sample.answer}]
    ids = tokenizer.encode_chat(messages, [picture.grid])
    if not bos and ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    return ids, picture.pixels


def build_rows(spec: CalibrationSpec, tokenizer: PixtralTokenizer) -> list[CalibrationRow]:
    """Deterministic rows for `spec` (same spec and tokenizer -> same rows)."""
    if spec.rows < 1 or spec.length < 16:
        raise CalibrationError(
            f"calibration needs at least 1 row of at least 16 tokens (got {spec.rows} × {spec.length})"
        )
    if not 1 <= spec.measure_rows <= spec.rows:
        raise CalibrationError(f"measure_rows must be between 1 and rows ({spec.rows}), got {spec.measure_rows}")
    texts = load_texts(spec)
    streams = TextStreams(texts, tokenizer, spec.seed)
    image_rows = round(spec.rows * spec.image_fraction)
    samples: list[ImageSample] = []
    if image_rows:
        samples = (
            [s for src in spec.image_sources for s in read_image_samples(src)]
            if spec.image_sources
            else default_image_samples(spec.seed, [d for docs in texts for d in docs[:50]])
        )
    image_slots = set(np.linspace(0, spec.rows - 1, image_rows).round().astype(int).tolist()) if image_rows else set()
    random_slots = set([i for i in range(spec.rows) if i not in image_slots][::-1][: spec.random_rows])
    gen = torch.Generator().manual_seed(spec.seed)
    max_image_tokens = int(spec.length * spec.image_token_share)
    next_sample = itertools.cycle(range(len(samples))) if samples else None
    rows = []
    for index in range(spec.rows):
        if index in random_slots:
            ids = torch.randint(0, tokenizer.vocab_size, (spec.length,), generator=gen)
            ids[0] = tokenizer.bos_id
            rows.append(CalibrationRow(ids, kind="random"))
            continue
        ids, images = [tokenizer.bos_id], []
        if index in image_slots:
            while len(ids) <= spec.length // 2:
                turn, pixels = _image_turn(samples[next(next_sample)], tokenizer, max_image_tokens, bos=False)
                room = spec.length - len(ids)
                if len(turn) > room:
                    if not images and turn.index(tokenizer.image_ids.img_end) < room:
                        ids += turn[:room]  # keep the whole picture, cut the answer short
                        images.append(pixels)
                    break
                ids += turn
                images.append(pixels)
        ids += streams.take(index, spec.length - len(ids))
        if len(ids) < spec.length:
            raise CalibrationError(
                f"calibration text ran out at row {index + 1} of {spec.rows}: {spec.rows} rows × {spec.length} tokens "
                "need more text (add --calibration-text, or lower --rows/--length)"
            )
        rows.append(CalibrationRow(torch.tensor(ids, dtype=torch.int64), images, "image" if images else "text"))
    return rows
