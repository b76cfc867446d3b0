"""Picture answers through exllamav2 with mistral-common's image layout (our backend, what
`pixtral-exl2 serve` runs) against exllamav2's own Pixtral processor (what TabbyAPI's exl2 branch
runs: its chat path reproduced, flattened content and `<$EMB_n$>` aliases), on the demo model.

    python bench/tabbyapi_image_layout.py [--tier DIR]      # default: the demo model's 4.0 tier, made here

Without CUDA exllamav2 runs on the tests' CPU stand-in for its extension (tests/exllamav2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project, not bench/quantize.py, is `quantize`


def _exllamav2():
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    sys.path.insert(0, str(ROOT / "tests" / "exllamav2"))
    from standin import exllamav2_on_cpu

    return exllamav2_on_cpu()


def _demo_tier(root: Path) -> tuple[Path, Path]:
    from typer.testing import CliRunner

    from cli import app
    from runtime.demo.model import write_demo_model

    demo = write_demo_model(root / "demo")
    result = CliRunner().invoke(app, ["quantize", str(demo), str(root / "exl2"), "--recipe", "demo", "--bpw", "4.0"])
    assert result.exit_code == 0, result.output
    return demo / "examples", root / "exl2" / "4.0bpw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tier", type=Path, help="an EXL2 tier of the demo model (default: made in a temporary folder)"
    )
    parser.add_argument("--examples", type=Path, help="folder with questions.jsonl and pictures (default: the demo's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, _exllamav2():
        examples, tier = (args.examples, args.tier) if args.tier else _demo_tier(Path(tmp))
        examples = examples or tier.parent.parent / "demo" / "examples"
        questions = [json.loads(line) for line in (examples / "questions.jsonl").read_text().splitlines()]
        ours, theirs = _ours(tier, examples, questions), _theirs(tier, examples, questions)
    print(f"mistral-common layout (pixtral-exl2 serve): {ours}/{len(questions)} picture answers right")
    print(f"exllamav2's Pixtral processor (TabbyAPI):   {theirs}/{len(questions)} picture answers right")


def _ours(tier: Path, examples: Path, questions: list[dict]) -> int:
    from pixtral.prompt import prepare_image
    from pixtral.tokenizer import PixtralTokenizer
    from runtime.backends.exllamav2 import ExLlamaV2Backend
    from runtime.engine import Engine, GenerationParams
    from runtime.sampling import SamplingParams

    backend = ExLlamaV2Backend(tier, max_seq_len=1024)
    engine, right = Engine(backend, PixtralTokenizer(tier)), 0
    greedy = GenerationParams(max_new_tokens=16, sampling=SamplingParams(temperature=0.0))
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
        prompt = engine.chat_prompt(messages, [prepare_image(Image.open(examples / q["image"]))])
        right += engine.generate(prompt, greedy).text.strip() == q["answer"]
    backend.close()
    return right


def _theirs(tier: Path, examples: Path, questions: list[dict]) -> int:
    import exllamav2 as ex
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2Sampler

    from pixtral.tokenizer import PixtralTokenizer
    from runtime.backends.exllamav2 import attention_path

    config = ex.ExLlamaV2Config(str(tier))
    config.max_seq_len = 1024
    paged = attention_path(config).startswith("flash-attn")
    vision, model = ex.ExLlamaV2VisionTower(config), ex.ExLlamaV2(config)
    vision.load()
    model.load()
    tokenizer = ex.ExLlamaV2Tokenizer(config)
    generator = ExLlamaV2DynamicGenerator(model, ex.ExLlamaV2Cache(model, max_seq_len=1024), tokenizer, paged=paged)
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        PixtralTokenizer(tier).chat_template
    )
    right = 0
    for q in questions:
        embedding = vision.get_image_embeddings(model, tokenizer, Image.open(examples / q["image"]))
        messages = [{"role": "user", "content": embedding.text_alias + q["question"]}]  # TabbyAPI's flattening
        prompt = template.render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
        reply = generator.generate(
            prompt=prompt.removeprefix("<s>"),
            max_new_tokens=16,
            embeddings=[embedding],
            add_bos=True,
            gen_settings=ExLlamaV2Sampler.Settings.greedy(),
            stop_conditions=[tokenizer.eos_token_id],
            completion_only=True,
            encode_special_tokens=True,
        )
        right += reply.strip() == q["answer"]
    return right


if __name__ == "__main__":
    main()
