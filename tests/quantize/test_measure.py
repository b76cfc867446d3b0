"""The measurement's shortcut: o_proj's and down_proj's block error computed from the Hessian is the
error a forward pass measures (README: "computed exactly from the Hessian")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtral.config import load_config
from pixtral.model import load_layer
from pixtral.text import DECODER_LINEARS
from pixtral.weights import Checkpoint
from quantize.block import RESIDUAL_LINEARS, BlockRunner, energy
from quantize.candidates import make_plan
from quantize.compute import Compute
from quantize.gptq import gptq_quantize, output_error, prepare_hessian


@pytest.mark.parametrize("name", RESIDUAL_LINEARS)
def test_residual_linear_error_from_the_hessian_equals_the_forward_pass(tiny_spm_model: Path, name: str) -> None:
    cfg = load_config(tiny_spm_model)
    with Checkpoint(tiny_spm_model) as ckpt:
        layer = load_layer(ckpt, cfg, 0)
    block = name.split(".")[0]
    runner = BlockRunner(layer, cfg.text, 64, Compute.for_device("cpu"))
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(64, cfg.text.hidden_size, generator=gen) for _ in range(3)]
    weights = [torch.rand(64, generator=gen) + 0.1 for _ in rows]  # token weights, as image tokens get
    accumulators, reference = runner.hessians(block, rows, weights)
    accumulator = accumulators[next(s.hessian_group for s in DECODER_LINEARS if s.name == name)]
    original = runner.layer.get_submodule(name).weight.data.clone()
    K = original.shape[1]
    result = gptq_quantize(original.float(), prepare_hessian(accumulator.result()), make_plan(K, 3, 3, K))
    exact = output_error(original.float(), result.weight, accumulator.result(), accumulator.tokens)
    runner.set_weight(name, result.weight)
    measured = runner.squared_error(block, rows, reference, weights)
    assert exact > 0 and exact == pytest.approx(measured, rel=1e-3)  # fp32 sums in another order
    assert exact / energy(reference, weights) < 1  # a relative error, as measurement.json stores
