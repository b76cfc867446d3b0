"""Checks that run before any long work: bad input fails in seconds, with a message naming the cause."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pixtral.config import PixtralConfig, load_config
from pixtral.device import resolve_device
from pixtral.errors import OptionError, check_range
from pixtral.exl2.format import pad_columns, storage_bits
from pixtral.exl2.writer import is_finished_tier
from pixtral.model import parameter_counts
from pixtral.outputs import OutputError, check_outside_inputs, check_replaceable, check_writable
from pixtral.text import DECODER_LINEARS
from pixtral.tokenizer import PixtralTokenizer
from pixtral.weights import Checkpoint, WeightsError
from quantize.candidates import HEAD_OPTIONS, head_plan, linear_shapes
from quantize.job import MEASUREMENT_FILE, QuantizeConfig, load_state, tier_name
from quantize.plan import minimum_bpw, tier_planner
from quantize.streams import disk_bytes

FLOAT_DTYPES = {"F16", "BF16", "F32"}
MAX_BPW = 8.0


def check_model(model_dir: Path) -> tuple[PixtralConfig, PixtralTokenizer]:
    """Config, tokenizer, one float dtype throughout, every tensor present (in seconds: no tensor is
    read); returns the config and the tokenizer for the job."""
    cfg = load_config(model_dir)
    tokenizer = PixtralTokenizer(model_dir)
    with Checkpoint(model_dir) as ckpt:
        names = ckpt.names()
        if any(n.endswith(".q_weight") for n in names):
            raise WeightsError(f"{model_dir}: already EXL2-quantized; quantize the fp16/bf16 source model")
        dtypes: dict[str, str] = {}
        for name in names:
            dtypes.setdefault(ckpt.dtype(name), name)
        floats = {d: n for d, n in dtypes.items() if d in FLOAT_DTYPES}
        if len(floats) > 1:
            listing = ", ".join(f"{d} (e.g. {n})" for d, n in sorted(floats.items()))
            raise WeightsError(
                f"{model_dir}: mixed float dtypes {listing}; expected one dtype for the whole checkpoint"
            )
        for prefix, (rows, _) in linear_shapes(cfg).items():
            if prefix + ".weight" not in ckpt:
                raise WeightsError(f"{model_dir}: tensor {prefix}.weight missing (needed by config.json)")
            if ckpt.shape(prefix + ".weight")[1] != rows:
                raise WeightsError(
                    f"{ckpt.shard_of(prefix + '.weight')}: {prefix}.weight has {ckpt.shape(prefix + '.weight')[1]} "
                    f"inputs, config says {rows}"
                )
    return cfg, tokenizer


def scan_weights(model_dir: Path, tick: Callable[[int, int], None] = lambda d, t: None) -> None:
    """Every float tensor finite (one pass over the weights, streamed: the slow check, run after the
    fast ones and before any long work)."""
    with Checkpoint(model_dir) as ckpt:
        names = ckpt.names()
        for done, name in enumerate(names, start=1):
            tensor = ckpt.get(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise WeightsError(f"{ckpt.shard_of(name)}: tensor {name} contains NaN or inf values")
            tick(done, len(names))


MAX_ROWS = 100_000
MIN_LENGTH, MAX_LENGTH = 16, 1 << 20
MAX_SHARD_MB = 1 << 20
DISK_HEADROOM = 0.95  # leave the last bit of the disk for the tiers being written


def check_options(config: QuantizeConfig, cfg: PixtralConfig) -> None:
    """Every option (flag or recipe field) in range for this model, before any work."""
    spec = config.calibration
    check_range("--rows (calibration.rows)", spec.rows, 1, MAX_ROWS)
    check_range("--measure-rows (calibration.measure_rows)", spec.measure_rows, 1, spec.rows)
    context = min(cfg.text.max_position_embeddings, MAX_LENGTH)
    check_range("--length (calibration.length)", spec.length, MIN_LENGTH, context)
    check_range("--image-fraction (calibration.image_fraction)", spec.image_fraction, 0.0, 1.0, "a number")
    check_range("calibration.image_token_share", spec.image_token_share, 0.05, 1.0, "a number")
    check_range("calibration.random_rows", spec.random_rows, 0, spec.rows)
    check_range("calibration.image_token_weight", spec.image_token_weight, 0.001, 100.0, "a number")
    check_range("--seed (calibration.seed)", spec.seed, 0, 2**63 - 1)
    check_range("--shard-size", config.shard_mb, 1, MAX_SHARD_MB)
    check_range("damp", config.damp, 1e-6, 1.0, "a number")
    resolve_device(config.device)
    if not config.tiers:
        raise OptionError("--bpw: no target bpw given (e.g. --bpw 4.0, or a list such as 2.5,3.0,4.0)")
    names = [tier_name(b) for b in config.tiers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OptionError(f"--bpw: {repeated[0].removesuffix('bpw')} is given more than once")
    if config.workers > 1 or config.ray_address is not None:
        from quantize.parallel import ray_host_port, ray_module

        ray_module()  # installed, or a one-line error saying how
        if config.ray_address is not None:
            ray_host_port(config.ray_address)
    if config.head_bits not in HEAD_OPTIONS:
        raise OptionError(
            f"--head-bits: expected one of {', '.join(map(str, sorted(HEAD_OPTIONS)))}, got {config.head_bits}"
        )
    lowest = minimum_bpw(linear_shapes(cfg))
    for bpw in config.tiers:
        if not lowest <= bpw <= MAX_BPW:
            raise OptionError(
                f"--bpw: {bpw:g} is outside what EXL2 reaches for this model ({lowest:.3f} to {MAX_BPW:g})"
            )
    _check_disk(config, cfg)


def _check_disk(config: QuantizeConfig, cfg: PixtralConfig) -> None:
    """Row states and quantized tensors live on disk: refuse a job that cannot fit where OUT_DIR is."""
    need = job_footprint(config, cfg)["disk"]
    place = Path(config.out_dir).absolute()
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if need > DISK_HEADROOM * free:
        raise OptionError(
            f"--rows {config.calibration.rows} × --length {config.calibration.length} × {len(config.tiers)} tiers: "
            f"the job needs about {need / 2**30:.1f} GiB of disk under {place}, {free / 2**30:.1f} GiB are free; "
            "lower --rows or --length, or quantize fewer tiers per run (reuse OUT/measurement.json with "
            "--measurement)"
        )


def check_plan(config: QuantizeConfig, cfg: PixtralConfig) -> None:
    """Options in range, a usable measurement, and an output directory we may write."""
    check_options(config, cfg)
    if config.measurement is not None:
        tier_planner(Path(config.measurement), linear_shapes(cfg))  # read and checked before any work
    check_output_dir(config)


def check_output_dir(config: QuantizeConfig) -> None:
    """OUT_DIR may not overlap the model; --force replaces only our tiers, measurement.json and .work;
    --resume needs a job (or finished tiers) to continue."""
    out_dir = Path(config.out_dir)
    check_outside_inputs(out_dir, [config.model_dir], "output directory")
    check_writable(out_dir)
    if not out_dir.exists():
        if config.resume:
            raise OutputError(f"{out_dir}: does not exist, so there is no job to resume; run without --resume")
        return
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if not (config.resume or config.force):
        raise OutputError(f"{out_dir}: already exists; pass --resume to continue a job there, or --force to start over")
    written = [out_dir / tier_name(b) for b in config.tiers] + [config.work_dir]
    sources = [*map(Path, config.calibration.text_sources), *map(Path, config.calibration.image_sources)]
    for path in written + [out_dir / MEASUREMENT_FILE]:
        check_outside_inputs(path, sources, "output")
    if config.measurement is not None:
        for path in written:
            check_outside_inputs(path, [Path(config.measurement)], "output")
    if config.force:
        for tier in written[:-1]:
            check_replaceable(tier, True, "quantize")
        return
    # a .work without a saved job is a job stopped before its first save point: --resume starts it again
    if (
        load_state(config.work_dir) is None
        and not config.work_dir.is_dir()
        and not all(is_finished_tier(out_dir / tier_name(b)) for b in config.tiers)
    ):
        raise OutputError(
            f"{out_dir}: holds no unfinished quantize job to resume; pass --force to start over there "
            "(only its tiers, measurement.json and .work are replaced)"
        )


def tier_bytes(cfg: PixtralConfig, bpw: float, head_bits: int) -> int:
    """A tier's size on disk: the decoder's linears at `bpw` (exllamav2's accounting, which the
    allocation lands within 0.01), the head at `head_bits`, everything else fp16 as the source."""
    counts, t = parameter_counts(cfg), cfg.text
    head = t.vocab_size * t.hidden_size
    fp16 = counts["total"] - counts["decoder_linears"] - head
    return int(
        counts["decoder_linears"] * bpw / 8
        + storage_bits(head_plan(t.hidden_size, head_bits), t.vocab_size) / 8
        + 2 * fp16
    )


def job_footprint(config: QuantizeConfig, cfg: PixtralConfig) -> dict[str, int]:
    """Peak host RAM (computing on the CPU) and peak disk of a job, from the shapes the code handles.

    RAM (per worker; `ram_all_workers` for --workers N on one host): the largest of (a) measuring the
    widest linear: its layer in fp32, the measurement rows and their reference outputs, the four
    Hessians and their factors, GPTQ's three work matrices plus up to three snapshots of them, two
    weight copies; (b) a tier's head: the head weight and three work
    matrices, and the fp16 reference distributions the calibration KL is taken against.
    Disk: the row states (streams.disk_bytes) plus every tier's quantized tensors before compiling.
    """
    t, spec = cfg.text, config.calibration
    shapes = {spec_.name: spec_.shape(t) for spec_ in DECODER_LINEARS}
    layer = 4 * sum(n * k for n, k in shapes.values())
    rows = spec.measure_rows * spec.length * t.hidden_size * 2
    groups = {s.hessian_group: shapes[s.name][1] for s in DECODER_LINEARS}
    hessians = 2 * 4 * sum(k * k for k in groups.values())
    widest = max(pad_columns(n) * k for n, k in shapes.values())
    measure = layer + 2 * rows + hessians + 4 * widest * (3 + 3 + 2) + spec.length * t.intermediate_size * 4 * 3
    head = (
        4 * pad_columns(t.vocab_size) * t.hidden_size * 4
        + spec.measure_rows * 64 * t.vocab_size * 2
        + 2 * 4 * t.hidden_size**2
    )
    params = sum(n * k for n, k in shapes.values()) * t.num_hidden_layers
    disk = disk_bytes(spec.rows, config.reference_rows, len(config.tiers), spec.length, t.hidden_size) + int(
        params * sum(config.tiers) / 8
    )
    ram = int(max(measure, head))  # each worker holds its own layer, Hessians and work matrices (per GPU on CUDA)
    return {"ram": ram, "ram_all_workers": ram * config.workers, "disk": int(disk)}  # the row states are shared on disk
