"""Mistral-native -> HF Llava conversion, checked against a forward pass written here for the native
format (interleaved complex RoPE, Mistral tensor names): transformers on the converted directory must
give the same logits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PARAMS, native_weights, write_native
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli import app
from convert.mistral import ConversionError, convert, permute_for_rope, unpermute_for_rope
from pixtral.config import load_config
from pixtral.image import encode_image
from pixtral.tokenizer import PixtralTokenizer

transformers = pytest.importorskip("transformers")

# --- the native-format oracle ------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Mistral's RoPE: rotate adjacent pairs (x[2k], x[2k+1]) as complex numbers. x [T, H, D], angles [T, D/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = xc * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(rotated).reshape(x.shape)


def _attention(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    p: str,
    heads: int,
    kv_heads: int,
    angles: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    T = x.shape[0]
    q = (x @ w[p + "wq.weight"].T).view(T, heads, -1)
    k = (x @ w[p + "wk.weight"].T).view(T, kv_heads, -1)
    v = (x @ w[p + "wv.weight"].T).view(T, kv_heads, -1)
    q, k = _rotate_interleaved(q, angles), _rotate_interleaved(k, angles)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    out = torch.einsum("hts,shd->thd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    return out.reshape(T, -1) @ w[p + "wo.weight"].T


def _ffn(x: torch.Tensor, w: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return (F.silu(x @ w[p + "w1.weight"].T) * (x @ w[p + "w3.weight"].T)) @ w[p + "w2.weight"].T


def native_vision(w: dict[str, torch.Tensor], params: dict, pixels: list[torch.Tensor]) -> torch.Tensor:
    v = params["vision_encoder"]
    hd = v["hidden_size"] // v["num_attention_heads"]
    freqs = 1.0 / (v["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    patches, angles, owner = [], [], []
    for index, image in enumerate(pixels):
        grid = F.conv2d(image[None], w["vision_encoder.patch_conv.weight"], stride=16)[0]
        rows, cols = grid.shape[1:]
        patches.append(grid.flatten(1).T)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        angles.append(torch.cat([r.reshape(-1, 1) * freqs[::2], c.reshape(-1, 1) * freqs[1::2]], -1))
        owner += [index] * (rows * cols)
    x = _rms(torch.cat(patches), w["vision_encoder.ln_pre.weight"])
    angles_all, owner_t = torch.cat(angles), torch.tensor(owner)
    mask = owner_t[:, None] == owner_t[None, :]
    for i in range(v["num_hidden_layers"]):
        p = f"vision_encoder.transformer.layers.{i}."
        x = x + _attention(
            _rms(x, w[p + "attention_norm.weight"]),
            w,
            p + "attention.",
            v["num_attention_heads"],
            v["num_attention_heads"],
            angles_all,
            mask,
        )
        x = x + _ffn(_rms(x, w[p + "ffn_norm.weight"]), w, p + "feed_forward.")
    h = x @ w["vision_language_adapter.w_in.weight"].T + w.get("vision_language_adapter.w_in.bias", 0)
    return F.gelu(h) @ w["vision_language_adapter.w_out.weight"].T + w.get("vision_language_adapter.w_out.bias", 0)


def native_logits(w: dict[str, torch.Tensor], params: dict, ids: list[int], pixels: list[torch.Tensor]) -> torch.Tensor:
    w = {k: t.float() for k, t in w.items()}
    x = w["tok_embeddings.weight"][torch.tensor(ids)]
    if pixels:
        x[torch.tensor(ids) == params["vision_encoder"]["image_token_id"]] = native_vision(w, params, pixels)
    T, hd = len(ids), params["head_dim"]
    angles = torch.arange(T).float()[:, None] * (1.0 / params["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = x + _attention(
            _rms(x, w[p + "attention_norm.weight"]),
            w,
            p + "attention.",
            params["n_heads"],
            params["n_kv_heads"],
            angles,
            causal,
        )
        x = x + _ffn(_rms(x, w[p + "ffn_norm.weight"]), w, p + "feed_forward.")
    return _rms(x, w["norm.weight"]) @ w["output.weight"].T


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer,bias", [("tekken", True), ("spm", False)])
def test_converted_model_matches_native_forward(tmp_path: Path, tokenizer: str, bias: bool) -> None:
    params = json.loads(json.dumps(PARAMS))
    if tokenizer == "tekken":
        params["vocab_size"] = 131072
    src = write_native(tmp_path / "native", params, tokenizer, bias)
    dst = tmp_path / "hf"
    cfg = convert(src, dst, dtype="float32")
    assert cfg.projector_bias is bias
    config = json.loads((dst / "config.json").read_text())
    assert config["multimodal_projector_bias"] is bias and config["vision_config"]["hidden_act"] == "silu"
    assert config["text_config"]["sliding_window"] is None and config["text_config"]["head_dim"] == 16

    tok = PixtralTokenizer(dst)
    rng = np.random.default_rng(0)
    image_tokens, pixels = encode_image(
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)), tok.image_ids
    )
    ids = [tok.bos_id] + tok.encode("[INST]") + image_tokens + tok.encode("What is it?[/INST]")
    weights = native_weights(params | {"vision_encoder": params["vision_encoder"] | {"adapter_bias": bias}}, bias)
    weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}  # what the shards hold
    expected = native_logits(weights, params, ids, [torch.from_numpy(pixels)])

    model = transformers.LlavaForConditionalGeneration.from_pretrained(dst, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.from_numpy(pixels)[None],
            image_sizes=torch.tensor([pixels.shape[1:]]),
        ).logits[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (dst / "tokenizer.json").is_file() and (dst / "chat_template.json").is_file()
    assert json.loads((dst / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 1024


def test_permutation_round_trip_and_pairs() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    p = permute_for_rope(w, heads=4)
    assert torch.equal(unpermute_for_rope(p, heads=4), w)
    assert torch.equal(p[:4], w[[0, 2, 4, 6]])  # head 0: even rows first
    assert torch.equal(p[4:8], w[[1, 3, 5, 7]])


def test_streamed_output_is_sharded_and_dtype_kept(tmp_path: Path) -> None:
    src = write_native(tmp_path / "native", PARAMS, "spm", bias=False, shards=3)
    dst = tmp_path / "hf"
    convert(src, dst, shard_mb=1)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert load_config(dst).text.num_hidden_layers == 2
    from pixtral.weights import Checkpoint

    with Checkpoint(dst) as ckpt:
        assert {ckpt.dtype(n) for n in ckpt.names()} == {"BF16"}


def test_cli_convert_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    src = write_native(tmp_path / "native", PARAMS, "spm", bias=False)
    ok = runner.invoke(app, ["convert", str(src), str(tmp_path / "hf")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["convert", str(src), str(tmp_path / "hf")])
    assert again.exit_code == 2 and "already exists" in again.output

    already_hf = runner.invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "x")])
    assert already_hf.exit_code == 2 and "already in HF layout" in already_hf.output

    text_only = tmp_path / "text-only"
    shutil.copytree(src, text_only)
    params = json.loads((text_only / "params.json").read_text())
    del params["vision_encoder"]
    (text_only / "params.json").write_text(json.dumps(params))
    result = runner.invoke(app, ["convert", str(text_only), str(tmp_path / "y")])
    assert result.exit_code == 2 and "no vision_encoder" in result.output

    mismatched = tmp_path / "mismatched"
    shutil.copytree(src, mismatched)
    sorted(mismatched.glob("consolidated-*.safetensors"))[0].unlink()
    result = runner.invoke(app, ["convert", str(mismatched), str(tmp_path / "z")])
    assert result.exit_code == 2 and "mismatched shard sets" in result.output
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z.tmp*"))


def test_failed_conversion_leaves_no_destination(tmp_path: Path) -> None:
    src = write_native(tmp_path / "native", PARAMS, "spm", bias=False)
    # a projector bias that params.json says is absent
    save_file(
        {"vision_language_adapter.w_in.bias": torch.zeros(64, dtype=torch.bfloat16)},
        str(src / "consolidated-extra.safetensors"),
    )
    with pytest.raises(ConversionError, match="adapter_bias is False"):
        convert(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
    (src / "consolidated-extra.safetensors").unlink()
    save_file({"patch_merger.merging_layer.weight": torch.zeros(4, 4)}, str(src / "consolidated-extra.safetensors"))
    with pytest.raises(ConversionError, match="unexpected tensor 'patch_merger"):
        convert(src, tmp_path / "hf")
    (src / "consolidated-extra.safetensors").unlink()
    save_file({"layers.7.attention.wq.weight": torch.zeros(64, 64)}, str(src / "consolidated-extra.safetensors"))
    with pytest.raises(ConversionError, match="layers.7.attention.wq.weight' does not fit params.json"):
        convert(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
