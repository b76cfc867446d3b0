"""Config parsing: the real Pixtral configs, both rope spellings, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert.hf_files import to_hf_dict
from pixtral.config import ConfigError, load_config, parse_config
from pixtral.model import parameter_counts

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _raw(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_pixtral_12b_config_and_parameter_counts() -> None:
    cfg = parse_config(_raw("pixtral-12b-config.json"))
    assert (cfg.text.head_dim, cfg.text.num_attention_heads, cfg.text.hidden_size) == (128, 32, 5120)
    assert cfg.projector_bias and cfg.vision.head_dim == 64
    counts = parameter_counts(cfg)
    # ../shared/spec/pixtral.md §1.3 computed totals
    assert counts["embed_and_head"] == pytest.approx(1.342e9, rel=1e-3)
    assert counts["decoder"] == pytest.approx(12.248e9, rel=1e-3)
    assert counts["vision"] == pytest.approx(0.403e9, rel=3e-3)
    assert counts["projector"] == pytest.approx(31.5e6, rel=3e-3)
    assert counts["total"] == pytest.approx(12.68e9, rel=1e-3)


def test_pixtral_large_config_and_parameter_counts() -> None:
    cfg = parse_config(_raw("pixtral-large-config.json"))
    assert cfg.text.head_dim == 128  # absent in the file: 12288 / 96
    assert not cfg.projector_bias and cfg.vision.head_dim == 88
    counts = parameter_counts(cfg)
    assert counts["embed_and_head"] == pytest.approx(0.805e9, rel=1e-3)
    assert counts["decoder"] == pytest.approx(122.61e9, rel=1e-3)
    assert counts["vision"] == pytest.approx(1.356e9, rel=1e-3)
    assert counts["projector"] == pytest.approx(168.3e6, rel=1e-3)
    assert counts["total"] == pytest.approx(124.1e9, rel=1e-3)


def test_transformers5_rope_parameters_spelling() -> None:
    raw = _raw("pixtral-12b-config.json")
    del raw["text_config"]["rope_theta"], raw["vision_config"]["rope_theta"]
    raw["text_config"]["rope_parameters"] = {"rope_theta": 1e9, "rope_type": "default"}
    raw["vision_config"]["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    cfg = parse_config(raw)
    assert cfg.text.rope_theta == 1e9 and cfg.vision.rope_theta == 10000.0


def test_written_config_carries_what_exllamav2_and_transformers_read() -> None:
    out = to_hf_dict(parse_config(_raw("pixtral-large-config.json")))
    assert out["text_config"]["rope_theta"] == 1e9 and out["vision_config"]["rope_theta"] == 10000.0
    assert out["text_config"]["sliding_window"] is None
    assert out["vision_config"]["hidden_act"] == "silu"
    assert {"head_dim", "patch_size"} <= set(out["vision_config"]) and "head_dim" in out["text_config"]
    assert out["vision_feature_layer"] == -1 and out["vision_feature_select_strategy"] == "full"
    assert out["multimodal_projector_bias"] is False and out["image_token_index"] == 10
    assert parse_config(out) == parse_config(_raw("pixtral-large-config.json"))


def test_transformers_reads_written_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(parse_config(_raw("pixtral-12b-config.json")))))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.text_config.head_dim == 128 and hf.text_config.sliding_window is None
    assert hf.vision_config.hidden_act == "silu" and hf.vision_feature_layer == -1


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda r: r.update(architectures=["MistralForCausalLM"]), "expected \\['LlavaForConditionalGeneration'\\]"),
        (lambda r: r["vision_config"].update(model_type="clip_vision_model"), "expected 'pixtral'"),
        (lambda r: r["text_config"].pop("hidden_size"), "missing field 'hidden_size'"),
        (lambda r: r["text_config"].update(num_key_value_heads=7), "not a multiple"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path: Path, edit, message: str) -> None:
    raw = _raw("pixtral-12b-config.json")
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_config(tmp_path)
