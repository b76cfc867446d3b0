"""What TabbyAPI (branch exl2-checkpoint, 79126f9) reads from a tier, reproduced from its source:
config.json's top-level context for `rope_alpha: auto`, tokenizer_config.json's `add_bos_token`
for raw completions, and its chat path (endpoints/OAI/utils/chat_completion.py): content parts
flattened into one string with exllamav2 embedding aliases, our template rendered in its Jinja
environment, the template's <s> stripped, then exllamav2's tokenizer with the embeddings. The ids
around each image span must be mistral-common's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from convert.hf_files import bundled_tokenizer_path
from pixtral.tokenizer import PixtralTokenizer

mistral = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk  # noqa: E402
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402

WIDE, TALL = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (30, 50), "blue")
CONVERSATIONS = {
    "image_first": [[WIDE, "What colour is the circle?"]],
    "text_first": [["What colour is the circle?", WIDE]],
    "interleaved": [["first", WIDE, "second", TALL]],
    "follow_up": [[WIDE, "What is it?"], "A red box.", ["And this?", TALL]],
}
SPAN = -1  # one marker per image span on both sides


def _rope_alpha_base(model_dir: Path) -> int:
    """common/transformers_utils.py HuggingFaceConfig.max_position_embeddings: the top-level field,
    passed to calculate_rope_alpha(base, target) as `rope_alpha: auto` does."""
    base = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    assert isinstance(base, int) and base > 0
    return base


def _add_bos(model_dir: Path) -> bool:
    """TokenizerConfig.add_bos_token: default True, else tokenizer_config.json's."""
    return json.loads((model_dir / "tokenizer_config.json").read_text()).get("add_bos_token", True)


def test_tiers_and_sources_carry_what_tabbyapi_reads(demo_tiers, tiny_model: Path) -> None:
    demo, tiers = demo_tiers
    for model_dir in (demo, tiny_model, *tiers.values()):
        text = json.loads((model_dir / "config.json").read_text())["text_config"]
        assert _rope_alpha_base(model_dir) == text["max_position_embeddings"], model_dir
        assert _add_bos(model_dir), model_dir  # raw /v1/completions start with <s>


def _tabby_prompt(template: str, messages: list[dict], aliases: list[str], add_bos: bool) -> str:
    """format_messages_with_template + apply_chat_template: parts flattened (text as is, an image as
    its alias), rendered with TabbyAPI's Jinja settings, the leading <s> stripped if add_bos."""
    flat, images = [], iter(aliases)
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(p["text"] if p["type"] == "text" else next(images) for p in content)
        flat.append({"role": m["role"], "content": content})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=True: json.dumps(
        v, indent=indent, ensure_ascii=ensure_ascii
    )
    prompt = env.from_string(template).render(
        messages=flat, bos_token="<s>", eos_token="</s>", add_generation_prompt=True, tools=None, functions=None
    )
    return prompt.removeprefix("<s>") if add_bos else prompt


def _messages(turns: list) -> tuple[list[dict], list[Any]]:
    ours, theirs = [], []
    for i, turn in enumerate(turns):
        if i % 2:
            ours.append({"role": "assistant", "content": turn})
            theirs.append(AssistantMessage(content=turn))
            continue
        ours.append(
            {
                "role": "user",
                "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in turn],
            }
        )
        theirs.append(
            UserMessage(content=[TextChunk(text=p) if isinstance(p, str) else ImageChunk(image=p) for p in turn])
        )
    return ours, theirs


def _collapse(ids: list[int], is_image: Any, span_end: Any) -> list[int]:
    out, inside = [], False
    for token in ids:
        if inside:
            inside = not span_end(token)
            continue
        if is_image(token):
            out.append(SPAN)
            inside = not span_end(token)
        else:
            out.append(token)
    return out


@pytest.mark.parametrize("kind", ["tekken", "spm"])
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_tabbyapis_chat_path_gives_mistral_commons_ids_around_images(
    exllamav2: Any, kind: str, case: str, request
) -> None:
    from exllamav2.generator import ExLlamaV2MMEmbedding

    model_dir = request.getfixturevalue("tiny_model" if kind == "tekken" else "tiny_spm_model")
    config = exllamav2.ExLlamaV2Config(str(model_dir))
    model, tokenizer = exllamav2.ExLlamaV2(config), exllamav2.ExLlamaV2Tokenizer(config)
    ours, theirs = _messages(CONVERSATIONS[case])
    n_images = sum(1 for m in ours if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
    embeddings = [ExLlamaV2MMEmbedding(model, torch.zeros(3, config.hidden_size)) for _ in range(n_images)]
    prompt = _tabby_prompt(
        PixtralTokenizer(model_dir).chat_template, ours, [e.text_alias for e in embeddings], _add_bos(model_dir)
    )
    ids = tokenizer.encode(prompt, add_bos=_add_bos(model_dir), encode_special_tokens=True, embeddings=embeddings)[
        0
    ].tolist()
    first = min(e.first_index for e in embeddings)
    got = _collapse(ids, lambda t: t >= first, lambda t: any(t == e.first_index + e.length - 1 for e in embeddings))

    oracle = mistral.MistralTokenizer.from_file(str(bundled_tokenizer_path(kind)))
    expected_ids = oracle.encode_chat_completion(ChatCompletionRequest(messages=theirs)).tokens
    ids_of = PixtralTokenizer(model_dir).image_ids
    expected = _collapse(expected_ids, lambda t: t == ids_of.img, lambda t: t == ids_of.img_end)
    assert got == expected, (prompt, got, expected)
    assert got.count(1) == 1 and got[0] == 1  # exactly one <s>


def test_exllamav2s_own_processor_lays_pictures_out_differently(exllamav2: Any, demo_tiers) -> None:
    """What the card says of TabbyAPI's image path: exllamav2's Pixtral processor loads our tier's
    vision tower, rounds the picture to 32 px and ends the grid with an extra [IMG_BREAK]."""
    from exllamav2.vlm.vision_tower import ExLlamaV2VisionTower

    from pixtral.image import patch_grid

    demo, tiers = demo_tiers
    config = exllamav2.ExLlamaV2Config(str(tiers["4.0bpw"]))
    config.max_seq_len = 1024
    vision, model = ExLlamaV2VisionTower(config), exllamav2.ExLlamaV2(config)
    vision.load()
    model.load()
    picture = Image.new("RGB", (40, 20), "red")  # mistral-common: 3×2 patches of 16 px; exllamav2: 64×32 px, 4×2
    embedding = vision.get_image_embeddings(model, exllamav2.ExLlamaV2Tokenizer(config), picture)
    rows, cols = patch_grid(*picture.size)
    assert (rows, cols) == (2, 3)
    ours = rows * (cols + 1)  # patches, a break per row, the last one [IMG_END]
    theirs = 2 * (4 + 1) + 1  # rows of 4 patches and a break each, then [IMG_END] after the last break
    assert ours == 8 and embedding.embeddings.shape == (theirs, config.hidden_size)
    vision.unload()
    model.unload()
