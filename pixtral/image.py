"""Pixtral image preprocessing and token layout, exactly as mistral-common does it.

RGB over white, downscale-only to a longest side of 1024 with Python's (banker's) `round`, ceil to
the 16-px grid, a bicubic stretch (OpenCV `INTER_CUBIC`, as mistral-common), then CLIP mean/std in
CHW order. Token layout: each patch row is `[IMG]`×cols + `[IMG_BREAK]`, the last break replaced by
`[IMG_END]` (../shared/spec/pixtral.md §2). Not exllamav2's 32-px rounding.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pixtral.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000  # decoded-pixel cap: a decompression bomb is refused before decoding
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


class ImageError(UserError):
    """An image that cannot be read, or is too large to accept."""


@dataclass(frozen=True)
class ImageTokenIds:
    """The three image marker ids; they differ per tokenizer (12B: 10/12/13, Large: 10/14/15)."""

    img: int
    img_break: int
    img_end: int


@dataclass(frozen=True)
class ImageSpec:
    patch_size: int = 16
    max_image_size: int = 1024


def open_image(
    source: str | Path | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
) -> Image.Image:
    """Decode an image from a path or bytes, refusing oversized input with a clear error."""
    label = name or (str(source) if not isinstance(source, bytes) else "<image bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise ImageError(f"{label}: cannot read image file ({err.strerror or err})") from err
    if len(data) > max_bytes:
        raise ImageError(f"{label}: image is {len(data)} bytes, more than the {max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageError(
                    f"{label}: image is {image.width}x{image.height} pixels, more than the {max_pixels}-pixel limit"
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError as err:
        raise ImageError(f"{label}: not a readable image (unknown format or corrupt data)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(
            f"{label}: image has more pixels than the {max_pixels}-pixel limit (a decompression bomb?)"
        ) from err
    except (OSError, ValueError) as err:
        raise ImageError(f"{label}: not a readable image ({err})") from err
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (as mistral-common)."""
    if image.mode == "RGB":
        return image
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, "WHITE")
    background.paste(rgba, (0, 0), rgba)
    return background.convert("RGB")


def patch_grid(width: int, height: int, spec: ImageSpec = ImageSpec()) -> tuple[int, int]:
    """(rows, cols) of 16-px patches for an image of `width`×`height` pixels."""
    ratio = max(width / spec.max_image_size, height / spec.max_image_size)
    if ratio > 1:
        # Python round (banker's), as mistral-common; never below one pixel
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    cols = (width - 1) // spec.patch_size + 1
    rows = (height - 1) // spec.patch_size + 1
    return rows, cols


def preprocess(image: Image.Image, spec: ImageSpec = ImageSpec()) -> np.ndarray:
    """PIL image -> normalised float32 pixels [3, rows·16, cols·16]."""
    rows, cols = patch_grid(image.width, image.height, spec)
    rgb = np.array(to_rgb(image), dtype=np.float32)
    resized = cv2.resize(rgb, (cols * spec.patch_size, rows * spec.patch_size), interpolation=cv2.INTER_CUBIC)
    pixels = np.divide(resized, np.float32(255.0), dtype=np.float32)
    pixels -= np.asarray(CLIP_MEAN, dtype=np.float32)
    pixels /= np.asarray(CLIP_STD, dtype=np.float32)
    return pixels.transpose(2, 0, 1)


def image_token_ids(rows: int, cols: int, ids: ImageTokenIds) -> list[int]:
    """Token ids for a `rows`×`cols` patch grid: rows·(cols+1) tokens, ending in `[IMG_END]`."""
    tokens = ([ids.img] * cols + [ids.img_break]) * rows
    tokens[-1] = ids.img_end
    return tokens


def encode_image(image: Image.Image, ids: ImageTokenIds, spec: ImageSpec = ImageSpec()) -> tuple[list[int], np.ndarray]:
    """Token ids and pixels of one image."""
    pixels = preprocess(image, spec)
    rows, cols = pixels.shape[1] // spec.patch_size, pixels.shape[2] // spec.patch_size
    return image_token_ids(rows, cols, ids), pixels
