"""The job's independent work as tasks, run in this process or on N workers through Ray.

What is independent: inside a decoder block, each tier's GPTQ and forward pass (each on its own
stream), the fp16 reference stream's pass, each linear's anchors in the measurement, and, at the
end, each tier's head. The driver (pipeline.py and the stages) keeps the job state: it hands out a
block's tasks, waits for all of them, then saves the state, so resume, save points and `--force`
mean what they mean in one process.

What moves where: tasks carry only names, plans and stream locations. Row states stay in the job's
disk streams (streams.py), written by the task that computes them and read by the tier's next task:
a tier's rows are rows × length × hidden fp16 per block (12B, 100 × 2048: 2 GiB), too large to pass
through the object store every block and already on disk for resume. Hessians never move: a task
computes its own from its rows in one forward pass, cheaper than shipping them (down_proj's 14336²
fp32 is 0.8 GiB). Quantized tensors are written to the work directory by the task (atomically);
the driver receives locations and numbers. A Ray cluster therefore needs OUT_DIR on storage every
node sees.

Each task computes exactly what the serial code computes, with the same thread count, so every byte
of the output is the same for any number of workers. A worker that dies (kill -9, a lost node) is
restarted and its task run again: tasks only write files they fully rewrite.
"""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pixtral.config import PixtralConfig
from pixtral.errors import OptionError, UserError
from pixtral.exl2.format import GroupPlan
from pixtral.model import load_layer
from pixtral.text import DecoderLayer, layer_prefix
from pixtral.weights import Checkpoint
from quantize.block import BlockRunner
from quantize.compute import Compute
from quantize.job import JobContext, QuantizeConfig
from quantize.streams import Location, RowStore, save_tensors

INSTALL_HINT = 'pip install -e ".[distributed]"'
OBJECT_STORE_BYTES = 256 * 2**20  # tasks pass names and numbers only (rows stay on disk): a small store will do
TASK_RETRIES = 2  # a task whose worker died runs again this many times before the job stops


class WorkerError(UserError):
    """A worker died more often than tasks are retried, or Ray could not start."""


@dataclass(frozen=True)
class StreamBlock:
    """Run one block over a stream's rows into its other buffer (the fp16 reference, the measurement)."""

    stream: str
    layer: int
    block: str
    source: Location
    rows: int


@dataclass(frozen=True)
class TierBlock:
    """GPTQ of one tier's block on its stream, its tensors saved, then the block run into the stream's other buffer."""

    tier: str
    layer: int
    block: str
    plans: dict[str, tuple[tuple[int, int], ...]]  # linear name (in the layer) -> groups
    source: Location
    rows: int
    reference: Location | None = None  # the fp16 stream at this block: GPTQ against fp16 (asymmetric)


@dataclass(frozen=True)
class MeasureLinear:
    """Every anchor of one linear of a block (measure.py), on the measurement stream's rows."""

    layer: int
    block: str
    name: str
    source: Location
    rows: int


@dataclass(frozen=True)
class TierHead:
    """One tier's head on its final stream, and its calibration KL (tiers.HeadQuantizer)."""

    tier: str
    location: Location
    reference: Location


Task = StreamBlock | TierBlock | MeasureLinear | TierHead
OnDone = Callable[[Task, int, Any], None]  # (task, worker index, its result)


class TaskRunner:
    """Carries out tasks for one process: the driver's own, or a Ray worker's (built there from the
    job's settings). Keeps the last decoder layer it loaded, so a block's tasks read it once."""

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self._layer: tuple[int, DecoderLayer] | None = None
        self._measured: tuple[tuple[int, str, str], BlockRunner, Any] | None = None
        self._weights: dict[int, list[torch.Tensor] | None] = {}
        # reference stream location -> tiers.HeadQuantizer (its fp16 reference computed once)
        self.heads: dict[Location, Any] = {}

    def layer(self, index: int) -> DecoderLayer:
        if self._layer is None or self._layer[0] != index:
            with Checkpoint(self.ctx.config.model_dir) as ckpt:
                self._layer = (index, load_layer(ckpt, self.ctx.cfg, index))
        return copy.deepcopy(self._layer[1])

    def token_weights(self, rows: int) -> list[torch.Tensor] | None:
        """The job's per-token weights of the first `rows` rows, read from the work directory once."""
        if rows not in self._weights:
            self._weights[rows] = self.ctx.token_weights(rows)
        return self._weights[rows]

    def runner(self, layer: int) -> BlockRunner:
        return BlockRunner(self.layer(layer), self.ctx.cfg.text, self.ctx.config.calibration.length, self.ctx.compute)

    def run(self, task: Task) -> Any:
        from quantize.measure import block_inputs, measure_linear
        from quantize.tiers import advance, quantize_block, quantize_head

        ctx = self.ctx
        if isinstance(task, StreamBlock):
            return advance(ctx, self.runner(task.layer), task.block, task.stream, task.source, task.rows)
        if isinstance(task, TierBlock):
            runner = self.runner(task.layer)
            weights = self.token_weights(task.rows)
            plans = {name: GroupPlan(groups) for name, groups in task.plans.items()}
            fp16 = (lambda: ctx.store.rows(task.reference, task.rows)) if task.reference is not None else None
            tensors = quantize_block(
                runner, task.block, lambda: ctx.store.rows(task.source, task.rows), plans, weights, fp16
            )
            folder = ctx.work / "quantized" / task.tier
            folder.mkdir(parents=True, exist_ok=True)
            save_tensors(
                folder / f"layer-{task.layer}-{task.block}.safetensors",
                {f"{layer_prefix(task.layer)}{n}.{k}": v for n, d in tensors.items() for k, v in d.items()},
            )
            return advance(ctx, runner, task.block, task.tier, task.source, task.rows)
        if isinstance(task, MeasureLinear):
            key = (task.layer, task.block, task.source)
            if self._measured is None or self._measured[0] != key:  # the block's Hessians and outputs, once per process
                runner = self.runner(task.layer)
                rows = list(ctx.store.rows(task.source, task.rows))
                self._measured = (key, runner, block_inputs(runner, task.block, rows, self.token_weights(task.rows)))
            _, runner, inputs = self._measured
            return measure_linear(runner, task.block, task.name, inputs)
        if isinstance(task, TierHead):
            return quantize_head(
                ctx,
                self.heads,
                task.tier,
                task.location,
                task.reference,
                self.token_weights(ctx.config.calibration.rows),
            )
        raise TypeError(f"not a task: {task!r}")


class Workers:
    """Runs a list of tasks and returns their results in order; `on_done(task, worker, result)` as each finishes."""

    count = 1

    def map(self, tasks: Sequence[Task], on_done: OnDone = lambda t, w, r: None) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InProcess(Workers):
    """Today's single process: the tasks one after the other, with the driver's context."""

    def __init__(self, ctx: JobContext):
        self.runner = TaskRunner(ctx)

    def map(self, tasks: Sequence[Task], on_done: OnDone = lambda t, w, r: None) -> list[Any]:
        results = []
        for task in tasks:
            results.append(self.runner.run(task))
            on_done(task, 0, results[-1])
        return results


def ray_module() -> Any:
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OptionError(f"--workers/--ray run on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class RayWorkers(Workers):
    """N Ray actors, each a TaskRunner in its own process with the job's threads (and one GPU each
    when the job computes on CUDA). A task goes to the next idle actor; a dead actor is restarted by
    Ray and its task run again (TASK_RETRIES times), else the job stops with a one-line error."""

    def __init__(self, config: QuantizeConfig, cfg: PixtralConfig, threads: int):
        ray = ray_module()
        self.ray, self.count = ray, config.workers
        self.started_here = not ray.is_initialized()
        if self.started_here:
            if config.ray_address is not None:
                check_reachable(config.ray_address)
            try:
                if config.ray_address is not None:
                    ray.init(address=config.ray_address, log_to_driver=False, logging_level=logging.WARNING)
                else:  # a local cluster of exactly the workers asked for
                    ray.init(
                        address="local",
                        num_cpus=config.workers * threads,
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                        object_store_memory=OBJECT_STORE_BYTES,
                    )
            except Exception as err:  # noqa: BLE001 - Ray raises many kinds here; all mean "no cluster"
                raise WorkerError(
                    f"--ray {config.ray_address or 'local'}: Ray did not start ({type(err).__name__}: {err})"
                ) from None
        gpus = 1 if Compute.for_device(config.device).device.type == "cuda" else 0
        # --ray without --workers: as many as the cluster holds
        if config.ray_address is not None and config.workers == 1:
            resources = ray.cluster_resources()
            self.count = int(resources.get("GPU", 0)) if gpus else max(1, int(resources.get("CPU", 1) // threads))
        actor = ray.remote(num_cpus=threads, num_gpus=gpus, max_restarts=-1, max_task_retries=TASK_RETRIES)(
            _RayTaskRunner
        )
        self.actors = [actor.remote(config, cfg, threads) for _ in range(self.count)]

    def map(self, tasks: Sequence[Task], on_done: OnDone = lambda t, w, r: None) -> list[Any]:
        ray = self.ray
        results: list[Any] = [None] * len(tasks)
        pending = list(enumerate(tasks))
        running: dict[Any, tuple[int, int]] = {}  # object ref -> (task index, actor index)
        idle = list(range(len(self.actors)))
        while pending or running:
            while pending and idle:
                index, task = pending.pop(0)
                worker = idle.pop(0)
                running[self.actors[worker].run.remote(task)] = (index, worker)
            done, _ = ray.wait(list(running), num_returns=1)
            index, worker = running.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                raise WorkerError(
                    f"worker {worker + 1} died {TASK_RETRIES + 1} times running {_describe(tasks[index])} "
                    f"({type(err).__name__}); the job is kept: run the same command with --resume"
                ) from None
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                # the task's own error: a UserError keeps its one line
                raise (cause if isinstance(cause, Exception) else err) from None
            idle.append(worker)
            on_done(tasks[index], worker, results[index])
        return results

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_here:
            self.ray.shutdown()


class _RayTaskRunner:
    """The actor: a TaskRunner built in the worker process from the job's settings."""

    def __init__(self, config: QuantizeConfig, cfg: PixtralConfig, threads: int):
        torch.set_num_threads(threads)
        ctx = JobContext(
            config,
            cfg,
            Compute.for_device(config.device, config.damp),
            RowStore(config.work_dir / "streams", config.calibration.length, cfg.text.hidden_size),
            lambda event: None,
        )
        self.runner = TaskRunner(ctx)

    def run(self, task: Task) -> Any:
        return self.runner.run(task)


def _describe(task: Task) -> str:
    if isinstance(task, TierHead):
        return f"the head of {task.tier}"
    name = getattr(task, "tier", None) or getattr(task, "stream", None) or getattr(task, "name", "")
    return f"layer {task.layer + 1} {task.block} ({name})"


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a --ray address; None for Ray's own `auto`; a one-line error for anything else."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise OptionError(f"--ray: expected host:port or ray://host:port (e.g. 10.0.0.5:6379) or auto, got {address!r}")
    return host, int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address that does not answer fails in seconds (ray.init would wait minutes)."""
    where = ray_host_port(address)
    if where is None:
        return
    host, port = where
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise WorkerError(
            f"--ray {address}: no Ray cluster answers there ({err.strerror or err}); start one with `ray start --head`"
        ) from None


def connect_workers(config: QuantizeConfig, cfg: PixtralConfig) -> Workers | None:
    """Ray workers (this process's thread count each) for --workers N > 1 or --ray, started or reached
    before any work; None for the single process."""
    if config.workers == 1 and config.ray_address is None:
        return None
    return RayWorkers(config, cfg, torch.get_num_threads())
