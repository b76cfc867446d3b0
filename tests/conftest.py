"""Shared fixtures: tiny random Pixtral checkpoints (real architecture, real tokenizers), a
`device` parameter over cpu (+ cuda when present), and the `gpu` marker's skip."""

from __future__ import annotations

import os

# Triton kernels run in its interpreter where there is no GPU (set before anything imports triton)
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convert.hf_files import bundled_tokenizer_path
from tests.support.synthetic import SyntheticSpec, write_random_model

FIXTURES = Path(__file__).parent / "fixtures"

TINY_TEKKEN = SyntheticSpec(seed=1)
TINY_SPM = SyntheticSpec(tokenizer="spm", projector_bias=False, seed=2, vision_layers=2)


STANDIN = Path(__file__).parent / "exllamav2"  # exllamav2's own Python on a CPU stand-in for its extension
STANDIN_TIERS = ("2.5", "4.0", "6.0")  # 2.5 mixes 2/3/4-bit groups; 6.0 reaches 5/6/8


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if STANDIN in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.standin)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (and exllamav2 built for it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def exllamav2():
    """exllamav2 imported over the stand-in (tests/exllamav2/standin.py). Module-scoped: its device
    no-ops are undone before the next module runs."""
    sys.path.insert(0, str(STANDIN))
    from standin import exllamav2_on_cpu

    with exllamav2_on_cpu() as ex:
        yield ex


@pytest.fixture(scope="session")
def demo_tiers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The demo model and its tiers: STANDIN_TIERS with the default head, and 4.0 with an 8-bit head."""
    from typer.testing import CliRunner

    from cli import app
    from runtime.demo.model import write_demo_model

    root = tmp_path_factory.mktemp("standin")
    demo = write_demo_model(root / "demo")
    runner = CliRunner()
    result = runner.invoke(
        app, ["quantize", str(demo), str(root / "exl2"), "--recipe", "demo", "--bpw", ",".join(STANDIN_TIERS)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "quantize",
            str(demo),
            str(root / "exl2-h8"),
            "--recipe",
            "demo",
            "--bpw",
            "4.0",
            "--head-bits",
            "8",
            "--measurement",
            str(root / "exl2" / "measurement.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    tiers = {f"{t}bpw": root / "exl2" / f"{t}bpw" for t in STANDIN_TIERS} | {
        "4.0bpw-head8": root / "exl2-h8" / "4.0bpw"
    }
    return demo, tiers


# --- Mistral-native checkpoints (what `convert` reads), built with Mistral's own names and conventions ---

PARAMS = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
    "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 32768,
    "vision_encoder": {"hidden_size": 32, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                       "rope_theta": 10000.0, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_token_id": 10, "adapter_bias": False},
}  # fmt: skip


def native_weights(params: dict, bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Mistral's own names and conventions."""
    gen = torch.Generator().manual_seed(seed)
    d, hd, v = params["dim"], params["head_dim"], params["vision_encoder"]
    vd = v["hidden_size"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    def gain(n: int) -> torch.Tensor:
        return 1 + 0.2 * torch.randn(n, generator=gen)

    out = {
        "tok_embeddings.weight": torch.randn(params["vocab_size"], d, generator=gen),
        "norm.weight": gain(d),
        "output.weight": w(params["vocab_size"], d),
        "vision_encoder.patch_conv.weight": w(vd, 3, 16, 16) / 16,
        "vision_encoder.ln_pre.weight": gain(vd),
        "vision_language_adapter.w_in.weight": w(d, vd),
        "vision_language_adapter.w_out.weight": w(d, d),
    }
    if bias:
        out["vision_language_adapter.w_in.bias"] = 0.1 * torch.randn(d, generator=gen)
        out["vision_language_adapter.w_out.bias"] = 0.1 * torch.randn(d, generator=gen)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        out |= {
            p + "attention_norm.weight": gain(d),
            p + "ffn_norm.weight": gain(d),
            p + "attention.wq.weight": w(params["n_heads"] * hd, d),
            p + "attention.wk.weight": w(params["n_kv_heads"] * hd, d),
            p + "attention.wv.weight": w(params["n_kv_heads"] * hd, d),
            p + "attention.wo.weight": w(d, params["n_heads"] * hd),
            p + "feed_forward.w1.weight": w(params["hidden_dim"], d),
            p + "feed_forward.w3.weight": w(params["hidden_dim"], d),
            p + "feed_forward.w2.weight": w(d, params["hidden_dim"]),
        }
    for i in range(v["num_hidden_layers"]):
        p = f"vision_encoder.transformer.layers.{i}."
        out |= {
            p + "attention_norm.weight": gain(vd),
            p + "ffn_norm.weight": gain(vd),
            **{p + f"attention.w{x}.weight": w(vd, vd) for x in "qkvo"},
            p + "feed_forward.w1.weight": w(v["intermediate_size"], vd),
            p + "feed_forward.w3.weight": w(v["intermediate_size"], vd),
            p + "feed_forward.w2.weight": w(vd, v["intermediate_size"]),
        }
    return out


def write_native(root: Path, params: dict, tokenizer: str, bias: bool, shards: int = 2) -> Path:
    root.mkdir(parents=True)
    params = json.loads(json.dumps(params))
    params["vision_encoder"]["adapter_bias"] = bias
    (root / "params.json").write_text(json.dumps(params))
    tensors = native_weights(params, bias)
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n].to(torch.bfloat16) for n in names[s::shards]}
        save_file(part, str(root / f"consolidated-{s + 1:05d}-of-{shards:05d}.safetensors"))
    shutil.copy(
        bundled_tokenizer_path(tokenizer), root / ("tekken.json" if tokenizer == "tekken" else "tokenizer.model.v7m1")
    )
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer model with the 12B tokenizer (tekken) and a projector bias, fp16, one shard."""
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-tekken", TINY_TEKKEN)


@pytest.fixture(scope="session")
def tiny_spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer model with the Large tokenizer (v7m1), no projector bias, sharded in small pieces."""
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-spm", TINY_SPM, max_shard_bytes=2_000_000)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def quantize_fixed(source: Path, out: Path, bits: int = 4, head_bits: int = 6, seed: int = 0, **write_kwargs) -> dict:
    """An EXL2 checkpoint with one uniform width per layer (GPTQ on a random SPD Hessian): format
    scaffolding for the format tests, independent of the quantizer pipeline."""
    from tests.support.uniform import write_uniform_tier

    gen = torch.Generator().manual_seed(seed)

    def hessian(prefix: str, K: int) -> torch.Tensor:
        X = torch.randn(4 * K, K, generator=gen) * torch.linspace(0.2, 2.0, K)
        return X.T @ X

    return write_uniform_tier(source, out, bits, head_bits, hessian=hessian, **write_kwargs)
