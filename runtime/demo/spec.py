"""Small Pixtrals of the real architecture: their sizes and their initial random weights.

The demo model is one (trained from these weights by runtime/demo/train.py); tests and benches build
others (tests/support/synthetic.py writes them as checkpoints). The weights are random but shaped like
a trained model's statistics where the quantizer cares: embeddings with a low-rank, anisotropic
structure and per-channel norm gains give correlated, uneven activations (the regime where GPTQ and
act-order pay off); residual-branch outputs are scaled down with depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pixtral.config import PixtralConfig, TextConfig, VisionConfig
from pixtral.model import PixtralModel

TOKENIZER_VOCAB = {"tekken": 131072, "spm": 32768}


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of a random model; vocab comes from the tokenizer kind."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    projector_bias: bool = True
    tokenizer: str = "tekken"
    seed: int = 0

    def config(self) -> PixtralConfig:
        text = TextConfig(
            vocab_size=TOKENIZER_VOCAB[self.tokenizer],
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=1e9,
            max_position_embeddings=131072,
        )
        vision = VisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            head_dim=self.vision_hidden_size // self.vision_heads,
        )
        return PixtralConfig(text=text, vision=vision, projector_bias=self.projector_bias)


def _gain(n: int, gen: torch.Generator, spread: float = 0.4) -> torch.Tensor:
    """Log-normal per-channel gains around 1: uneven channel scales, as trained norms have."""
    return torch.exp(spread * torch.randn(n, generator=gen))


def random_weights(cfg: PixtralConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, fp32 tensor) for every parameter of the model, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in PixtralModel(cfg).state_dict().items()}
    t = cfg.text
    rank = max(4, t.hidden_size // 4)
    basis = torch.randn(rank, t.hidden_size, generator=gen) * _gain(t.hidden_size, gen, 0.6)
    depth_scale = 1.0 / math.sqrt(2 * t.num_hidden_layers)
    for name, shape in shapes.items():
        if name == "language_model.model.embed_tokens.weight":
            low_rank = torch.randn(shape[0], rank, generator=gen) @ basis / math.sqrt(rank)
            yield name, low_rank + 0.3 * torch.randn(shape, generator=gen)
        elif name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            yield name, _gain(shape[0], gen)
        elif name.endswith(".bias"):
            yield name, 0.02 * torch.randn(shape, generator=gen)
        elif name.endswith("patch_conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            yield name, torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:
            fan_in = shape[1]
            scale = depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            # column gains make inputs of the next layer uneven, as in trained models
            weight = torch.randn(shape, generator=gen) * _gain(shape[1], gen, 0.3)
            yield name, weight * scale / math.sqrt(fan_in)
