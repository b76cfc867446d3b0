"""The quantize job: one measurement, then every EXL2 tier, streamed one decoder block at a time.

    for stage in the stages from the saved one: state = run(stage, state); save the state

CALIBRATE builds the calibration rows (text and image conversations) and checks the weights; EMBED
turns them into the decoder's input (PixtralModel.embed: token embeddings, image features at
`[IMG]`); MEASURE (measure.py) records the error of every anchor layout of every linear; QUANTIZE
(tiers.py) allocates bits per tier and runs GPTQ block by block, each tier on its own stream; COMPILE
writes each tier's checkpoint and model card. One layer's weights, one row state and one output
shard are in memory at a time; row states live on disk (streams.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from calibration.rows import build_rows
from pixtral.config import PixtralConfig, load_config
from pixtral.errors import OptionError
from pixtral.exl2.metadata import CalibrationInfo, EXL2Metadata
from pixtral.exl2.writer import EXLLAMAV2_VERSION, is_finished_tier, write_exl2_checkpoint
from pixtral.model import PixtralModel, load_module
from pixtral.outputs import atomic_write_bytes
from pixtral.progress import Progress, ProgressFn
from pixtral.tokenizer import PixtralTokenizer
from pixtral.weights import Checkpoint, weights_bytes
from quantize.card import render_card
from quantize.compute import Compute
from quantize.job import (
    MEASUREMENT_FILE,
    ROWS_FILE,
    STAGES,
    JobContext,
    JobState,
    QuantizeConfig,
    Stage,
    describe_mismatch,
    load_state,
    save_state,
    tier_name,
)
from quantize.measure import QUANTIZER_VERSION, run_measure
from quantize.parallel import InProcess, Workers, connect_workers
from quantize.preflight import check_model, check_plan, scan_weights
from quantize.streams import EMBEDDED, RowStore, load_rows, save_rows
from quantize.tiers import HEAD, run_tiers


@dataclass(frozen=True)
class TierResult:
    name: str
    target_bpw: float
    bpw: float
    head_bpw: float
    size_bytes: int
    calibration_kl: float
    path: Path


def run_quantize(config: QuantizeConfig, progress: ProgressFn | None = None) -> list[TierResult]:
    """Run (or resume) the whole job; return one result per tier."""
    progress = progress or (lambda event: None)
    cfg, tokenizer = check_model(Path(config.model_dir))
    check_plan(config, cfg)
    ray_workers = connect_workers(config, cfg)  # a cluster that cannot be reached fails before any work
    try:
        return _run_job(config, cfg, tokenizer, progress, ray_workers)
    finally:
        if ray_workers is not None:
            ray_workers.close()


def _run_job(
    config: QuantizeConfig,
    cfg: PixtralConfig,
    tokenizer: PixtralTokenizer,
    progress: ProgressFn,
    ray_workers: Workers | None,
) -> list[TierResult]:
    state = _resumed_job(config)
    if (
        state is None
        and config.resume
        and all(is_finished_tier(Path(config.out_dir) / tier_name(b)) for b in config.tiers)
    ):
        return [_finished_tier(Path(config.out_dir) / tier_name(b)) for b in sorted(config.tiers)]  # nothing left to do
    state = state or _start_job(config, tokenizer, progress)
    store = RowStore(config.work_dir / "streams", config.calibration.length, cfg.text.hidden_size)
    ctx = JobContext(config, cfg, Compute.for_device(config.device, config.damp), store, progress)
    workers = ray_workers or InProcess(ctx)
    for stage in STAGES[STAGES.index(state.stage) : STAGES.index(Stage.DONE)]:
        started = time.monotonic()
        state = STAGE_RUNNERS[stage](ctx, state, workers)
        timings = {**state.timings, stage.value: state.timings.get(stage.value, 0.0) + time.monotonic() - started}
        state = replace(state, stage=STAGES[STAGES.index(stage) + 1], blocks_done=0, timings=timings)
        save_state(ctx.work, state)
    results = _results(ctx, state)
    if not config.keep_work:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return results


def _resumed_job(config: QuantizeConfig) -> JobState | None:
    saved = load_state(config.work_dir) if config.resume else None
    if saved is not None and saved.fingerprint != config.fingerprint():
        raise OptionError(
            f"{config.work_dir}: the job there used other settings "
            f"({describe_mismatch(saved.frozen, config.frozen())}); "
            "use the same settings with --resume, or --force to start over"
        )
    return saved


def _start_job(config: QuantizeConfig, tokenizer: PixtralTokenizer, progress: ProgressFn) -> JobState:
    """CALIBRATE: build the rows and scan the weights before anything is written, so bad input
    fails fast and leaves no output behind; then create the work directory."""
    started = time.monotonic()
    progress(Progress("calibrate", 0, 1, "building calibration rows"))
    rows = build_rows(config.calibration, tokenizer)
    if config.check_weights:
        scan_weights(Path(config.model_dir), lambda d, t: progress(Progress("check weights", d, t)))
    if config.force and Path(config.out_dir).exists():
        shutil.rmtree(config.work_dir, ignore_errors=True)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if (
        config.measurement is not None
        and Path(config.measurement).resolve() != (Path(config.out_dir) / MEASUREMENT_FILE).resolve()
    ):
        # every job leaves one
        atomic_write_bytes(Path(config.out_dir) / MEASUREMENT_FILE, Path(config.measurement).read_bytes())
    save_rows(config.work_dir / ROWS_FILE, rows)
    images = sum(len(r.images) for r in rows)
    state = JobState(
        config.fingerprint(),
        config.frozen(),
        Stage.EMBED,
        images=images,
        timings={"calibrate": time.monotonic() - started},
    )
    save_state(config.work_dir, state)
    progress(Progress("calibrate", 1, 1, f"{len(rows)} rows, {images} images"))
    return state


@torch.no_grad()
def stage_embed(ctx: JobContext, state: JobState, _workers: Workers) -> JobState:
    """EMBED: the decoder input of every row, image features at the `[IMG]` positions."""
    rows, dtype, device = load_rows(ctx.work / ROWS_FILE), ctx.compute.dtype, ctx.compute.device
    with torch.device("meta"):
        model = PixtralModel(ctx.cfg)
    with Checkpoint(ctx.config.model_dir) as ckpt:
        load_module(model.vision_tower, ckpt, "vision_tower.", dtype, device)
        load_module(model.multi_modal_projector, ckpt, "multi_modal_projector.", dtype, device)
        load_module(model.language_model.model.embed_tokens, ckpt, "language_model.model.embed_tokens.", dtype, device)
    for index, row in enumerate(rows):
        images = [torch.from_numpy(p).to(device) for p in row.images] or None
        ctx.store.write(EMBEDDED, index, model.embed(row.input_ids.to(device)[None], images)[0])
        ctx.progress(Progress("embed", index + 1, len(rows)))
    return state


def stage_compile(ctx: JobContext, state: JobState, _workers: Workers) -> JobState:
    """COMPILE: each tier's complete model directory and card (atomically); a tier already written is kept."""
    spec = ctx.config.calibration
    tiers = dict(state.tiers)
    for done, name in enumerate(sorted(tiers), start=1):
        tier, out = tiers[name], Path(ctx.config.out_dir) / name
        if tier.compiled or (ctx.config.resume and is_finished_tier(out)):
            continue  # finished by this job (a kill can fall between the rename and the job update)
        calibration = CalibrationInfo(
            spec.rows, spec.length, spec.dataset_name(), state.images, spec.image_token_weight
        )
        metadata = EXL2Metadata(
            version=EXLLAMAV2_VERSION,
            bits=tier.target_bpw,
            head_bits=ctx.config.head_bits,
            source_model=Path(ctx.config.model_dir).resolve().name,
            calibration=calibration,
            quantizer=QUANTIZER_VERSION,
            decoder_bpw=round(tier.bpw, 4),
            head_bpw=round(tier.head_bpw or 0.0, 4),
            calibration_kl=tier.calibration_kl,
            measure_rows=spec.measure_rows,
        )
        write_exl2_checkpoint(
            out,
            ctx.config.model_dir,
            [*tier.plans, HEAD],
            _quantized_loader(ctx.work / "quantized" / name),
            metadata,
            ctx.config.shard_mb,
            force=True,
            extra_files=lambda tmp, m=metadata, t=name: _card(t, m, tmp),
        )
        tiers[name] = replace(tier, compiled=True)
        state = replace(state, tiers=tiers)
        save_state(ctx.work, state)
        if not ctx.config.keep_work:
            shutil.rmtree(ctx.work / "quantized" / name, ignore_errors=True)  # in the tier now
        ctx.progress(Progress("compile", done, len(tiers), name))
    return state


def _card(tier: str, metadata: EXL2Metadata, tier_dir: Path) -> dict[str, bytes]:
    """The tier's README.md model card, with what quantize knows (eval adds the measured quality)."""
    return {"README.md": render_card(tier, metadata, weights_bytes(tier_dir)).encode("utf-8")}


def _quantized_loader(qdir: Path) -> Callable[[str], dict[str, torch.Tensor]]:
    """Reads one block file at a time (tensors are requested in layer order)."""
    from safetensors.torch import load_file

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(prefix: str) -> dict[str, torch.Tensor]:
        if prefix == HEAD:
            file = "head"
        else:
            layer, block = prefix.split(".layers.")[1].split(".")[:2]
            file = f"layer-{layer}-{block}"
        if file not in cache:
            cache.clear()
            cache[file] = load_file(str(qdir / f"{file}.safetensors"))
        return {k[len(prefix) + 1 :]: v for k, v in cache[file].items() if k.rpartition(".")[0] == prefix}

    return load


def _finished_tier(path: Path) -> TierResult:
    """A tier written earlier, as its config.json and files describe it."""
    meta = load_config(path).quantization
    assert meta is not None  # _is_exl2_dir said so
    return TierResult(
        path.name,
        meta.bits,
        meta.decoder_bpw or meta.bits,
        meta.head_bpw or 0.0,
        weights_bytes(path),
        meta.calibration_kl or float("nan"),
        path,
    )


def _results(ctx: JobContext, state: JobState) -> list[TierResult]:
    out = []
    for name, tier in sorted(state.tiers.items(), key=lambda item: item[1].target_bpw):
        path = Path(ctx.config.out_dir) / name
        out.append(
            TierResult(
                name,
                tier.target_bpw,
                tier.bpw,
                tier.head_bpw or 0.0,
                weights_bytes(path),
                tier.calibration_kl or float("nan"),
                path,
            )
        )
    return out


STAGE_RUNNERS: dict[Stage, Callable[[JobContext, JobState, Workers], JobState]] = {
    Stage.EMBED: stage_embed,
    Stage.MEASURE: run_measure,
    Stage.QUANTIZE: run_tiers,
    Stage.COMPILE: stage_compile,
}
