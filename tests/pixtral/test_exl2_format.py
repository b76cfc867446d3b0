"""EXL2 layer format: the spec's worked example as a golden test, and property round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from pixtral.exl2.format import (
    EXL2_BITS,
    FormatError,
    GroupPlan,
    bits_per_weight,
    dequantize,
    effective_scales,
    parse_q_groups,
    q_invperm_to_perm,
    storage_bits,
    unpack_codes,
    unpack_q_weight,
    unpack_scales,
)
from pixtral.exl2.pack import build_q_groups, pack_codes, pack_q_weight, pack_scales, perm_to_q_invperm

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "exl2_worked_example.json").read_text())


def _u32(word: int) -> int:
    return word & 0xFFFFFFFF


def _worked_example_layer() -> tuple[GroupPlan, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The §2.9 layer: codes and scale codes that the spec's words and values come from."""
    plan = GroupPlan.from_proportions(64, [4, 2], [0.5, 0.5], {4: 32, 2: 32})
    codes = torch.full((64, 32), 8, dtype=torch.int64)
    codes[32:] = 2
    codes[0:8, 0] = torch.tensor(GOLDEN["group0_column0_codes"])
    codes[32:48, 0] = torch.tensor(GOLDEN["group1_column0_codes"])
    qscale = torch.full((2, 32), 16, dtype=torch.int64)
    qscale[0, :8] = torch.tensor(GOLDEN["group0_qscale_columns_0_to_7"])
    qscale[1, 0] = GOLDEN["group1_qscale_col0"]
    q_scale_max = torch.tensor(GOLDEN["q_scale_max"]).half()
    return plan, codes, qscale - 1, q_scale_max


def test_worked_example_byte_for_byte() -> None:
    plan, codes, scale_codes, q_scale_max = _worked_example_layer()
    assert plan.groups == ((4, 32), (2, 32))
    q_weight = pack_q_weight(codes, plan)
    assert list(q_weight.shape) == GOLDEN["q_weight_shape"] and q_weight.dtype == torch.int32
    assert _u32(int(q_weight[0, 0])) == int(GOLDEN["group0_word_row0_col0"], 16)
    assert _u32(int(q_weight[4, 0])) == int(GOLDEN["group1_word_row4_col0"], 16)
    assert build_q_groups(plan).tolist() == GOLDEN["q_groups"]
    q_scale = pack_scales(scale_codes)
    assert list(q_scale.shape) == GOLDEN["q_scale_shape"]
    assert _u32(int(q_scale[0, 0])) == int(GOLDEN["group0_q_scale_word0"], 16)
    assert q_scale_max.tolist() == GOLDEN["q_scale_max_stored"]


def test_worked_example_dequantization() -> None:
    plan, codes, scale_codes, q_scale_max = _worked_example_layer()
    scales = effective_scales(scale_codes, q_scale_max)
    assert scales.dtype == torch.float16
    assert float(scales[0, 0]) == GOLDEN["group0_scale_col0"]
    assert float(scales[1, 0]) == GOLDEN["group1_scale_col0"]
    assert float((q_scale_max[0].float() / 256).half()) == GOLDEN["group0_m"]  # an fp16 subnormal, not flushed
    assert float((q_scale_max[1].float() / 256).half()) == pytest.approx(GOLDEN["group1_m"], rel=1e-6)
    identity = perm_to_q_invperm(torch.arange(64))
    weight = dequantize(
        pack_q_weight(codes, plan), pack_scales(scale_codes), q_scale_max, build_q_groups(plan), identity
    )
    assert weight.shape == (32, 64) and weight.dtype == torch.float16  # nn.Linear orientation [N, K]
    assert weight[0, :8].tolist() == GOLDEN["group0_dequant_col0_rows0_7"]
    s1 = GOLDEN["group1_scale_col0"]
    expected = [float(torch.tensor((c - 2) * s1).half()) for c in GOLDEN["group1_column0_codes"]]
    assert weight[0, 32:48].tolist() == expected


def test_three_bit_block_words() -> None:
    codes = (torch.arange(32) % 8)[:, None]
    words = pack_codes(codes, 3)
    assert [_u32(int(w)) for w in words[:, 0]] == [int(w, 16) for w in GOLDEN["three_bit_block_words"]]
    assert int(unpack_codes(words, 3)[10, 0]) == 2  # code 10 straddles words 0 and 1


def test_permutation_direction() -> None:
    perm = torch.arange(64)
    perm[:3] = torch.tensor(GOLDEN["perm_head"])
    perm[7], perm[14] = 1, 2
    q_invperm = perm_to_q_invperm(perm)
    assert int(q_invperm[7]) == GOLDEN["q_invperm_at_7"] and q_invperm.dtype == torch.int32
    assert torch.equal(q_invperm_to_perm(q_invperm), perm)


def test_bpw_accounting_example() -> None:
    example = GOLDEN["bpw_example"]
    plan = GroupPlan(((4, 128),) * (example["K"] // 128))
    assert storage_bits(plan, example["N"]) == example["total_bits"]
    assert bits_per_weight(plan, example["N"]) == pytest.approx(example["bpw"], abs=1e-4)


@st.composite
def plans(draw: st.DrawFn) -> GroupPlan:
    widths = sorted(draw(st.lists(st.sampled_from(EXL2_BITS), min_size=1, max_size=4)), reverse=True)
    groups = []
    for bits in widths:
        step = 16 if bits == 2 else 32
        for _ in range(draw(st.integers(1, 3))):
            groups.append((bits, step * draw(st.integers(1, 4))))
    return GroupPlan(tuple(groups))


@settings(max_examples=60, deadline=None)
@given(plan=plans(), columns=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_layer_round_trips_through_safetensors(plan: GroupPlan, columns: int, seed: int, tmp_path_factory) -> None:
    gen = torch.Generator().manual_seed(seed)
    N = columns * 8  # pack widths: not necessarily a multiple of 32
    codes = torch.cat([torch.randint(0, 2**bits, (rows, N), generator=gen) for bits, rows in plan.groups])
    scale_codes = torch.randint(0, 16, (len(plan.groups), N), generator=gen)
    perm = torch.randperm(plan.rows, generator=gen)
    q_scale_max = (torch.rand(len(plan.groups), generator=gen) * 0.05 + 1e-4).half()
    tensors = {
        "x.q_weight": pack_q_weight(codes, plan),
        "x.q_scale": pack_scales(scale_codes),
        "x.q_scale_max": q_scale_max,
        "x.q_groups": build_q_groups(plan),
        "x.q_invperm": perm_to_q_invperm(perm),
    }
    path = tmp_path_factory.mktemp("rt") / "layer.safetensors"
    save_file(tensors, str(path))
    back = load_file(str(path))
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in tensors.items()}
    parsed = parse_q_groups(back["x.q_groups"], back["x.q_weight"].shape[0])
    assert parsed == plan
    assert torch.equal(unpack_q_weight(back["x.q_weight"], parsed), codes)
    assert torch.equal(unpack_scales(back["x.q_scale"]), scale_codes)
    assert torch.equal(q_invperm_to_perm(back["x.q_invperm"]), perm)

    # dequantization equals a direct float computation of §2.8 (fp16 roundings at each product)
    weight = dequantize(
        back["x.q_weight"], back["x.q_scale"], back["x.q_scale_max"], back["x.q_groups"], back["x.q_invperm"]
    )
    expected = torch.empty(plan.rows, N, dtype=torch.float16)
    row = 0
    for g, (bits, rows) in enumerate(plan.groups):
        m = torch.tensor(float(q_scale_max[g]) / 256).half()
        for n in range(N):
            s = (torch.tensor(float((scale_codes[g, n] + 1) ** 2)).half() * m).half()
            expected[row : row + rows, n] = (codes[row : row + rows, n] - 2 ** (bits - 1)).half() * s
        row += rows
    assert torch.equal(weight, expected[torch.argsort(perm)].T)


def test_plan_rules() -> None:
    with pytest.raises(FormatError, match="must not increase"):
        GroupPlan(((2, 32), (4, 32)))
    with pytest.raises(FormatError, match="multiple of 32"):
        GroupPlan(((4, 16),))
    assert GroupPlan(((2, 16),)).packed_rows == 1
    with pytest.raises(FormatError, match="7 bits"):
        GroupPlan(((7, 32),))


def test_inconsistent_q_groups_are_rejected() -> None:
    plan = GroupPlan(((4, 32), (2, 32)))
    q_groups = build_q_groups(plan)
    with pytest.raises(FormatError, match="group 1"):
        parse_q_groups(q_groups, 4)  # q_weight rows end where the 2-bit group starts: it would be empty
    with pytest.raises(FormatError, match="group 0"):
        parse_q_groups(build_q_groups(GroupPlan(((3, 32),))), 4)  # 4 words of 3-bit codes: not whole codes
    bad = q_groups.clone()
    bad[3] = 3
    with pytest.raises(FormatError, match="group 0: 24 rows"):
        parse_q_groups(bad, 6)  # offset 3 shrinks the 4-bit group to 24 rows
    swapped = torch.tensor([2, 0, 4, 2], dtype=torch.int16)
    with pytest.raises(FormatError, match="must not increase"):
        parse_q_groups(swapped, 6)
