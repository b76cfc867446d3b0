"""Quantize benchmark: the current quantizer against the previous algorithm (`legacy`: the full
97-point scale search, every anchor from scratch, every error by a forward pass), in one run.

Job mode (default): models of 2 and 8 decoder layers, each quantized both ways in a child process (so
its peak RSS is its own); per-stage seconds, peak RSS, calibration KL per tier, and new/legacy ratios.
GPTQ mode (`--gptq`): the GPTQ core alone on 4096×4096 and 5120×14336 (the shapes of Pixtral-12B's
attention and down projections), new against the plain reference, in this process.

    python bench/quantize.py [--hidden 512] [--tiers 3.0,4.0] [--device cpu] [--gptq]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
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
from runtime.config import load_config
model, out, tiers, device, legacy = sys.argv[1], sys.argv[2], tuple(map(float, sys.argv[3].split(","))), sys.argv[4], sys.argv[5] == "1"
spec = CalibrationSpec(rows=8, measure_rows=4, length=256, image_fraction=0.25)
started = time.monotonic()
config = QuantizeConfig(Path(model), Path(out), tiers, calibration=spec, device=device, shard_mb=16, keep_work=True, legacy=legacy)
estimate = job_footprint(config, load_config(model))["ram"] / 2**20
results = run_quantize(config)
state = load_state(Path(out) / ".work")
print(json.dumps({"timings": state.timings, "total": time.monotonic() - started, "estimate_mb": estimate,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bpw": [r.bpw for r in results], "kl": [r.calibration_kl for r in results]}))
"""
STAGES = ["calibrate", "embed", "measure", "quantize", "compile"]


def run_job(model: Path, out: Path, tiers: str, device: str, legacy: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), tiers, device, "1" if legacy else "0"], cwd=REPO,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job_bench(args: argparse.Namespace) -> None:
    from runtime.synthetic import SyntheticSpec, write_random_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (2, 8):
            spec = SyntheticSpec(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_layers=layers, num_heads=8,
                                 num_kv_heads=2, head_dim=args.hidden // 8, tokenizer="spm", seed=layers)  # fmt: skip
            model = write_random_model(Path(tmp) / f"model-{layers}", spec)
            for legacy in (True, False):
                rows.append((layers, legacy, run_job(model, Path(tmp) / f"out-{layers}-{int(legacy)}", args.tiers, args.device, legacy)))
    print(f"\nquantize bench: hidden {args.hidden}, tiers {args.tiers}, device {args.device}, 8 rows × 256 tokens (4 measured)")
    print(f"{'layers':>6} {'path':>7} " + " ".join(f"{s:>10}" for s in STAGES) + f" {'total s':>9} {'peak RSS MB':>12}  calibration KL per tier")
    for layers, legacy, r in rows:
        print(f"{layers:>6} {'legacy' if legacy else 'new':>7} " + " ".join(f"{r['timings'].get(s, 0.0):>10.2f}" for s in STAGES)
              + f" {r['total']:>9.2f} {r['peak_rss_mb']:>12.0f}  " + ", ".join(f"{k:.5f}" for k in r["kl"]))  # fmt: skip
    for layers in (2, 8):
        old, new = (r for n, _, r in rows if n == layers)
        print(f"{layers:>6} {'ratio':>7} " + " ".join(f"{new['timings'].get(s, 0) / max(old['timings'].get(s, 0), 1e-9):>10.2f}" for s in STAGES)
              + f" {new['total'] / old['total']:>9.2f} {new['peak_rss_mb'] / old['peak_rss_mb']:>12.2f}  KL new/legacy "
              + ", ".join(f"{n / o:.3f}" for n, o in zip(new["kl"], old["kl"])))  # fmt: skip
    two, eight = rows[1][2], rows[3][2]
    print(f"new path, 8 layers over 2: time ×{eight['total'] / two['total']:.2f}, peak RSS ×{eight['peak_rss_mb'] / two['peak_rss_mb']:.2f}")
    print(f"job_footprint's peak-RAM estimate (the quantizer's own arrays): {eight['estimate_mb']:.0f} MB; measured peak RSS of the "
          f"8-layer run {eight['peak_rss_mb']:.0f} MB (includes ~{two['peak_rss_mb'] - two['estimate_mb']:.0f} MB of interpreter, torch and tokenizer)")


def gptq_bench(device: str) -> None:
    from quantize.candidates import make_plan
    from quantize.gptq import gptq_quantize, prepare_hessian, quantize_group

    group = None
    if device.startswith("cuda"):
        from quantize.gptq_triton import triton_quantize_group as group
    print(f"\nGPTQ core on {device}: 4-bit, act-order, 128-row groups; reference = full 97-point search, torch group loop")
    for N, K in ((4096, 4096), (5120, 14336)):
        gen = torch.Generator().manual_seed(0)
        W = (torch.randn(N, K, generator=gen) * 0.02).to(device)
        X = torch.randn(2 * K, K, generator=gen) * torch.exp(0.5 * torch.randn(K, generator=gen))
        Hp = prepare_hessian((X.T @ X / X.shape[0]).to(device))
        plan = make_plan(K, 4, 4, K)
        timings = {}
        for name, fn in (("reference", functools.partial(quantize_group, full_search=True)), ("new", group or quantize_group)):
            started = time.perf_counter()
            result = gptq_quantize(W, Hp, plan, group=fn, proxy=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - started, result.proxy_error)
        (t_ref, e_ref), (t_new, e_new) = timings["reference"], timings["new"]
        print(f"  {N}×{K}: reference {t_ref:.1f} s (proxy error {e_ref:.6f}), new {t_new:.1f} s ({e_new:.6f}): "
              f"×{t_ref / t_new:.2f} faster, error ratio {e_new / e_ref:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tiers", default="3.0,4.0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gptq", action="store_true", help="time the GPTQ core alone on 12B shapes")
    args = parser.parse_args()
    gptq_bench(args.device) if args.gptq else job_bench(args)


if __name__ == "__main__":
    main()
