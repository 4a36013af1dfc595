"""The report's figures as inline SVG strings (matplotlib, Agg backend, no files, no network).

Each function returns the ``<svg>...</svg>`` element alone (no XML prologue, no namespace
URLs) so that it can sit in the HTML page as is, or ``""`` when there is nothing to draw.
"""

from __future__ import annotations

import io
import re
from collections import Counter

from vlmtune.report.inputs import EvalResult

# Training-log keys drawn as curves, with their titles; only those a log holds are drawn.
CURVES = (
    ("loss", "training loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("eval/loss", "eval loss"),
    ("eval/rewards/accuracies", "eval reward accuracy"),
)
ERROR_BINS = ("0", "1", "2", "3", "4", "5+", "unparsed")
PALETTE = ("#6b7280", "#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626")
_RC = {
    "svg.fonttype": "none",  # text stays text: smaller, sharp, selectable
    "svg.hashsalt": "vlmtune",  # stable element ids from one run to the next
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def training_curves(results: list[EvalResult]) -> str:
    """One panel per logged quantity, one line per run that logged it."""
    panels = [
        (key, title)
        for key, title in CURVES
        if any(_series(r.train_log, key)[0] for r in results)
    ]
    if not panels:
        return ""
    plt = _pyplot()
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels), 2.3), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            for i, r in enumerate(results):
                steps, values = _series(r.train_log, key)
                if steps:
                    ax.plot(steps, values, label=r.name, color=_color(i), lw=1.5,
                            marker="o" if len(steps) < 12 else None, ms=3)
            ax.set_title(title)
            ax.set_xlabel("step")
        axes[0][0].legend(frameon=False)
        return _svg(fig)


def budget_curves(curves: dict[str, list[dict]]) -> str:
    """Held-out exact match against scored samples and against seconds, one line per method.

    ``curves[method]`` lists points ``{"scored", "seconds", "em", "ci": [low, high]}`` (EM and its
    95% interval in %), in the order they were reached; the interval is drawn as an error bar.
    "" when no method has a point.
    """
    named = [(name, points) for name, points in curves.items() if points]
    if not named:
        return ""
    plt = _pyplot()
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
        for ax, key, label in ((axes[0], "scored", "scored samples"), (axes[1], "seconds", "seconds of training")):
            for i, (name, points) in enumerate(named):
                xs = [p[key] for p in points]
                ems = [p["em"] for p in points]
                bars = [[p["em"] - p["ci"][0] for p in points], [p["ci"][1] - p["em"] for p in points]]
                ax.errorbar(xs, ems, yerr=bars, label=name, color=_color(i), lw=1.5, marker="o", ms=3, capsize=2)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out exact match (%)")
        axes[0].legend(frameon=False, fontsize=7)
        return _svg(fig)


def class_accuracy_bars(results: list[EvalResult]) -> str:
    """Per-class accuracy (share of records with that class counted right), grouped by model."""
    classes = _classes(results)
    if not classes:
        return ""
    plt = _pyplot()
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(classes) + 1.5), 2.8))
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            accs = [_class_accuracy(r, c) for c in classes]
            xs = [k + (i - (len(results) - 1) / 2) * width for k in range(len(classes))]
            ax.bar(xs, [100 * a for a in accs], width, label=r.name, color=_color(i))
        ax.set_xticks(range(len(classes)), classes)
        ax.set_ylim(0, 118)  # headroom for the legend above 100 %
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("accuracy (%)")
        ax.legend(frameon=False, ncols=min(4, len(results)), loc="upper center")
        return _svg(fig)


def count_error_histogram(results: list[EvalResult]) -> str:
    """How far each answer's total is from the gold total over the counting records, per model
    (bars side by side); "" when there are none."""
    if not any(s.gold for r in results for s in r.samples):
        return ""
    plt = _pyplot()
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(5.0, 2.8))
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            counting = [s for s in r.samples if s.gold]
            counts = Counter(_error_bin(s.total_error()) for s in counting)
            shares = [100 * counts[b] / max(1, len(counting)) for b in ERROR_BINS]
            xs = [k + (i - (len(results) - 1) / 2) * width for k in range(len(ERROR_BINS))]
            ax.bar(xs, shares, width, label=r.name, color=_color(i))
        ax.set_xticks(range(len(ERROR_BINS)), ERROR_BINS)
        ax.set_xlabel("|predicted total - gold total|")
        ax.set_ylabel("records (%)")
        ax.legend(frameon=False)
        return _svg(fig)


def _series(log: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for i, row in enumerate(log):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(row.get("step", i))
            values.append(float(value))
    return steps, values


def _classes(results: list[EvalResult]) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        for s in r.samples:
            seen.update(dict.fromkeys(s.gold))
    return list(seen)


def _class_accuracy(result: EvalResult, cls: str) -> float:
    scored = [s for s in result.samples if cls in s.gold]
    return sum(s.class_hits()[cls] for s in scored) / len(scored) if scored else 0.0


def _error_bin(error: int | None) -> str:
    if error is None:
        return "unparsed"
    return "5+" if error >= 5 else str(error)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig) -> str:
    """The figure as a bare, width-fluid ``<svg>`` element for inlining in HTML5."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.tight_layout()
    # Empty metadata: no Dublin Core block, whose namespace URLs are of no use inline.
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    head, rest = text.split(">", 1)
    head = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", head)
    width_pt = float(re.search(r'width="([\d.]+)pt"', head).group(1))
    head = re.sub(r'\s+(width|height)="[^"]*"', "", head)
    # Never drawn larger than its natural size (pt -> CSS px), narrower on a narrow screen.
    style = f"width: {width_pt * 96 / 72:.0f}px; max-width: 100%"
    return f'{head} class="plot" style="{style}" role="img">{rest.strip()}'
