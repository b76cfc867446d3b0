"""Quantize benchmark: the current quantizer against the previous algorithm (the full 97-point scale
search, every anchor from scratch, every error by a forward pass: `legacy=True` at the pinned
revision BASELINE, checked out into a temporary git worktree), in one run.

Job mode (default): models of 2 and 8 decoder layers, each quantized both ways in a child process (so
its peak RSS is its own); per-stage seconds, peak RSS, calibration KL per tier, and new/legacy ratios.
GPTQ mode (`--gptq`): the GPTQ core alone on 4096×4096 (also with outlier input channels) and
5120×14336 (the shapes of Pixtral-12B's attention and down projections): proxy output error and time
of ours against an IST-DASLab-style GPTQ and against our own full scale search, in this process.

    python bench/quantize.py [--hidden 512] [--tiers 3.0,4.0] [--device cpu] [--gptq] [--workers 1,2]

Workers mode (`--workers 1,2`): `quantize --workers N --threads 1` for each N on one model, wall times
and their ratio in one run, and the share of the job that ran in parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, resource, sys, time
from pathlib import Path
from calibration.rows import CalibrationSpec
from quantize.job import QuantizeConfig, load_state
from quantize.pipeline import run_quantize
from quantize.preflight import job_footprint
try:
    from pixtral.config import load_config
except ImportError:  # BASELINE's layout
    from runtime.config import load_config
model, out, device, legacy = sys.argv[1], sys.argv[2], sys.argv[4], sys.argv[5] == "1"
tiers = tuple(map(float, sys.argv[3].split(",")))
spec = CalibrationSpec(rows=8, measure_rows=4, length=256, image_fraction=0.25)
started = time.monotonic()
config = QuantizeConfig(Path(model), Path(out), tiers, calibration=spec, device=device, shard_mb=16, keep_work=True,
                        **({"legacy": True} if legacy else {}))
estimate = job_footprint(config, load_config(model))["ram"] / 2**20
results = run_quantize(config)
state = load_state(Path(out) / ".work")
print(json.dumps({"timings": state.timings, "total": time.monotonic() - started, "estimate_mb": estimate,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bpw": [r.bpw for r in results], "kl": [r.calibration_kl for r in results]}))
"""
STAGES = ["calibrate", "embed", "measure", "quantize", "compile"]
BASELINE = "384023b"  # the last revision with the previous algorithm behind `legacy=True`


def run_job(tree: Path, model: Path, out: Path, tiers: str, device: str, legacy: bool) -> dict:
    """One quantize job of the source tree at `tree`, in a child process."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(out), tiers, device, "1" if legacy else "0"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def baseline_tree(root: Path) -> Iterator[Path]:
    """BASELINE checked out beside this tree (a detached git worktree), removed afterwards."""
    tree = root / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), BASELINE], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def bench_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random model of `layers` decoder layers `hidden` wide (FFN 3×, 8 heads, 2 KV heads), Large's tokenizer."""
    from tests.support.synthetic import SyntheticSpec, write_random_model

    spec = SyntheticSpec(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=hidden // 8,
        tokenizer="spm",
        seed=layers,
    )
    return write_random_model(folder, spec)


def job_bench(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, baseline_tree(Path(tmp)) as old_tree:
        for layers in (2, 8):
            model = bench_model(Path(tmp) / f"model-{layers}", args.hidden, layers)
            for legacy in (True, False):
                tree = old_tree if legacy else REPO
                rows.append(
                    (
                        layers,
                        legacy,
                        run_job(
                            tree, model, Path(tmp) / f"out-{layers}-{int(legacy)}", args.tiers, args.device, legacy
                        ),
                    )
                )
    print(
        f"\nquantize bench: hidden {args.hidden}, tiers {args.tiers}, device {args.device}, 8 rows × 256 tokens (4 "
        "measured)"
    )
    print(
        f"{'layers':>6} {'path':>7} "
        + " ".join(f"{s:>10}" for s in STAGES)
        + f" {'total s':>9} {'peak RSS MB':>12}  calibration KL per tier"
    )
    for layers, legacy, r in rows:
        print(
            f"{layers:>6} {'legacy' if legacy else 'new':>7} "
            + " ".join(f"{r['timings'].get(s, 0.0):>10.2f}" for s in STAGES)
            + f" {r['total']:>9.2f} {r['peak_rss_mb']:>12.0f}  "
            + ", ".join(f"{k:.5f}" for k in r["kl"])
        )
    for layers in (2, 8):
        old, new = (r for n, _, r in rows if n == layers)
        print(
            f"{layers:>6} {'ratio':>7} "
            + " ".join(f"{new['timings'].get(s, 0) / max(old['timings'].get(s, 0), 1e-9):>10.2f}" for s in STAGES)
            + f" {new['total'] / old['total']:>9.2f} {new['peak_rss_mb'] / old['peak_rss_mb']:>12.2f}  KL new/legacy "
            + ", ".join(f"{n / o:.3f}" for n, o in zip(new["kl"], old["kl"]))
        )
    two, eight = rows[1][2], rows[3][2]
    print(
        f"new path, 8 layers over 2: time ×{eight['total'] / two['total']:.2f}, peak RSS "
        f"×{eight['peak_rss_mb'] / two['peak_rss_mb']:.2f}"
    )
    print(
        f"job_footprint's peak-RAM estimate (the quantizer's own arrays): {eight['estimate_mb']:.0f} MB; measured "
        "peak RSS of the "
        f"8-layer run {eight['peak_rss_mb']:.0f} MB (includes ~{two['peak_rss_mb'] - two['estimate_mb']:.0f} MB of "
        "interpreter, torch and tokenizer)"
    )


def reference_gptq(W: torch.Tensor, Hp, bits: int, groupsize: int = 128, blocksize: int = 128) -> torch.Tensor:
    """GPTQ as IST-DASLab's gptq.py writes it (our own code from its algorithm): act-order, lazy
    blocks of 128 columns, per-(row, group) asymmetric min/max quantizer set at each group's first
    column, column-by-column error feedback. Same prepared Hessian as ours. Returns the dequantized
    weight [N, K] in the original input order."""
    maxq = 2**bits - 1
    Wp = W.float()[:, Hp.perm].clone()  # [N, K] columns in act order
    Hinv, (N, K) = Hp.U, Wp.shape
    Q = torch.zeros_like(Wp)
    scale = zero = None
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1, Hinv1 = Wp[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % groupsize == 0:  # find_params on the group's current columns
                group = W1[:, i : i + groupsize] if i + groupsize <= i2 - i1 else Wp[:, i1 + i : i1 + i + groupsize]
                lo, hi = group.amin(dim=1).clamp(max=0), group.amax(dim=1).clamp(min=0)
                scale = ((hi - lo) / maxq).clamp_min(1e-9)
                zero = torch.round(-lo / scale)
            w, d = W1[:, i], Hinv1[i, i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, Hp.perm] = Q
    return out


def gptq_layers() -> list[tuple[str, int, int, float]]:
    """(label, N, K, outlier gain): Pixtral-12B's attention and down shapes, heavy-tailed input channels;
    the outlier case gives 1 % of the input channels 30× the scale (LLM activations' outlier features)."""
    return [
        ("4096×4096", 4096, 4096, 0.0),
        ("4096×4096, outlier channels", 4096, 4096, 30.0),
        ("5120×14336", 5120, 14336, 0.0),
    ]


def gptq_bench(device: str) -> None:
    from quantize.candidates import make_plan
    from quantize.gptq import gptq_quantize, prepare_hessian, proxy_error, quantize_group

    group = None
    if device.startswith("cuda"):
        from quantize.gptq_triton import triton_quantize_group as group
    print(
        f"GPTQ core on {device}: 4-bit, act-order, 128-row groups; IST-DASLab-style reference (min/max asymmetric "
        "groups), our full 97-point scale search, ours (the default)"
    )
    print(
        "| layer | reference | full search | ours | ours / full search: error | ours / reference: error, time "
        "|\n|---|---:|---:|---:|---:|---:|"
    )
    for label, N, K, outlier in gptq_layers():
        gen = torch.Generator().manual_seed(0)
        W = (torch.randn(N, K, generator=gen) * 0.02).to(device)
        gains = torch.exp(0.5 * torch.randn(K, generator=gen))
        if outlier:
            gains[torch.randperm(K, generator=gen)[: K // 100]] *= outlier
        X = torch.randn(2 * K, K, generator=gen) * gains
        Hp = prepare_hessian((X.T @ X / X.shape[0]).to(device))
        plan = make_plan(K, 4, 4, K)
        runs = {}
        for name in ("reference", "full", "ours"):
            started = time.perf_counter()
            if name == "reference":
                weight = reference_gptq(W, Hp, 4)
            else:
                fn = (
                    functools.partial(quantize_group, full_search=True) if name == "full" else (group or quantize_group)
                )
                weight = gptq_quantize(W, Hp, plan, group=fn).weight
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs[name] = (time.perf_counter() - started, proxy_error(W, weight, Hp.H))
        cells = [f"{t:.1f} s, {e:.6f}" for t, e in runs.values()]
        (t_ref, e_ref), (_, e_full), (t_new, e_new) = runs["reference"], runs["full"], runs["ours"]
        print(f"| {label} | {' | '.join(cells)} | ×{e_new / e_full:.4f} | ×{e_new / e_ref:.3f}, ×{t_new / t_ref:.2f} |")


def workers_bench(counts: list[int], hidden: int, layers: int) -> None:
    """`quantize --workers N --threads 1` for each N, as a user runs it, on one random model: wall
    times and those of the two stages that run on the workers, and their ratios to the first count."""
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(Path(tmp) / "model", hidden, layers)
        for count in counts:
            out = Path(tmp) / f"out-{count}"
            args = [
                sys.executable,
                "-m",
                "cli",
                "quantize",
                str(model),
                str(out),
                "--bpw",
                "2.5,3.0,4.0,5.0",
                "--rows",
                "8",
                "--measure-rows",
                "4",
                "--length",
                "256",
                "--threads",
                "1",
                "--keep-work",
            ] + (["--workers", str(count)] if count > 1 else [])
            started = time.monotonic()
            subprocess.run(args, cwd=REPO, check=True, capture_output=True)
            walls[count] = (time.monotonic() - started, json.loads((out / ".work" / "job.json").read_text())["timings"])
    base, (base_wall, base_stages) = counts[0], walls[counts[0]]
    parallel = base_stages["measure"] + base_stages["quantize"]
    print(
        f"quantize, hidden {hidden}, {layers} layers, 4 tiers, one thread per worker, on {os.cpu_count()} cores; "
        "measure and quantize "
        f"(the stages that run on the workers) are {parallel / base_wall:.0%} of the {base}-worker wall time:"
    )
    for count, (wall, stages) in walls.items():
        ratios = ", ".join(f"{stage} ×{base_stages[stage] / stages[stage]:.2f}" for stage in ("measure", "quantize"))
        print(
            f"  --workers {count}: {wall:6.1f} s (measure {stages['measure']:.1f} s, quantize "
            f"{stages['quantize']:.1f} s), "
            f"×{base_wall / wall:.2f} faster than {base}" + (f"; {ratios}" if count != base else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tiers", default="3.0,4.0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gptq", action="store_true", help="time the GPTQ core alone on 12B shapes")
    parser.add_argument("--workers", help="compare quantize --workers counts, e.g. 1,2 (needs the distributed extra)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the --workers model")
    args = parser.parse_args()
    if args.workers:
        workers_bench([int(n) for n in args.workers.split(",")], args.hidden, args.layers)
    else:
        gptq_bench(args.device) if args.gptq else job_bench(args)


if __name__ == "__main__":
    main()
