"""The Pixtral vision encoder and the Llava projector, as plain PyTorch modules.

Several images are encoded in one sequence with block-diagonal attention (no image attends to
another), exactly as HF's `generate_block_attention_mask`. The 2D RoPE gives a patch at (row, col)
the angles `[row·f0, row·f2, …, col·f1, col·f3, …]` (../shared/spec/pixtral.md §1.5), applied in
rotate-half form because q/k weights are stored HF-permuted. There is no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixtral.config import PixtralConfig, VisionConfig
from pixtral.image import ImageError
from pixtral.text import MLP, RMSNorm, apply_rope

VISION_NORM_EPS = 1e-5  # fixed in Pixtral, independent of the text config


def rope_2d_cos_sin(grids: list[tuple[int, int]], cfg: VisionConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [num_patches, head_dim] for images with (rows, cols) patch grids, concatenated."""
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))  # [D/2]
    angles = []
    for rows, cols in grids:
        r = torch.arange(rows).repeat_interleave(cols).float()  # row-major patch order
        c = torch.arange(cols).repeat(rows).float()
        angles.append(torch.cat([torch.outer(r, freqs[::2]), torch.outer(c, freqs[1::2])], dim=-1))
    emb = torch.cat(angles, dim=0)  # [P, D/2]
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def block_diagonal_mask(sizes: list[int], device: torch.device) -> Tensor:
    """Boolean [P, P] mask, True where attention is allowed (within one image)."""
    image_of_patch = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )
    return image_of_patch[:, None] == image_of_patch[None, :]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        P = x.shape[0]  # x: [P, hidden]
        q = self.q_proj(x).view(P, self.n_heads, self.head_dim).transpose(0, 1)  # [H, P, D]
        k = self.k_proj(x).view(P, self.n_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(P, self.n_heads, self.head_dim).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [H, P, D]
        return self.o_proj(y.transpose(0, 1).reshape(P, -1))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    """`transformer`: the stack of vision layers (a container, so names match the checkpoint)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """`vision_tower`: pixel arrays -> one feature row per 16-px patch, images concatenated."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.transformer = VisionTransformer(cfg)

    def forward(self, images: list[Tensor]) -> Tensor:
        """images: list of [3, H, W] (H, W multiples of patch_size) -> [sum of patches, hidden]."""
        dtype = self.patch_conv.weight.dtype
        patches, grids = [], []
        for image in images:
            grid = self.patch_conv(image.to(dtype)[None])[0]  # [hidden, rows, cols]
            rows, cols = grid.shape[-2:]
            if max(rows, cols) > self.cfg.max_patches_per_side:
                raise ImageError(f"image grid {rows}x{cols} exceeds {self.cfg.max_patches_per_side} patches per side")
            patches.append(grid.flatten(1).T)  # [rows*cols, hidden], row-major
            grids.append((rows, cols))
        x = self.ln_pre(torch.cat(patches, dim=0))
        cos, sin = rope_2d_cos_sin(grids, self.cfg, x.dtype)
        mask = block_diagonal_mask([r * c for r, c in grids], x.device)
        for layer in self.transformer.layers:
            x = layer(x, cos.to(x.device), sin.to(x.device), mask)
        return x


class Projector(nn.Module):
    """`multi_modal_projector`: Linear -> GELU (exact erf) -> Linear, bias optional."""

    def __init__(self, cfg: PixtralConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
