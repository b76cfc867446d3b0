"""What Pixtral-12B and Pixtral-Large cost: each tier's size, the memory to run it, and the quantize
job's peak RAM and disk, computed from their real configs by the code that enforces them
(quantize.preflight.tier_bytes and job_footprint; the KV cache from the shapes). Nothing is timed.

    python bench/footprint.py [--recipe default] [--context 32768]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixtral.config import PixtralConfig, parse_config  # noqa: E402
from pixtral.errors import UserError  # noqa: E402
from quantize.preflight import job_footprint, tier_bytes  # noqa: E402
from recipes import quantize_config  # noqa: E402

CONFIGS = {
    "Pixtral-12B": REPO / "tests/fixtures/pixtral-12b-config.json",
    "Pixtral-Large": REPO / "tests/fixtures/pixtral-large-config.json",
}
GIB = 2**30


def kv_bytes_per_token(cfg: PixtralConfig, bits: float) -> float:
    """Keys and values of every layer for one token; Q4/Q6/Q8 add one fp16 scale per 32 values."""
    t = cfg.text
    values = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    return values * (2.0 if bits == 16 else bits / 8 + 2 / 32)


def rows(recipe: str, context: int) -> list[str]:
    """The markdown table: one line per model and tier."""
    out = [
        "| model | tier | files | + KV cache FP16 / Q4 at {:,} tokens | quantize job: peak RAM, disk |".format(context),
        "|---|---:|---:|---:|---:|",
    ]
    for name, path in CONFIGS.items():
        cfg = parse_config(json.loads(path.read_text()))
        config = quantize_config(recipe, path.parent, Path("out"), {})
        need = job_footprint(config, cfg)
        job = f"{need['ram'] / GIB:.1f} GiB, {need['disk'] / GIB:.0f} GiB"
        kv16, kv4 = (kv_bytes_per_token(cfg, bits) * context / GIB for bits in (16, 4))
        for index, bpw in enumerate(sorted(config.tiers)):
            size = tier_bytes(cfg, bpw, config.head_bits) / GIB
            first = index == 0
            out.append(
                f"| {name if first else ''} | {bpw:.1f} | {size:.1f} GiB | "
                f"{f'{kv16:.1f} / {kv4:.1f} GiB' if first else ''} | {job if first else ''} |"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--context", type=int, default=32768)
    args = parser.parse_args()
    try:
        print("\n".join(rows(args.recipe, args.context)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
