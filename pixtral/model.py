"""Pixtral as a whole: vision tower + projector + decoder, and loading it from a model directory.

The projected image features replace the token embeddings at `[IMG]` positions only, in order of
appearance; `[IMG_BREAK]`/`[IMG_END]` keep their learned embeddings (../shared/spec/pixtral.md §2.3).
Loading is by canonical tensor name (see `weights.py`), with every shape checked against config.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from pixtral.config import PixtralConfig, load_config
from pixtral.exl2.linear import EXL2LinearLoader
from pixtral.image import ImageError
from pixtral.text import DecoderLayer, LanguageModel, layer_prefix
from pixtral.vision import Projector, VisionTower
from pixtral.weights import Checkpoint, WeightsError


class PixtralModel(nn.Module):
    """`LlavaForConditionalGeneration` for Pixtral, with checkpoint-compatible module names."""

    def __init__(self, cfg: PixtralConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = LanguageModel(cfg.text)

    @property
    def has_vision(self) -> bool:
        return self.vision_tower is not None

    def image_features(self, images: list[Tensor]) -> Tensor:
        """[3, H, W] pixel arrays -> projected features [sum of patches, text hidden]."""
        if self.vision_tower is None:
            raise ImageError(
                "this model has no vision tower (its checkpoint holds no vision_tower.* tensors); it cannot take images"
            )
        return self.multi_modal_projector(self.vision_tower(images))

    def embed(self, input_ids: Tensor, images: list[Tensor] | None = None) -> Tensor:
        """input_ids [B, T] -> embeddings [B, T, hidden] with image features at `[IMG]` positions."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if images:
            features = self.image_features(images).to(embeds.dtype)
            return insert_image_features(embeds, input_ids, features, self.cfg.image_token_index)
        return embeds

    def forward(self, input_ids: Tensor, images: list[Tensor] | None = None) -> Tensor:
        """input_ids [B, T], images in prompt order -> logits [B, T, vocab]."""
        return self.language_model(self.embed(input_ids, images))


def insert_image_features(embeds: Tensor, input_ids: Tensor, features: Tensor, image_token: int) -> Tensor:
    """Scatter `features` rows into `embeds` where `input_ids == image_token`, in order."""
    is_image = input_ids == image_token
    count = int(is_image.sum())
    if count != features.shape[0]:
        raise ImageError(f"prompt has {count} [IMG] tokens but the images give {features.shape[0]} patch features")
    out = embeds.clone()
    out[is_image] = features
    return out


def load_module(
    module: nn.Module, ckpt: Checkpoint, prefix: str, dtype: torch.dtype, device: str | torch.device
) -> None:
    """Fill every parameter of `module` from `ckpt` tensors named `prefix + param name`."""
    state = {}
    for name, param in module.state_dict().items():
        full = prefix + name
        if full not in ckpt:
            raise WeightsError(f"{ckpt.model_dir}: tensor {full!r} missing (needed by config.json)")
        state[name] = ckpt.get(full, tuple(param.shape)).to(device=device, dtype=dtype)
    module.load_state_dict(state, assign=True)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    linear_loader: LinearLoader | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PixtralModel:
    """Build and load the whole model, fp16/bf16 or EXL2 (dequantized); without vision tensors in
    the checkpoint, the model is text-only (`has_vision` False). For a checkpoint too large for
    memory, use `load_layer`.

    `linear_loader` supplies quantized linears; by default an EXL2 directory is detected by its
    `.q_weight` tensors and read with pixtral.exl2.linear.
    """
    cfg = load_config(model_dir)
    with torch.device("meta"):
        model = PixtralModel(cfg)
    with Checkpoint(model_dir) as ckpt:
        if linear_loader is None and any(name.endswith(".q_weight") for name in ckpt.names()):
            linear_loader = EXL2LinearLoader(model_dir)
        if "vision_tower.patch_conv.weight" in ckpt:
            load_module(model.vision_tower, ckpt, "vision_tower.", dtype, device)
            load_module(model.multi_modal_projector, ckpt, "multi_modal_projector.", dtype, device)
        else:  # EXL2 files from exllamav2 before 2024-11 dropped the vision tensors: text only
            model.vision_tower, model.multi_modal_projector = None, None
        lm = model.language_model
        load_module(lm.model.embed_tokens, ckpt, "language_model.model.embed_tokens.", dtype, device)
        load_module(lm.model.norm, ckpt, "language_model.model.norm.", dtype, device)
        for index in range(cfg.text.num_hidden_layers):
            lm.model.layers[index] = load_layer(ckpt, cfg, index, dtype, device, linear_loader)
            if progress is not None:
                progress(index + 1, cfg.text.num_hidden_layers)
        if linear_loader is not None and linear_loader.has("language_model.lm_head"):
            lm.lm_head = linear_loader.load("language_model.lm_head", cfg.text.vocab_size, dtype, device)
        else:
            load_module(lm.lm_head, ckpt, "language_model.lm_head.", dtype, device)
    return model.eval()


class LinearLoader(Protocol):
    """A source of (dequantized) decoder linears, e.g. pixtral.exl2.linear.EXL2LinearLoader."""

    def has(self, prefix: str) -> bool: ...

    def load(self, prefix: str, out_features: int, dtype: torch.dtype, device: str | torch.device) -> nn.Linear: ...


def load_layer(
    ckpt: Checkpoint,
    cfg: PixtralConfig,
    index: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    linear_loader: LinearLoader | None = None,
) -> DecoderLayer:
    """Load decoder layer `index` alone: what the quantizer streams, one layer at a time."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg.text)
    prefix = layer_prefix(index)
    for name, child in list(layer.named_modules()):
        if isinstance(child, nn.Linear) and linear_loader is not None and linear_loader.has(prefix + name):
            parent_name, _, attr = name.rpartition(".")
            loaded = linear_loader.load(prefix + name, child.out_features, dtype, device)
            setattr(layer.get_submodule(parent_name), attr, loaded)
    fp_names = [n for n, p in layer.named_parameters() if p.is_meta]
    state = {}
    for name in fp_names:
        shape = tuple(layer.get_parameter(name).shape)
        state[name] = ckpt.get(prefix + name, shape).to(device=device, dtype=dtype)
    layer.load_state_dict(state, assign=True, strict=False)
    return layer


def iter_layers(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Iterable[tuple[int, DecoderLayer]]:
    """Yield (index, layer) one at a time; only one layer is resident per step."""
    cfg = load_config(model_dir)
    with Checkpoint(model_dir) as ckpt:
        for index in range(cfg.text.num_hidden_layers):
            yield index, load_layer(ckpt, cfg, index, dtype, device)


def parameter_counts(cfg: PixtralConfig) -> dict[str, int]:
    """Parameters per component, counted on the modules themselves (built on the meta device)."""
    with torch.device("meta"):
        model = PixtralModel(cfg)

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    lm = model.language_model
    norms = sum(count(layer.input_layernorm) + count(layer.post_attention_layernorm) for layer in lm.model.layers)
    decoder, vision, projector = count(lm), count(model.vision_tower), count(model.multi_modal_projector)
    return {
        "decoder": decoder,
        "decoder_linears": count(lm.model.layers) - norms,
        "embed_and_head": count(lm.model.embed_tokens) + count(lm.lm_head),
        "vision": vision,
        "projector": projector,
        "total": decoder + vision + projector,
    }
