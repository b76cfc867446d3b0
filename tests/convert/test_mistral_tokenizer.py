"""Converted HF tokenizers against mistral-common's own tokenizers (the oracle), on real files."""

from __future__ import annotations

import random

import pytest

from convert.hf_files import bundled_tokenizer_path
from convert.tokenizer import convert_mistral_tokenizer

mistral = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")

ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ  \n\t'.,;:!?0123456789-_()[]{}\"éüñ中文日本語😀") + [
    "don't", "Hello", " world", "  ", "\n\n", "The ", "ing", "'s", "https://x.y/z", "▁", "<0x41>", "\r\n",
]  # fmt: skip
FIXED = [
    "Hello world",
    "don'tthe",
    " Hello",
    "a  b   c",
    "  leading",
    "trailing  ",
    "x\n\ny",
    "1234567",
    "中文テキスト",
    "😀😀",
]


def _strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return FIXED + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.mark.parametrize("kind", ["tekken", "spm"])
def test_text_ids_match_mistral_common(kind: str) -> None:
    path = bundled_tokenizer_path(kind)
    ours = convert_mistral_tokenizer(path).tokenizer
    theirs = mistral.MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    # in a prompt, text follows a special token (each run gets spm's dummy prefix from the normalizer)
    mismatches = [
        s
        for s in _strings(1500, seed=hash(kind) % 1000)
        if theirs.encode(s, bos=False, eos=False) != ours.encode("</s>" + s, add_special_tokens=False).ids[1:]
    ]
    assert mismatches == []


@pytest.mark.parametrize("kind", ["tekken", "spm"])
def test_a_whole_string_encodes_as_mistral_common(kind: str) -> None:
    """tokenizer.json read by the `tokenizers` library, as exllamav2, TabbyAPI and AutoTokenizer read
    it, on whole strings (a raw completion prompt): those that begin with a space keep SentencePiece's
    dummy prefix (" x" is "▁▁x"; a Metaspace "first" pre-tokenizer would drop it)."""
    path = bundled_tokenizer_path(kind)
    ours = convert_mistral_tokenizer(path).tokenizer
    theirs = mistral.MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    rng = random.Random(7)
    strings = [
        " " * rng.randint(1, 3) + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20))) for _ in range(1500)
    ]
    mismatches = [
        s
        for s in _strings(500, seed=8) + strings
        if theirs.encode(s, bos=False, eos=False) != ours.encode(s, add_special_tokens=False).ids
    ]
    assert mismatches == []


@pytest.mark.parametrize("kind", ["tekken", "spm"])
def test_special_ids_match_mistral_common(kind: str) -> None:
    path = bundled_tokenizer_path(kind)
    ours = convert_mistral_tokenizer(path).tokenizer
    theirs = mistral.MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    assert ours.get_vocab_size() == theirs.n_words
    for token in [
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[TOOL_CALLS]",
        "[AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[TOOL_CONTENT]",
    ]:
        assert ours.token_to_id(token) == theirs.get_special_token(token), token
        assert ours.encode(token, add_special_tokens=False).ids == [theirs.get_special_token(token)]


def test_break_and_end_ids_differ_between_models() -> None:
    tekken = convert_mistral_tokenizer(bundled_tokenizer_path("tekken")).tokenizer
    spm = convert_mistral_tokenizer(bundled_tokenizer_path("spm")).tokenizer
    assert (tekken.token_to_id("[IMG_BREAK]"), tekken.token_to_id("[IMG_END]")) == (12, 13)
    assert (spm.token_to_id("[IMG_BREAK]"), spm.token_to_id("[IMG_END]")) == (14, 15)


@pytest.mark.parametrize("kind", ["tekken", "spm"])
def test_decode_round_trips(kind: str) -> None:
    tok = convert_mistral_tokenizer(bundled_tokenizer_path(kind)).tokenizer
    for text in ["Hello  world\n x", "naïve café 中文", "a\tb"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_spm_model"])
def test_plain_encoding_matches_mistral_common(model_fixture: str, request: pytest.FixtureRequest) -> None:
    """What the token routes and the engine encode: plain text, no special token before it."""
    from pixtral.tokenizer import PixtralTokenizer

    model_dir = request.getfixturevalue(model_fixture)
    ours = PixtralTokenizer(model_dir)
    kind = "tekken" if ours.vocab_size == 131072 else "spm"
    theirs = mistral.MistralTokenizer.from_file(str(bundled_tokenizer_path(kind))).instruct_tokenizer.tokenizer
    assert ours.encode(" leading space") == theirs.encode(" leading space", bos=False, eos=False)
    mismatches = [s for s in _strings(500, seed=7) if ours.encode(s) != theirs.encode(s, bos=False, eos=False)]
    assert mismatches == []
