"""Hessians H = E[xᵀx] of each linear's input, collected with forward pre-hooks.

Linears that read the same input share one H (q/k/v: the normed residual; gate/up likewise); the
table in pixtral.text.DECODER_LINEARS says which, so nothing here knows the architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pixtral.text import LinearSpec


class HessianAccumulator:
    """Running sum of xᵀx over tokens, in fp32; `token_weight` [tokens] (set per row) weighs each
    token's outer product, e.g. image tokens less than text tokens."""

    def __init__(self, features: int, device: torch.device | str):
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0.0
        self.token_weight: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, K]
        if self.token_weight is None:
            self.H.addmm_(x2.T, x2)
            self.tokens += x2.shape[0]
        else:
            w = self.token_weight.to(x2.device, torch.float32)  # [tokens]
            self.H.addmm_((x2 * w[:, None]).T, x2)
            self.tokens += float(w.sum())

    def result(self) -> Tensor:
        """Mean outer product; the identity when no token was seen (then GPTQ reduces to RTN)."""
        if self.tokens == 0:
            return torch.eye(self.H.shape[0], device=self.H.device)
        return self.H / self.tokens


class CrossAccumulator(HessianAccumulator):
    """The Hessian of one stream's inputs x, and beside it D = Σ w·(x_ref − x)ᵀ x against another
    stream's inputs x_ref at the same tokens (asymmetric GPTQ: x a tier's, x_ref the fp16 model's),
    each token weighted as in H."""

    def __init__(self, features: int, device: torch.device | str):
        super().__init__(features, device)
        self.D = torch.zeros_like(self.H)

    def add_pair(self, x_ref: Tensor, x: Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, K]
        delta = x_ref.reshape(-1, x_ref.shape[-1]).float() - x2
        if self.token_weight is not None:
            delta = delta * self.token_weight.to(x2.device, torch.float32)[:, None]
        self.D.addmm_(delta.T, x2)
        self.add(x2)

    def cross(self) -> Tensor:
        """Mean D over the weighted tokens (zero when no token was seen)."""
        return self.D / max(self.tokens, 1e-30)


@contextmanager
def collect_hessians(
    layer: nn.Module, specs: list[LinearSpec], device: torch.device | str
) -> Iterator[dict[str, HessianAccumulator]]:
    """While active, every forward through `layer` adds the inputs of each Hessian group of `specs`."""
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for spec in specs:
        if spec.hessian_group in accumulators:
            continue  # siblings share the first one's input
        linear = layer.get_submodule(spec.name)
        accumulator = HessianAccumulator(linear.in_features, device)
        accumulators[spec.hessian_group] = accumulator
        handles.append(linear.register_forward_pre_hook(lambda _m, args, acc=accumulator: acc.add(args[0])))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
