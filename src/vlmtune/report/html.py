"""``report.html``: the before/after table, the plots and the gallery in one self-contained page.

The page opens from a ``file://`` URL with no network: CSS and JS are inline, plots are inline
SVG, images are data URIs. Every text from data or models is escaped.

    write_report("out", [RunResult("base", Path("out/base")),
                         RunResult("dpo", Path("out/dpo"), Path("runs/dpo/metrics.jsonl"))])
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.eval.baselines import is_accuracy
from vlmtune.eval.breakdown import GROUPS, baseline_columns, group_keys
from vlmtune.report import gallery, plots
from vlmtune.report.assets import CSS, JS
from vlmtune.report.deltas import NO_DIRECTION, MetricDelta, lower_is_better, metric_deltas
from vlmtune.report.inputs import EvalResult, RunResult, load_run

HEADLINE_METRICS = ("exact_match", "task/accuracy", "rewards/accuracies", "logps/accuracy")
LABELS = {
    "exact_match": "exact match",
    "task/accuracy": "task accuracy",
    "task/format_rate": "format rate",
    "task/answer_tokens": "answer length (tokens)",
    "task/truncation_rate": "truncated answers",
    "task/think_consistency": "think/answer consistency",
    "class_accuracy": "class accuracy",
    "total_accuracy": "total right",
    "total_abs_error": "total abs. error",
    "parse_failure": "parse failures",
    "logps/chosen": "log-prob of chosen",
    "logps/rejected": "log-prob of rejected",
    "logps/accuracy": "log-prob accuracy",
    "rewards/chosen": "reward of chosen",
    "rewards/rejected": "reward of rejected",
    "rewards/accuracies": "reward accuracy",
    "rewards/margins": "reward margin",
    "text/bleu": "BLEU",
    "text/sentence_bleu": "sentence BLEU",
    "text/rouge_l": "ROUGE-L",
}
# Shares in [0, 1]: shown in %, their deltas in points.
RATE_WORDS = ("accura", "exact", "failure", "rouge", "rate", "consistency", "acc@", "iou")
FILTERS = (("all", "all"), ("improved", "improved"), ("regressed", "regressed"), ("both-wrong", "both wrong"))


def write_report(
    out_dir: str | Path,
    runs: list[RunResult],
    title: str = "vlmtune: before / after",
    max_gallery: int | None = None,
    seed: int = 0,
    budget: dict[str, list[dict]] | None = None,
) -> Path:
    """Render ``out_dir/report.html`` from evaluation folders already written; returns its path.

    ``runs[0]`` is the baseline; every other run is compared with it. ``budget`` (method -> points,
    see ``plots.budget_curves``) adds the plot of exact match against scored samples and seconds.
    """
    if not runs:
        raise VlmtuneError("write_report needs at least one run (the baseline first)")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise VlmtuneError(f"run names must differ, got {names}; pass distinct --names")
    results = [load_run(r) for r in runs]
    deltas = [metric_deltas(results[0], r, seed=seed) for r in results[1:]]
    page = render_page(results, deltas, title=title, max_gallery=max_gallery,
                       training_samples=training_samples_html(runs), budget=budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison(results, deltas), indent=2) + "\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def comparison(results: list[EvalResult], deltas: list[list[MetricDelta]]) -> dict:
    """The table's deltas as data (``comparison.json``): per tuned model, its summary line and
    ``{metric: {delta, ci_low, ci_high, n, verdict}}``; NaN written as null."""
    def finite(x: float) -> float | None:
        return None if math.isnan(x) else x

    models = {}
    for result, rows in zip(results[1:], deltas):
        models[result.name] = {
            "summary": _summary_text(result, results, rows),
            "deltas": {d.metric: {"delta": finite(d.delta), "ci_low": finite(d.ci_low),
                                  "ci_high": finite(d.ci_high), "n": d.n, "verdict": d.verdict}
                       for d in rows},
        }
    return {"base": results[0].name, "models": models}


def render_page(
    results: list[EvalResult],
    deltas: list[list[MetricDelta]],
    title: str,
    max_gallery: int | None = None,
    training_samples: str = "",
    budget: dict[str, list[dict]] | None = None,
) -> str:
    ids = gallery.select_ids(results, max_gallery)
    n_records = len(results[0].samples)
    shown = "" if len(ids) == n_records else f" (the {len(ids)} most instructive of {n_records})"
    figures = [
        ("Training curves", plots.training_curves(results)),
        ("Per-class accuracy", plots.class_accuracy_bars(results)),
        ("Count errors", plots.count_error_histogram(results)),
        ("Exact match against scored samples and seconds (95% CIs)", plots.budget_curves(budget or {})),
    ]
    plot_html = "\n".join(
        f'<figure class="plotbox"><figcaption>{escape(name)}</figcaption>{svg}</figure>'
        for name, svg in figures
        if svg
    )
    return _TEMPLATE.format(
        title=escape(title),
        css=CSS,
        js=JS,
        summary=summary_html(results, deltas),
        table=metrics_table(results, deltas),
        groups=group_tables(results, deltas),
        plots=plot_html or '<p class="muted">Nothing to plot.</p>',
        training_samples=training_samples,
        controls=_gallery_controls(results),
        cards=gallery.gallery_html(results, ids),
        gallery_note=escape(f"{len(ids)} records{shown}"),
        n=n_records,
    )


def training_samples_html(runs: list[RunResult]) -> str:
    """The training section's samples: for each run whose folder holds ``training_samples.jsonl``
    (``train.sample_every``), the cards of its latest sampling step; "" when no run has any."""
    from vlmtune.train.samples import ROWS_FILE, latest_rows, read_sample_rows
    from vlmtune.train.samples_html import step_cards, step_summary  # it imports report.assets: not at the top

    blocks = []
    for run in runs:
        path = run.train_log.parent / ROWS_FILE if run.train_log else None
        if path is None or not path.is_file():
            continue
        rows = latest_rows(read_sample_rows(path))
        if rows:
            blocks.append(f'<h4>{escape(run.name)} <span class="muted">step {rows[0]["step"]} · '
                          f'{escape(step_summary(rows))}</span></h4><div class="gallery">{step_cards(rows)}</div>')
    if not blocks:
        return ""
    return ('<div class="training-samples"><h3>Training samples</h3><p class="muted">Greedy answers to the same held-out items during '
            "training (the run's samples.html has every step).</p>" + "\n".join(blocks) + "</div>")


def summary_line(name: str, base_name: str, metric: str, d: MetricDelta, rate: bool) -> str:
    """``"dpo vs base: exact match +12.3 points [95% CI +6.1, +18.0]"`` (plain text)."""
    ci = "" if math.isnan(d.ci_low) else f" [95% CI {_signed(d.ci_low, rate)}, {_signed(d.ci_high, rate)}]"
    unit = " points" if rate else ""
    return f"{name} vs {base_name}: {_label(metric)} {_signed(d.delta, rate)}{unit}{ci}"


def summary_html(results: list[EvalResult], deltas: list[list[MetricDelta]]) -> str:
    base = results[0]
    if not deltas:
        return f'<p class="summary">{escape(base.name)}: {len(base.samples)} records evaluated.</p>'
    lines = []
    for result, rows in zip(results[1:], deltas):
        if rows:
            d = _headline(rows)
            text = _summary_text(result, results, rows)
            lines.append(f'<p class="summary {_verdict_class(d)}">{escape(text)} {_badge(d)}</p>')
    return "\n".join(lines)


def _headline(rows: list[MetricDelta]) -> MetricDelta:
    """The first of :data:`HEADLINE_METRICS` paired over the most records (on mixed task data,
    task accuracy rather than the counting records' exact match)."""
    ranked = [(-r.n, HEADLINE_METRICS.index(r.metric), i) for i, r in enumerate(rows) if r.metric in HEADLINE_METRICS]
    return rows[min(ranked)[2]] if ranked else rows[0]


def _summary_text(result: EvalResult, results: list[EvalResult], rows: list[MetricDelta]) -> str:
    if not rows:
        return f"{result.name}: no metric in common with {results[0].name}"
    d = _headline(rows)
    return summary_line(result.name, results[0].name, d.metric, d, _is_rate(d.metric, results))


def metrics_table(results: list[EvalResult], deltas: list[list[MetricDelta]]) -> str:
    head = ["<th>metric</th>", f"<th>{escape(results[0].name)}</th>"]
    for r in results[1:]:
        head += [f"<th>{escape(r.name)}</th>", f"<th>&Delta; vs {escape(results[0].name)}</th>"]
    body = []
    for metric in _metric_order(results):
        rate = _is_rate(metric, results)
        arrow = "" if metric in NO_DIRECTION else "&darr; better" if lower_is_better(metric) else "&uarr; better"
        cells = [
            f'<th scope="row">{escape(_label(metric))} <span class="muted">{arrow}</span>'
            f'<div class="key">{escape(metric)}</div></th>'
        ]
        base_entry = results[0].metrics.get(metric)
        cells.append(f"<td>{_value_cell(base_entry, rate) if base_entry else '&ndash;'}</td>")
        for r, rows in zip(results[1:], deltas):
            d = next((x for x in rows if x.metric == metric), None)
            entry = r.metrics.get(metric)
            cells.append(f"<td>{_value_cell(entry, rate) if entry else '&ndash;'}</td>")
            cells.append(_delta_cell(d, rate))
        body.append(f'<tr data-metric="{escape(metric)}">{"".join(cells)}</tr>')
    return (
        f'<div class="tablewrap"><table class="metrics"><thead><tr>{"".join(head)}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div>'
    )


def group_tables(results: list[EvalResult], deltas: list[list[MetricDelta]]) -> str:
    """Accuracy by family (and by hop count and OOD axis when there are several): one section per
    grouping, each model's accuracy with its CI, the paired delta vs the base, and the base's
    baselines; "" when no model reports task accuracy."""
    if not any("task/accuracy" in r.metrics for r in results):
        return ""
    sections = []
    for group, title in GROUPS:
        keys: dict[str, None] = {}
        for r in results:
            keys.update(dict.fromkeys(group_keys(r.metrics, group)))
        if len(keys) < 2 and group != "family":
            continue
        table = _group_table(group, ["task/accuracy", *keys], results, deltas)
        sections.append(f'<section class="groups" data-group="{group}"><h2>{escape(title[0].upper() + title[1:])}</h2>'
                        f"{table}</section>")
    return "\n".join(sections)


def _group_table(group: str, keys: list[str], results: list[EvalResult], deltas: list[list[MetricDelta]]) -> str:
    base = results[0]
    baselines = baseline_columns([(r.name, r.metrics) for r in results])
    head = [f"<th>{escape(group)}</th>", "<th>n</th>", f"<th>{escape(base.name)}</th>"]
    for r in results[1:]:
        head += [f"<th>{escape(r.name)}</th>", f"<th>&Delta; vs {escape(base.name)}</th>"]
    head += [f"<th>{escape(label)}{_baseline_note(metrics, prefix)}</th>" for label, metrics, prefix in baselines]
    body = []
    for metric in keys:
        name = "all" if metric == "task/accuracy" else metric.split("/")[1]
        n = (base.metrics.get(metric) or {}).get("n")
        cells = [f'<th scope="row">{escape(name)}</th>', f"<td>{'' if n is None else n}</td>",
                 _entry_cell(base.metrics.get(metric))]
        for r, rows in zip(results[1:], deltas):
            cells.append(_entry_cell(r.metrics.get(metric)))
            cells.append(_delta_cell(next((d for d in rows if d.metric == metric), None), True))
        cells += [_entry_cell(metrics.get(prefix + metric)) for _, metrics, prefix in baselines]
        body.append(f'<tr data-{group}="{escape(name)}">{"".join(cells)}</tr>')
    return (f'<div class="tablewrap"><table class="metrics"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _baseline_note(metrics: dict, prefix: str) -> str:
    """Where a baseline's answers come from, when it says (the majority's source)."""
    note = metrics[prefix + "task/accuracy"].get("note")
    return f' <span class="muted">({escape(note)})</span>' if note else ""


def _entry_cell(entry: dict | None) -> str:
    return f"<td>{_value_cell(entry, True) if entry else '&ndash;'}</td>"


def _metric_order(results: list[EvalResult]) -> list[str]:
    """Every metric any model reports, the base's in its order, then the others' new ones; less
    those the accuracy tables show (a group's accuracy, the baselines)."""
    seen: dict[str, None] = {}
    for r in results:
        seen.update(dict.fromkeys(r.metrics))
    return [m for m in seen if m == "task/accuracy" or not (is_accuracy(m) or m.startswith("baseline/"))]


def _value_cell(entry: dict, rate: bool) -> str:
    value = _fmt(entry["value"], rate)
    if math.isnan(entry["ci_low"]) or math.isnan(entry["ci_high"]):
        return f'<span class="num">{value}</span>'
    ci = f"[{_fmt(entry['ci_low'], rate)}, {_fmt(entry['ci_high'], rate)}]"
    return f'<span class="num">{value}</span> <span class="ci">{ci}</span>'


def _delta_cell(d: MetricDelta | None, rate: bool) -> str:
    if d is None:
        return "<td>&ndash;</td>"
    ci = "" if math.isnan(d.ci_low) else (
        f' <span class="ci">[{_signed(d.ci_low, rate)}, {_signed(d.ci_high, rate)}]</span>'
    )
    return (
        f'<td class="delta {_verdict_class(d)}" data-verdict="{escape(d.verdict)}">'
        f'<span class="num">{_signed(d.delta, rate)}</span>{ci}{_badge(d, quiet=True)}</td>'
    )


def _badge(d: MetricDelta, quiet: bool = False) -> str:
    """The verdict as a badge; ``quiet`` leaves out the non-significant ones (table cells)."""
    text = {"better": "&#9650; significant gain", "worse": "&#9660; significant loss",
            "up": "&#9650; significant rise", "down": "&#9660; significant drop",
            "no change": "not significant", "no CI": "no CI"}[d.verdict]
    if quiet and d.verdict in ("no change", "no CI"):
        return ""
    return f'<span class="badge">{text}</span>'


def _verdict_class(d: MetricDelta) -> str:
    return {"better": "better", "worse": "worse"}.get(d.verdict, "neutral")


def _gallery_controls(results: list[EvalResult]) -> str:
    families = sorted({s.family for r in results for s in r.samples if s.family})
    family = ""
    if families:
        options = "".join(f'<option value="{escape(f)}">{escape(f)}</option>' for f in families)
        family = (f'<label class="vs">family <select id="family"><option value="all">all families</option>'
                  f"{options}</select></label>")
    if len(results) < 2:
        return f'<div class="controls">{family}</div>' if family else ""
    buttons = "".join(
        f'<button type="button" data-filter="{key}">{label} <span class="count"></span></button>'
        for key, label in FILTERS
    )
    options = "".join(
        f'<option value="{k}">{escape(r.name)}</option>' for k, r in enumerate(results[1:], start=1)
    )
    selector = (
        f'<label class="vs">compare <b>{escape(results[0].name)}</b> with '
        f'<select id="vs">{options}</select></label>'
    )
    return f'<div class="controls"><div class="filters">{buttons}</div>{selector}{family}</div>'


def _is_rate(metric: str, results: list[EvalResult]) -> bool:
    """A share in [0, 1] (shown in %, its deltas in points), not a count, a log-prob or a score."""
    if not any(w in metric.lower() for w in RATE_WORDS):
        return False
    values = [
        v
        for r in results
        if metric in r.metrics
        for v in (r.metrics[metric]["value"], r.metrics[metric]["ci_low"], r.metrics[metric]["ci_high"])
        if not math.isnan(v)
    ]
    return all(0.0 <= v <= 1.0 for v in values)


def _label(metric: str) -> str:
    """A reader's name: ``exact_match`` -> ``exact match``, ``accuracy/car`` -> ``car accuracy``."""
    if metric in LABELS:
        return LABELS[metric]
    for prefix, suffix in (("accuracy/", "accuracy"), ("abs_error/", "abs. error")):
        if metric.startswith(prefix):
            return f"{metric[len(prefix):]} {suffix}"
    return metric.replace("_", " ")


def _fmt(x: float, rate: bool) -> str:
    return f"{100 * x:.1f}%" if rate else f"{x:.3g}"


def _signed(x: float, rate: bool) -> str:
    return f"{100 * x:+.1f}" if rate else f"{x:+.3g}"


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
{summary}
<p class="muted">{n} records. Brackets are 95% confidence intervals; deltas use a paired bootstrap
over records, and are marked significant when their interval excludes 0.</p>
</header>
{groups}
<section>
<h2>Metrics</h2>
{table}
</section>
<section>
<h2>Plots</h2>
<div class="plots">
{plots}
</div>
{training_samples}
</section>
<section id="gallery-section">
<h2>Gallery <span class="muted">{gallery_note}</span></h2>
{controls}
<p id="shown" class="muted"></p>
<div id="gallery" class="gallery">
{cards}
</div>
</section>
<script>
{js}
</script>
</body>
</html>
"""
