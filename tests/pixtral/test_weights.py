"""Lazy checkpoint access: shards, name spellings, and errors that name the file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixtral.model import iter_layers, load_model
from pixtral.weights import Checkpoint, WeightsError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_reads_like_single(tiny_spm_model: Path) -> None:
    index = json.loads((tiny_spm_model / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    with Checkpoint(tiny_spm_model) as ckpt:
        assert ckpt.dtype("language_model.lm_head.weight") == "F16"
        assert ckpt.shape("language_model.lm_head.weight") == (32768, 64)


def test_layers_stream_one_at_a_time(tiny_model: Path) -> None:
    full = load_model(tiny_model)
    for index, layer in iter_layers(tiny_model):
        assert torch.equal(layer.mlp.down_proj.weight, full.language_model.model.layers[index].mlp.down_proj.weight)


def test_new_transformers_names_are_read(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model, tmp_path / "m")
    shard = next(model_dir.glob("model-*.safetensors"))
    tensors = load_file(shard)
    renamed = {}
    for name, tensor in tensors.items():
        name = name.replace("language_model.model.", "model.language_model.").replace(
            "language_model.lm_head.", "lm_head."
        )
        name = name.replace("vision_tower.", "model.vision_tower.").replace(
            "multi_modal_projector.", "model.multi_modal_projector."
        )
        renamed[name] = tensor
    shard.unlink()
    (model_dir / "model.safetensors.index.json").unlink()
    save_file(renamed, str(model_dir / "model.safetensors"))
    ids = torch.tensor([[1, 3, 1000, 2000, 4]])
    torch.testing.assert_close(load_model(model_dir)(ids), load_model(tiny_model)(ids), rtol=0, atol=0)


def test_missing_shard_is_named(tiny_spm_model: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_spm_model, tmp_path / "m")
    victim = sorted(model_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError, match=victim.name):
        load_model(model_dir)


def test_wrong_shape_is_named(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model, tmp_path / "m")
    shard = next(model_dir.glob("model-*.safetensors"))
    tensors = load_file(shard)
    tensors["language_model.model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64, dtype=torch.float16)
    save_file(tensors, str(shard))
    with pytest.raises(
        WeightsError, match=r"layers\.1\.mlp\.up_proj\.weight' has shape \[100, 64\], expected \[128, 64\]"
    ):
        load_model(model_dir)


def test_truncated_shard_is_named(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model, tmp_path / "m")
    shard = next(model_dir.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=f"{shard.name}: truncated"):
        Checkpoint(model_dir)


def test_missing_tensor_is_named(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_model, tmp_path / "m")
    shard = next(model_dir.glob("model-*.safetensors"))
    tensors = load_file(shard)
    del tensors["vision_tower.ln_pre.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(WeightsError, match="vision_tower.ln_pre.weight' missing"):
        load_model(model_dir)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_and_fp32_checkpoints_load(tmp_path: Path, dtype: torch.dtype) -> None:
    from tests.support.synthetic import SyntheticSpec, write_random_model

    model_dir = write_random_model(tmp_path / "m", SyntheticSpec(tokenizer="spm", seed=4), dtype=dtype)
    with Checkpoint(model_dir) as ckpt:
        stored = ckpt.get("language_model.model.layers.0.self_attn.q_proj.weight")
        assert stored.dtype == dtype
    model = load_model(model_dir)
    assert torch.equal(model.language_model.model.layers[0].self_attn.q_proj.weight, stored.float())
    assert torch.isfinite(model(torch.tensor([[1, 3, 500, 4]]))).all()
