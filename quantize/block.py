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
    def cross_hessians(
        self, block: str, states: Iterable[Tensor], reference: Iterable[Tensor], weights: Sequence[Tensor] | None = None
    ) -> dict[str, CrossAccumulator]:
        """For each input group of the block: the Hessian of its inputs x on `states` (a tier's
        stream) and the cross term against its inputs x_ref on `reference` (the fp16 stream, same
        rows), token-weighted; the block's current weights run both."""
        specs = block_specs(block)
        groups = {spec.hessian_group: self.layer.get_submodule(spec.name) for spec in reversed(specs)}
        captured: dict[str, Tensor] = {}
        handles = [
            linear.register_forward_pre_hook(lambda _m, args, g=group: captured.__setitem__(g, args[0]))
            for group, linear in groups.items()
        ]
        stop = self.layer.get_submodule(specs[-1].name).register_forward_pre_hook(_stop)
        accumulators = {g: CrossAccumulator(linear.in_features, self.compute.device) for g, linear in groups.items()}
        try:
            for index, (state, ref) in enumerate(zip(states, reference)):
                inputs = []
                for rows in (ref, state):
                    captured.clear()
                    try:
                        self.forward(block, rows.to(self.compute.device, self.compute.dtype)[None])
                    except _Enough:
                        pass
                    inputs.append(dict(captured))
                for group, accumulator in accumulators.items():
                    accumulator.token_weight = None if weights is None else weights[index]
                    accumulator.add_pair(inputs[0][group], inputs[1][group])
        finally:
            for handle in (*handles, stop):
                handle.remove()
        return accumulators

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
