"""Model configuration: frozen dataclasses parsed from an HF Llava/Pixtral `config.json`.

Pixtral ships as `LlavaForConditionalGeneration` with a Pixtral vision tower and a Mistral decoder.
Writers spell some fields differently (transformers 5 nests `rope_theta` under `rope_parameters`,
older files and exllamav2 use a top-level `rope_theta`), so the reader accepts both; the writer emits
the spelling exllamav2 0.3.2 reads (see ../shared/spec/exl2-format.md §5.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixtral.errors import UserError
from pixtral.exl2.metadata import EXL2Metadata


class ConfigError(UserError):
    """A config file that is not a Pixtral model, or lacks a field we need."""


@dataclass(frozen=True)
class TextConfig:
    """The Mistral decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1e9
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral vision encoder (no final norm, 2D RoPE, SiLU-gated MLP)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    patch_size: int = 16
    image_size: int = 1024
    rope_theta: float = 10000.0
    num_channels: int = 3

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class PixtralConfig:
    """Decoder + vision tower + projector, with the token ids that glue them."""

    text: TextConfig
    vision: VisionConfig
    image_token_index: int = 10
    projector_bias: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    # an EXL2 tier's quantization_config
    quantization: EXL2Metadata | None = field(default=None, compare=False, hash=False)


def _read(section: dict[str, Any], names: list[str], where: str, default: Any = None) -> Any:
    """First present key of `names` in `section` (dotted names walk sub-dicts)."""
    for name in names:
        node: Any = section
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    if default is not None:
        return default
    raise ConfigError(f"{where}: missing field {names[0]!r}")


def _rope_theta(section: dict[str, Any], where: str, default: float) -> float:
    return float(_read(section, ["rope_theta", "rope_parameters.rope_theta"], where, default))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> PixtralConfig:
    """Parse an HF Llava config dict into a `PixtralConfig`, with errors that name `source`."""
    archs = raw.get("architectures") or []
    if "LlavaForConditionalGeneration" not in archs:
        raise ConfigError(
            f"{source}: architectures is {archs!r}; expected ['LlavaForConditionalGeneration'] "
            "(a Pixtral model in HF Llava layout; convert Mistral-native checkpoints with `pixtral-exl2 convert`)"
        )
    vision_raw = raw.get("vision_config") or {}
    if vision_raw.get("model_type") != "pixtral":
        raise ConfigError(f"{source}: vision_config.model_type is {vision_raw.get('model_type')!r}; expected 'pixtral'")
    text_raw = raw.get("text_config") or {}
    where_t, where_v = f"{source} text_config", f"{source} vision_config"
    hidden = int(_read(text_raw, ["hidden_size"], where_t))
    heads = int(_read(text_raw, ["num_attention_heads"], where_t))
    text = TextConfig(
        vocab_size=int(_read(text_raw, ["vocab_size"], where_t)),
        hidden_size=hidden,
        intermediate_size=int(_read(text_raw, ["intermediate_size"], where_t)),
        num_hidden_layers=int(_read(text_raw, ["num_hidden_layers"], where_t)),
        num_attention_heads=heads,
        num_key_value_heads=int(_read(text_raw, ["num_key_value_heads"], where_t, heads)),
        head_dim=int(_read(text_raw, ["head_dim"], where_t, hidden // heads)),
        rope_theta=_rope_theta(text_raw, where_t, 1e9),
        rms_norm_eps=float(_read(text_raw, ["rms_norm_eps"], where_t, 1e-5)),
        max_position_embeddings=int(_read(text_raw, ["max_position_embeddings"], where_t, 131072)),
    )
    v_hidden = int(_read(vision_raw, ["hidden_size"], where_v, 1024))
    v_heads = int(_read(vision_raw, ["num_attention_heads"], where_v, 16))
    vision = VisionConfig(
        hidden_size=v_hidden,
        intermediate_size=int(_read(vision_raw, ["intermediate_size"], where_v, 4096)),
        num_hidden_layers=int(_read(vision_raw, ["num_hidden_layers"], where_v, 24)),
        num_attention_heads=v_heads,
        head_dim=int(_read(vision_raw, ["head_dim"], where_v, v_hidden // v_heads)),
        patch_size=int(_read(vision_raw, ["patch_size"], where_v, 16)),
        image_size=int(_read(vision_raw, ["image_size"], where_v, 1024)),
        rope_theta=_rope_theta(vision_raw, where_v, 10000.0),
        num_channels=int(_read(vision_raw, ["num_channels"], where_v, 3)),
    )
    _check_consistency(text, vision, source)
    eos = raw.get("eos_token_id", text_raw.get("eos_token_id", 2))
    return PixtralConfig(
        text=text,
        vision=vision,
        image_token_index=int(raw.get("image_token_index", 10)),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        bos_token_id=int(raw.get("bos_token_id", text_raw.get("bos_token_id", 1)) or 1),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos or 2),
        quantization=EXL2Metadata.from_json(raw["quantization_config"], source)
        if "quantization_config" in raw
        else None,
    )


def _check_consistency(text: TextConfig, vision: VisionConfig, source: str) -> None:
    if text.num_attention_heads % text.num_key_value_heads:
        raise ConfigError(
            f"{source}: text num_attention_heads {text.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {text.num_key_value_heads}"
        )
    if text.head_dim % 2 or vision.head_dim % 4:
        raise ConfigError(f"{source}: head_dim must be even (text) and a multiple of 4 (vision, 2D RoPE)")
    if vision.head_dim * vision.num_attention_heads != vision.hidden_size:
        raise ConfigError(
            f"{source}: vision head_dim {vision.head_dim} × num_attention_heads {vision.num_attention_heads} "
            f"!= hidden_size {vision.hidden_size}"
        )


def load_config(model_dir: str | Path) -> PixtralConfig:
    """Read and parse `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        tiers = sorted(Path(model_dir).glob("*bpw/config.json")) if Path(model_dir).is_dir() else []
        if tiers:  # a quantize output folder: its tiers are the models
            raise ConfigError(
                f"{model_dir}: a quantize output folder, not a model; pick a tier, e.g. {tiers[0].parent}"
            )
        raise ConfigError(f"{path}: not found; expected an HF Llava/Pixtral model directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    return parse_config(raw, str(path))


def with_top_level_context(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json with `max_position_embeddings` also at the top level, as text_config has it:
    TabbyAPI (exl2-checkpoint, backends/exllamav2/model.py) computes its default `rope_alpha: auto`
    from the top-level field and fails to load a Llava directory without it."""
    context = hf.get("text_config", {}).get("max_position_embeddings")
    if context is not None and hf.get("max_position_embeddings") is None:
        hf = {**hf, "max_position_embeddings": context}
    return hf
