"""Decode benchmark: our engine against a baseline run in the same process, as a ratio.

CPU (default without CUDA): the reference backend against transformers'
`LlavaForConditionalGeneration.generate` on the same fp16 demo model, both computing in fp32, greedy,
the same prompt and number of new tokens (goal: ratio ≥ 1.0).

GPU (`--gpu`): on a random Pixtral-shaped model quantized to 4.0 bpw, our engine (exllamav2 backend)
against exllamav2's raw dynamic generator (goal ≥ 0.95×); prefill tokens/s of a long prompt; and the
time our fp16 vision tower (real Pixtral-12B shape) takes to encode a 1024×1024 image.

    python bench/decode.py [--tokens 128] [--repeats 3] [--gpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle, and tell it slowly."


def _median_rate(runs: list[tuple[int, float]]) -> float:
    return statistics.median(tokens / seconds for tokens, seconds in runs)


def cpu_bench(tokens: int, repeats: int) -> dict:
    import transformers

    from pixtral.tokenizer import PixtralTokenizer
    from runtime.backends.reference import ReferenceBackend
    from runtime.demo.model import write_demo_model
    from runtime.engine import Engine, GenerationParams
    from runtime.sampling import SamplingParams

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_demo_model(Path(tmp) / "demo")
        tokenizer = PixtralTokenizer(model_dir)
        engine = Engine(ReferenceBackend(model_dir, "cpu", torch.float32), tokenizer)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        prompt = engine.chat_prompt([{"role": "user", "content": PROMPT}])
        params = GenerationParams(max_new_tokens=tokens, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
        ids = torch.tensor([prompt.token_ids])
        ours, theirs = [], []
        for _ in range(repeats):
            engine.backend.cache.truncate(0)  # no reuse between repeats: each run prefills the prompt
            engine.backend._cached_keys = []
            usage = engine.generate(prompt, params).usage
            ours.append((usage.completion_tokens - 1, usage.decode_seconds))
            theirs.append(_hf_decode(hf, ids, tokens))
    ours_rate, hf_rate = _median_rate(ours), _median_rate(theirs)
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "new_tokens": tokens,
        "prompt_tokens": len(prompt),
        "ours_decode_tok_s": ours_rate,
        "transformers_decode_tok_s": hf_rate,
        "ratio": ours_rate / hf_rate,
    }


@torch.no_grad()
def _hf_decode(model, ids: torch.Tensor, tokens: int) -> tuple[int, float]:
    """Decode time of transformers' generate: the whole call minus a prefill-only call."""
    started = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    out = model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    total = time.perf_counter() - started
    return out.shape[1] - ids.shape[1] - 1, total - prefill


def gpu_bench(tokens: int, repeats: int) -> dict:
    from exllamav2.generator import ExLlamaV2Sampler

    from bench.tiers import GPU_BENCH_SPEC, write_tier
    from pixtral.tokenizer import PixtralTokenizer
    from runtime.backends.exllamav2 import ExLlamaV2Backend
    from runtime.engine import Engine, GenerationParams
    from runtime.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        tier = write_tier(Path(tmp), GPU_BENCH_SPEC, bits=4)
        backend = ExLlamaV2Backend(tier, max_seq_len=4096)
        engine = Engine(backend, PixtralTokenizer(tier))
        prompt = engine.chat_prompt([{"role": "user", "content": PROMPT}])
        params = GenerationParams(max_new_tokens=tokens, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
        ids = torch.tensor([prompt.token_ids])
        ours, raw = [], []
        for _ in range(repeats):
            usage = engine.generate(prompt, params).usage
            ours.append((usage.completion_tokens - 1, usage.decode_seconds))
            raw.append(_raw_decode(backend, ids, tokens, ExLlamaV2Sampler.Settings.greedy()))
        long_prompt = engine.chat_prompt([{"role": "user", "content": "word " * 2000}])
        usage = engine.generate(long_prompt, GenerationParams(max_new_tokens=1)).usage
        vision_ms = _vision_encode_ms()
        backend.close()
    ours_rate, raw_rate = _median_rate(ours), _median_rate(raw)
    return {
        "device": torch.cuda.get_device_name(0),
        "new_tokens": tokens,
        "ours_decode_tok_s": ours_rate,
        "exllamav2_decode_tok_s": raw_rate,
        "ratio": ours_rate / raw_rate,
        "prefill_tok_s": (usage.prompt_tokens - usage.cached_tokens) / usage.prefill_seconds,
        "vision_1024px_ms": vision_ms,
    }


def _raw_decode(backend, ids: torch.Tensor, tokens: int, settings) -> tuple[int, float]:
    """exllamav2's dynamic generator alone, on the same model and cache (timed from the first token)."""
    from exllamav2.generator import ExLlamaV2DynamicJob

    def run() -> tuple[int, float]:
        generator = backend.generator
        job = ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=tokens, gen_settings=settings, stop_conditions=[])
        generator.enqueue(job)
        first, count = None, 0
        while generator.num_remaining_jobs():
            for result in generator.iterate():
                if result.get("token_ids") is not None:
                    count += result["token_ids"].shape[-1]
                    first = first or time.perf_counter()
        return count - 1, time.perf_counter() - first

    return backend._call(run)


@torch.no_grad()
def _vision_encode_ms() -> float:
    """Pixtral-12B's vision tower shape (24 layers, 1024 wide), random fp16 weights, one 1024² image."""
    from pixtral.config import VisionConfig
    from pixtral.vision import VisionTower

    tower = VisionTower(VisionConfig(1024, 4096, 24, 16, 64)).half().cuda().eval()
    image = torch.randn(3, 1024, 1024, device="cuda", dtype=torch.float16)
    tower([image])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        tower([image])
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / 5 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="benchmark the exllamav2 backend (needs CUDA and exllamav2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = gpu_bench(args.tokens, args.repeats) if args.gpu else cpu_bench(args.tokens, args.repeats)
    for key, value in result.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
