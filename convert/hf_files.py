"""The non-weight files of an HF Pixtral model directory.

config.json, generation_config.json, the tokenizer (converted from Mistral's own files),
chat_template.json, and the image-processor configs that transformers and exllamav2 read
(exllamav2 refuses a vision model without preprocessor_config.json, ../shared/spec/exl2-format.md §5.2).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path
from typing import Any

from convert.tokenizer import HFTokenizer, TokenizerSourceError, convert_mistral_tokenizer, write_hf_tokenizer
from pixtral.chat_template import chat_template
from pixtral.config import PixtralConfig, with_top_level_context
from pixtral.image import CLIP_MEAN, CLIP_STD
from pixtral.outputs import write_json

# the tokenizers mistral-common ships (../shared/spec/pixtral.md §1.4)
BUNDLED_TOKENIZERS = {
    "tekken": "tekken_240911.json",  # Pixtral-12B-2409
    "spm": "mistral_instruct_tokenizer_241114.model.v7m1",  # Pixtral-Large-Instruct-2411
}


def to_hf_dict(config: PixtralConfig, dtype: str = "float16") -> dict[str, Any]:
    """The config.json this project writes: readable by transformers and by exllamav2 0.3.2.

    Pixtral has no sliding window (transformers' Mistral default of 4096 is wrong for it), the
    vision MLP is SiLU (PixtralVisionConfig's default "gelu" is wrong), and exllamav2 requires
    `vision_config.{head_dim, hidden_act, patch_size, rope_theta}` and `vision_feature_layer`.
    """
    text = asdict(config.text)
    text.update(
        model_type="mistral",
        hidden_act="silu",
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        torch_dtype=dtype,
    )
    vision = asdict(config.vision)
    vision.update(model_type="pixtral", hidden_act="silu", attention_dropout=0.0, torch_dtype=dtype)
    out: dict[str, Any] = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": config.image_token_index,
        "image_seq_length": 1,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }
    if config.quantization is not None:
        out["quantization_config"] = config.quantization.to_json()
    return with_top_level_context(out)


def bundled_tokenizer_path(kind: str) -> Path:
    """Path of a real Mistral tokenizer inside the installed mistral-common package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed; it ships the real Pixtral tokenizers")
    path = Path(spec.submodule_search_locations[0]) / "data" / BUNDLED_TOKENIZERS[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed mistral-common")
    return path


def write_tokenizer_files(converted: HFTokenizer, out_dir: Path, config: PixtralConfig) -> None:
    """tokenizer.json (+ configs) and chat_template.json (read by HF processors) for the tokenizer."""
    template = chat_template(converted.kind)
    write_hf_tokenizer(converted, out_dir, config.text.max_position_embeddings, template)
    write_json(out_dir / "chat_template.json", {"chat_template": template})


def write_processor_files(out_dir: Path, config: PixtralConfig) -> None:
    """preprocessor_config.json and processor_config.json (patch 16, longest edge 1024, CLIP)."""
    patch = config.vision.patch_size
    write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "PixtralImageProcessor",
            "processor_class": "PixtralProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "patch_size": {"height": patch, "width": patch},
            "resample": 3,  # PIL bicubic
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": config.vision.image_size},
        },
    )
    write_json(
        out_dir / "processor_config.json",
        {
            "processor_class": "PixtralProcessor",
            "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]",
            "patch_size": patch,
            "spatial_merge_size": 1,
        },
    )


def write_config_files(out_dir: Path, config: PixtralConfig, dtype: str, pad_token_id: int | None) -> None:
    """config.json and generation_config.json."""
    write_json(out_dir / "config.json", to_hf_dict(config, dtype))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if pad_token_id is not None:
        generation["pad_token_id"] = pad_token_id
    write_json(out_dir / "generation_config.json", generation)


def write_model_files(out_dir: Path, config: PixtralConfig, tokenizer_source: Path, dtype: str) -> HFTokenizer:
    """Every non-weight file of the model directory; returns the converted tokenizer."""
    converted = convert_mistral_tokenizer(tokenizer_source)
    if converted.tokenizer.get_vocab_size() != config.text.vocab_size:
        raise TokenizerSourceError(
            f"{tokenizer_source}: tokenizer has {converted.tokenizer.get_vocab_size()} tokens "
            f"but the model's vocab_size is {config.text.vocab_size}"
        )
    write_tokenizer_files(converted, out_dir, config)
    write_processor_files(out_dir, config)
    pad = converted.tokenizer.token_to_id(converted.pad) if converted.pad else None
    write_config_files(out_dir, config, dtype, pad)
    return converted
