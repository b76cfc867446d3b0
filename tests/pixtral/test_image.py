"""Image preprocessing and token layout against mistral-common (the oracle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixtral.image import ImageError, ImageSpec, ImageTokenIds, encode_image, open_image, patch_grid

mc_image = pytest.importorskip("mistral_common.tokens.tokenizers.image")
from mistral_common.protocol.instruct.chunk import ImageChunk  # noqa: E402

# tiny, odd patch counts, exactly 1024, above 1024 on either side, banker's-rounding edges, extreme ratios
SIZES = [
    (1, 1), (5, 3), (40, 20), (17, 33), (336, 224), (1024, 1024), (1024, 300), (1025, 1023),
    (2049, 1000), (1000, 3000), (3000, 2001), (2048, 1025), (2048, 1057), (4000, 20), (10, 2000),
    (1, 5000), (1920, 1080),
]  # fmt: skip
IDS = {"12B": ImageTokenIds(10, 12, 13), "Large": ImageTokenIds(10, 14, 15)}


def _mc_encoder(ids: ImageTokenIds):
    return mc_image.ImageEncoder(
        mc_image.ImageConfig(16, 1024), mc_image.SpecialImageIDs(ids.img, ids.img_break, ids.img_end)
    )


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7 + height)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 255, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8), "L")
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("model", sorted(IDS))
@pytest.mark.parametrize("width,height", SIZES)
def test_tokens_and_pixels_match_mistral_common(width: int, height: int, model: str) -> None:
    image = _image(width, height)
    tokens, pixels = encode_image(image, IDS[model])
    expected = _mc_encoder(IDS[model])(ImageChunk(image=image))
    assert tokens == expected.tokens
    assert pixels.shape == expected.image.shape
    np.testing.assert_array_equal(pixels, expected.image)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_modes_match_mistral_common(mode: str) -> None:
    image = _image(45, 30, mode)
    tokens, pixels = encode_image(image, IDS["12B"])
    expected = _mc_encoder(IDS["12B"])(ImageChunk(image=image))
    assert tokens == expected.tokens
    np.testing.assert_array_equal(pixels, expected.image)


def test_grid_examples_from_spec() -> None:
    # ../shared/spec/pixtral.md §2.2 worked examples
    assert patch_grid(40, 20) == (2, 3)
    assert patch_grid(1920, 1080) == (36, 64)
    assert patch_grid(3000, 2001) == (43, 64)
    rows, cols = patch_grid(1920, 1080)
    assert rows * (cols + 1) == 2340
    assert patch_grid(4096, 4096, ImageSpec(16, 1024)) == (64, 64)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    _, pixels = encode_image(image, IDS["12B"])
    white = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(pixels[:, 0, 0], white, rtol=1e-5)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        open_image(bad)
    with pytest.raises(ImageError, match="missing.jpg: cannot read"):
        open_image(tmp_path / "missing.jpg")


def test_pixel_and_byte_caps(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    with pytest.raises(ImageError, match="more than the 10000-pixel limit"):
        open_image(path, max_pixels=10_000)
    with pytest.raises(ImageError, match="byte limit"):
        open_image(path, max_bytes=10)
    assert open_image(path).size == (300, 300)
