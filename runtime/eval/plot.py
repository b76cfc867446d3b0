"""The quality-against-bpw plot a model card shows (matplotlib, no display needed)."""

from __future__ import annotations

import io

from .run import ModelScore


def quality_plot(scores: list[ModelScore], title: str) -> bytes:
    """PNG: task accuracy (or top-1 agreement) and KL to fp16 against decoder bpw, fp16 as a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    source, tiers = scores[0], sorted((s for s in scores[1:] if s.bpw is not None), key=lambda s: s.bpw)
    bpw = [s.bpw for s in tiers]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    lowest = 1.0
    for label, field, colour in (("task accuracy", "task_accuracy", "#4e79a7"), ("image top-1 agreement", "image_top1", "#f28e2b")):
        values = [getattr(s, field) for s in tiers]
        if all(v is not None for v in values) and values:
            left.plot(bpw, values, "o-", color=colour, label=label)
            lowest = min(lowest, *values)
    if source.task_accuracy is not None:
        left.axhline(source.task_accuracy, color="#e15759", linestyle="--", label=f"fp16 task accuracy ({source.task_accuracy:.3f})")
    left.set(xlabel="decoder bits per weight", ylabel="share", title="answers against fp16", ylim=(max(0.0, lowest - 0.05), 1.005))
    left.legend(loc="lower right", fontsize="small")
    for label, values, colour in (("text KL", [s.text_kl for s in tiers], "#59a14f"), ("image KL", [s.image_kl for s in tiers], "#f28e2b")):
        points = [(b, v) for b, v in zip(bpw, values) if v]
        if points:
            right.semilogy(*zip(*points), "o-", color=colour, label=label)
    right.set(xlabel="decoder bits per weight", ylabel="KL(fp16 ‖ tier), nats/token", title="divergence from fp16 (0 = fp16)")
    right.legend(loc="upper right")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
