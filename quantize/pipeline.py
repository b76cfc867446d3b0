"""The quantize job: one measurement, then every EXL2 tier, streamed one decoder layer at a time.

    for stage in stages from the saved one: run it; save the job state atomically

CALIBRATE builds the calibration rows (text and image conversations) and checks the weights;
EMBED turns them into the decoder's input (token embeddings, image features at `[IMG]`); MEASURE
quantizes every anchor candidate of every linear on the fp16 stream and records its error; QUANTIZE
allocates bits per tier and runs GPTQ layer by layer, each tier on its own quantized stream (plus an
fp16 reference stream for the calibration KL); COMPILE writes each tier's checkpoint.
Only one layer's weights, the row states and one output shard are in memory at any time.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from calibration.rows import build_rows
from runtime.config import PixtralConfig
from runtime.exl2_format import GroupPlan, bits_per_weight
from runtime.model import PixtralModel, insert_image_features, load_layer, load_module
from runtime.outputs import atomic_write_bytes, atomic_write_json
from runtime.text import RMSNorm, layer_prefix
from runtime.tokenizer import PixtralTokenizer
from runtime.weights import Checkpoint

from .checkpoint import EXLLAMAV2_VERSION, write_exl2_checkpoint
from .gptq import gptq_quantize, pack_exl2, prepare_hessian
from .hessian import HessianAccumulator
from .job import (
    MEASUREMENT_FILE,
    STAGES,
    JobState,
    QuantizeConfig,
    Stage,
    describe_mismatch,
    load_state,
    save_state,
    tier_name,
)
from .layerwise import BLOCKS, BlockRunner, Compute, block_specs, measure_block, quantize_block
from .options import anchor_candidates, head_plan
from .preflight import check_model, check_plan, linear_shapes
from .strategy import (
    LinearMeasurement,
    anchors_from_json,
    anchors_to_json,
    load_measurement,
    measurement_from_json,
    measurement_to_json,
    plan_tier,
)
from .strategy_exllamav2 import is_exllamav2_measurement, plan_tier_exllamav2
from .streams import load_rows, load_streams, save_rows, save_streams, save_tensors

QUANTIZER_VERSION = "pixtral-exl2 0.1.0"
ROWS_FILE, EMBED_FILE, PARTIAL_MEASUREMENT = "calibration.safetensors", "states-embed.safetensors", "measurement.partial.json"
HEAD = "language_model.lm_head"


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int
    detail: str = ""


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class TierResult:
    name: str
    target_bpw: float
    bpw: float
    head_bpw: float
    size_bytes: int
    calibration_kl: float
    path: Path


@dataclass
class JobContext:
    config: QuantizeConfig
    cfg: PixtralConfig
    state: JobState
    compute: Compute
    progress: ProgressFn
    last_save: float = field(default_factory=time.monotonic)

    @property
    def work(self) -> Path:
        return self.config.work_dir

    def save(self) -> None:
        save_state(self.work, self.state)

    def checkpoint_streams(self, layer: int, streams: dict[str, list[torch.Tensor]], force: bool = False) -> None:
        """Save row states after `layer` layers if the interval has passed (or `force`), then the job."""
        if not force and time.monotonic() - self.last_save < self.config.checkpoint_seconds:
            return
        name = f"states-{self.state.stage.value}-{layer}.safetensors"
        save_streams(self.work / name, streams)
        previous, self.state.states_file, self.state.layer = self.state.states_file, name, layer
        self.save()
        if previous and previous != name:
            (self.work / previous).unlink(missing_ok=True)
        self.last_save = time.monotonic()


def run_quantize(config: QuantizeConfig, progress: ProgressFn | None = None) -> list[TierResult]:
    """Run (or resume) the whole job; return one result per tier."""
    progress = progress or (lambda event: None)
    cfg = check_model(Path(config.model_dir), check_values=False)
    check_plan(config, cfg)
    state = _resumed_job(config)
    if state is None and config.resume and all(_is_exl2_dir(Path(config.out_dir) / tier_name(b)) for b in config.tiers):
        return [_finished_tier(Path(config.out_dir) / tier_name(b)) for b in sorted(config.tiers)]  # nothing left to do
    state = state or _start_job(config, progress)
    ctx = JobContext(config, cfg, state, Compute.for_device(config.device, config.damp), progress)
    for stage in STAGES[STAGES.index(ctx.state.stage) : STAGES.index(Stage.DONE)]:
        started = time.monotonic()
        STAGE_RUNNERS[stage](ctx)
        ctx.state.timings[stage.value] = ctx.state.timings.get(stage.value, 0.0) + time.monotonic() - started
        ctx.state.stage, ctx.state.layer = STAGES[STAGES.index(stage) + 1], 0
        ctx.save()
    results = _results(ctx)
    if not config.keep_work:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return results


def _resumed_job(config: QuantizeConfig) -> JobState | None:
    saved = load_state(config.work_dir) if config.resume else None
    if saved is not None and saved.fingerprint != config.fingerprint():
        raise ValueError(f"{config.work_dir}: the job there used other settings ({describe_mismatch(saved.frozen, config.frozen())}); "
                         "use the same settings with --resume, or --force to start over")  # fmt: skip
    return saved


def _start_job(config: QuantizeConfig, progress: ProgressFn) -> JobState:
    """CALIBRATE: build the rows and scan the weights before anything is written, so bad input
    fails fast and leaves no output behind; then create the work directory."""
    started = time.monotonic()
    progress(Progress("calibrate", 0, 1, "building calibration rows"))
    rows = build_rows(config.calibration, PixtralTokenizer(config.model_dir))
    if config.check_weights:
        check_model(Path(config.model_dir), True, lambda d, t: progress(Progress("check weights", d, t)))
    if config.force and Path(config.out_dir).exists():
        shutil.rmtree(config.work_dir, ignore_errors=True)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if config.measurement is not None:
        _keep_measurement(Path(config.measurement), Path(config.out_dir) / MEASUREMENT_FILE)
    save_rows(config.work_dir / ROWS_FILE, rows)
    state = JobState(config.fingerprint(), config.frozen(), stage=Stage.EMBED, images=sum(len(r.images) for r in rows))
    state.timings[Stage.CALIBRATE.value] = time.monotonic() - started
    save_state(config.work_dir, state)
    progress(Progress("calibrate", 1, 1, f"{len(rows)} rows, {sum(len(r.images) for r in rows)} images"))
    return state


def _keep_measurement(source: Path, copy: Path) -> None:
    """A job reusing a measurement still leaves it in OUT_DIR, as every job does."""
    if source.resolve() != copy.resolve():
        atomic_write_bytes(copy, source.read_bytes())


@torch.no_grad()
def stage_embed(ctx: JobContext) -> None:
    """Decoder inputs of every row: token embeddings, with image features at the [IMG] positions."""
    rows, dtype, device = load_rows(ctx.work / ROWS_FILE), ctx.compute.dtype, ctx.compute.device
    with torch.device("meta"):
        model = PixtralModel(ctx.cfg)
    with Checkpoint(ctx.config.model_dir) as ckpt:
        load_module(model.vision_tower, ckpt, "vision_tower.", dtype, device)
        load_module(model.multi_modal_projector, ckpt, "multi_modal_projector.", dtype, device)
        load_module(model.language_model.model.embed_tokens, ckpt, "language_model.model.embed_tokens.", dtype, device)
    states = []
    for index, row in enumerate(rows):
        ids = row.input_ids.to(device)[None]
        embeds = model.language_model.model.embed_tokens(ids)
        if row.images:
            features = model.image_features([torch.from_numpy(p).to(device) for p in row.images])
            embeds = insert_image_features(embeds, ids, features.to(embeds.dtype), ctx.cfg.image_token_index)
        states.append(embeds[0].half().cpu())
        ctx.progress(Progress("embed", index + 1, len(rows)))
    save_streams(ctx.work / EMBED_FILE, {"rows": states})


def stage_measure(ctx: JobContext) -> None:
    """Measure every anchor candidate of every linear, layer by layer, on the fp16 stream."""
    if ctx.config.measurement is not None:
        return
    if ctx.state.layer == 0:
        states = load_streams(ctx.work / EMBED_FILE)["rows"][: ctx.config.calibration.measure_rows]
    else:
        states = load_streams(ctx.work / ctx.state.states_file)["m"]
    partial_path = ctx.work / PARTIAL_MEASUREMENT
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    layers, shapes = ctx.cfg.text.num_hidden_layers, linear_shapes(ctx.cfg)
    steps = sum(len(anchor_candidates(k)) for name, (k, _) in shapes.items() if name.startswith(layer_prefix(0)))
    with Checkpoint(ctx.config.model_dir) as ckpt:
        for index in range(ctx.state.layer, layers):
            ticks = itertools.count(index * steps + 1)

            def tick(index: int = index, ticks: Iterator[int] = ticks) -> None:
                ctx.progress(Progress("measure", next(ticks), layers * steps, f"layer {index + 1}/{layers}"))

            runner = BlockRunner(load_layer(ckpt, ctx.cfg, index), ctx.cfg.text, ctx.config.calibration.length, ctx.compute)
            for block in BLOCKS:
                results, states = measure_block(runner, block, states, tick)
                for name, anchors in results.items():
                    partial[layer_prefix(index) + name] = anchors_to_json(anchors)
            atomic_write_json(partial_path, partial)
            ctx.checkpoint_streams(index + 1, {"m": states}, force=index + 1 == layers)
    measurements = {name: LinearMeasurement(*shapes[name], anchors_from_json(entries)) for name, entries in partial.items()}
    atomic_write_json(Path(ctx.config.out_dir) / MEASUREMENT_FILE, measurement_to_json(measurements, _measurement_meta(ctx)))


def _measurement_meta(ctx: JobContext) -> dict:
    spec = ctx.config.calibration
    return {"model": str(ctx.config.model_dir), "quantizer": QUANTIZER_VERSION,
            "calibration": {"rows": spec.measure_rows, "length": spec.length, "dataset": spec.dataset_name()}}  # fmt: skip


def _tier_plans(ctx: JobContext) -> dict[str, dict[str, GroupPlan]]:
    """Per tier, the layout of every decoder linear (allocated once, kept in the job state)."""
    if not ctx.state.plans:
        source = ctx.config.measurement or Path(ctx.config.out_dir) / MEASUREMENT_FILE
        data, shapes = load_measurement(source), linear_shapes(ctx.cfg)
        targets = sorted(ctx.config.tiers)
        if is_exllamav2_measurement(data):
            tiers = [plan_tier_exllamav2(data, shapes, bpw, str(source)) for bpw in targets]
        else:
            measurements = measurement_from_json(data, str(source))
            tiers = [plan_tier(measurements, bpw) for bpw in targets]
        for bpw, tier in zip(targets, tiers):
            ctx.state.plans[tier_name(bpw)] = {k: [list(g) for g in p.groups] for k, p in tier.plans.items()}
            ctx.state.tier_bits[tier_name(bpw)] = {"target": bpw, "bits": tier.bits, "numel": tier.numel, "bpw": tier.bpw}
        ctx.save()
    return {tier: {k: GroupPlan(tuple(tuple(g) for g in groups)) for k, groups in plans.items()}
            for tier, plans in ctx.state.plans.items()}  # fmt: skip


@torch.no_grad()
def stage_quantize(ctx: JobContext) -> None:
    """GPTQ every layer for every tier on that tier's quantized stream; then the heads."""
    plans = _tier_plans(ctx)
    tiers = sorted(plans)
    if ctx.state.layer == 0:
        rows = load_streams(ctx.work / EMBED_FILE)["rows"]
        streams = {"ref": rows[: ctx.config.calibration.measure_rows], **{t: list(rows) for t in tiers}}
    else:
        streams = load_streams(ctx.work / ctx.state.states_file)
    layers, length = ctx.cfg.text.num_hidden_layers, ctx.config.calibration.length
    with Checkpoint(ctx.config.model_dir) as ckpt:
        for index in range(ctx.state.layer, layers):
            base = load_layer(ckpt, ctx.cfg, index)
            reference = BlockRunner(copy.deepcopy(base), ctx.cfg.text, length, ctx.compute)
            for block in BLOCKS:
                streams["ref"] = reference.run(block, streams["ref"])
            for done, tier in enumerate(tiers, start=1):
                runner = BlockRunner(copy.deepcopy(base), ctx.cfg.text, length, ctx.compute)
                tensors = {}
                for block in BLOCKS:
                    block_plans = {s.name: plans[tier][layer_prefix(index) + s.name] for s in block_specs(block)}
                    quantized, streams[tier] = quantize_block(runner, block, streams[tier], block_plans)
                    tensors.update({f"{layer_prefix(index)}{n}.{k}": v for n, d in quantized.items() for k, v in d.items()})
                (ctx.work / "quantized" / tier).mkdir(parents=True, exist_ok=True)
                save_tensors(ctx.work / "quantized" / tier / f"layer-{index}.safetensors", tensors)
                ctx.progress(Progress("quantize", index * len(tiers) + done, layers * len(tiers), f"layer {index + 1}/{layers}, {tier}"))
            ctx.checkpoint_streams(index + 1, streams, force=index + 1 == layers)
        _quantize_heads(ctx, ckpt, streams, tiers)


def _quantize_heads(ctx: JobContext, ckpt: Checkpoint, streams: dict[str, list[torch.Tensor]], tiers: list[str]) -> None:
    """The head of each tier (GPTQ on its final-norm outputs), and the tier's calibration KL vs fp16."""
    device, dtype = ctx.compute.device, ctx.compute.dtype
    norm = RMSNorm(ctx.cfg.text.hidden_size, ctx.cfg.text.rms_norm_eps)
    norm.weight.data = ckpt.get("language_model.model.norm.weight").to(device, dtype)
    W = ckpt.get(f"{HEAD}.weight").to(device, dtype)
    for done, tier in enumerate(tiers, start=1):
        accumulator = HessianAccumulator(W.shape[1], device)
        for state in streams[tier]:
            accumulator.add(norm(state.to(device, dtype)))
        plan = head_plan(W.shape[1], ctx.config.head_bits)
        result = gptq_quantize(W, prepare_hessian(accumulator.result(), ctx.compute.damp), plan)
        save_tensors(ctx.work / "quantized" / tier / "head.safetensors", {f"{HEAD}.{k}": v for k, v in pack_exl2(result, plan).items()})
        Wq = result.weight.to(dtype)
        kl = [_kl(norm(r.to(device, dtype)) @ W.T, norm(q.to(device, dtype)) @ Wq.T) for r, q in zip(streams["ref"], streams[tier])]
        ctx.state.tier_errors[tier] = sum(kl) / len(kl)
        ctx.state.tier_bits[tier]["head_bpw"] = bits_per_weight(plan, result.codes.shape[1])
        ctx.progress(Progress("quantize heads", done, len(tiers), tier))


def _kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(fp16 ‖ quantized) of the next-token distributions."""
    p_log = F.log_softmax(reference_logits.float(), dim=-1)
    q_log = F.log_softmax(logits.float(), dim=-1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def stage_compile(ctx: JobContext) -> None:
    """Write each tier's complete model directory (atomically); a tier already written is kept."""
    spec, images = ctx.config.calibration, ctx.state.images
    for done, tier in enumerate(sorted(ctx.state.plans), start=1):
        out = Path(ctx.config.out_dir) / tier
        if tier in ctx.state.compiled or (ctx.config.resume and _is_exl2_dir(out)):
            continue  # finished by this job (a kill can fall between the rename and the job update)
        bits = ctx.state.tier_bits[tier]
        qconfig = {"quant_method": "exl2", "version": EXLLAMAV2_VERSION, "bits": bits["target"], "head_bits": ctx.config.head_bits,
                   "calibration": {"rows": spec.rows, "length": spec.length, "dataset": spec.dataset_name(), "images": images},
                   "quantizer": QUANTIZER_VERSION, "decoder_bpw": round(bits["bpw"], 4), "head_bpw": round(bits["head_bpw"], 4),
                   "calibration_kl": ctx.state.tier_errors.get(tier), "measure_rows": spec.measure_rows}  # fmt: skip
        prefixes = [*ctx.state.plans[tier], HEAD]
        write_exl2_checkpoint(out, ctx.config.model_dir, prefixes, _quantized_loader(ctx.work / "quantized" / tier), qconfig,
                              ctx.config.shard_mb, force=True)  # fmt: skip
        ctx.state.compiled.append(tier)
        ctx.save()
        ctx.progress(Progress("compile", done, len(ctx.state.plans), tier))


def _is_exl2_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def _quantized_loader(qdir: Path) -> Callable[[str], dict[str, torch.Tensor]]:
    """Reads one layer file at a time (tensors are requested in layer order)."""
    from safetensors.torch import load_file

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(prefix: str) -> dict[str, torch.Tensor]:
        file = "head" if prefix == HEAD else f"layer-{prefix.split('.layers.')[1].split('.')[0]}"
        if file not in cache:
            cache.clear()
            cache[file] = load_file(str(qdir / f"{file}.safetensors"))
        return {k[len(prefix) + 1 :]: v for k, v in cache[file].items() if k.rpartition(".")[0] == prefix}

    return load


def _finished_tier(path: Path) -> TierResult:
    """A tier written earlier, as its config.json and files describe it."""
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return TierResult(path.name, quant["bits"], quant["decoder_bpw"], quant.get("head_bpw", 0.0), size,
                      quant.get("calibration_kl") or float("nan"), path)  # fmt: skip


def _results(ctx: JobContext) -> list[TierResult]:
    out = []
    for tier in sorted(ctx.state.plans, key=lambda t: ctx.state.tier_bits[t]["target"]):
        path = Path(ctx.config.out_dir) / tier
        bits = ctx.state.tier_bits[tier]
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        out.append(TierResult(tier, bits["target"], bits["bpw"], bits.get("head_bpw", 0.0), size,
                              ctx.state.tier_errors.get(tier, float("nan")), path))  # fmt: skip
    return out


STAGE_RUNNERS: dict[Stage, Callable[[JobContext], None]] = {
    Stage.EMBED: stage_embed,
    Stage.MEASURE: stage_measure,
    Stage.QUANTIZE: stage_quantize,
    Stage.COMPILE: stage_compile,
}
