"""One block of one decoder layer over the calibration rows.

A layer has two blocks, attention (`self_attn`) and MLP (`mlp`), each with a residual, handled on
their own as exllamav2 does: Hessians come from the block's input, the block is quantized, and its
(quantized) output is the next block's input. Rows arrive one at a time from the stream store (CPU,
fp16); for the many passes of a measurement they are kept on the compute device (`resident`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from pixtral.config import TextConfig
from pixtral.text import DECODER_LINEARS, DecoderLayer, LinearSpec, rope_cos_sin
from quantize.compute import Compute
from quantize.hessian import CrossAccumulator, HessianAccumulator, collect_hessians

BLOCKS = ("self_attn", "mlp")
RESIDUAL_LINEARS = ("self_attn.o_proj", "mlp.down_proj")  # output straight into the residual


def block_specs(block: str) -> list[LinearSpec]:
    return [spec for spec in DECODER_LINEARS if spec.module == block]


class BlockRunner:
    """Runs one block of one layer over row states ([L, hidden] each)."""

    def __init__(self, layer: DecoderLayer, text: TextConfig, length: int, compute: Compute):
        self.layer = layer.to(device=compute.device, dtype=compute.dtype)
        self.compute = compute
        positions = torch.arange(length, device=compute.device)
        self.cos, self.sin = rope_cos_sin(positions, text.head_dim, text.rope_theta, compute.dtype)

    def resident(self, states: Sequence[Tensor]) -> list[Tensor]:
        """The rows on the compute device, once (a measurement runs every anchor over them)."""
        return [s.to(self.compute.device, self.compute.dtype) for s in states]

    def forward(self, block: str, x: Tensor) -> Tensor:
        """x [1, L, hidden] on device -> block output (residual included)."""
        if block == "self_attn":
            return self.layer.attention_block(x, self.cos, self.sin)
        return self.layer.mlp_block(x)

    @torch.no_grad()
    def run(self, block: str, states: Sequence[Tensor], on_device: bool = False) -> list[Tensor]:
        """Block outputs for every row: back on the CPU in fp16, or kept on the device."""
        outputs = []
        for s in states:
            y = self.forward(block, s.to(self.compute.device, self.compute.dtype)[None])[0]
            outputs.append(y if on_device else y.half().cpu())
        return outputs

    @torch.no_grad()
    def hessians(
        self,
        block: str,
        states: Sequence[Tensor],
        weights: Sequence[Tensor] | None = None,
        on_device: bool = False,
        keep_outputs: bool = True,
    ) -> tuple[dict[str, HessianAccumulator], list[Tensor]]:
        """The Hessian accumulator of each input group of the block (tokens weighted by `weights`,
        one [L] per row), and the block's outputs with the current weights (without `keep_outputs`,
        each pass stops once the last linear's input is in: its output would be thrown away)."""
        last = self.layer.get_submodule(block_specs(block)[-1].name)
        with collect_hessians(self.layer, block_specs(block), self.compute.device) as accumulators:
            stop = None if keep_outputs else last.register_forward_pre_hook(_stop)
            outputs = []
            try:
                for index, state in enumerate(states):
                    for accumulator in accumulators.values():
                        accumulator.token_weight = None if weights is None else weights[index]
                    try:
                        outputs += self.run(block, [state], on_device)
                    except _Enough:
                        pass
            finally:
                if stop is not None:
                    stop.remove()
        return accumulators, outputs

    @torch.no_grad()
    def cross_hessian(
        self,
        block: str,
        group: str,
        states: Iterable[Tensor],
        reference: Iterable[Tensor],
        fp16_weights: dict[str, Tensor],
        weights: Sequence[Tensor] | None = None,
    ) -> CrossAccumulator:
        """The Hessian of input group `group`'s inputs x on `states` (a tier's stream, run with the
        block's current weights: those quantized so far) and the cross term against its inputs x_ref
        on `reference` (the fp16 stream, same rows, run with `fp16_weights`, the block's linears by
        name before quantizing), token-weighted. Each pass stops at the group's first linear."""
        specs = block_specs(block)
        linear = self.layer.get_submodule(next(s.name for s in specs if s.hessian_group == group))
        current = {s.name: self.layer.get_submodule(s.name).weight.data for s in specs}
        captured: list[Tensor] = []

        def capture(_module: torch.nn.Module, args: tuple) -> None:
            captured.append(args[0])
            raise _Enough

        accumulator = CrossAccumulator(linear.in_features, self.compute.device)
        handle = linear.register_forward_pre_hook(capture)
        try:
            for index, (state, ref) in enumerate(zip(states, reference)):
                captured.clear()
                for rows, linears in ((ref, fp16_weights), (state, current)):
                    for name, weight in linears.items():
                        self.layer.get_submodule(name).weight.data = weight
                    try:
                        self.forward(block, rows.to(self.compute.device, self.compute.dtype)[None])
                    except _Enough:
                        pass
                accumulator.token_weight = None if weights is None else weights[index]
                accumulator.add_pair(captured[0], captured[1])
        finally:
            handle.remove()
            for name, weight in current.items():
                self.layer.get_submodule(name).weight.data = weight
        return accumulator

    @torch.no_grad()
    def squared_error(
        self, block: str, states: Sequence[Tensor], reference: Sequence[Tensor], weights: Sequence[Tensor] | None = None
    ) -> float:
        """Σ over rows and tokens of w·‖y − y_ref‖² (w = 1 without `weights`)."""
        total = 0.0
        for index, (s, ref) in enumerate(zip(states, reference)):
            y = self.forward(block, s.to(self.compute.device, self.compute.dtype)[None])[0].float()
            total += _token_sum(
                ((y - ref.to(y.device).float()) ** 2).sum(-1), None if weights is None else weights[index]
            )
        return total

    def set_weight(self, name: str, weight: Tensor) -> None:
        self.layer.get_submodule(name).weight.data = weight.to(self.compute.device, self.compute.dtype)


class _Enough(Exception):
    """Raised by a hook once the last linear's input was accumulated."""


def _stop(module: torch.nn.Module, args: tuple) -> None:
    raise _Enough


def energy(reference: Sequence[Tensor], weights: Sequence[Tensor] | None = None) -> float:
    """Σ w·‖y_ref‖²: what a block's squared error is relative to."""
    total = 0.0
    for index, ref in enumerate(reference):
        total += _token_sum((ref.float() ** 2).sum(-1), None if weights is None else weights[index])
    return max(total, 1e-30)


def _token_sum(per_token: Tensor, weight: Tensor | None) -> float:
    """Σ over tokens, each weighted by `weight` [L] when given."""
    return float(per_token.sum() if weight is None else (per_token * weight.to(per_token.device)).sum())
