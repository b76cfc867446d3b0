"""Does calibrating on images help? Text-only, image+text, and image+text with the image tokens'
Hessian rows down-weighted (MBQ-style balance), on the trained demo model at 2.5 / 3.0 / 4.0 bpw.

For each mode and calibration seed: quantize the demo model with the demo recipe's calibration size
and score the tiers with `eval`'s sets (held-out task accuracy, image-prompt KL to fp16, text KL).
Prints a markdown table of means over seeds (± spread) and writes JSON with `--json`.

    python bench/calibration_modes.py [--seeds 0,1,2] [--tiers 2.5,3.0,4.0] [--balanced-weight 0.1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(
    mode: str, weight: float, seed: int, tiers: tuple[float, ...], demo: Path, root: Path, eval_set
) -> dict[str, dict]:
    from calibration.rows import CalibrationSpec
    from quantize.job import QuantizeConfig
    from quantize.pipeline import run_quantize
    from recipes import load_recipe
    from runtime.backends import BackendConfig, load_backend
    from runtime.eval.run import evaluate

    base = load_recipe("demo")["calibration"]
    spec = CalibrationSpec(
        **{
            **base,
            "text_sources": tuple(base["text_sources"]),
            "image_sources": tuple(base["image_sources"]),
            "seed": seed,
            "image_fraction": 0.0 if mode == "text-only" else base["image_fraction"],
            "image_token_weight": weight if mode == "balanced" else 1.0,
        }
    )
    out = root / f"{mode}-{seed}"
    results = run_quantize(QuantizeConfig(demo, out, tiers, calibration=spec))
    scores = evaluate(
        demo,
        [r.path for r in results],
        eval_set,
        lambda p: load_backend(p, BackendConfig(backend="reference", device="cpu")),
    )
    return {
        s.name: {"task_accuracy": s.task_accuracy, "image_kl": s.image_kl, "text_kl": s.text_kl} for s in scores[1:]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tiers", default="2.5,3.0,4.0")
    parser.add_argument("--balanced-weight", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from runtime.demo.model import write_demo_model
    from runtime.eval.sets import build_eval_set

    seeds, tiers = [int(s) for s in args.seeds.split(",")], tuple(float(t) for t in args.tiers.split(","))
    modes = {"text-only": 1.0, "image+text": 1.0, "balanced": args.balanced_weight}
    table: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_model(Path(tmp) / "demo")
        eval_set = build_eval_set(demo, None, None, args.samples)
        for mode, weight in modes.items():
            for seed in seeds:
                for tier, score in run(mode, weight, seed, tiers, demo, Path(tmp), eval_set).items():
                    table.setdefault(tier, {}).setdefault(mode, []).append(score)
                print(f"done: {mode} seed {seed}", flush=True)
    print(
        f"\ncalibration modes on the demo model: means over seeds {seeds} (± half the range); balanced = "
        f"image-token weight {args.balanced_weight}"
    )
    print("| tier | mode | task accuracy | image KL | text KL |\n|---|---|---:|---:|---:|")
    summary = {}
    for tier in sorted(table, key=lambda t: float(t.removesuffix("bpw"))):
        for mode in modes:
            runs = table[tier][mode]
            row = {}
            for metric in ("task_accuracy", "image_kl", "text_kl"):
                values = [r[metric] for r in runs]
                row[metric] = (statistics.mean(values), (max(values) - min(values)) / 2)
            summary.setdefault(tier, {})[mode] = row
            print(
                f"| {tier} | {mode} | {row['task_accuracy'][0]:.3f} ± {row['task_accuracy'][1]:.3f} | "
                f"{row['image_kl'][0]:.4f} ± {row['image_kl'][1]:.4f} "
                f"| {row['text_kl'][0]:.4f} ± {row['text_kl'][1]:.4f} |"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"seeds": seeds, "balanced_weight": args.balanced_weight, "runs": table, "summary": summary}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
