"""The non-weight files of an HF Pixtral model directory.

config.json, generation_config.json, the tokenizer (converted from Mistral's own files),
chat_template.json, and the image-processor configs that transformers and exllamav2 read
(exllamav2 refuses a vision model without preprocessor_config.json, ../shared/spec/exl2-format.md §5.2).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .chat_template import chat_template
from .config import PixtralConfig, to_hf_dict
from .image import CLIP_MEAN, CLIP_STD
from .mistral_tokenizer import HFTokenizer, TokenizerSourceError, convert_mistral_tokenizer, write_hf_tokenizer
from .outputs import write_json

# the tokenizers mistral-common ships (../shared/spec/pixtral.md §1.4)
BUNDLED_TOKENIZERS = {
    "tekken": "tekken_240911.json",  # Pixtral-12B-2409
    "spm": "mistral_instruct_tokenizer_241114.model.v7m1",  # Pixtral-Large-Instruct-2411
}


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
