"""Mistral-native Pixtral (params.json, consolidated*.safetensors, tekken.json / tokenizer.model.v7m1)
-> HF Llava directory (config, renamed and q/k-permuted weights, tokenizer, chat template, processor).

Spec: ../shared/spec/pixtral.md §1, §3, §4, §6. One mapping table and one permutation function:
Mistral rotates adjacent pairs (interleaved RoPE); HF and exllamav2 rotate halves, so the rows of
every q and k projection — decoder and vision encoder alike — are reordered inside each head, evens
first. v, o, MLPs, norms, patch_conv and the projector are copied unchanged. Tensors stream one at
a time from the source shards into output shards, so a 124B model never sits in memory.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from convert.hf_files import write_model_files
from pixtral.config import PixtralConfig, TextConfig, VisionConfig
from pixtral.errors import UserError
from pixtral.exl2.checkpoint import natural_key
from pixtral.outputs import atomic_directory
from pixtral.weights import ShardWriter, read_safetensors_header

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model")
EXTRA_FILES = ("SYSTEM_PROMPT.txt",)

# per-layer tensors, identical in the decoder and the vision encoder: (native suffix, HF suffix, permuted by)
ATTENTION = (("wq", "q_proj", "q"), ("wk", "k_proj", "k"), ("wv", "v_proj", None), ("wo", "o_proj", None))
FEED_FORWARD = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))  # w1 = gate, w3 = up, w2 = down
LAYER_TENSORS = (
    "attention_norm",
    "ffn_norm",
    *(f"attention.{w}" for w, _, _ in ATTENTION),
    *(f"feed_forward.{w}" for w, _ in FEED_FORWARD),
)


def _layer_rules(
    native: str, hf: str, norms: tuple[str, str], attention: str, mlp: str, heads: dict
) -> list[tuple[str, str, str | None]]:
    rules = [
        (native + r"attention_norm\.weight", f"{hf}{norms[0]}.weight", None),
        (native + r"ffn_norm\.weight", f"{hf}{norms[1]}.weight", None),
    ]
    rules += [
        (native + rf"attention\.{w}\.weight", f"{hf}{attention}.{proj}.weight", heads.get(qk))
        for w, proj, qk in ATTENTION
    ]
    rules += [(native + rf"feed_forward\.{w}\.weight", f"{hf}{mlp}.{proj}.weight", None) for w, proj in FEED_FORWARD]
    return rules


# (native name pattern, HF name template, which head count permutes it: None | "text_q" | "text_kv" | "vision")
NAME_MAP: tuple[tuple[str, str, str | None], ...] = (
    (r"tok_embeddings\.weight", "language_model.model.embed_tokens.weight", None),
    (r"norm\.weight", "language_model.model.norm.weight", None),
    (r"output\.weight", "language_model.lm_head.weight", None),
    *_layer_rules(r"layers\.(\d+)\.", r"language_model.model.layers.\1.",
                  ("input_layernorm", "post_attention_layernorm"), "self_attn", "mlp", {"q": "text_q", "k": "text_kv"}),
    (r"vision_encoder\.patch_conv\.weight", "vision_tower.patch_conv.weight", None),
    (r"vision_encoder\.ln_pre\.weight", "vision_tower.ln_pre.weight", None),
    *_layer_rules(r"vision_encoder\.transformer\.layers\.(\d+)\.", r"vision_tower.transformer.layers.\1.",
                  ("attention_norm", "ffn_norm"), "attention", "feed_forward", {"q": "vision", "k": "vision"}),
    (r"vision_language_adapter\.w_in\.(weight|bias)", r"multi_modal_projector.linear_1.\1", None),
    (r"vision_language_adapter\.w_out\.(weight|bias)", r"multi_modal_projector.linear_2.\1", None),
)  # fmt: skip
_COMPILED = tuple((re.compile(pattern + "$"), template, permute) for pattern, template, permute in NAME_MAP)


class ConversionError(UserError):
    """A source that is not a Mistral-native Pixtral checkpoint, or an inconsistent one."""


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Interleaved (Mistral) -> rotate-half (HF) row order inside each head: evens, then odds."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse: HF -> Mistral-native row order."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(native: str) -> tuple[str, str | None]:
    """(HF tensor name, permutation kind) for a native name; raises for names Pixtral does not have."""
    for pattern, template, permute in _COMPILED:
        if pattern.match(native):
            return pattern.sub(template, native), permute
    raise ConversionError(
        f"unexpected tensor {native!r}: not part of a Pixtral checkpoint (a Mistral 3 model, or a LoRA?)"
    )


@dataclass(frozen=True)
class NativeSource:
    """What a Mistral-native directory holds."""

    root: Path
    params: dict[str, Any]
    shards: tuple[Path, ...]
    tokenizer: Path
    names: dict[str, Path]  # native tensor name -> its shard


def read_source(src: Path) -> NativeSource:
    """Find and check params.json, the consolidated shards and the tokenizer of a native checkpoint."""
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    params_path = src / "params.json"
    if not params_path.is_file():
        if (src / "config.json").is_file():
            raise ConversionError(f"{src}: already in HF layout (config.json, no params.json); nothing to convert")
        raise ConversionError(f"{src}: no params.json; expected a Mistral-native Pixtral checkpoint")
    try:
        params = json.loads(params_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{params_path}: not valid JSON ({err})") from err
    if not isinstance(params.get("vision_encoder"), dict):
        raise ConversionError(f"{params_path}: no vision_encoder block; this is a text-only Mistral model, not Pixtral")
    tokenizer = next((src / name for name in TOKENIZER_FILES if (src / name).is_file()), None)
    if tokenizer is None:
        raise ConversionError(f"{src}: no tokenizer file (expected one of {', '.join(TOKENIZER_FILES)})")
    shards = tuple(sorted(src.glob("consolidated*.safetensors"), key=lambda p: natural_key(p.name)))
    if not shards:
        raise ConversionError(f"{src}: no consolidated*.safetensors weights")
    _check_index(src, shards)
    names: dict[str, Path] = {}
    for shard in shards:
        for name in read_safetensors_header(shard):
            if name in names:
                raise ConversionError(
                    f"{src}: tensor {name!r} is in both {names[name].name} and {shard.name}: mismatched shard sets"
                )
            names[name] = shard
    return NativeSource(src, params, shards, tokenizer, names)


def _check_index(src: Path, shards: tuple[Path, ...]) -> None:
    """A shard index, when present, must name exactly the shard files that are there."""
    for index in src.glob("consolidated*.index.json"):
        listed = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        present = {p.name for p in shards}
        if listed != present:
            missing, extra = sorted(listed - present), sorted(present - listed)
            raise ConversionError(
                f"{index}: mismatched shard sets (listed but missing: {missing}; present but not listed: {extra})"
            )


def pixtral_config(params: dict[str, Any], projector_bias: bool, source: str) -> PixtralConfig:
    """HF-side config from params.json (Pixtral has no sliding window; its vision MLP is SiLU)."""
    vision = params["vision_encoder"]
    try:
        heads = int(params["n_heads"])
        text = TextConfig(
            vocab_size=int(params["vocab_size"]),
            hidden_size=int(params["dim"]),
            intermediate_size=int(params["hidden_dim"]),
            num_hidden_layers=int(params["n_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(params.get("n_kv_heads", heads)),
            head_dim=int(params.get("head_dim") or params["dim"] // heads),
            rope_theta=float(params.get("rope_theta", 1e9)),
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            max_position_embeddings=int(params.get("max_position_embeddings", params.get("max_seq_len", 131072))),
        )
        v_heads = int(vision["num_attention_heads"])
        vision_cfg = VisionConfig(
            hidden_size=int(vision["hidden_size"]),
            intermediate_size=int(vision["intermediate_size"]),
            num_hidden_layers=int(vision["num_hidden_layers"]),
            num_attention_heads=v_heads,
            head_dim=int(vision["hidden_size"]) // v_heads,
            patch_size=int(vision.get("patch_size", 16)),
            image_size=int(vision.get("image_size", 1024)),
            rope_theta=float(vision.get("rope_theta", 10000.0)),
            num_channels=int(vision.get("num_channels", 3)),
        )
    except KeyError as err:
        raise ConversionError(f"{source}: missing field {err.args[0]!r}") from err
    if vision.get("spatial_merge_size", 1) != 1 or vision.get("add_pre_mm_projector_layer_norm"):
        raise ConversionError(f"{source}: spatial merging / pre-projector norm is Mistral 3, not Pixtral")
    return PixtralConfig(
        text, vision_cfg, image_token_index=int(vision.get("image_token_id", 10)), projector_bias=projector_bias
    )


def _expected_names(cfg: PixtralConfig) -> set[str]:
    """Every native tensor name a checkpoint of this config must hold."""
    names = {
        "tok_embeddings.weight",
        "norm.weight",
        "output.weight",
        "vision_encoder.patch_conv.weight",
        "vision_encoder.ln_pre.weight",
        "vision_language_adapter.w_in.weight",
        "vision_language_adapter.w_out.weight",
    }
    names |= {f"layers.{i}.{t}.weight" for i in range(cfg.text.num_hidden_layers) for t in LAYER_TENSORS}
    names |= {
        f"vision_encoder.transformer.layers.{i}.{t}.weight"
        for i in range(cfg.vision.num_hidden_layers)
        for t in LAYER_TENSORS
    }
    if cfg.projector_bias:
        names |= {"vision_language_adapter.w_in.bias", "vision_language_adapter.w_out.bias"}
    return names


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    shard_mb: int = 4096,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PixtralConfig:
    """Convert a Mistral-native Pixtral directory into an HF Llava directory at `dst` (atomically)."""
    source = read_source(Path(src))
    has_bias = "vision_language_adapter.w_in.bias" in source.names
    declared = source.params["vision_encoder"].get("adapter_bias")
    if declared is not None and bool(declared) != has_bias:
        raise ConversionError(
            f"{source.root}/params.json: adapter_bias is {declared} but the projector bias tensors are "
            f"{'present' if has_bias else 'absent'}"
        )
    cfg = pixtral_config(source.params, has_bias, str(source.root / "params.json"))
    expected = _expected_names(cfg)
    missing, unexpected = sorted(expected - set(source.names), key=natural_key), sorted(set(source.names) - expected)
    if missing:
        raise ConversionError(
            f"{source.root}: {len(missing)} tensor(s) missing from the shards, e.g. {missing[0]!r} "
            "(mismatched shard sets?)"
        )
    for name in unexpected:
        hf_name(name)  # raises with a clear message for foreign tensors
        raise ConversionError(
            f"{source.root}: tensor {name!r} does not fit params.json ({cfg.text.num_hidden_layers} decoder, "
            f"{cfg.vision.num_hidden_layers} vision layers): mismatched shard sets?"
        )
    heads = {
        "text_q": cfg.text.num_attention_heads,
        "text_kv": cfg.text.num_key_value_heads,
        "vision": cfg.vision.num_attention_heads,
    }
    with atomic_directory(dst, force, "convert", [source.root]) as tmp:
        target_dtype = DTYPES[dtype] if dtype else None
        writer = ShardWriter(tmp, "model", shard_mb * 2**20)
        for shard_index, shard in enumerate(source.shards, start=1):
            with safe_open(str(shard), "pt") as handle:
                for native in sorted(handle.keys(), key=natural_key):
                    name, permute = hf_name(native)
                    tensor = handle.get_tensor(native)
                    if permute:
                        tensor = permute_for_rope(tensor, heads[permute])
                    writer.add(name, tensor.to(target_dtype) if target_dtype else tensor)
            if progress:
                progress(shard_index, len(source.shards))
        writer.finish()
        write_model_files(tmp, cfg, source.tokenizer, dtype or _source_dtype(source))
        for extra in EXTRA_FILES:
            if (source.root / extra).is_file():
                shutil.copy2(source.root / extra, tmp / extra)
    return cfg


def _source_dtype(source: NativeSource) -> str:
    """The checkpoint's dtype, as the embedding table has it."""
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    shard = source.names["tok_embeddings.weight"]
    return names.get(read_safetensors_header(shard)["tok_embeddings.weight"]["dtype"], "bfloat16")
