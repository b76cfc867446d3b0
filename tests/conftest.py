"""Shared fixtures: tiny random Pixtral checkpoints (real architecture, real tokenizers), a
`device` parameter over cpu (+ cuda when present), and the `gpu` marker's skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.synthetic import SyntheticSpec, write_random_model

FIXTURES = Path(__file__).parent / "fixtures"

TINY_TEKKEN = SyntheticSpec(seed=1)
TINY_SPM = SyntheticSpec(tokenizer="spm", projector_bias=False, seed=2, vision_layers=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (and exllamav2 built for it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
    from quantize.checkpoint import write_exl2_checkpoint
    from quantize.exl2_format import GroupPlan
    from quantize.gptq import gptq_quantize, pack_exl2, prepare_hessian
    from runtime.config import load_config
    from runtime.text import DECODER_LINEARS, layer_prefix
    from runtime.weights import Checkpoint

    cfg = load_config(source)
    prefixes = [layer_prefix(i) + spec.name for i in range(cfg.text.num_hidden_layers) for spec in DECODER_LINEARS]
    prefixes.append("language_model.lm_head")
    gen = torch.Generator().manual_seed(seed)
    results = {}

    def load(prefix: str) -> dict:
        with Checkpoint(source) as ckpt:
            W = ckpt.get(prefix + ".weight").float()
        K = W.shape[1]
        X = torch.randn(4 * K, K, generator=gen) * torch.linspace(0.2, 2.0, K)
        width = head_bits if prefix.endswith("lm_head") else bits
        plan = GroupPlan(((width, 32),) * (K // 32))
        result = gptq_quantize(W, prepare_hessian(X.T @ X), plan)
        results[prefix] = result
        return pack_exl2(result, plan)

    config = {"quant_method": "exl2", "version": "0.3.2", "bits": float(bits), "head_bits": head_bits,
              "calibration": {"rows": 0, "length": 0, "dataset": "(test)"}}  # fmt: skip
    write_exl2_checkpoint(out, source, prefixes, load, config, **write_kwargs)
    return results
