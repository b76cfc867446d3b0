"""The stand-in's ops against their definitions: the EXL2 bits against the spec's worked example
(tests/golden, typed from the spec, not produced by any packer of ours), the kernels' unchecked
assumptions refused, norms/RoPE/sampling/string matching against their formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ext_standin as ext
import numpy as np
import pytest
import torch

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "exl2_worked_example.json").read_text())
NONE = torch.empty((1, 1), device="meta")


def _i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _worked_example(perm: torch.Tensor | None = None, q_groups: list[int] | None = None, rows: int = 64) -> dict:
    """The §2.9 matrix: K=64, N=32, a 4-bit group (q rows 0-3) then a 2-bit group (q rows 4-5).
    Column 0 carries the spec's codes; every other code is the zero point."""
    q_weight = torch.full((6, 32), _i32(0x88888888), dtype=torch.int32)
    q_weight[4:] = _i32(0xAAAAAAAA)
    q_weight[0, 0] = _i32(int(GOLDEN["group0_word_row0_col0"], 16))
    q_weight[4, 0] = _i32(int(GOLDEN["group1_word_row4_col0"], 16))
    q_scale = torch.zeros((2, 4), dtype=torch.int32)
    q_scale[0, 0] = _i32(int(GOLDEN["group0_q_scale_word0"], 16))
    q_scale[1, 0] = GOLDEN["group1_qscale_col0"] - 1  # the spec gives qscale = code + 1
    q_groups_t = torch.tensor(q_groups or GOLDEN["q_groups"], dtype=torch.short)
    return {
        "q_weight": q_weight,
        "q_scale": q_scale,
        "q_groups": q_groups_t,
        "rows": rows,
        "perm": perm,
        "q_scale_max": torch.tensor(GOLDEN["q_scale_max_stored"], dtype=torch.half) / 256,
    }


def _make(w: dict) -> int:
    perm = w["perm"]
    invperm = torch.argsort(perm).short() if perm is not None else NONE
    group_map = ext.make_group_map(w["q_groups"], w["q_weight"].shape[0])
    return ext.make_q_matrix(
        w["q_weight"],
        perm.short() if perm is not None else NONE,
        invperm,
        w["q_scale"],
        w["q_scale_max"],
        w["q_groups"],
        group_map,
        NONE,
        NONE,
        NONE,
        NONE,
        NONE,
        0,
    )


def _weight(handle: int, shape: tuple[int, int] = (64, 32)) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.half)
    ext.reconstruct(handle, out)
    return out


def test_reconstruct_gives_the_spec_worked_example() -> None:
    w = _weight(_make(_worked_example()))
    assert w[:8, 0].tolist() == GOLDEN["group0_dequant_col0_rows0_7"]
    assert float(w[0, 1]) == 0.0  # column 1 holds only zero points
    codes = torch.tensor(GOLDEN["group1_column0_codes"], dtype=torch.float)
    expected = ((codes - 2) * GOLDEN["group1_scale_col0"]).half()
    assert torch.equal(w[32:48, 0], expected)


def test_three_bit_blocks_unpack_as_the_spec_packs_them() -> None:
    words = torch.tensor([int(x, 16) for x in GOLDEN["three_bit_block_words"]], dtype=torch.int64).reshape(1, 3, 1)
    assert ext._dequant_block(words, 3).flatten().tolist() == [i % 8 - 4 for i in range(32)]


def test_q_perm_puts_rows_back_in_input_order() -> None:
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    plain, permuted = _weight(_make(_worked_example())), _weight(_make(_worked_example(perm)))
    assert torch.equal(permuted[perm], plain)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.update(perm=torch.tensor([0] * 64)), "not a permutation"),
        (lambda w: w.update(q_groups=torch.tensor([2, 0, 4, 2], dtype=torch.short)), "order"),  # 2-bit before 4-bit
        (lambda w: w.update(q_groups=torch.tensor([4, 0, 2, 2], dtype=torch.short)), "steps"),  # a 16-row 4-bit group
        (lambda w: w.update(q_groups=torch.tensor([7, 0, 2, 4], dtype=torch.short)), "width 7"),
        (lambda w: w.update(q_scale=w["q_scale"][:, :3]), r"q_scale\.size\(1\)"),
        (lambda w: w.update(q_weight=w["q_weight"].long()), "TORCH_CHECK_DTYPE"),
    ],
)
def test_what_the_kernels_assume_is_refused(change, message: str) -> None:
    w = _worked_example()
    change(w)
    with pytest.raises(RuntimeError, match=message):
        _make(w)


def test_gemm_adds_the_bias_to_a_times_w() -> None:
    w = _worked_example()
    bias = torch.linspace(-1, 1, 32).half()
    handle = ext.make_q_matrix(
        w["q_weight"],
        NONE,
        NONE,
        w["q_scale"],
        w["q_scale_max"],
        w["q_groups"],
        ext.make_group_map(w["q_groups"], 6),
        NONE,
        NONE,
        NONE,
        bias,
        NONE,
        0,
    )
    a = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).half()
    c = torch.empty(3, 32, dtype=torch.half)
    ext.gemm_half_q_half(a, handle, c, False)
    torch.testing.assert_close(c.float(), a.float() @ _weight(handle).float() + bias.float(), atol=2e-3, rtol=1e-3)
    ext.free_q_matrix(handle)
    with pytest.raises(RuntimeError, match="live QMatrix"):
        ext.gemm_half_q_half(a, handle, c, False)


def test_tensor_remap_gathers_columns_of_words_and_of_nibbles() -> None:
    gen = torch.Generator().manual_seed(2)
    index = torch.randperm(16, generator=gen).int()
    words = torch.randint(-(2**31), 2**31 - 1, (3, 16), generator=gen, dtype=torch.int64).int()
    remapped = words.clone()
    ext.tensor_remap(remapped, index)
    assert torch.equal(remapped, words[:, index.long()])
    packed = torch.randint(-(2**31), 2**31 - 1, (3, 2), generator=gen, dtype=torch.int64).int()
    nibbles = [[(int(v) & 0xFFFFFFFF) >> (4 * j) & 0xF for v in row for j in range(8)] for row in packed]
    ext.tensor_remap_4bit(packed, index)
    after = [[(int(v) & 0xFFFFFFFF) >> (4 * j) & 0xF for v in row for j in range(8)] for row in packed]
    assert after == [[row[i] for i in index.tolist()] for row in nibbles]


def test_rms_norm_is_x_times_w_over_rms() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).half()
    w = torch.rand(64, generator=torch.Generator().manual_seed(4)).half()
    y = torch.empty_like(x)
    ext.rms_norm(x, w, y, 1e-5)
    expected = x.double() * w.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), expected, atol=2e-3, rtol=2e-3)


def test_neox_rope_rotates_half_pairs_by_position() -> None:
    heads, dim, tokens, past = 2, 8, 3, 5
    x = torch.randn(1, tokens, heads, dim, generator=torch.Generator().manual_seed(5)).half()
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(torch.arange(32).float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    rotated = x.clone()
    ext.rope_(rotated, emb.sin().half(), emb.cos().half(), past, heads, dim, NONE, True)
    for t in range(tokens):
        angle = (past + t) * inv  # rotate-half: (x_i, x_{i+d/2}) as a complex number times e^{i·angle}
        z = torch.complex(x[0, t, :, : dim // 2].double(), x[0, t, :, dim // 2 :].double()) * torch.polar(
            torch.ones(dim // 2, dtype=torch.double), angle.double()
        )
        torch.testing.assert_close(rotated[0, t].double(), torch.cat([z.real, z.imag], -1), atol=4e-3, rtol=4e-3)


def _sample(logits: list[float], **settings) -> tuple[int, float]:
    row = torch.tensor([[logits]], dtype=torch.float)
    tokens, probs = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)
    kw = {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 0.0,
        "top_a": 0.0,
        "min_p": 0.0,
        "tfs": 0.0,
        "typical": 0.0,
        "random": 0.5,
    } | settings
    ext.sample_basic(
        row,
        kw["temperature"],
        kw["top_k"],
        kw["top_p"],
        kw["top_a"],
        kw["min_p"],
        kw["tfs"],
        kw["typical"],
        kw["random"],
        tokens,
        probs,
        NONE,
        NONE,
        NONE,
        False,
        [],
        0.0,
        0.0,
        1.0,
        NONE,
    )
    return int(tokens[0, 0]), float(probs[0, 0])


def test_sampling_follows_the_distribution_it_keeps() -> None:
    logits = [0.0, math.log(3), math.log(6)]  # probabilities 0.1, 0.3, 0.6
    assert _sample(logits, temperature=0.0) == (2, 1.0)  # below 0.01: greedy
    assert _sample(logits, top_k=1, random=0.99)[0] == 2
    assert _sample(logits, random=0.5)[0] == 2  # descending candidates: 0.6 covers [0, 0.6)
    assert _sample(logits, random=0.7)[0] == 1 and _sample(logits, random=0.95)[0] == 0
    token, prob = _sample(logits, top_k=2, random=0.8)  # 0.6/0.9, 0.3/0.9
    assert token == 1 and prob == pytest.approx(1 / 3)
    assert _sample(logits, min_p=0.4, random=0.99)[0] == 1  # 0.1 < 0.4·0.6 dropped
    assert _sample(logits, top_p=0.5, random=0.99)[0] == 2  # 0.6 alone passes 0.5
    with pytest.raises(NotImplementedError, match="typical"):
        _sample(logits, typical=0.5)


def _utf32(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint8)


def _strings(*strings: str) -> tuple[np.ndarray, np.ndarray]:
    buf = "".join(strings).encode("utf-32-le")
    offsets = np.cumsum([0] + [len(s) * 4 for s in strings]).astype(np.uint32)
    return offsets, np.frombuffer(buf, dtype=np.uint8)


def test_partial_strings_match_finds_whole_and_cut_off_stops() -> None:
    offsets, buf = _strings("STOP", "end")
    assert ext.partial_strings_match(_utf32("say STOP now"), offsets, buf) == 4
    assert ext.partial_strings_match(_utf32("say ST"), offsets, buf) == -2
    assert ext.partial_strings_match(_utf32("the end"), offsets, buf) == 4
    assert ext.partial_strings_match(_utf32("nothing"), offsets, buf) == -1


def test_count_match_counts_the_shared_prefix() -> None:
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 9]])
    assert ext.count_match(a, b, 4) == 2 and ext.count_match(a, b, 1) == 1
    assert ext.count_match(a, torch.tensor([[1, 2]]), 4) == 2
