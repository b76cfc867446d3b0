"""One decoder layer at a time: run calibration rows through a block, measure options, quantize.

A layer has two blocks, attention (`self_attn`) and MLP (`mlp`), each with a residual, and each is
handled on its own as exllamav2 does: Hessians come from the block's input, the block is quantized,
and its (quantized) output is the next block's input. Hidden states live on the CPU in fp16, one
tensor per row; a row is moved to the compute device only while it is being processed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.config import TextConfig
from runtime.device import resolve_device
from runtime.exl2_format import GroupPlan, pad_columns, storage_bits
from runtime.text import DECODER_LINEARS, DecoderLayer, LinearSpec, rope_cos_sin

from .gptq import DAMP, gptq_quantize, pack_exl2, prepare_hessian
from .hessian import collect_hessians
from .options import Candidate, anchor_candidates

BLOCKS = ("self_attn", "mlp")


@dataclass(frozen=True)
class Compute:
    """Where and in what precision blocks run (fp32 on CPU; fp16 on CUDA, as exllamav2)."""

    device: torch.device
    dtype: torch.dtype
    damp: float = DAMP

    @staticmethod
    def for_device(name: str, damp: float = DAMP) -> Compute:
        device = resolve_device(name)
        return Compute(device, torch.float16 if device.type == "cuda" else torch.float32, damp)


def block_specs(block: str) -> list[LinearSpec]:
    return [spec for spec in DECODER_LINEARS if spec.module == block]


class BlockRunner:
    """Runs one block of one layer over a list of row states."""

    def __init__(self, layer: DecoderLayer, text: TextConfig, length: int, compute: Compute):
        self.layer = layer.to(device=compute.device, dtype=compute.dtype)
        self.compute = compute
        positions = torch.arange(length, device=compute.device)
        self.cos, self.sin = rope_cos_sin(positions, text.head_dim, text.rope_theta, compute.dtype)

    def forward(self, block: str, x: Tensor) -> Tensor:
        """x [1, L, hidden] on device -> block output (residual included)."""
        if block == "self_attn":
            return self.layer.attention_block(x, self.cos, self.sin)
        return self.layer.mlp_block(x)

    @torch.no_grad()
    def run(self, block: str, states: list[Tensor]) -> list[Tensor]:
        """Block outputs for every row, back on the CPU in fp16."""
        return [self.forward(block, s.to(self.compute.device, self.compute.dtype)[None])[0].half().cpu() for s in states]

    @torch.no_grad()
    def hessians(self, block: str, states: list[Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Hessian of each input group of the block, and the block's outputs (with current weights)."""
        with collect_hessians(self.layer, block_specs(block), self.compute.device) as accumulators:
            outputs = self.run(block, states)
        return {group: acc.result() for group, acc in accumulators.items()}, outputs

    @torch.no_grad()
    def relative_error(self, block: str, states: list[Tensor], reference: list[Tensor]) -> float:
        """Σ‖y − y_ref‖² / Σ‖y_ref‖² over all rows and tokens (squared relative output error)."""
        num = den = 0.0
        for s, ref in zip(states, reference):
            y = self.forward(block, s.to(self.compute.device, self.compute.dtype)[None])[0].float()
            r = ref.to(self.compute.device).float()
            num += float(((y - r) ** 2).sum())
            den += float((r**2).sum())
        return num / max(den, 1e-30)

    def set_weight(self, name: str, weight: Tensor) -> None:
        self.layer.get_submodule(name).weight.data = weight.to(self.compute.device, self.compute.dtype)


@dataclass(frozen=True)
class AnchorResult:
    candidate: Candidate
    bits: int  # storage cost (spec §3.2)
    error: float  # squared relative error of the block output with only this linear quantized


def measure_block(
    runner: BlockRunner, block: str, states: list[Tensor], tick: Callable[[], None] = lambda: None
) -> tuple[dict[str, list[AnchorResult]], list[Tensor]]:
    """Quantize every anchor candidate of every linear in the block and measure its output error.

    Returns the results per linear name and the block's fp16 outputs (the next block's input).
    """
    H, reference = runner.hessians(block, states)
    prepared = {group: prepare_hessian(h, runner.compute.damp) for group, h in H.items()}
    results: dict[str, list[AnchorResult]] = {}
    for spec in block_specs(block):
        original = runner.layer.get_submodule(spec.name).weight.data.clone()
        rows, columns = original.shape[1], pad_columns(original.shape[0])
        results[spec.name] = []
        for candidate in anchor_candidates(rows):
            plan = candidate.plan(rows)
            quantized = gptq_quantize(original, prepared[spec.hessian_group], plan)
            runner.set_weight(spec.name, quantized.weight)
            error = runner.relative_error(block, states, reference)
            results[spec.name].append(AnchorResult(candidate, storage_bits(plan, columns), error))
            tick()
        runner.set_weight(spec.name, original)
    return results, reference


def quantize_block(
    runner: BlockRunner, block: str, states: list[Tensor], plans: dict[str, GroupPlan]
) -> tuple[dict[str, dict[str, Tensor]], list[Tensor]]:
    """GPTQ every linear of the block with its chosen plan; return EXL2 tensors and the quantized outputs."""
    H, _ = runner.hessians(block, states)
    prepared = {group: prepare_hessian(h, runner.compute.damp) for group, h in H.items()}
    tensors = {}
    for spec in block_specs(block):
        weight = runner.layer.get_submodule(spec.name).weight.data
        result = gptq_quantize(weight, prepared[spec.hessian_group], plans[spec.name])
        tensors[spec.name] = pack_exl2(result, plans[spec.name])
        runner.set_weight(spec.name, result.weight)
    return tensors, runner.run(block, states)
