"""Our reference model against transformers' LlavaForConditionalGeneration (the oracle), fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixtral.image import encode_image
from pixtral.model import load_model
from pixtral.tokenizer import PixtralTokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def _hf_model(model_dir: Path):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
    return model.eval()


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)),  # 3 x 5 patches
        Image.fromarray(rng.integers(0, 255, (50, 33, 3), dtype=np.uint8)),  # 4 x 3 patches
    ]


def _prompt(tokenizer: PixtralTokenizer, images: list[Image.Image]) -> tuple[list[int], list[np.ndarray]]:
    ids = [tokenizer.bos_id] + tokenizer.encode("[INST]Compare ")
    pixels = []
    for image in images:
        tokens, array = encode_image(image, tokenizer.image_ids)
        ids += tokens + tokenizer.encode(" and ")
        pixels.append(array)
    return ids + tokenizer.encode("[/INST]"), pixels


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_spm_model"])
def test_text_logits_match_transformers(model_fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    tokenizer = PixtralTokenizer(model_dir)
    ids = torch.tensor(
        [[tokenizer.bos_id] + tokenizer.encode("[INST]The quick brown fox jumps over the lazy dog.[/INST]")]
    )
    ours = load_model(model_dir)(ids)
    with torch.no_grad():
        theirs = _hf_model(model_dir)(input_ids=ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_spm_model"])
def test_two_image_logits_match_transformers(model_fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    tokenizer = PixtralTokenizer(model_dir)
    ids, pixels = _prompt(tokenizer, _images())
    input_ids = torch.tensor([ids])
    ours = load_model(model_dir)(input_ids, [torch.from_numpy(p) for p in pixels])

    # transformers takes one padded batch plus the true sizes, and crops each patch grid back
    height, width = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
    batch = torch.zeros(len(pixels), 3, height, width)
    for i, p in enumerate(pixels):
        batch[i, :, : p.shape[1], : p.shape[2]] = torch.from_numpy(p)
    sizes = torch.tensor([p.shape[1:] for p in pixels])
    with torch.no_grad():
        theirs = _hf_model(model_dir)(input_ids=input_ids, pixel_values=batch, image_sizes=sizes).logits
    torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=TOLERANCE)
    # the images really changed the output (features landed at [IMG] positions)
    plain = load_model(model_dir).language_model(load_model(model_dir).language_model.model.embed_tokens(input_ids))
    assert (plain - ours).abs().max() > 1e-3


def test_features_replace_only_img_positions(tiny_model: Path) -> None:
    tokenizer = PixtralTokenizer(tiny_model)
    ids, pixels = _prompt(tokenizer, _images()[:1])
    model = load_model(tiny_model)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = model.embed(input_ids, [torch.from_numpy(pixels[0])])
        plain = model.language_model.model.embed_tokens(input_ids)
    is_img = input_ids[0] == tokenizer.image_ids.img
    assert int(is_img.sum()) == 15
    assert torch.equal(embeds[0, ~is_img], plain[0, ~is_img])  # [IMG_BREAK]/[IMG_END]/text untouched
    assert not torch.isclose(embeds[0, is_img], plain[0, is_img]).all(dim=-1).any()
