"""Models the benchmarks run on: random weights with real Pixtral shapes, quantized without calibration."""

from __future__ import annotations

from pathlib import Path

from tests.support.synthetic import SyntheticSpec, write_random_model
from tests.support.uniform import write_uniform_tier

# a slice of Pixtral-12B: its widths (hidden 5120, FFN 14336, 32/8 heads of 128), 4 layers, Large's
# 32k-token vocabulary (so the head does not dominate); kernel-friendly for exllamav2
GPU_BENCH_SPEC = SyntheticSpec(
    hidden_size=5120,
    intermediate_size=14336,
    num_layers=4,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_layers=2,
    vision_heads=16,
    tokenizer="spm",
    seed=12,
)


def write_tier(root: Path, spec: SyntheticSpec, bits: int = 4, head_bits: int = 6) -> Path:
    """Write the fp16 model under root/fp16 and a uniform `bits` EXL2 tier under root/exl2."""
    source = write_random_model(root / "fp16", spec)
    write_uniform_tier(source, root / "exl2", bits, head_bits, group_rows=128)
    return root / "exl2"
