"""Small random Pixtral checkpoints with the real architecture and the real tokenizers.

Real weights cannot be downloaded here, so tests and benches are built on these (sizes and weights:
runtime/demo/spec.py, which the demo model shares).
"""

from __future__ import annotations

from pathlib import Path

import torch

from convert.hf_files import bundled_tokenizer_path, write_model_files
from pixtral.outputs import atomic_directory
from pixtral.weights import ShardWriter
from runtime.demo.spec import SyntheticSpec, random_weights

__all__ = ["SyntheticSpec", "write_random_model"]


def write_random_model(
    out_dir: str | Path,
    spec: SyntheticSpec = SyntheticSpec(),
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = 2**31,
    force: bool = False,
) -> Path:
    """Write a complete HF Llava/Pixtral directory with random weights and a real tokenizer."""
    cfg = spec.config()
    dtype_name = str(dtype).removeprefix("torch.")
    with atomic_directory(out_dir, force, "demo-model") as tmp:
        write_model_files(tmp, cfg, bundled_tokenizer_path(spec.tokenizer), dtype_name)
        writer = ShardWriter(tmp, "model", max_shard_bytes)
        for name, tensor in random_weights(cfg, spec.seed):
            writer.add(name, tensor.to(dtype))
        writer.finish()
    return Path(out_dir)
