"""The quality-against-bpw plot a model card shows (matplotlib, no display needed)."""

from __future__ import annotations

import io

from runtime.eval.run import ModelScore


def quality_figure(scores: list[ModelScore], title: str):  # -> matplotlib.figure.Figure
    """Against decoder bpw, one panel per quantity: task accuracy (against the right answers, with
    fp16's as a line; demo model only), top-1 agreement with fp16 on image prompts, KL to fp16."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    source, tiers = scores[0], sorted((s for s in scores[1:] if s.bpw is not None), key=lambda s: s.bpw)
    bpw = [s.bpw for s in tiers]
    has_task = bool(tiers) and all(s.task_accuracy is not None for s in tiers)
    figure, axes = plt.subplots(1, 3 if has_task else 2, figsize=(12 if has_task else 8.5, 3.6), dpi=110)
    panels = list(axes)
    if has_task:
        task = panels.pop(0)
        values = [s.task_accuracy for s in tiers]
        task.plot(bpw, values, "o-", color="#4e79a7", label="tier")
        task.axhline(source.task_accuracy, color="#e15759", linestyle="--", label=f"fp16 ({source.task_accuracy:.3f})")
        task.set(
            xlabel="decoder bits per weight",
            ylabel="share of questions answered right",
            title="task accuracy",
            ylim=(max(0.0, min(values + [source.task_accuracy]) - 0.05), 1.005),
        )
        task.legend(loc="lower right", fontsize="small")
    agreement, divergence = panels
    top1 = [(b, s.image_top1) for b, s in zip(bpw, tiers) if s.image_top1 is not None]
    if top1:
        agreement.plot(*zip(*top1), "o-", color="#f28e2b")
    agreement.set(
        xlabel="decoder bits per weight",
        ylabel="share of image-prompt positions",
        title="top-1 agreement with fp16",
        ylim=(max(0.0, min([v for _, v in top1] or [1.0]) - 0.05), 1.005),
    )
    for label, values, colour in (
        ("text KL", [s.text_kl for s in tiers], "#59a14f"),
        ("image KL", [s.image_kl for s in tiers], "#f28e2b"),
    ):
        points = [(b, v) for b, v in zip(bpw, values) if v]
        if points:
            divergence.semilogy(*zip(*points), "o-", color=colour, label=label)
    divergence.set(
        xlabel="decoder bits per weight", ylabel="KL(fp16 ‖ tier), nats/token", title="divergence from fp16 (0 = fp16)"
    )
    divergence.legend(loc="upper right")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def quality_plot(scores: list[ModelScore], title: str) -> bytes:
    """The quality figure as PNG bytes."""
    from matplotlib import pyplot as plt

    figure = quality_figure(scores, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
