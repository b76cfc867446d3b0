"""The engine over the reference backend, on CPU in fp32: the KV cache against a full recompute,
prefix reuse across turns, streaming, stop strings, seeds, the context limit and bad input."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pixtral.config import ConfigError
from pixtral.image import ImageError, open_image
from pixtral.kv_cache import KVCache
from pixtral.prompt import Prompt, prepare_image
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends import BackendConfig, load_backend
from runtime.backends.reference import ReferenceBackend
from runtime.engine import ContextError, Engine, GenerationParams, StopMatcher, TextStream
from runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
ATOL = 1e-4  # fp32 on both paths: only summation order differs


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny_model, "cpu")


@pytest.fixture(scope="module")
def engine(backend: ReferenceBackend, tiny_model: Path) -> Engine:
    return Engine(backend, PixtralTokenizer(tiny_model))


def _conversation(engine: Engine, images: int) -> Prompt:
    pictures = [prepare_image(_picture(i, (48 + 16 * i, 40))) for i in range(images)]
    content = [{"type": "image"} for _ in pictures] + [
        {"type": "text", "text": "Describe what you see in detail, please."}
    ]
    return engine.chat_prompt([{"role": "user", "content": content}], pictures)


@pytest.mark.parametrize("images", [0, 2])
def test_kv_cached_decoding_equals_a_full_recompute(engine: Engine, backend: ReferenceBackend, images: int) -> None:
    prompt = _conversation(engine, images)
    keys = prompt.position_keys(backend.cfg.image_token_index)
    embeds, _ = backend._embed(prompt, keys, 0)
    lm = backend.model.language_model
    with torch.no_grad():
        full = lm(embeds)[0]
        cache = KVCache(backend.cfg.text, 4096, torch.float32, "cpu")
        split = len(prompt) // 2
        first = lm(embeds[:, :split], 0, cache)[0]  # prefill
        chunk = lm(embeds[:, split : split + 5], split, cache)[0]  # several new tokens after a cached prefix
        steps = [lm(embeds[:, i : i + 1], i, cache)[0, 0] for i in range(split + 5, len(prompt))]  # one at a time
    torch.testing.assert_close(first, full[:split], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunk, full[split : split + 5], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps), full[split + 5 :], atol=ATOL, rtol=0)


def test_a_follow_up_reuses_the_prefix_and_the_image(engine: Engine, tiny_model: Path) -> None:
    picture = prepare_image(_picture(3, (64, 48)))
    turn1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    first = engine.generate(engine.chat_prompt(turn1, [picture]), GenerationParams(max_new_tokens=6, sampling=GREEDY))
    assert first.usage.images_encoded == 1
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    prompt2 = engine.chat_prompt(turn2, [picture])
    second = engine.generate(prompt2, GenerationParams(max_new_tokens=6, sampling=GREEDY))
    assert second.usage.images_encoded == 0  # the picture is not encoded again
    image_span = prompt2.token_ids.index(engine.tokenizer.image_ids.img_end) + 1
    assert second.usage.cached_tokens > image_span  # the image's prefix is not run again
    fresh = Engine(ReferenceBackend(tiny_model, "cpu"), engine.tokenizer).generate(
        prompt2, GenerationParams(max_new_tokens=6, sampling=GREEDY)
    )
    assert fresh.token_ids == second.token_ids and fresh.usage.cached_tokens == 0


def test_streaming_and_non_streaming_give_the_same_text(engine: Engine) -> None:
    prompt = _conversation(engine, 1)
    params = GenerationParams(max_new_tokens=24, sampling=SamplingParams(temperature=0.9, seed=11))
    pieces = [chunk.text for chunk in engine.stream(prompt, params)]
    whole = engine.generate(prompt, params)
    assert "".join(pieces) == whole.text and len(pieces) > 2
    assert whole.text == engine.tokenizer.decode(whole.token_ids)


def test_a_seed_reproduces_a_sampled_reply(engine: Engine) -> None:
    prompt = _conversation(engine, 0)
    replies = [
        engine.generate(
            prompt, GenerationParams(max_new_tokens=16, sampling=SamplingParams(temperature=1.0, seed=s))
        ).text
        for s in (5, 5, 6)
    ]
    assert replies[0] == replies[1] != replies[2]


def test_a_stop_string_split_across_tokens_is_caught(engine: Engine) -> None:
    prompt = _conversation(engine, 0)
    params = GenerationParams(max_new_tokens=30, sampling=GREEDY)
    pieces = [c.text for c in engine.stream(prompt, params) if c.text]
    boundary = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    stop = pieces[boundary - 1][-2:] + pieces[boundary][:2]  # spans two tokens
    text = "".join(pieces)
    stopped = engine.generate(prompt, GenerationParams(max_new_tokens=30, sampling=GREEDY, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert stopped.text == text[: text.index(stop)]
    streamed = "".join(
        c.text for c in engine.stream(prompt, GenerationParams(max_new_tokens=30, sampling=GREEDY, stop=(stop,)))
    )
    assert streamed == stopped.text and stop[:2] not in streamed[len(stopped.text) - 1 :]


def test_stop_matcher_holds_back_a_possible_start() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("The end</") == ("The end", None)
    assert matcher.feed("ans") == ("", None)
    assert matcher.feed("wer> tail") == ("", "</answer>")
    assert StopMatcher(["xyz"]).feed("ab x") == ("ab ", None)


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_spm_model"])
def test_incremental_text_equals_a_whole_decode(model_fixture: str, request: pytest.FixtureRequest) -> None:
    tokenizer = PixtralTokenizer(request.getfixturevalue(model_fixture))
    rng = random.Random(0)
    for _ in range(30):
        ids = tokenizer.encode(
            "".join(rng.choice(["héllo", " wörld", "中文", "😀", " ", "\n", "a", "▁b"]) for _ in range(12))
        )
        ids += [rng.randrange(100, tokenizer.vocab_size) for _ in range(5)]
        stream = TextStream(tokenizer)
        text = "".join(stream.push(t) for t in ids)
        whole = tokenizer.decode(ids)
        assert whole.startswith(text) and len(whole) - len(text) <= 1  # at most a held-back broken byte


def test_budget_and_length_finish(engine: Engine) -> None:
    out = engine.generate(
        _conversation(engine, 0), GenerationParams(max_new_tokens=3, sampling=GREEDY, ignore_eos=True)
    )
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3 and len(out.token_ids) == 3


def test_a_prompt_over_the_context_is_refused_before_work(tiny_model: Path) -> None:
    backend = load_backend(tiny_model, BackendConfig(backend="reference", device="cpu", max_seq_len=32))
    engine = Engine(backend, PixtralTokenizer(tiny_model))
    prompt = engine.chat_prompt([{"role": "user", "content": "word " * 40}])
    with pytest.raises(ContextError, match=f"{len(prompt)} tokens but the context holds 32"):
        next(engine.stream(prompt))
    assert backend.cache.length == 0  # nothing ran
    short = engine.chat_prompt([{"role": "user", "content": "hi"}])
    out = engine.generate(short, GenerationParams(sampling=GREEDY, ignore_eos=True))
    # stops at the context's end
    assert out.finish_reason == "length" and len(short) + out.usage.completion_tokens == 32


def test_logprobs_are_the_models(engine: Engine, backend: ReferenceBackend) -> None:
    prompt = _conversation(engine, 0)
    out = engine.generate(prompt, GenerationParams(max_new_tokens=2, sampling=GREEDY, logprobs=3))
    expected = torch.log_softmax(backend.logits(prompt)[-1], -1)
    step = out.logprobs[0]
    assert step.token_id == int(expected.argmax()) and step.top_logprobs[0][0] == step.token_id
    assert step.logprob == pytest.approx(float(expected.max()), abs=1e-4) and len(step.top_logprobs) == 3


def test_bad_images_are_named() -> None:
    png = io.BytesIO()
    _picture(0, (64, 64)).save(png, format="PNG")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(png.getvalue()[:200])
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"GIF89a-not-really")
    with pytest.raises(ImageError, match="pixel limit"):
        open_image(png.getvalue(), max_pixels=1000)


def test_an_image_for_a_model_without_a_vision_tower(tiny_model: Path, tmp_path: Path) -> None:
    text_only = Path(shutil.copytree(tiny_model, tmp_path / "text-only"))
    for shard in text_only.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file(
            {k: v for k, v in tensors.items() if not k.startswith(("vision_tower.", "multi_modal_projector."))},
            str(shard),
        )
    engine = Engine(ReferenceBackend(text_only, "cpu"), PixtralTokenizer(text_only))
    assert not engine.backend.has_vision
    with pytest.raises(ImageError, match="no vision tower"):
        engine.chat_prompt(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
            [prepare_image(_picture(0, (32, 32)))],
        )
    assert (
        engine.generate(
            engine.chat_prompt([{"role": "user", "content": "hi"}]), GenerationParams(max_new_tokens=2)
        ).usage.completion_tokens
        >= 1
    )


def test_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_backend(tmp_path, BackendConfig(backend="reference"))
