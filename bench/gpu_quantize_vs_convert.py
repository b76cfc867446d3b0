"""On a GPU: our `quantize --device cuda` against exllamav2's convert.py on the same model, calibration
size and GPU — wall time of measurement + one 4.0 bpw tier, and the KL of both tiers to fp16 on the
same held-out text (goal: ≤ 0.5× convert.py's time at equal or lower KL).

The model is Pixtral-12B-shaped (hidden 5120, FFN 14336, 32/8 heads, 131k vocabulary) with random
weights and `--layers` decoder layers (default 8, so the run fits the GPU machine's time limit).
Run by bench/gpu_check.sh; writes a JSON summary with `--json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS, LENGTH = 32, 2048


def write_model(root: Path, layers: int) -> Path:
    from tests.support.synthetic import SyntheticSpec, write_random_model

    spec = SyntheticSpec(
        hidden_size=5120,
        intermediate_size=14336,
        num_layers=layers,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_layers=1,
        vision_heads=16,
        tokenizer="tekken",
        seed=7,
    )
    return write_random_model(root / "fp16", spec)


def run_ours(model: Path, out: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "quantize",
            str(model),
            str(out),
            "--bpw",
            "4.0",
            "--rows",
            str(ROWS),
            "--measure-rows",
            "16",
            "--length",
            str(LENGTH),
            "--text-only",
            "--device",
            "cuda",
            "--head-bits",
            "6",
        ],
        cwd=REPO,
        check=True,
    )
    return time.monotonic() - started


def run_convert(model: Path, work: Path, out: Path) -> float:
    """exllamav2 0.3.2's convert.py (its module parses sys.argv when imported)."""
    args = [
        "convert.py",
        "-i",
        str(model),
        "-o",
        str(work),
        "-cf",
        str(out),
        "-b",
        "4.0",
        "-hb",
        "6",
        "-r",
        str(ROWS),
        "-mr",
        "16",
        "-l",
        str(LENGTH),
        "-ml",
        str(LENGTH),
    ]
    code = f"import sys; sys.argv = {args!r}; import exllamav2.conversion.convert_exl2"
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return time.monotonic() - started


@torch.no_grad()
def text_kl(source: Path, tiers: dict[str, Path], documents: list[str]) -> dict[str, float]:
    """Mean per-token KL(fp16 ‖ tier) on held-out text, every model on the reference backend (CUDA, fp16)."""
    from pixtral.tokenizer import PixtralTokenizer
    from runtime.backends.reference import ReferenceBackend
    from runtime.eval.sets import text_items

    items = text_items(PixtralTokenizer(source), documents, max_tokens=1024)
    reference = ReferenceBackend(source, "cuda")
    ref = [t.to(torch.float32) for t in reference.logits_at([(i.prompt, i.positions) for i in items])]
    reference.close()
    out = {}
    for name, path in tiers.items():
        backend = ReferenceBackend(path, "cuda")
        total = count = 0.0
        for p, q in zip(ref, backend.logits_at([(i.prompt, i.positions) for i in items])):
            log_p, log_q = torch.log_softmax(p, -1), torch.log_softmax(q.float(), -1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += p.shape[0]
        out[name] = total / count
        backend.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from calibration.sources import split_documents, standard_text_files

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = Path(tmp)
        model = write_model(root, args.layers)
        ours = run_ours(model, root / "ours")
        theirs = run_convert(model, root / "convert-work", root / "convert")
        documents = [
            d for path in standard_text_files().values() for d in split_documents(path.read_text(encoding="utf-8"))[-2:]
        ]
        kl = text_kl(model, {"ours": root / "ours" / "4.0bpw", "convert.py": root / "convert"}, documents)
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "layers": args.layers,
        "rows": ROWS,
        "length": LENGTH,
        "ours_seconds": ours,
        "convert_seconds": theirs,
        "time_ratio": ours / theirs,
        "kl_ours": kl["ours"],
        "kl_convert": kl["convert.py"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
