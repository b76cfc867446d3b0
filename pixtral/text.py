"""The Mistral decoder of Pixtral, as plain PyTorch modules (gpt-fast style).

Module attribute names follow the HF Llava checkpoint, so `state_dict()` keys are the tensor names in
the files. q/k weights are in HF's rotate-half RoPE layout (the converter permutes Mistral's
interleaved layout). `DECODER_LINEARS` is the table the quantizer walks: it never imports these classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixtral.config import TextConfig
from pixtral.kv_cache import KVCache, LayerCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] (or broadcastable)."""
    return x * cos + rotate_half(x) * sin


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """1D RoPE tables for `positions` [T] -> cos, sin [T, head_dim], computed in fp32."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None, start: int = 0) -> Tensor:
        """x [B, T, hidden] at positions start..start+T; with `cache`, attends to its first `start` tokens too."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)  # [B, Hkv, start+T, D]
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if start == 0 or T == 1:  # a fresh square causal block, or one new token that sees everything
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # [B, H, T, D]
        else:  # new tokens after a cached prefix: token i sees keys 0..start+i
            mask = (
                torch.arange(start + T, device=x.device)[None, :]
                <= torch.arange(start, start + T, device=x.device)[:, None]
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def attention_block(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None, start: int = 0
    ) -> Tensor:
        return x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)

    def mlp_block(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None, start: int = 0) -> Tensor:
        return self.mlp_block(self.attention_block(x, cos, sin, cache, start))


class Decoder(nn.Module):
    """`language_model.model`: embeddings, layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """`language_model`: the decoder plus the untied head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self, inputs_embeds: Tensor, start_pos: int = 0, cache: KVCache | None = None, last_only: bool = False
    ) -> Tensor:
        """inputs_embeds [B, T, hidden] at positions start_pos.. -> logits [B, T, vocab] ([B, 1, vocab]
        with `last_only`). With `cache`, the first `start_pos` positions come from it and the new ones
        are appended to it."""
        T = inputs_embeds.shape[1]
        positions = torch.arange(start_pos, start_pos + T, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for index, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache.layers[index] if cache is not None else None, start_pos)
        if cache is not None:
            cache.length = start_pos + T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def hidden_states(self, inputs_embeds: Tensor) -> Tensor:
        """The final-norm hidden states [B, T, hidden] of a full (uncached) pass: the head's input."""
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)


@dataclass(frozen=True)
class LinearSpec:
    """One quantizable linear of a decoder layer.

    `module` is the block whose output error measures it; `hessian_group` names the input it shares
    with its siblings (q/k/v see the same normed input, gate/up likewise), so H is collected once.
    """

    name: str  # path inside the layer, e.g. "self_attn.q_proj"
    module: str  # "self_attn" | "mlp"
    hessian_group: str  # "attn_in" | "attn_out" | "mlp_in" | "mlp_down"

    def shape(self, cfg: TextConfig) -> tuple[int, int]:
        """(out_features, in_features) of this linear for `cfg`, as the modules define it."""
        return layer_shapes(cfg)[self.name]


DECODER_LINEARS: tuple[LinearSpec, ...] = (
    LinearSpec("self_attn.q_proj", "self_attn", "attn_in"),
    LinearSpec("self_attn.k_proj", "self_attn", "attn_in"),
    LinearSpec("self_attn.v_proj", "self_attn", "attn_in"),
    LinearSpec("self_attn.o_proj", "self_attn", "attn_out"),
    LinearSpec("mlp.gate_proj", "mlp", "mlp_in"),
    LinearSpec("mlp.up_proj", "mlp", "mlp_in"),
    LinearSpec("mlp.down_proj", "mlp", "mlp_down"),
)


def layer_shapes(cfg: TextConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear of a decoder layer, read off the modules (meta device)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    return {name: tuple(module.weight.shape) for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


LAYER_PREFIX = "language_model.model.layers."


def layer_prefix(index: int) -> str:
    return f"{LAYER_PREFIX}{index}."
