"""The reference (CPU or any-device) backend's view of EXL2 layers: dequantized nn.Linear modules.

The weights are reconstructed exactly as exllamav2's reconstruct path does (fp16, bit for bit) and
then cast to the compute dtype, so the fp16 model code runs EXL2 files unchanged (a module swap).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pixtral.exl2.checkpoint import EXL2Checkpoint


class EXL2LinearLoader:
    """Supplies dequantized decoder linears from an EXL2 checkpoint (a pixtral.model.LinearLoader)."""

    def __init__(self, model_dir: str | Path):
        self.checkpoint = EXL2Checkpoint(model_dir)

    def has(self, prefix: str) -> bool:
        return self.checkpoint.has_layer(prefix)

    def load(self, prefix: str, out_features: int, dtype: torch.dtype, device: str | torch.device) -> nn.Linear:
        weight = self.checkpoint.dequantized(prefix)[:out_features]  # crop the padding to N'
        tensors = self.checkpoint.tensors(prefix)
        linear = nn.Linear(weight.shape[1], out_features, bias="bias" in tensors, device="meta")
        linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        if "bias" in tensors:
            linear.bias = nn.Parameter(
                tensors["bias"][:out_features].to(device=device, dtype=dtype), requires_grad=False
            )
        return linear
