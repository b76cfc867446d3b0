"""The project's ExLlamaV2Backend, end to end on exllamav2's own Python (over the stand-in), against
the reference backend on the same tier: greedy tokens, finish_reason and usage equal; streaming,
stop strings, images in our layout, concurrent requests, cancel; `chat` and `serve` on it."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pixtral.prompt import prepare_image
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends.reference import ReferenceBackend
from runtime.engine import Engine, GenerationParams
from runtime.sampling import SamplingParams
from runtime.server.config import ModelConfig, ServerConfig

GREEDY = GenerationParams(max_new_tokens=24, sampling=SamplingParams(temperature=0.0))


@pytest.fixture(scope="module")
def engines(exllamav2: Any, demo_tiers):
    from runtime.backends.exllamav2 import ExLlamaV2Backend

    _, tiers = demo_tiers
    tier = tiers["4.0bpw"]
    tokenizer = PixtralTokenizer(tier)
    ex = ExLlamaV2Backend(tier, max_seq_len=1024)
    yield Engine(ex, tokenizer), Engine(ReferenceBackend(tier, "cpu"), tokenizer)
    ex.close()


def _questions(demo: Path) -> list[dict]:
    return [json.loads(line) for line in (demo / "examples" / "questions.jsonl").read_text().splitlines()]


def _picture_prompt(engine: Engine, demo: Path, q: dict):
    image = prepare_image(Image.open(demo / "examples" / q["image"]))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
    return engine.chat_prompt(messages, [image])


def _same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)


def test_greedy_generation_equals_the_reference_including_the_end(engines, demo_tiers) -> None:
    ex, ref = engines
    demo, _ = demo_tiers
    prompts = [_picture_prompt(ref, demo, q) for q in _questions(demo)[:8]]
    prompts.append(ref.chat_prompt([{"role": "user", "content": "What is 3 plus 4?"}]))
    for prompt in prompts:
        a, b = ex.generate(prompt, GREEDY), ref.generate(prompt, GREEDY)
        _same(a, b)
    assert a.finish_reason == "stop"  # the stop token ends both, counted in usage by both
    capped = GenerationParams(max_new_tokens=2, sampling=SamplingParams(temperature=0.0))
    _same(ex.generate(prompts[0], capped), ref.generate(prompts[0], capped))


def test_streaming_and_stop_strings_match(engines, demo_tiers) -> None:
    ex, ref = engines
    demo, _ = demo_tiers
    prompt = _picture_prompt(ref, demo, _questions(demo)[0])
    chunks = list(ex.stream(prompt, GREEDY))
    assert "".join(c.text for c in chunks) == ref.generate(prompt, GREEDY).text and chunks[-1].finish_reason == "stop"
    stop = GenerationParams(max_new_tokens=24, sampling=SamplingParams(temperature=0.0), stop=(" is",))
    a, b = ex.generate(prompt, stop), ref.generate(prompt, stop)
    _same(a, b)
    assert a.stop_string == " is"


def test_a_follow_up_turn_reuses_the_picture(engines, demo_tiers) -> None:
    ex, ref = engines
    demo, _ = demo_tiers
    q = _questions(demo)[1]
    image = prepare_image(Image.open(demo / "examples" / q["image"]))
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
    first = ex.generate(ex.chat_prompt(turn, [image]), GREEDY)
    follow = turn + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "What is 3 plus 4?"}]
    prompt = ex.chat_prompt(follow, [image])
    second = ex.generate(prompt, GREEDY)
    assert second.usage.images_encoded == 0
    _same(second, ref.generate(prompt, GREEDY))


def test_concurrent_requests_and_a_cancel(engines, demo_tiers) -> None:
    ex, ref = engines
    demo, _ = demo_tiers
    prompts = [_picture_prompt(ref, demo, q) for q in _questions(demo)[2:4]]
    expected = [ref.generate(p, GREEDY) for p in prompts]
    stream = ex.stream(prompts[0], GREEDY)
    next(stream)
    stream.close()  # cancelled mid-generation: the generator goes on serving others
    outputs: list = [None, None]

    def run(i: int) -> None:
        outputs[i] = ex.generate(prompts[i], GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    for got, want in zip(outputs, expected):
        assert got is not None
        _same(got, want)


def test_chat_on_exllamav2_answers_a_picture_question(exllamav2: Any, demo_tiers) -> None:
    demo, tiers = demo_tiers
    q = _questions(demo)[0]
    script = [f"/image {demo / 'examples' / q['image']}", q["question"]]
    result = CliRunner().invoke(
        app,
        [
            "chat",
            str(tiers["4.0bpw"]),
            "--backend",
            "exllamav2",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--context",
            "1024",
        ],
        input="\n".join(script) + "\n",
    )
    assert result.exit_code == 0, result.output
    replies = [line.removeprefix("model>").strip() for line in result.output.splitlines() if line.startswith("model>")]
    assert replies == [q["answer"]], result.output


def test_serve_on_exllamav2_answers_a_picture_question(exllamav2: Any, demo_tiers, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from serving import API, models_folder, running_server

    demo, tiers = demo_tiers
    q = _questions(demo)[0]
    models = models_folder(tmp_path / "models", ("demo-4.0", tiers["4.0bpw"]))
    config = ServerConfig(model=ModelConfig(model_dir=str(models), backend="exllamav2", max_seq_len=1024))
    url = "data:image/png;base64," + base64.b64encode((demo / "examples" / q["image"]).read_bytes()).decode()
    body = {
        "model": "demo-4.0",
        "max_tokens": 16,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q["question"]}],
            }
        ],
    }
    with running_server(config, "demo-4.0") as server:
        card = httpx.get(f"{server.url}/v1/model", headers=API, timeout=30).json()
        assert card["parameters"]["backend"] == "exllamav2" and "causal mask" in card["parameters"]["attention"]
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=API, timeout=120).json()
    assert reply["choices"][0]["message"]["content"] == q["answer"] and reply["choices"][0]["finish_reason"] == "stop"
