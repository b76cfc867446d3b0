"""Quality at equal size, A/B: tiers of the demo model over several calibration seeds, in one run.

    python bench/quality_ab.py [--seeds 0,1,2] [--tiers 2.5,3.0,4.0,5.0] [--variant=--symmetric]
                               [--baseline 66e4021] [--jobs 2]

Arms: `baseline` (the quantizer at a pinned revision, checked out into a temporary git worktree),
`default` (this tree) and, per --variant, a `variant` arm (this tree with those quantize flags). Each arm
quantizes the demo model (`--recipe demo`, the tiers given, `--seed` per seed, one thread per job),
and this tree's `eval` scores every tier (text KL, image KL, task accuracy). Printed: per tier and
arm the mean ± half the range over seeds, each arm's mean KL over the baseline's, and each arm's
quantize seconds over the baseline's.

    python bench/quality_ab.py --proxy

The GPTQ-level proxy: one linear of a real shape (4096², 5120×14336 and 14336×5120 with
heavy-tailed input channels) whose inputs carry the error of the quantized layers before it
(x_q = x_fp + correlated noise); the output error ‖x_fp Wᵀ − x_q Qᵀ‖² / ‖x_fp Wᵀ‖² on held-out
tokens, symmetric GPTQ (target W on the x_q Hessian) against asymmetric (target W + W·D·H⁻¹).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE = "66e4021"  # the quantizer issue 22 measured ("today's")
METRICS = ("text_kl", "image_kl", "task_accuracy")


def worktree(revision: str, parent: Path) -> Path:
    tree = parent / f"tree-{revision}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), revision], check=True)
    return tree


def quantize(tree: Path, module: str, model: Path, out: Path, tiers: str, seed: int, flags: list[str]) -> float:
    """One quantize job on one thread; its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", module, "quantize", str(model), str(out), "--recipe", "demo", "--bpw", tiers]
    started = time.monotonic()
    result = subprocess.run([*command, "--seed", str(seed), *flags], cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"quantize failed in {tree} ({' '.join(flags) or 'default'}, seed {seed}):\n{result.stdout[-3000:]}"
        )
    return time.monotonic() - started


def evaluate(model: Path, out: Path, samples: int = 1024) -> dict[str, dict[str, float]]:
    """This tree's eval of every tier in `out`: tier name -> metric -> value."""
    report = out / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "cli",
        "eval",
        str(model),
        str(out),
        "--json",
        str(report),
        "--no-card",
        "--threads",
        "1",
        "--samples",
        str(samples),
    ]
    command += ["--plot", str(out / "quality.png")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"eval failed on {out}:\n{result.stdout[-3000:]}")
    models = json.loads(report.read_text())["models"][1:]
    return {m["name"]: {k: m[k] for k in METRICS} for m in models}


def run_arm(
    arm: str, tree: Path, module: str, model: Path, work: Path, tiers: str, seed: int, flags: list[str], samples: int
) -> dict:
    out = work / f"{arm}-seed{seed}"
    seconds = quantize(tree, module, model, out, tiers, seed, flags)
    return {"arm": arm, "seed": seed, "seconds": seconds, "tiers": evaluate(model, out, samples)}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def report(runs: list[dict], tiers: list[str], arms: list[str]) -> None:
    print(
        f"\nquality A/B on the demo model (--recipe demo), seeds {sorted({r['seed'] for r in runs})}: mean ± "
        "half the range"
    )
    print("| tier | arm | text KL | image KL | task accuracy | text KL / baseline | image KL / baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tier in tiers:
        base = {k: spread([r["tiers"][tier][k] for r in runs if r["arm"] == "baseline"])[0] for k in METRICS}
        for arm in arms:
            rows = [r["tiers"][tier] for r in runs if r["arm"] == arm]
            stats = {k: spread([row[k] for row in rows]) for k in METRICS}
            text, image, task = (stats[k] for k in METRICS)
            print(f"| {tier} | {arm} | {text[0]:.4f} ± {text[1]:.4f} | {image[0]:.4f} ± {image[1]:.4f} | "
                  f"{task[0]:.3f} ± {task[1]:.3f} | {text[0] / base['text_kl']:.2f} | "
                  f"{image[0] / base['image_kl']:.2f} |")  # fmt: skip
    base_seconds = statistics.fmean(r["seconds"] for r in runs if r["arm"] == "baseline")
    times = ", ".join(
        f"{a} ×{statistics.fmean(r['seconds'] for r in runs if r['arm'] == a) / base_seconds:.2f}" for a in arms
    )
    print(f"quantize time against the baseline's ({base_seconds:.0f} s a job): {times}")


def quality(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    tiers = [f"{float(t):.1f}bpw" for t in args.tiers.split(",")]
    with tempfile.TemporaryDirectory(prefix="quality-ab-") as tmp:
        work = Path(tmp)
        model = work / "demo"
        subprocess.run(
            [sys.executable, "-m", "cli", "demo-model", str(model)], cwd=REPO, check=True, capture_output=True
        )
        old = worktree(args.baseline, work)
        try:
            old_cli = "cli" if (old / "cli" / "__main__.py").is_file() else "runtime.cli"  # moved after 66e4021
            arms = [("baseline", old, old_cli, []), ("default", REPO, "cli", [])]
            for index, variant in enumerate(args.variant, 1):
                arms.append((f"variant{index}" if len(args.variant) > 1 else "variant", REPO, "cli", variant.split()))
            jobs = [(arm, tree, module, flags, seed) for seed in seeds for arm, tree, module, flags in arms]
            with ThreadPoolExecutor(args.jobs) as pool:
                runs = list(
                    pool.map(
                        lambda j: run_arm(j[0], j[1], j[2], model, work, args.tiers, j[4], j[3], args.samples), jobs
                    )
                )
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")
        report(runs, tiers, [a for a, *_ in arms])


def proxy(args: argparse.Namespace) -> None:
    import torch

    from pixtral.exl2.format import GroupPlan
    from quantize.gptq import gptq_quantize, prepare_hessian
    from quantize.tiers import asymmetric_target

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    print("\nGPTQ proxy: held-out output error ‖x_fp Wᵀ − x_q Qᵀ‖² / ‖x_fp Wᵀ‖², inputs with upstream error")
    print("| layer (out × in) | bits | symmetric | asymmetric | asymmetric / symmetric |")
    print("|---|---:|---:|---:|---:|")
    for out_features, in_features in ((4096, 4096), (5120, 14336), (14336, 5120)):
        tokens = 2 * in_features
        gains = torch.exp(1.5 * torch.randn(in_features)).clamp(max=50)  # heavy-tailed channel scales
        mixing = torch.randn(in_features, in_features) / in_features**0.5

        def inputs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
            x_fp = torch.randn(count, in_features) * gains
            error = (x_fp @ mixing) * 0.05 + 0.02 * torch.randn(
                count, in_features
            ) * gains  # the layers before: correlated
            return x_fp, x_fp + error

        W = torch.randn(out_features, in_features) / in_features**0.5
        calibration, held_out = inputs(tokens), inputs(tokens // 2)
        H = calibration[1].T @ calibration[1] / tokens
        D = (calibration[0] - calibration[1]).T @ calibration[1] / tokens
        prepared = prepare_hessian(H)
        target_fp = held_out[0] @ W.T
        for bits in (3, 4):
            plan = GroupPlan(((bits, in_features),))
            errors = []
            for target in (W, asymmetric_target(W, H, D)):
                Q = gptq_quantize(target, prepared, plan).weight
                errors.append(float(((target_fp - held_out[1] @ Q.T) ** 2).sum() / (target_fp**2).sum()))
            print(
                f"| {out_features} × {in_features} | {bits} | {errors[0]:.5f} | {errors[1]:.5f} | "
                f"{errors[1] / errors[0]:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tiers", default="2.5,3.0,4.0,5.0")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="quantize flags of a variant arm, e.g. --variant=--symmetric (repeatable: variant1, variant2, …)",
    )
    parser.add_argument("--baseline", default=BASELINE, help="revision of the baseline arm")
    parser.add_argument(
        "--samples",
        type=int,
        default=1024,
        help="eval's demo questions (1024: about 150 text prompts; at eval's 256 default the text KL rests on "
        "about 60 uncertain positions)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once (one thread each)")
    parser.add_argument("--json", help="also write every run here")
    parser.add_argument("--proxy", action="store_true", help="the GPTQ-level proxy on real shapes instead")
    args = parser.parse_args()
    proxy(args) if args.proxy else quality(args)


if __name__ == "__main__":
    main()
