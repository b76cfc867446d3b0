"""A plain-torch stand-in for `exllamav2_ext`, exllamav2 0.3.2's compiled extension, for tests only.

Each op is written from exllamav2's shipped C++/CUDA sources (exllamav2/exllamav2_ext/, cited per
function), so that exllamav2's own, unmodified Python runs on a CPU. It is an oracle: it shares no
code with the project's EXL2 reader (pixtral/exl2/format.py) or models, and it checks what the CUDA
kernels silently assume (q_perm a permutation, widths in exllamav2's order, group boundaries on the
kernels' row steps, dtypes and shapes), raising where a GPU would compute garbage.

Handles (`make_q_matrix` etc.) are integers, as the extension's `uintptr_t`s; they index a table.
Ops exllamav2 calls only for features we do not use (tensor parallel, LoRA, MoE, Q4 caches, the
quantizer's kernels) raise NotImplementedError naming themselves.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

_HANDLES: dict[int, Any] = {}
_NEXT = itertools.count(0x1000)

# cuda/q_matrix.cu: QMatrix's row ranges, in this order: rows_8 ≤ rows_6 ≤ … ≤ rows_2
KERNEL_WIDTHS = (8, 6, 5, 4, 3, 2)
# cuda/q_matrix.cu reconstruct_kernel: rows consumed per step of each width's loop (the group
# boundary test `k == nextgroup` only happens on these steps)
ROW_STEP = {8: 32, 6: 32, 5: 32, 4: 32, 3: 32, 2: 16}


def _new_handle(obj: Any) -> int:
    handle = next(_NEXT)
    _HANDLES[handle] = obj
    return handle


def _get(handle: int, kind: type) -> Any:
    obj = _HANDLES.get(handle)
    if not isinstance(obj, kind):
        raise RuntimeError(f"stand-in: {handle:#x} is not a live {kind.__name__} handle")
    return obj


def _free(handle: int, kind: type) -> None:
    _get(handle, kind)
    del _HANDLES[handle]


def _no_loras(lora_maps: tuple[dict, ...]) -> int:
    """The set_loras ops: the largest LoRA rank, 0 without LoRAs (the project loads none)."""
    if any(lora_maps):
        raise NotImplementedError("stand-in: LoRA")
    return 0


def _is_none(t: Tensor) -> bool:
    """ext.py's none_tensor is a (1, 1) meta tensor; the C++ tests `device().is_meta()`."""
    return t.device.type == "meta"


def _check_dtype(t: Tensor, dtype: torch.dtype, name: str, optional: bool = False) -> None:
    if optional and _is_none(t):
        return
    if t.dtype != dtype:
        raise RuntimeError(f"stand-in TORCH_CHECK_DTYPE: {name} is {t.dtype}, expected {dtype}")


# --- EXL2 matrices (ext_qmatrix.cpp, cuda/q_matrix.cu, cuda/quant/qdq_*.cuh) ----------------------


def make_group_map(q_groups: Tensor, num_qrows: int) -> Tensor:
    """ext_qmatrix.cpp make_group_map: for every weight row, (group index, rows left in the group)."""
    groups = q_groups.tolist()
    out: list[int] = []
    n = len(groups) // 2
    for i in range(n):
        bits = groups[2 * i]
        qrows = (groups[2 * i + 3] if i < n - 1 else num_qrows) - groups[2 * i + 1]
        rows = qrows * 32 // bits
        for j in range(rows):
            out += [i, rows - j]
    return torch.tensor(out, dtype=torch.short)


def _exb(words: Tensor, bit: int, mask: int) -> Tensor:
    """cuda/quant/qdq_util.cuh exb (with __funnelshift_rc across two words): `mask`-wide field at
    `bit` of the little-endian concatenation of `words` [..., w, n] (int64 holding uint32)."""
    lo, shift = divmod(bit, 32)
    value = words[..., lo, :] >> shift
    if shift and lo + 1 < words.shape[-2]:
        value = value | (words[..., lo + 1, :] << (32 - shift))
    return value & mask


def _dequant_block(words: Tensor, bits: int) -> Tensor:
    """The plain (non-QMODE) dequant_{2,3,4,5,6,8}bit_* of cuda/quant/qdq_*.cuh over one row step:
    words [blocks, bits·step/32, n] -> q - zero [blocks, step, n]. The fast QMODE kernels shuffle
    q_weight at load and undo it in their bit tricks; this #else branch is the layout on disk."""
    zero = 1 << (bits - 1)  # dq_ns(q, 2 | 4 | 8 | 16 | 32 | 128)
    step = ROW_STEP[bits]
    return torch.stack([_exb(words, i * bits, (1 << bits) - 1) - zero for i in range(step)], dim=1)


@dataclass
class QMatrix:
    height: int
    width: int
    q_weight: Tensor
    q_perm: Tensor | None
    q_scale: Tensor
    q_scale_max: Tensor
    q_groups: list[int]
    bias: Tensor | None
    rows: dict[int, int] = field(default_factory=dict)  # width -> rows of that width
    _weight: Tensor | None = None

    def weight(self) -> Tensor:
        """reconstruct_kernel: the fp16 matrix [height, width], rows back in input order (q_perm)."""
        if self._weight is None:
            self._weight = _reconstruct(self)
        return self._weight


def _scales(qm: QMatrix) -> Tensor:
    """MatrixView_q4_row over q_scale [groups, width/8]: eight 4-bit scales per int32, low first;
    dq_scale: half((qs + 1)²) · q_scale_max (already premultiplied by 1/256 in ext.py)."""
    packed = qm.q_scale.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    qs = ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)[:, : qm.width]
    return ((qs + 1) ** 2).to(torch.half) * qm.q_scale_max[:, None]


def _reconstruct(qm: QMatrix) -> Tensor:
    words_all = qm.q_weight.to(torch.int64) & 0xFFFFFFFF
    scales = _scales(qm)
    rows_out: list[Tensor] = []
    qrow, group = 0, 0
    n_groups = len(qm.q_groups) // 2
    for group in range(n_groups):
        bits, start = qm.q_groups[2 * group], qm.q_groups[2 * group + 1]
        end_qrow = qm.q_groups[2 * group + 3] if group < n_groups - 1 else qm.q_weight.shape[0]
        assert start == qrow
        step = ROW_STEP[bits]
        words_per_step = bits * step // 32
        words = words_all[start:end_qrow].reshape(-1, words_per_step, qm.width)
        values = _dequant_block(words, bits).reshape(-1, qm.width)
        rows_out.append((values.to(torch.half) * scales[group]).to(torch.half))
        qrow = end_qrow
    stacked = torch.cat(rows_out)
    if stacked.shape[0] != qm.height:
        raise RuntimeError(f"stand-in: q_weight holds {stacked.shape[0]} rows, q_groups/height say {qm.height}")
    if qm.q_perm is None:
        return stacked
    out = torch.empty_like(stacked)
    out[qm.q_perm.long()] = stacked  # b_.set(perm[lk++], n, ...)
    return out


def make_q_matrix(
    q_weight: Tensor,
    q_perm: Tensor,
    q_invperm: Tensor,
    q_scale: Tensor,
    q_scale_max: Tensor,
    q_groups: Tensor,
    q_group_map: Tensor,
    gptq_qzeros: Tensor,
    gptq_scales: Tensor,
    gptq_g_idx: Tensor,
    bias: Tensor,
    temp_dq: Tensor,
    max_dq_rows: int,
) -> int:
    """ext_qmatrix.cpp make_q_matrix (EXL2 only: GPTQ checkpoints are not ours), with its
    TORCH_CHECKs and the assumptions QMatrix's constructor and kernels make without checking."""
    if _is_none(q_scale):
        raise NotImplementedError("stand-in make_q_matrix: GPTQ-format matrices")
    _check_dtype(q_weight, torch.int, "q_weight")
    _check_dtype(q_perm, torch.short, "q_perm", optional=True)
    _check_dtype(q_invperm, torch.short, "q_invperm", optional=True)
    _check_dtype(q_scale, torch.int, "q_scale")
    _check_dtype(q_scale_max, torch.half, "q_scale_max")
    _check_dtype(q_groups, torch.short, "q_groups")
    _check_dtype(q_group_map, torch.short, "q_group_map")
    _check_dtype(bias, torch.half, "bias", optional=True)
    width = q_weight.shape[1]
    if q_scale.shape[1] * 8 != width:
        raise RuntimeError("stand-in TORCH_CHECK_SHAPES: q_weight.size(1) != q_scale.size(1) * 8")
    if q_scale_max.shape[0] != q_scale.shape[0]:
        raise RuntimeError("stand-in TORCH_CHECK_SHAPES: q_scale_max.size(0) != q_scale.size(0)")
    if not _is_none(bias) and bias.shape[0] != width:
        raise RuntimeError("stand-in TORCH_CHECK_SHAPES: bias.size(0) != q_weight.size(1)")
    groups, height = q_scale.shape[0], q_group_map.shape[0] // 2
    if not _is_none(temp_dq) and temp_dq.shape[0] < width * min(max_dq_rows, height):
        raise RuntimeError("stand-in TORCH_CHECK: Insufficient size of temp_dq buffer")
    if _is_none(q_perm) != _is_none(q_invperm):
        raise RuntimeError("stand-in: q_perm and q_invperm come together")

    # What the kernels assume without a check
    gr = [int(v) for v in q_groups.tolist()]
    if len(gr) != 2 * groups:
        raise RuntimeError(f"stand-in: q_groups has {len(gr) // 2} groups, q_scale {groups}")
    rows: dict[int, int] = {}
    order = []
    for i in range(groups):
        bits, qrow = gr[2 * i], gr[2 * i + 1]
        next_qrow = gr[2 * i + 3] if i < groups - 1 else q_weight.shape[0]
        if bits not in KERNEL_WIDTHS:
            raise RuntimeError(f"stand-in: group {i} has width {bits}; the kernels know {KERNEL_WIDTHS}")
        if next_qrow <= qrow or (next_qrow - qrow) * 32 % bits:
            raise RuntimeError(
                f"stand-in: group {i} spans q_weight rows {qrow}..{next_qrow}, not whole {bits}-bit rows"
            )
        group_rows = (next_qrow - qrow) * 32 // bits
        if group_rows % ROW_STEP[bits]:
            raise RuntimeError(f"stand-in: group {i} has {group_rows} rows; the {bits}-bit loop steps {ROW_STEP[bits]}")
        rows[bits] = rows.get(bits, 0) + group_rows
        order.append(KERNEL_WIDTHS.index(bits))
    if order != sorted(order):
        raise RuntimeError(
            f"stand-in: group widths {[gr[2 * i] for i in range(groups)]} are not in the kernels' order {KERNEL_WIDTHS}"
        )
    if sum(rows.values()) != height:
        raise RuntimeError(f"stand-in: groups hold {sum(rows.values())} rows, q_group_map {height}")
    perm = None
    if not _is_none(q_perm):
        perm = q_perm.long()
        if perm.shape[0] != height or not torch.equal(torch.sort(perm).values, torch.arange(height)):
            raise RuntimeError("stand-in: q_perm is not a permutation of the rows")
        if not torch.equal(q_invperm.long()[perm], torch.arange(height)):
            raise RuntimeError("stand-in: q_invperm is not q_perm's inverse")
    expected_map = make_group_map(q_groups.cpu(), q_weight.shape[0])
    if not torch.equal(q_group_map.cpu(), expected_map):
        raise RuntimeError("stand-in: q_group_map does not match q_groups")
    qm = QMatrix(height, width, q_weight, perm, q_scale, q_scale_max, gr, None if _is_none(bias) else bias, rows)
    return _new_handle(qm)


def make_q_matrix_split(*args: Any) -> int:
    raise NotImplementedError("stand-in: make_q_matrix_split (tensor parallel)")


def free_q_matrix(handle: int) -> None:
    _free(handle, QMatrix)


def reconstruct(q_handle: int, output: Tensor) -> None:
    qm = _get(q_handle, QMatrix)
    if tuple(output.shape) != (qm.height, qm.width):
        raise RuntimeError("stand-in TORCH_CHECK: Output tensor doesn't match shape of QMatrix")
    _check_dtype(output, torch.half, "output")
    output.copy_(qm.weight())


def _gemm(a: Tensor, qm: QMatrix, clear: bool = True) -> Tensor:
    """gemm_half_q_half_cuda: c = bias + a @ W (cuBLAS half GEMM: fp32 accumulate, fp16 out)."""
    out = a.float() @ qm.weight().float()
    if qm.bias is not None and clear:
        out += qm.bias.float()
    return out.half()


def gemm_half_q_half(a: Tensor, b: int, c: Tensor, force_cuda: bool) -> None:
    qm = _get(b, QMatrix)
    _check_dtype(a, torch.half, "a")
    _check_dtype(c, torch.half, "c")
    if a.shape[0] != c.shape[0] or qm.height != a.shape[1] or qm.width != c.shape[1]:
        raise RuntimeError("stand-in TORCH_CHECK: a, b and c have incompatible shapes")
    c.copy_(_gemm(a, qm))


# --- norms, RoPE, elementwise (ext_norm.cpp, cuda/rms_norm.cu, ext_rope.cpp, cuda/rope.cu) ---------


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """rms_norm_kernel: fp32 sum of squares of x clamped to ±65504, y = x·w·rsqrt(mean + eps)."""
    xf = x.float().clamp(-65504.0, 65504.0)
    rmf = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf * w.float() * rmf


def rms_norm(x: Tensor, w: Tensor, y: Tensor, epsilon: float) -> None:
    _check_dtype(w, torch.half, "w")
    if x.shape[-1] != w.shape[0] or x.shape != y.shape:
        raise RuntimeError("stand-in TORCH_CHECK_SHAPES: rms_norm x/w/y")
    y.copy_(_rms(x, w, epsilon).to(y.dtype))


def rms_norm_(x: Tensor, w: Tensor, epsilon: float) -> None:
    rms_norm(x, w, x, epsilon)


def softcap_(x: Tensor, scale: float) -> None:
    x.copy_((torch.tanh(x.float() / scale) * scale).to(x.dtype))


def _rope(
    x: Tensor,
    sin: Tensor,
    cos: Tensor,
    past_len: int,
    past_lens: Tensor | None,
    num_heads: int,
    head_dim: int,
    neox: bool,
) -> None:
    """rope_cuda_arr_neox / _gptj in place on x viewed as [batch, rows, head_dim] (rows = tokens·heads):
    the position of row r is past_len + r // num_heads (past_len -1: each batch's past_lens entry;
    otherwise past_lens adds to it); only the first sincos_size columns rotate."""
    batch = x.shape[0]
    rows = x.numel() // head_dim // batch
    view = x.view(batch, rows, head_dim)
    sincos_size = cos.shape[-1]
    sin2, cos2 = sin.reshape(-1, sincos_size), cos.reshape(-1, sincos_size)
    for b in range(batch):
        if past_len == -1:
            start = max(int(past_lens[b]), 0)
        else:
            start = past_len + (int(past_lens[b]) if past_lens is not None else 0)
        positions = (start + torch.arange(rows) // num_heads).clamp(min=0)
        s, c = sin2[positions], cos2[positions]
        xb = view[b, :, :sincos_size]
        if neox:
            half = sincos_size // 2
            left, right = xb[:, :half].clone(), xb[:, half:].clone()
            # item_l = l·cos − r·sin ; item_r = r·cos + l·sin (one rounding per half op, as __hfma2)
            xb[:, :half] = (left.float() * c[:, :half].float() - right.float() * s[:, :half].float()).half()
            xb[:, half:] = (right.float() * c[:, :half].float() + left.float() * s[:, :half].float()).half()
        else:
            even, odd = xb[:, 0::2].clone(), xb[:, 1::2].clone()
            xb[:, 0::2] = (even.float() * c[:, 0::2].float() - odd.float() * s[:, 0::2].float()).half()
            xb[:, 1::2] = (odd.float() * c[:, 1::2].float() + even.float() * s[:, 1::2].float()).half()


def rope_(
    x: Tensor, sin: Tensor, cos: Tensor, past_len: int, num_heads: int, head_dim: int, offsets: Tensor, neox_style: bool
) -> None:
    _check_dtype(x, torch.half, "x")
    _rope(x, sin, cos, past_len, None if _is_none(offsets) else offsets, num_heads, head_dim, neox_style)


# --- fused attention and MLP (ext_qattn.cpp, cuda/q_attn.cu, ext_qmlp.cpp, cuda/q_mlp.cu) ----------


@dataclass
class QAttn:
    layernorm: Tensor | None
    eps: float
    q: QMatrix
    k: QMatrix
    v: QMatrix
    o: QMatrix
    num_heads: int
    num_kv_heads: int
    head_dim: int
    has_residual: bool
    rope_style: int
    residual_fp32: bool


def make_q_attn(
    layernorm: Tensor,
    layernorm_bias: Tensor,
    layernorm_is_rms: bool,
    headnorm_is_rms: bool,
    norm_epsilon: float,
    q_q_proj: int,
    q_k_proj: int,
    q_v_proj: int,
    q_o_proj: int,
    temp_state: Tensor,
    temp_dq: Tensor,
    max_rows: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    has_residual: bool,
    rope_style: int,
    sincos_size: int,
    q_norm: Tensor,
    k_norm: Tensor,
    post_layernorm: Tensor,
    post_layernorm_bias: Tensor,
    residual_fp32: bool,
    use_graphs: bool,
) -> int:
    if not layernorm_is_rms or not _is_none(q_norm) or not _is_none(k_norm) or not _is_none(post_layernorm):
        raise NotImplementedError("stand-in make_q_attn: only RMS pre-norm attention (Mistral/Llama)")
    _check_dtype(layernorm, torch.half, "layernorm", optional=True)
    q, k, v, o = (_get(h, QMatrix) for h in (q_q_proj, q_k_proj, q_v_proj, q_o_proj))
    norm = None if _is_none(layernorm) else layernorm
    if norm is not None:
        for name, m in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            if m.height != norm.shape[0]:
                raise RuntimeError(f"stand-in TORCH_CHECK: {name} is wrong shape")
        if o.width != norm.shape[0]:
            raise RuntimeError("stand-in TORCH_CHECK: o_proj is wrong shape")
    if q.width != num_heads * head_dim or k.width != num_kv_heads * head_dim or v.width != num_kv_heads * head_dim:
        raise RuntimeError("stand-in: q/k/v widths do not match the heads")
    if sincos_size != head_dim:
        raise NotImplementedError("stand-in make_q_attn: partial rotary")
    return _new_handle(
        QAttn(
            norm, norm_epsilon, q, k, v, o, num_heads, num_kv_heads, head_dim, has_residual, rope_style, residual_fp32
        )
    )


def free_q_attn(handle: int) -> None:
    _free(handle, QAttn)


def q_attn_set_loras(handle: int, *lora_maps: dict) -> int:
    return _no_loras(lora_maps)


def q_attn_forward_1(
    q_attn: int,
    x: Tensor,
    batch_size: int,
    q_len: int,
    past_len: int,
    past_lens: Tensor,
    q_temp: Tensor,
    k_temp: Tensor,
    v_temp: Tensor,
    sin: Tensor,
    cos: Tensor,
    loras: list,
    loras_temp: Tensor,
) -> None:
    """QAttn::forward_cuda_1_run: norm x, project q/k/v into the temps, RoPE on q and k."""
    attn = _get(q_attn, QAttn)
    _check_dtype(x, torch.float if attn.residual_fp32 else torch.half, "x")
    _check_dtype(past_lens, torch.int, "past_lens", optional=True)
    if loras:
        raise NotImplementedError("stand-in: LoRA")
    rows = batch_size * q_len
    flat = x.reshape(rows, -1)
    state = _rms(flat, attn.layernorm, attn.eps).half() if attn.layernorm is not None else flat.half()
    for temp, m in ((q_temp, attn.q), (k_temp, attn.k), (v_temp, attn.v)):
        temp.view(rows, -1).copy_(_gemm(state, m))
    if attn.rope_style:
        lens = None if _is_none(past_lens) else past_lens
        neox = attn.rope_style == 2
        _rope(q_temp.view(batch_size, -1), sin, cos, past_len, lens, attn.num_heads, attn.head_dim, neox)
        _rope(k_temp.view(batch_size, -1), sin, cos, past_len, lens, attn.num_kv_heads, attn.head_dim, neox)


def q_attn_forward_2(
    q_attn: int, x: Tensor, attn_output: Tensor, batch_size: int, q_len: int, loras: list, loras_temp: Tensor
) -> None:
    """QAttn::forward_cuda_2: x (+)= attn_output @ o_proj (accumulated onto x when has_residual)."""
    attn = _get(q_attn, QAttn)
    if loras:
        raise NotImplementedError("stand-in: LoRA")
    rows = batch_size * q_len
    flat = x.view(rows, -1)
    out = _gemm(attn_output.reshape(rows, -1).half(), attn.o)
    # cuBLAS with beta = 1 adds in fp32 and rounds once to the output's type
    flat.copy_((flat.float() + out.float()).to(flat.dtype) if attn.has_residual else out.to(flat.dtype))


@dataclass
class QMLP:
    layernorm: Tensor | None
    eps: float
    gate: QMatrix | None
    up: QMatrix
    down: QMatrix
    max_rows: int
    act_gelu: bool
    has_residual: bool
    residual_fp32: bool


def make_q_mlp(
    layernorm: Tensor,
    layernorm_bias: Tensor,
    layernorm_is_rms: bool,
    norm_epsilon: float,
    q_gate: int,
    q_up: int,
    q_down: int,
    temp_state: Tensor,
    temp_a: Tensor,
    temp_b: Tensor,
    temp_dq: Tensor,
    max_rows: int,
    act_gelu: bool,
    has_residual: bool,
    post_layernorm: Tensor,
    post_layernorm_bias: Tensor,
    residual_fp32: bool,
    use_graphs: bool,
) -> int:
    if not layernorm_is_rms or not _is_none(post_layernorm):
        raise NotImplementedError("stand-in make_q_mlp: only RMS pre-norm MLPs (Mistral/Llama)")
    _check_dtype(layernorm, torch.half, "layernorm", optional=True)
    gate = _get(q_gate, QMatrix) if q_gate else None
    up, down = _get(q_up, QMatrix), _get(q_down, QMatrix)
    norm = None if _is_none(layernorm) else layernorm
    if norm is not None and (up.height != norm.shape[0] or (gate is not None and gate.height != norm.shape[0])):
        raise RuntimeError("stand-in TORCH_CHECK: gate_proj/up_proj is wrong shape")
    return _new_handle(QMLP(norm, norm_epsilon, gate, up, down, max_rows, act_gelu, has_residual, residual_fp32))


def free_q_mlp(handle: int) -> None:
    _free(handle, QMLP)


def q_mlp_set_loras(handle: int, *lora_maps: dict) -> int:
    return _no_loras(lora_maps)


def _silu_half(x: Tensor) -> Tensor:
    """q_mlp_activation.cuh silu(half2): x · rcp(1 + exp(−x)), each op rounded to half."""
    e = torch.exp(-x.float()).half()
    r = (1.0 / (1.0 + e.float()).half().float()).half()
    return (x.float() * r.float()).half()


def q_mlp_forward_(q_mlp: int, x: Tensor, loras: list, loras_temp: Tensor) -> None:
    """QMLP::forward_run_: x (+)= down(act(gate(norm x)) · up(norm x))."""
    mlp = _get(q_mlp, QMLP)
    _check_dtype(x, torch.float if mlp.residual_fp32 else torch.half, "x")
    if loras:
        raise NotImplementedError("stand-in: LoRA")
    dim = x.shape[-1]
    rows = x.numel() // dim
    if dim != mlp.up.height or rows > mlp.max_rows:
        raise RuntimeError("stand-in TORCH_CHECK: x is wrong shape / too many rows in x")
    if mlp.act_gelu:
        raise NotImplementedError("stand-in: gelu MLP")
    flat = x.view(rows, dim)
    state = _rms(flat, mlp.layernorm, mlp.eps).half() if mlp.layernorm is not None else flat.half()
    if mlp.gate is not None:
        a = (_silu_half(_gemm(state, mlp.gate)).float() * _gemm(state, mlp.up).float()).half()
    else:
        a = _silu_half(_gemm(state, mlp.up))
    out = _gemm(a, mlp.down)
    flat.copy_((flat.float() + out.float()).to(flat.dtype) if mlp.has_residual else out.to(flat.dtype))


# --- sampling (ext_sampling.cpp, cpp/sampling.cpp, cpp/generator.cpp) ------------------------------


def apply_rep_penalty(
    sequence: Tensor,
    penalty_max: float,
    sustain: int,
    decay: int,
    alpha_frequency: float,
    alpha_presence: float,
    logits: Tensor,
) -> None:
    """cpp/sampling.cpp apply_rep_penalty_cpu: over the last `sustain + decay` tokens (newest first),
    the penalty fades from penalty_max to 1 across `decay`; each distinct token is penalised once
    (positive logits divided, negative multiplied) and frequency/presence subtract per occurrence."""
    _check_dtype(sequence, torch.long, "sequence")
    _check_dtype(logits, torch.float, "logits")
    if penalty_max == 1.0 and alpha_frequency == 0.0 and alpha_presence == 0.0:
        return
    raise NotImplementedError("stand-in: repetition/frequency/presence penalties")


def logit_filter_exclusive(filter: Tensor, exclusive_lists: list[list[int]]) -> None:
    """Keep only the listed (sorted) ids of each row."""
    _check_dtype(filter, torch.bool, "filter")
    if filter.shape[0] != len(exclusive_lists):
        raise RuntimeError("stand-in TORCH_CHECK: Number of lists does not match batch size")
    for row, ids in zip(filter, exclusive_lists):
        keep = torch.zeros_like(row)
        keep[torch.tensor(ids, dtype=torch.long)] = True
        row &= keep


def fast_fill_cpu_ones_bool(tensor: Tensor) -> None:
    _check_dtype(tensor, torch.bool, "tensor")
    tensor.fill_(True)


def fast_fadd_cpu(a: Tensor, b: Tensor) -> None:
    _check_dtype(a, torch.float, "a")
    _check_dtype(b, torch.float, "b")
    a.view(-1, b.numel()).add_(b.view(1, -1))


def fast_copy_cpu(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise RuntimeError("stand-in TORCH_CHECK: fast_copy_cpu shapes/dtypes")
    dst.copy_(src)


def sample_basic(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    top_a: float,
    min_p: float,
    tfs: float,
    typical: float,
    random: float,
    output_tokens: Tensor,
    output_probs: Tensor,
    output_kprobs: Tensor,
    output_ktokens: Tensor,
    logit_filter: Tensor,
    mirostat: bool,
    mirostat_mu: list[float],
    mirostat_tau: float,
    mirostat_eta: float,
    post_temperature: float,
    xtc_mask: Tensor,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    min_temp: float = 0,
    max_temp: float = 0.0,
    temp_exponent: float = 1.0,
    smoothing_factor: float = 0.0,
    skew: float = 0.0,
) -> list[float]:
    """ext_sampling.cpp sample_basic for temperature, top-k, top-p and min-p (the filters the
    project sends); the others raise. Candidates are kept in descending probability."""
    _check_dtype(logits, torch.float, "logits")
    _check_dtype(output_tokens, torch.long, "output_tokens")
    _check_dtype(output_probs, torch.float, "output_probs")
    _check_dtype(logit_filter, torch.bool, "logit_filter", optional=True)
    unsupported = {
        "top_a": top_a > 0,
        "tfs": 0 < tfs < 1,
        "typical": 0 < typical < 1,
        "mirostat": mirostat,
        "xtc": xtc_probability > 0,
        "dynamic temperature": max_temp > min_temp,
        "post temperature": post_temperature != 1.0,
        "smoothing": smoothing_factor > 0,
        "skew": skew != 0,
    }
    if any(unsupported.values()):
        raise NotImplementedError(f"stand-in sample_basic: {[k for k, v in unsupported.items() if v]}")
    if temperature < 0.01:
        temperature, top_k = 1.0, 1
    vocab = logits.shape[-1]
    num_probs = 0 if _is_none(output_kprobs) else output_kprobs.shape[2]
    for i in range(logits.shape[0]):
        row = logits[i].reshape(-1).double()
        allowed = torch.ones(vocab, dtype=torch.bool) if _is_none(logit_filter) else logit_filter[i].reshape(-1)
        masked = torch.where(allowed, row, torch.tensor(-math.inf, dtype=torch.float64))
        probs = torch.softmax((masked - masked.max()) / temperature, dim=-1)  # softmax_cpu
        order = torch.argsort(probs, descending=True, stable=True)
        p, ids = probs[order], order
        if top_k == 1:
            first = int(torch.argmax(masked))  # top_k_cpu's greedy special case: the max logit
            p, ids = torch.ones(1, dtype=torch.float64), torch.tensor([first])
        elif 0 < top_k < vocab:
            p, ids = p[:top_k], ids[:top_k]
            p = p / p.sum()
        if len(p) > 1 and 0 < top_p < 1:  # top_p_cpu: the smallest head whose mass exceeds top_p
            keep = int(torch.searchsorted(torch.cumsum(p, 0), torch.tensor([top_p], dtype=torch.float64)).item()) + 1
            p, ids = p[: max(keep, 1)], ids[: max(keep, 1)]
            p = p / p.sum()
        if len(p) > 1 and 0 < min_p < 1:  # min_p_cpu: keep p ≥ top · min_p
            keep = p >= p[0] * min_p
            p, ids = p[keep], ids[keep]
            p = p / p.sum()
        for j in range(num_probs):
            output_ktokens[i, 0, j] = int(ids[j]) if j < len(ids) and p[j] > 0 else 0
            output_kprobs[i, 0, j] = float(p[j]) if j < len(ids) else 0.0
        # multinomial_cpu: first candidate whose running sum passes random · 0.9998
        pick = int(torch.searchsorted(torch.cumsum(p, 0), torch.tensor([random * 0.9998], dtype=torch.float64)).item())
        pick = min(pick, len(p) - 1)
        output_tokens[i, 0] = int(ids[pick])
        output_probs[i, 0] = float(p[pick])
        if logits.shape[0] > 1:  # the extension derives the next row's random number from this one
            r = random
            for _ in range(10):
                r = math.fmod((r + 1.337 + random) ** 2, 1.0)
            random = r
    return mirostat_mu


def partial_strings_match(match: np.ndarray, offsets: np.ndarray, strings: np.ndarray) -> int:
    """cpp/generator.cpp: over UTF-32 buffers, the start of the first whole occurrence of a string
    in `match`, -2 if one is cut off by the end of `match` (first string first), -1 if none."""
    q = np.frombuffer(match.tobytes(), dtype=np.uint32)
    offs = np.frombuffer(offsets.tobytes(), dtype=np.uint32)
    buf = np.frombuffer(strings.tobytes(), dtype=np.uint32)
    for i in range(len(offs) - 1):
        s = buf[offs[i] // 4 : offs[i + 1] // 4]
        a = 0
        while a < len(q):
            a0, b = a, 0
            while q[a] == s[b]:
                a, b = a + 1, b + 1
                if b == len(s):
                    return a0
                if a == len(q):
                    return -2
            a = a0 + 1
    return -1


def count_match(a: Tensor, b: Tensor, max_a: int) -> int:
    """ext_cache.cpp count_match: equal leading elements of a and b, at most min(max_a, b's length)."""
    limit = min(max_a, b.shape[1])
    equal = (a.reshape(-1)[:limit] == b.reshape(-1)[:limit]).tolist()
    return next((i for i, same in enumerate(equal) if not same), limit)


# --- file loading (ext_stloader.cpp) ---------------------------------------------------------------


def stloader_read(filename: str, offset: int, size: int, target: Tensor) -> None:
    """Read `size` bytes at `offset` of a safetensors file into a contiguous target."""
    with Path(filename).open("rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise RuntimeError(f"stand-in stloader_read: {filename} ends before byte {offset + size}")
    target.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def tensor_remap(tensor: Tensor, index: Tensor) -> None:
    """ext_stloader.cpp tensor_remap: column c of every row becomes old column index[c]."""
    _check_dtype(tensor, torch.int, "tensor")
    _check_dtype(index, torch.int, "index")
    if tensor.shape[1] != index.shape[0]:
        raise RuntimeError("stand-in TORCH_CHECK_SHAPES: tensor_remap")
    tensor.copy_(tensor[:, index.long()])


def tensor_remap_4bit(tensor: Tensor, index: Tensor) -> None:
    """tensor_remap over eight 4-bit fields per int32 (low field first), as q_scale is packed."""
    _check_dtype(tensor, torch.int, "tensor")
    _check_dtype(index, torch.int, "index")
    if index.shape[0] != tensor.shape[1] * 8:
        raise RuntimeError("stand-in TORCH_CHECK_SHAPES: tensor_remap_4bit")
    words = tensor.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    fields = ((words[:, :, None] >> shifts) & 0xF).reshape(words.shape[0], -1)[:, index.long()]
    packed = (fields.reshape(words.shape[0], -1, 8) << shifts).sum(dim=-1)
    tensor.copy_(packed.to(torch.int64).where(packed < 2**31, packed - 2**32).to(torch.int32))


def stfiles_free_pinned_buffer() -> None:
    pass


def __getattr__(name: str) -> Any:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"stand-in exllamav2_ext.{name}: not needed by the project's use of exllamav2")

    if name.startswith("__"):
        raise AttributeError(name)
    return missing
