"""Where and how the quantizer computes: the one place with device policy.

fp32 on the CPU; fp16 activations on CUDA (as exllamav2), with the GPTQ group step as a Triton
kernel there. (The previous algorithm is compared in bench/quantize.py, at a pinned revision.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixtral.device import resolve_device
from quantize.gptq import DAMP, GroupFn, quantize_group


@dataclass(frozen=True)
class Compute:
    device: torch.device
    dtype: torch.dtype
    damp: float = DAMP

    @staticmethod
    def for_device(name: str, damp: float = DAMP) -> Compute:
        device = resolve_device(name)
        return Compute(device, torch.float16 if device.type == "cuda" else torch.float32, damp)

    @property
    def group(self) -> GroupFn:
        """The GPTQ group step: the Triton kernel on CUDA, the torch reference elsewhere."""
        if self.device.type == "cuda":
            try:
                from quantize.gptq_triton import triton_quantize_group
            except ImportError:  # no triton: the reference runs on CUDA as well
                return quantize_group
            return triton_quantize_group
        return quantize_group
