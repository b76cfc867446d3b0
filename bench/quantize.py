"""Quantize benchmark: time per stage and peak RSS for models of 2 and 8 decoder layers.

Each run is a child process (so its peak RSS is its own); the 2-layer model is the baseline and the
table prints the 8-layer run's ratios against it. Streaming means time grows with depth while peak
memory should not: it is bounded by a layer, the row states and one output shard.

    python bench/quantize.py [--hidden 512] [--tiers 3.0,4.0] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from calibration.rows import CalibrationSpec
from quantize.job import QuantizeConfig
from quantize.pipeline import run_quantize
model, out, tiers, device = sys.argv[1], sys.argv[2], tuple(map(float, sys.argv[3].split(","))), sys.argv[4]
spec = CalibrationSpec(rows=8, measure_rows=4, length=256, image_fraction=0.25)
started = time.monotonic()
results = run_quantize(QuantizeConfig(Path(model), Path(out), tiers, calibration=spec, device=device, shard_mb=16, keep_work=True))
state = json.loads((Path(out) / ".work" / "job.json").read_text())
print(json.dumps({"timings": state["timings"], "total": time.monotonic() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bpw": [r.bpw for r in results]}))
"""


def run(model: Path, out: Path, tiers: str, device: str) -> dict:
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), tiers, device], cwd=repo,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tiers", default="3.0,4.0")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from runtime.synthetic import SyntheticSpec, write_random_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (2, 8):
            spec = SyntheticSpec(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_layers=layers, num_heads=8,
                                 num_kv_heads=2, head_dim=args.hidden // 8, tokenizer="spm", seed=layers)  # fmt: skip
            model = write_random_model(Path(tmp) / f"model-{layers}", spec)
            rows.append((layers, run(model, Path(tmp) / f"out-{layers}", args.tiers, args.device)))
    stages = ["calibrate", "embed", "measure", "quantize", "compile"]
    base = rows[0][1]
    print(f"\nquantize bench: hidden {args.hidden}, tiers {args.tiers}, device {args.device}, 8 rows x 256 tokens")
    print(f"{'layers':>6} " + " ".join(f"{s:>10}" for s in stages) + f" {'total s':>9} {'peak RSS MB':>12}")
    for layers, result in rows:
        print(f"{layers:>6} " + " ".join(f"{result['timings'].get(s, 0.0):>10.2f}" for s in stages)
              + f" {result['total']:>9.2f} {result['peak_rss_mb']:>12.0f}")  # fmt: skip
    eight = rows[1][1]
    print(f"{'ratio':>6} " + " ".join(f"{eight['timings'].get(s, 0) / max(base['timings'].get(s, 0), 1e-9):>10.2f}" for s in stages)
          + f" {eight['total'] / base['total']:>9.2f} {eight['peak_rss_mb'] / base['peak_rss_mb']:>12.2f}")  # fmt: skip
    print("bpw per tier:", {layers: [round(b, 4) for b in r["bpw"]] for layers, r in rows})


if __name__ == "__main__":
    main()
