"""QUANTIZE: every tier, GPTQ of each block with the tier's layouts on the tier's own (already
quantized) stream, so each layer is calibrated on the inputs it will really see, against the fp16
model's outputs on the fp16 stream (asymmetric calibration; `QuantizeConfig.asymmetric`); then each head.

Block by block: the fp16 reference stream advances too (the measurement rows for the calibration KL,
every row for asymmetric GPTQ), then each tier's block is quantized and run; a checkpoint follows
every block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pixtral.exl2.format import GroupPlan, bits_per_weight
from pixtral.progress import Progress
from pixtral.text import RMSNorm, layer_prefix
from pixtral.weights import Checkpoint
from quantize.block import BLOCKS, BlockRunner, block_specs
from quantize.candidates import head_plan, linear_shapes
from quantize.compute import Compute
from quantize.gptq import DAMP, GPTQResult, PreparedHessian, gptq_quantize, pack_exl2, prepare_hessian
from quantize.hessian import CrossAccumulator
from quantize.job import MEASUREMENT_FILE, JobContext, JobState, TierState, save_state, tier_name
from quantize.parallel import StreamBlock, Task, TierBlock, TierHead, Workers
from quantize.plan import tier_planner
from quantize.streams import EMBED, REFERENCE, Location, current_location, next_location, save_tensors

HEAD = "language_model.lm_head"

KL_POSITIONS = 64  # positions per row the calibration KL is taken at (its reference is kept for every tier)


def quantize_block(
    runner: BlockRunner,
    block: str,
    states: Callable[[], Iterable[Tensor]],
    plans: dict[str, GroupPlan],
    weights: Sequence[Tensor] | None = None,
    reference: Callable[[], Iterable[Tensor]] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """GPTQ every linear of the block with its layout; the runner's layer then holds the quantized
    weights (run it for the block's outputs). Returns the EXL2 tensors per linear. `states` (and
    `reference`) give a fresh pass over the rows each call.

    With `reference` (the fp16 stream's rows at this block), each linear's target is the fp16 output
    on the fp16 inputs, not its own output on the tier's inputs (`asymmetric_target`), and the input
    groups go in order (GPTAQ): o_proj's inputs come through the quantized q/k/v, down_proj's
    through the quantized gate/up, so each residual linear also makes up for its block's first
    linears. Without it, every group's inputs come from one fp16 pass, as exllamav2 does."""
    specs = block_specs(block)
    if reference is None:
        accumulators, _ = runner.hessians(block, states(), weights, keep_outputs=False)
        prepared = {group: prepare_hessian(acc.result(), runner.compute.damp) for group, acc in accumulators.items()}
        return {s.name: _quantize_linear(runner, s.name, prepared[s.hessian_group], plans[s.name]) for s in specs}
    fp16 = {spec.name: runner.layer.get_submodule(spec.name).weight.data for spec in specs}
    tensors = {}
    for group in dict.fromkeys(spec.hessian_group for spec in specs):  # the block's order
        pair = runner.cross_hessian(block, group, states(), reference(), fp16, weights)
        H, D = pair.result(), pair.cross()
        prepared = prepare_hessian(H, runner.compute.damp)
        for spec in (s for s in specs if s.hessian_group == group):
            target = asymmetric_target(fp16[spec.name], H, D, runner.compute.damp)
            tensors[spec.name] = _quantize_linear(runner, spec.name, prepared, plans[spec.name], target)
    return tensors


def _quantize_linear(
    runner: BlockRunner, name: str, prepared: PreparedHessian, plan: GroupPlan, target: Tensor | None = None
) -> dict[str, Tensor]:
    """GPTQ of one linear (of `target`, else its weight); the quantized weight goes into the layer."""
    weight = runner.layer.get_submodule(name).weight.data if target is None else target
    result = gptq_quantize(weight, prepared, plan, group=runner.compute.group)
    runner.set_weight(name, result.weight)
    return pack_exl2(result, plan)


def asymmetric_target(W: Tensor, H: Tensor, D: Tensor, damp: float = DAMP) -> Tensor:
    """The weight whose output on the tier's inputs x best matches W's on the fp16 inputs x_ref:
    argmin_Q E‖x_ref Wᵀ − x Qᵀ‖² = W + W D H⁻¹, with H = E[xᵀx] and D = E[(x_ref − x)ᵀ x] (GPTAQ's
    asymmetric calibration). E‖x_ref Wᵀ − x Qᵀ‖² differs from E‖x (W' − Q)ᵀ‖² by a constant, so GPTQ
    of this target on H minimizes the error against fp16 itself. H is damped as GPTQ damps it."""
    Hd = H.float().clone()
    Hd.diagonal().add_(torch.clamp(damp * Hd.diagonal().mean(), min=1e-5))
    L = torch.linalg.cholesky(Hd)  # damped: positive definite
    correction = torch.cholesky_solve(D.float().T @ W.float().T, L).T
    return (W.float() + correction).to(W.dtype)


def kl_positions(length: int) -> Tensor:
    return torch.linspace(0, length - 1, min(KL_POSITIONS, length)).round().long()


class HeadQuantizer:
    """The output head of every tier (GPTQ on the tier's final-norm outputs) and each tier's KL to
    fp16 on the measurement rows; the fp16 reference distributions are computed once."""

    def __init__(self, norm: torch.nn.Module, W: Tensor, compute: Compute):
        self.norm, self.W, self.compute = norm, W, compute
        self.reference: list[Tensor] = []  # per measurement row: fp16 log-probs at kl_positions

    def _log_probs(self, state: Tensor, W: Tensor) -> Tensor:
        """Next-token log-probs (fp32) at the row's KL positions, with head weight W."""
        x = self.norm(state.to(self.compute.device, self.compute.dtype))[kl_positions(state.shape[0])]
        return F.log_softmax((x @ W.T).float(), -1)

    def add_reference(self, state: Tensor) -> None:
        self.reference.append(self._log_probs(state, self.W).half())

    def quantize(
        self,
        states: Iterable[Tensor],
        plan: GroupPlan,
        weights: Sequence[Tensor] | None,
        reference: Iterable[Tensor] | None = None,
    ) -> GPTQResult:
        """GPTQ of the head on the tier's final rows; with `reference` (the fp16 stream's final rows),
        against the fp16 logits (`asymmetric_target`)."""
        accumulator = CrossAccumulator(self.W.shape[1], self.compute.device)
        references = iter(reference) if reference is not None else None
        for index, state in enumerate(states):
            accumulator.token_weight = weights[index] if weights else None
            x = self.norm(state.to(self.compute.device, self.compute.dtype))
            if references is None:
                accumulator.add(x)
            else:
                accumulator.add_pair(self.norm(next(references).to(self.compute.device, self.compute.dtype)), x)
        H = accumulator.result()
        target = self.W
        if references is not None:
            target = asymmetric_target(self.W, H, accumulator.cross(), self.compute.damp)
        return gptq_quantize(target, prepare_hessian(H, self.compute.damp), plan, group=self.compute.group)

    def kl(self, states: Iterable[Tensor], weight: Tensor) -> float:
        """Mean over the measurement rows' sampled positions of KL(fp16 ‖ tier)."""
        Wq = weight.to(self.compute.device, self.compute.dtype)
        total = count = 0.0
        for reference, state in zip(self.reference, states):
            log_q = self._log_probs(state, Wq)
            log_p = reference.float()
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0]
        return total / max(count, 1)


def run_tiers(ctx: JobContext, state: JobState, workers: Workers) -> JobState:
    """QUANTIZE: allocate every tier's layouts (once), then block by block (the reference stream and
    every tier's block as tasks, in parallel on Ray workers), then the heads."""
    if not state.tiers:
        state = replace(state, tiers=allocate_tiers(ctx))
        save_state(ctx.work, state)
    rows, tiers, asymmetric = ctx.config.calibration.rows, sorted(state.tiers), ctx.config.asymmetric
    total = 2 * ctx.layers * len(tiers)
    for index in range(state.blocks_done, 2 * ctx.layers):
        layer, which = divmod(index, 2)
        block = BLOCKS[which]
        streams = dict(state.streams)
        fp16 = current_location(streams, REFERENCE)
        tasks: list[Task] = [StreamBlock(REFERENCE, layer, block, fp16, ctx.config.reference_rows)]
        for tier in tiers:
            plans = {s.name: state.tiers[tier].plans[layer_prefix(layer) + s.name] for s in block_specs(block)}
            tasks.append(
                TierBlock(
                    tier, layer, block, plans, current_location(streams, tier), rows, fp16 if asymmetric else None
                )
            )
        done = iter(range(index * len(tiers) + 1, total + 1))

        def report(task: Task, worker: int, _result: object, layer: int = layer) -> None:
            if isinstance(task, TierBlock):
                where = f" (worker {worker + 1})" if workers.count > 1 else ""
                ctx.progress(
                    Progress("quantize", next(done), total, f"layer {layer + 1}/{ctx.layers}, {task.tier}{where}")
                )

        for task, target in zip(tasks, workers.map(tasks, report)):
            streams[task.tier if isinstance(task, TierBlock) else task.stream] = target
        state = replace(state, blocks_done=index + 1, streams=streams)
        save_state(ctx.work, state)
    return quantize_heads(ctx, state, workers)


def advance(ctx: JobContext, runner: BlockRunner, block: str, stream: str, source: Location, count: int) -> Location:
    """Run the block over a stream's rows, one at a time, into its other buffer; return that buffer."""
    target = next_location(stream, source)
    for row, state in enumerate(ctx.store.rows(source, count)):
        ctx.store.write(target, row, runner.run(block, [state])[0])
    return target


def allocate_tiers(ctx: JobContext) -> dict[str, TierState]:
    """Every tier's layout per linear, from our measurement or exllamav2's."""
    source = ctx.config.measurement or Path(ctx.config.out_dir) / MEASUREMENT_FILE
    planner = tier_planner(source, linear_shapes(ctx.cfg))
    out = {}
    for bpw in sorted(ctx.config.tiers):
        tier = planner(bpw)
        plans = {name: plan.groups for name, plan in tier.plans.items()}
        out[tier_name(bpw)] = TierState(tier_name(bpw), bpw, tier.bits, tier.numel, plans)
    return out


@torch.no_grad()
def quantize_head(
    ctx: JobContext,
    heads: dict[Location, HeadQuantizer],
    tier: str,
    location: Location,
    reference: Location,
    weights: Sequence[Tensor] | None,
) -> tuple[float, float]:
    """One tier's head on its final stream (tensors saved in the work directory), its rows weighted by
    `weights`; returns its bpw and calibration KL. `heads` keeps the fp16 reference per reference
    stream for the next tier."""
    if reference not in heads:
        with Checkpoint(ctx.config.model_dir) as ckpt:
            norm = RMSNorm(ctx.cfg.text.hidden_size, ctx.cfg.text.rms_norm_eps).to(ctx.compute.device)
            norm.weight.data = ckpt.get("language_model.model.norm.weight").to(ctx.compute.device, ctx.compute.dtype)
            heads[reference] = HeadQuantizer(
                norm, ckpt.get(f"{HEAD}.weight").to(ctx.compute.device, ctx.compute.dtype), ctx.compute
            )
        for row in ctx.store.rows(reference, ctx.config.calibration.measure_rows):
            heads[reference].add_reference(row)
    quantizer, rows, count = heads[reference], ctx.config.calibration.rows, ctx.config.calibration.measure_rows
    plan = head_plan(quantizer.W.shape[1], ctx.config.head_bits)
    fp16_rows = ctx.store.rows(reference, rows) if ctx.config.asymmetric else None
    result = quantizer.quantize(ctx.store.rows(location, rows), plan, weights, fp16_rows)
    save_tensors(
        ctx.work / "quantized" / tier / "head.safetensors",
        {f"{HEAD}.{k}": v for k, v in pack_exl2(result, plan).items()},
    )
    kl = quantizer.kl(ctx.store.rows(location, count), result.weight)
    return bits_per_weight(plan, result.codes.shape[1]), kl


def quantize_heads(ctx: JobContext, state: JobState, workers: Workers) -> JobState:
    """Each tier's head on its final stream and its calibration KL against the fp16 reference (tasks:
    in parallel on Ray workers); the state is saved as each finishes."""
    tiers = dict(state.tiers)
    todo = [name for name in sorted(tiers) if tiers[name].head_bpw is None]  # others were done before an interruption
    reference = current_location(state.streams, REFERENCE)
    finished = iter(range(len(tiers) - len(todo) + 1, len(tiers) + 1))

    def save(task: Task, _worker: int, result: tuple[float, float]) -> None:
        nonlocal state
        tiers[task.tier] = replace(tiers[task.tier], head_bpw=result[0], calibration_kl=result[1])
        state = replace(state, tiers=dict(tiers))
        save_state(ctx.work, state)
        ctx.progress(Progress("quantize heads", next(finished), len(tiers), task.tier))

    workers.map([TierHead(name, current_location(state.streams, name), reference) for name in todo], save)
    if not ctx.config.keep_work:
        for stream in (REFERENCE, *tiers, EMBED):
            ctx.store.remove(stream)  # every tier has its layers and head: the row states are done with
    return state
