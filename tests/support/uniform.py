"""EXL2 checkpoints with one bit width everywhere, quantized without calibration data.

For the format and runtime checks that need a valid tier quickly (tests, benchmarks, the GPU check):
round-to-nearest, or GPTQ when a Hessian per layer is supplied. Real tiers come from pipeline.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from pixtral.config import load_config
from pixtral.exl2.format import GroupPlan
from pixtral.exl2.metadata import CalibrationInfo, EXL2Metadata
from pixtral.exl2.writer import DEFAULT_SHARD_MB, EXLLAMAV2_VERSION, write_exl2_checkpoint
from pixtral.text import DECODER_LINEARS, layer_prefix
from pixtral.weights import Checkpoint
from quantize.gptq import GPTQResult, gptq_quantize, pack_exl2, prepare_hessian, rtn_quantize

HEAD = "language_model.lm_head"


def write_uniform_tier(
    source: str | Path,
    out: str | Path,
    bits: int = 4,
    head_bits: int = 6,
    group_rows: int = 32,
    hessian: Callable[[str, int], Tensor] | None = None,
    shard_mb: int = DEFAULT_SHARD_MB,
    force: bool = False,
) -> dict[str, GPTQResult]:
    """Quantize every decoder linear to `bits` and the head to `head_bits` in groups of `group_rows`;
    `hessian(prefix, K)` switches from round-to-nearest to GPTQ. Returns each layer's result."""
    cfg = load_config(source)
    prefixes = [layer_prefix(i) + spec.name for i in range(cfg.text.num_hidden_layers) for spec in DECODER_LINEARS] + [
        HEAD
    ]
    results: dict[str, GPTQResult] = {}

    def load(prefix: str) -> dict[str, Tensor]:
        with Checkpoint(source) as ckpt:
            W = ckpt.get(prefix + ".weight").float()
        K = W.shape[1]
        plan = GroupPlan(((head_bits if prefix == HEAD else bits, group_rows),) * (K // group_rows))
        result = gptq_quantize(W, prepare_hessian(hessian(prefix, K)), plan) if hessian else rtn_quantize(W, plan)
        results[prefix] = result
        return pack_exl2(result, plan)

    metadata = EXL2Metadata(
        version=EXLLAMAV2_VERSION,
        bits=float(bits),
        head_bits=head_bits,
        calibration=CalibrationInfo(rows=0, length=0, dataset="(none: uniform widths, no calibration)"),
    )
    write_exl2_checkpoint(out, source, prefixes, load, metadata, shard_mb, force)
    return results
