"""Train the embedded demo model: `python -m runtime.demo.train [--steps 5000] [--seed 0]`, then
`python -m runtime.demo.train --init <those weights> --steps 2500 --lr 3e-4`, then on conversations
`--init <those> --steps 2000 --lr 3e-4 --chats 0.6` and `--init <those> --steps 2500 --lr 2e-4 --chats 0.7
--seed 1` (how the shipped ones were made; each run's note keeps the one it continued).

A small Pixtral (real decoder + vision tower + projector, Large's v7m1 tokenizer) learns the shapes
task of calibration/demo_task.py through the real chat template, single questions and conversations of
several turns: loss on the answer tokens (and `</s>`) of every turn only, AdamW, warm-up then cosine
decay, fp32 on the CPU. Deterministic for a seed and thread count.
Writes the weights that `pixtral-exl2 demo-model` ships (runtime/demo/weights/) and a JSON note of
the run (steps, seconds, loss, held-out accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from calibration import demo_task as task
from convert.hf_files import bundled_tokenizer_path, write_model_files
from pixtral.model import PixtralModel
from pixtral.prompt import PromptImage, answer_ids, prepare_image, question_messages
from pixtral.text import rope_cos_sin
from pixtral.tokenizer import PixtralTokenizer
from runtime.demo.model import DEMO_SPEC, WEIGHTS_FILE

LOG_FILE = WEIGHTS_FILE.with_suffix(".json")


def as_turns(example: task.Example) -> list[task.Turn]:
    return [task.Turn(example.question, example.answer, example.image)]


def conversation_ids(
    tokenizer: PixtralTokenizer, chat: list[task.Turn]
) -> tuple[list[int], list[PromptImage], list[tuple[int, int]]]:
    """Token ids of the whole chat through the chat template, its pictures in order, and the
    [start, end) span of every answer (with its `</s>`)."""
    messages: list[dict] = []
    pictures: list[PromptImage] = []
    spans: list[tuple[int, int]] = []
    for turn in chat:
        picture = prepare_image(turn.image) if turn.image is not None else None
        messages += question_messages(turn.question, picture)
        pictures += [picture] if picture is not None else []
        ids, start = answer_ids(tokenizer, messages, turn.answer, [p.grid for p in pictures])
        messages.append({"role": "assistant", "content": turn.answer})
        spans.append((start, len(ids)))
    return ids, pictures, spans


def batch_tensors(
    chats: list[list[task.Turn]], tokenizer: PixtralTokenizer
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], the images in order, and (batch, position) of every predicted token
    with its target: each answer of each chat and its `</s>`."""
    rows, images, where, targets = [], [], [], []
    for b, chat in enumerate(chats):
        ids, pictures, spans = conversation_ids(tokenizer, chat)
        rows.append(ids)
        images += [torch.from_numpy(p.pixels) for p in pictures]
        for start, end in spans:
            where += [(b, p - 1) for p in range(start, end)]
            targets += ids[start:end]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.eos_id] * (width - len(r)) for r in rows])
    return ids, images, torch.tensor(where), torch.tensor(targets)


def answer_logits(
    model: PixtralModel, ids: torch.Tensor, images: list[torch.Tensor], where: torch.Tensor
) -> torch.Tensor:
    """Logits at the `where` positions only (the head over 32k tokens is the costly part)."""
    lm = model.language_model
    x = model.embed(ids, images or None)
    cos, sin = rope_cos_sin(torch.arange(ids.shape[1]), lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
    for layer in lm.model.layers:
        x = layer(x, cos, sin)
    return lm.lm_head(lm.model.norm(x[where[:, 0], where[:, 1]]))


def demo_tokenizer(folder: Path) -> PixtralTokenizer:
    """The demo model's tokenizer, from model files written to `folder` (keep it: they are read lazily)."""
    write_model_files(folder, DEMO_SPEC.config(), bundled_tokenizer_path(DEMO_SPEC.tokenizer), "float16")
    return PixtralTokenizer(folder)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def accuracy(model: PixtralModel, tokenizer: PixtralTokenizer, chats: list[list[task.Turn]], batch: int = 64) -> float:
    """Share of chats whose every greedy answer is exactly right (argmax matches every answer
    token, teacher-forced on the earlier right answers)."""
    right = 0
    for i in range(0, len(chats), batch):
        chunk = chats[i : i + batch]
        ids, images, where, targets = batch_tensors(chunk, tokenizer)
        correct = answer_logits(model, ids, images, where).argmax(-1) == targets
        right += len(chunk) - len(set(where[~correct, 0].tolist()))
    return right / len(chats)


def training_chat(rng: random.Random, chat_share: float) -> list[task.Turn]:
    """A conversation of several turns (with `chat_share`), else one question."""
    return task.conversation(rng) if rng.random() < chat_share else as_turns(task.sample(rng))


def train(
    steps: int, batch: int, seed: int, peak_lr: float, out: Path, init: Path | None = None, chat_share: float = 0.0
) -> dict:
    torch.manual_seed(seed)
    # a continuation draws fresh scenes (and a chat-trained one fresh ones again)
    rng = random.Random(task.TRAIN_SEED + 1000 * seed + (7 if init is not None else 0) + (13 if chat_share else 0))
    cfg = DEMO_SPEC.config()
    with torch.device("meta"):
        model = PixtralModel(cfg)
    from runtime.demo.spec import random_weights

    if init is None:
        model.load_state_dict(dict(random_weights(cfg, DEMO_SPEC.seed)), assign=True)
    else:  # continue an earlier run (its note is kept in this run's note)
        model.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()}, assign=True)
        earlier = json.loads(init.with_suffix(".json").read_text())
    files = tempfile.TemporaryDirectory()  # lives as long as this run: the tokenizer reads it lazily
    tokenizer = demo_tokenizer(Path(files.name))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=peak_lr, betas=(0.9, 0.98)
    )
    held_out = [as_turns(e) for e in task.examples(task.EVAL_SEED, 256)]
    held_out_chats = task.conversations(task.CHAT_EVAL_SEED, 128)
    started, log = time.monotonic(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, warmup=min(200, steps // 10 + 1))
        ids, images, where, targets = batch_tensors([training_chat(rng, chat_share) for _ in range(batch)], tokenizer)
        loss = F.cross_entropy(answer_logits(model, ids, images, where), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.monotonic() - started, 1)}
            if step % 500 == 0 or step == steps - 1:
                entry["held_out_accuracy"] = accuracy(model, tokenizer, held_out)
                entry["held_out_chat_accuracy"] = accuracy(model, tokenizer, held_out_chats)
                _save(
                    model,
                    out,
                    {
                        "seed": seed,
                        "steps": step + 1,
                        "batch": batch,
                        "peak_lr": peak_lr,
                        "threads": torch.get_num_threads(),
                        "chat_share": chat_share,
                        "continues": earlier if init is not None else None,
                        "seconds": round(time.monotonic() - started, 1),
                        "torch": torch.__version__,
                        "spec": DEMO_SPEC.__dict__,
                        "held_out_accuracy": entry["held_out_accuracy"],
                        "held_out_chat_accuracy": entry["held_out_chat_accuracy"],
                        "log": log + [entry],
                    },
                )
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return json.loads(out.with_suffix(".json").read_text())


def _save(model: PixtralModel, out: Path, note: dict) -> None:
    """Weights (fp16) and the note of the run so far: a long run can be stopped and still ship."""
    weights = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"format": "pt", "seed": str(note["seed"]), "steps": str(note["steps"])})
    out.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    parser.add_argument("--init", type=Path, help="continue from these weights (a second, lower-rate run)")
    parser.add_argument(
        "--chats", type=float, default=0.0, help="share of the batch that is a conversation of several turns"
    )
    args = parser.parse_args()
    note = train(args.steps, args.batch, args.seed, args.lr, args.out, args.init, args.chats)
    print(
        f"trained {args.steps} steps in {note['seconds']} s; held-out accuracy {note['held_out_accuracy']:.3f} "
        f"(chats {note['held_out_chat_accuracy']:.3f}); weights in {args.out}"
    )


if __name__ == "__main__":
    main()
