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
