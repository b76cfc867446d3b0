"""The GPTQ group step as Triton kernels, for CUDA; gptq.quantize_group is the reference.

Per group: `_scale_error_kernel` scores the scale multipliers (one program per multiplier and block of
columns, partial sums reduced in torch: the choice is one scalar per group, so it needs every column),
then `_group_kernel` quantizes the group's rows in one launch, a program per block of columns holding
the whole group in registers: quantize row c, push its error onto rows c.. of the block, next row.
Columns are independent and rows sequential, so no program waits on another. The arithmetic is the
reference's (division rounded to nearest, round half to even, the fp16 product of the kernel's
dequantization); where a fused multiply-add rounds differently, a code can differ by one.
Tested against the reference under `TRITON_INTERPRET=1` on the CPU (tests/quantize/test_gptq_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantize.gptq import ERR_NORM, GroupResult, find_scales

BLOCK_N = 32  # columns per program


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)


@triton.jit
def _scale_error_kernel(W, S, P, OUT, R, N, stride_w, zero, maxq, err_norm, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[p, block] = Σ over the group's rows and the block's columns of |q·s·p − w|^err_norm."""
    pi, nb = tl.program_id(0), tl.program_id(1)
    cols = nb * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    sp = tl.load(S + cols, mask=cmask, other=1.0) * tl.load(P + pi)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & cmask[None, :]
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
        q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(w, sp[None, :])), -zero), maxq - zero)
        e = tl.abs(q * sp[None, :] - w)
        powered = tl.where(e > 0, tl.exp2(err_norm * tl.log2(tl.maximum(e, 1e-38))), 0.0)
        total += tl.sum(tl.where(mask, powered, 0.0), axis=0)
    tl.store(OUT + pi * tl.num_programs(1) + nb, tl.sum(total, axis=0))


@triton.jit
def _group_kernel(
    W, U, S, CODES, DEQ, ERR, R, N, stride_w, stride_u, zero, maxq, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr
):
    """Quantize the group's rows of one block of columns with in-group error feedback."""
    nb = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R)
    cols = nb * BLOCK + tl.arange(0, BLOCK)
    rmask, cmask = rows < R, cols < N
    mask = rmask[:, None] & cmask[None, :]
    w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
    s = tl.load(S + cols, mask=cmask, other=1.0)
    s16 = s.to(tl.float16)
    codes = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
    deq = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
    err = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
    for c in range(0, R):
        here = (rows == c)[:, None]
        wc = tl.sum(tl.where(here, w, 0.0), axis=0)  # row c as updated by the rows before it
        q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(wc, s)) + zero, 0.0), maxq)
        d = ((q - zero).to(tl.float16) * s16).to(tl.float32)
        e = tl.div_rn(wc - d, tl.load(U + c * stride_u + c))
        u = tl.load(U + c * stride_u + rows, mask=rmask & (rows >= c), other=0.0)
        w = w - u[:, None] * e[None, :]
        codes = tl.where(here, q[None, :], codes)
        deq = tl.where(here, d[None, :], deq)
        err = tl.where(here, e[None, :], err)
    offsets = rows[:, None] * N + cols[None, :]
    tl.store(CODES + offsets, codes.to(tl.uint8), mask=mask)
    tl.store(DEQ + offsets, deq, mask=mask)
    tl.store(ERR + offsets, err, mask=mask)


def _block_rows(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def _scale_errors(W: Tensor, s: Tensor, p: Tensor, bits: int) -> Tensor:
    Ws, ss = W.contiguous(), s.contiguous()
    R, N = Ws.shape
    blocks = triton.cdiv(N, BLOCK_N)
    out = torch.empty(p.shape[0], blocks, dtype=torch.float32, device=W.device)
    _scale_error_kernel[(p.shape[0], blocks)](
        Ws,
        ss,
        p.contiguous(),
        out,
        R,
        N,
        Ws.stride(0),
        2 ** (bits - 1),
        2**bits - 1,
        ERR_NORM,
        BLOCK_R=min(64, _block_rows(R)),
        BLOCK=BLOCK_N,
    )
    return out.sum(dim=1)


def triton_quantize_group(Wg: Tensor, Ug: Tensor, bits: int, full_search: bool = False) -> GroupResult:
    """gptq.quantize_group on the GPU: the same scales, codes and error feedback (Wg is not changed)."""
    scale_code, scale_max, s = find_scales(Wg, bits, full_search, _scale_errors)
    s = s.contiguous()
    W, U = Wg.contiguous(), Ug.contiguous()
    R, N = W.shape
    codes = torch.empty(R, N, dtype=torch.uint8, device=W.device)
    deq, Err = torch.empty(R, N, device=W.device), torch.empty(R, N, device=W.device)
    _group_kernel[(triton.cdiv(N, BLOCK_N),)](
        W,
        U,
        s,
        codes,
        deq,
        Err,
        R,
        N,
        W.stride(0),
        U.stride(0),
        float(2 ** (bits - 1)),
        float(2**bits - 1),
        BLOCK_R=_block_rows(R),
        BLOCK=BLOCK_N,
    )
    return GroupResult(codes, deq, Err, scale_code, scale_max)
