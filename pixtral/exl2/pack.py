"""The EXL2 storage format, the writer's half: packing codes, scales, groups and the permutation.

Pure functions, tensor in, tensor out; each is the exact inverse of its reader in
pixtral/exl2/format.py (round-trip and golden tests in tests/pixtral/test_exl2_format.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pixtral.exl2.format import INT16_MAX, SCALE_BITS, FormatError, GroupPlan, word_block


def _to_int32(words: Tensor) -> Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes [R, N] in [0, 2^bits) -> int32 words [R·bits/32, N]; code r at stream bit r·bits."""
    R, N = codes.shape
    per_block, words_per_block = word_block(bits)
    if R % per_block:
        raise FormatError(f"{R} rows of {bits}-bit codes do not fill whole words")
    blocks = codes.to(torch.int64).reshape(R // per_block, per_block, N)
    words = torch.zeros(R // per_block, words_per_block, N, dtype=torch.int64)
    for r in range(per_block):
        word, shift = divmod(r * bits, 32)
        words[:, word] |= (blocks[:, r] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code straddles two words
            words[:, word + 1] |= blocks[:, r] >> (32 - shift)
    return _to_int32(words.reshape(-1, N))


def pack_q_weight(codes: Tensor, plan: GroupPlan) -> Tensor:
    """Codes [K, N'] in storage order -> `q_weight` [Q, N'], group blocks concatenated."""
    if codes.shape[0] != plan.rows:
        raise FormatError(f"codes have {codes.shape[0]} rows, plan has {plan.rows}")
    blocks, start = [], 0
    for bits, rows in plan.groups:
        blocks.append(pack_codes(codes[start : start + rows], bits))
        start += rows
    return torch.cat(blocks)


def pack_scales(scale_codes: Tensor) -> Tensor:
    """4-bit scale codes [G, N'] (qscale − 1, in [0, 15]) -> `q_scale` [G, N'/8], column 8w+j in bits 4j."""
    G, N = scale_codes.shape
    if N % 8:
        raise FormatError(f"{N} columns: scales pack 8 to a word")
    nibbles = scale_codes.to(torch.int64).reshape(G, N // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * SCALE_BITS
    return _to_int32((nibbles << shifts).sum(dim=-1))


def build_q_groups(plan: GroupPlan) -> Tensor:
    """`q_groups` int16 [2G]: (bits, first packed row) per group."""
    values, packed_row = [], 0
    for bits, rows in plan.groups:
        values += [bits, packed_row]
        packed_row += rows * bits // 32
    if packed_row > INT16_MAX:
        raise FormatError(f"{packed_row} packed rows: offsets are int16 (< 32768)")
    return torch.tensor(values, dtype=torch.int16)


def perm_to_q_invperm(perm: Tensor) -> Tensor:
    """`perm[k]` = original input feature of storage row k -> stored `q_invperm = argsort(perm)`."""
    return torch.argsort(perm).to(torch.int32)
