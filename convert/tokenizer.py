"""Mistral tokenizer files (tekken.json, SentencePiece *.model.v7m1) -> HF `tokenizer.json`.

Tekken (Pixtral-12B) is a tiktoken byte-level BPE with ids = rank + num_special_tokens. We rebuild
it as a ByteLevel BPE with tekken's own pre-tokenizer regex (transformers' converter uses a
cl100k-like default that splits differently, ../shared/spec/pixtral.md §4.1) and `ignore_merges`, so a
pre-token that is itself in the vocabulary stays whole, as tiktoken does.

SentencePiece v7m1 (Pixtral-Large) becomes a byte-fallback BPE whose normalizer prefixes `▁` to every
text segment (each run between special tokens, as transformers' legacy Llama conversion): that is
SentencePiece's dummy prefix, which mistral-common adds to each text chunk, so a string that starts
with a space encodes as it does (" x" -> "▁▁x"; Metaspace's "first" scheme would give "▁x").
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from pixtral.errors import UserError

SPIECE_UNDERLINE = "▁"


class TokenizerSourceError(UserError):
    """A tokenizer file that is not a tekken.json or a SentencePiece model."""


@dataclass(frozen=True)
class HFTokenizer:
    """A converted tokenizer and the facts the config and chat template need."""

    tokenizer: Tokenizer
    kind: str  # "tekken" | "spm"
    bos: str
    eos: str
    unk: str
    pad: str | None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by ByteLevel BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _merges_from_vocab(vocab: dict[str, int], priority: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges that rebuild every token from its parts, ordered by the merged token's priority.

    Every split of a token into two vocabulary pieces is listed (ordered by the pieces' ids), so the
    HF BPE reaches the same segmentation as a rank-driven (tiktoken) or score-driven (SentencePiece)
    merger. `priority`: lower merges first; defaults to the token id.
    """
    priority = priority or {token: float(token_id) for token, token_id in vocab.items()}
    merges: list[tuple[float, int, int, str, str]] = []
    for token in vocab:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((priority[token], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def tekken_to_hf(path: str | Path) -> HFTokenizer:
    """Convert a tekken.json (tiktoken-based) tokenizer."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config, vocab_entries = data["config"], data["vocab"]
        num_special = int(config["default_num_special_tokens"])
        vocab_size = int(config["default_vocab_size"])
        pattern = config["pattern"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise TokenizerSourceError(f"{path}: not a tekken.json tokenizer ({err})") from err
    byte_map = _bytes_to_unicode()
    num_ranks = vocab_size - num_special
    vocab: dict[str, int] = {}
    for entry in vocab_entries[:num_ranks]:
        piece = "".join(byte_map[b] for b in base64.b64decode(entry["token_bytes"]))
        vocab[piece] = int(entry["rank"]) + num_special
    specials = _tekken_specials(data, num_special)
    merges = _merges_from_vocab(vocab)
    # the specials take ids 0..num_special-1; no byte-level piece spells the same string
    vocab.update({special: token_id for token_id, special in enumerate(specials)})
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # ids 0..num_special-1 are the specials, in id order
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return HFTokenizer(tok, "tekken", bos="<s>", eos="</s>", unk="<unk>", pad="<pad>" if "<pad>" in specials else None)


def _tekken_specials(data: dict, num_special: int) -> list[str]:
    """Special-token strings by id. Files without a list use the fixed V3 order mistral-common uses."""
    listed = data.get("special_tokens")
    if listed:
        by_rank = {int(t["rank"]): t["token_str"] for t in listed}
        return [by_rank.get(i, f"<SPECIAL_{i}>") for i in range(num_special)]
    v3 = [
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
        "[TOOL_CALLS]",
        "[IMG]",
        "<pad>",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[PREFIX]",
        "[MIDDLE]",
        "[SUFFIX]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[TOOL_CONTENT]",
    ]
    return v3 + [f"<SPECIAL_{i}>" for i in range(len(v3), num_special)]


def spm_to_hf(path: str | Path) -> HFTokenizer:
    """Convert a SentencePiece BPE model (Mistral v3/v7, e.g. tokenizer.model.v7m1)."""
    import sentencepiece  # only needed for this conversion

    path = Path(path)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerSourceError(f"{path}: not a SentencePiece model ({err})") from err
    size = processor.GetPieceSize()
    vocab = {processor.IdToPiece(i): i for i in range(size)}
    atomic = [i for i in range(size) if processor.IsControl(i) or processor.IsUnknown(i)]
    # user-defined pieces ([REF], [REFERENCE_DOC_n]) sit between the controls and the byte pieces
    first_byte = next((i for i in range(size) if processor.IsByte(i)), size)
    user_defined = [i for i in range(max(atomic, default=0) + 1, first_byte)]
    scores = {piece: -processor.GetScore(i) for piece, i in vocab.items()}  # higher score merges first
    mergeable = {p: i for p, i in vocab.items() if i >= first_byte and not processor.IsByte(i)}
    model = models.BPE(
        vocab=vocab,
        merges=_merges_from_vocab(mergeable, scores),
        unk_token=processor.IdToPiece(processor.unk_id()),
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(processor.IdToPiece(i), special=True, normalized=False) for i in atomic])
    tok.add_tokens([AddedToken(processor.IdToPiece(i), special=False, normalized=False) for i in user_defined])
    return HFTokenizer(
        tok,
        "spm",
        bos=processor.IdToPiece(processor.bos_id()),
        eos=processor.IdToPiece(processor.eos_id()),
        unk=processor.IdToPiece(processor.unk_id()),
        pad=None,
    )


def convert_mistral_tokenizer(path: str | Path) -> HFTokenizer:
    """Convert either kind, chosen by the file's content."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerSourceError(f"{path}: tokenizer file not found")
    with open(path, "rb") as handle:
        head = handle.read(1)
    return tekken_to_hf(path) if head == b"{" else spm_to_hf(path)


def write_hf_tokenizer(
    converted: HFTokenizer, out_dir: str | Path, model_max_length: int, chat_template: str | None = None
) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template, where HF tokenizers
    look for it) and special_tokens_map.json."""
    out_dir = Path(out_dir)
    converted.tokenizer.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": converted.bos, "eos_token": converted.eos, "unk_token": converted.unk}
    if converted.pad:
        specials["pad_token"] = converted.pad
    config = {
        "tokenizer_class": "LlamaTokenizerFast" if converted.kind == "spm" else "PreTrainedTokenizerFast",
        # raw prompts start with <s> (exllamav2's and TabbyAPI's completions read this flag); the chat
        # template writes its own <s>, which TabbyAPI strips when this is true: one <s> either way
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,  # a slow Llama tokenizer then also prefixes every segment, as tokenizer.json does
        "model_max_length": model_max_length,
        "mistral_tokenizer_kind": converted.kind,
        **specials,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
