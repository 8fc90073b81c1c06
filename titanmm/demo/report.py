"""What the demo shows at the end: the loss curves of its training stages in one PNG, and a few held-out
samples (what the image shows, the caption the model wrote, its answers) as text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from titanmm.metrics import read_jsonl


def plot_stage_losses(stages: Sequence[tuple[str, str | Path]], output: str | Path) -> Path:
    """One panel per (title, metrics.jsonl) stage, loss against step, side by side, saved as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(4.2 * len(stages), 3.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, (title, metrics_path) in zip(axes, stages):
        points = [(r["step"], r["loss"]) for r in read_jsonl(str(metrics_path)) if r.get("loss") is not None]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="." if len(points) < 40 else None, linewidth=1.4)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            # label the minor ticks too when the curve spans less than a decade (else they crowd)
            minor = FormatStrFormatter("%g") if max(losses) < 10 * min(losses) else NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("training loss (per learned token)")
    output = Path(output)
    os.makedirs(output.parent, exist_ok=True)
    fig.savefig(output, dpi=110)
    return output


def format_samples(heldout: Sequence[dict], final, untrained=None, count: int = 4) -> str:
    """The first `count` held-out images: layout, reference caption, the model's caption and answers."""
    lines = []
    for record in heldout[:count]:
        lines.append(f"{record['image']}  shows: {record['layout']}")
        lines.append(f"  reference caption : {record['references'][0]}")
        lines.append(f"  model caption     : {final.captions[record['id']]}")
        if untrained is not None:
            lines.append(f"  untrained caption : {untrained.captions[record['id']][:100]!r}")
        for question, answer in zip(record["questions"], final.answers[record["id"]]):
            mark = "ok" if answer == question["answer"] else f"wrong, expected {question['answer']!r}"
            lines.append(f"  Q: {question['question']:<36} A: {answer:<14} ({mark})")
    return "\n".join(lines)
