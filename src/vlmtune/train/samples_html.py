"""``samples.html``: a run's training samples (``train.samples``' rows) as one self-contained page.

One section per sampling step, newest first, each a grid of cards: the item's image (a downscaled
JPEG data URI, ``report.gallery.thumbnail_data_uri``), prompt, the model's answer, the gold answer
and the task's reward with a right / wrong mark. The report's stylesheet is inline and the page has
no script; its Content-Security-Policy allows inline styles and data-URI images only. Every text
goes through ``html.escape``: answers are model output, prompts and ids are data.
``step_cards`` is also what the compare report shows for a run's latest step.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from vlmtune.report.assets import CSS
from vlmtune.report.gallery import thumbnail_data_uri

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def by_step(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The rows grouped by step, newest step first, each step's rows in item order."""
    steps: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        steps.setdefault(row["step"], []).append(row)
    return dict(sorted(steps.items(), reverse=True))


def step_summary(rows: list[dict[str, Any]]) -> str:
    """``"8 items · mean reward 0.62 · 4 of 8 right"``; items without a task are counted, not scored."""
    scored = [r["reward"] for r in rows if r.get("reward") is not None]
    parts = [f"{len(rows)} items"]
    if scored:
        right = sum(1 for r in rows if r.get("correct") is True)
        parts += [f"mean reward {sum(scored) / len(scored):.2f}", f"{right} of {len(scored)} right"]
    return " · ".join(parts)


def step_cards(rows: list[dict[str, Any]], images: dict[str, str | None] | None = None) -> str:
    """One step's cards; ``images`` caches each path's data URI across steps."""
    images = {} if images is None else images
    return "\n".join(_card(row, images) for row in rows)


def samples_page(rows: list[dict[str, Any]], title: str) -> str:
    """The whole page for ``rows`` (every step's), newest step first."""
    images: dict[str, str | None] = {}
    sections = [
        f'<section class="step" data-step="{step}"><h2>step {step} '
        f'<span class="muted">{escape(step_summary(step_rows))}</span></h2>'
        f'<div class="gallery">{step_cards(step_rows, images)}</div></section>'
        for step, step_rows in by_step(rows).items()
    ]
    body = "\n".join(sections) or '<section><p class="muted">No samples yet.</p></section>'
    return _TEMPLATE.format(title=escape(title), csp=CSP, css=CSS, body=body)


def _card(row: dict[str, Any], images: dict[str, str | None]) -> str:
    path = row.get("image")
    if path and path not in images:
        images[path] = thumbnail_data_uri(path)
    uri = images.get(path) if path else None
    if uri:
        figure = f'<img src="{uri}" alt="{escape(Path(path).name)}">'
    elif path:
        figure = f'<div class="noimg">image not readable:<br>{escape(str(path))}</div>'
    else:
        figure = '<div class="noimg">no image</div>'
    return (
        f'<article class="card{_outcome_class(row)}" data-id="{escape(str(row["id"]))}">'
        f"<figure>{figure}</figure>"
        f'<div class="body"><div class="rid">{escape(str(row["id"]))}</div>'
        f'<p class="prompt">{escape(str(row.get("prompt") or ""))}</p>'
        f'<table class="answers"><tr><th>answer</th><td class="mark">{_mark(row)}</td>'
        f"<td>{_answer(row['answer'])}</td></tr>"
        f'<tr><th>gold</th><td class="mark"></td><td>{escape(str(row.get("gold") or ""))}</td></tr>'
        f"{_reward_row(row)}</table></div></article>"
    )


def _outcome_class(row: dict[str, Any]) -> str:
    return {True: " improved", False: " regressed"}.get(row.get("correct"), "")


def _mark(row: dict[str, Any]) -> str:
    return {True: '<span class="ok" title="right">&#10003;</span>',
            False: '<span class="bad" title="wrong">&#10007;</span>'}.get(row.get("correct"), "")


def _reward_row(row: dict[str, Any]) -> str:
    if row.get("reward") is None:
        return '<tr><th>reward</th><td class="mark"></td><td class="muted">no task: not scored</td></tr>'
    return f'<tr><th>reward</th><td class="mark"></td><td class="num">{row["reward"]:.2f}</td></tr>'


def _answer(answer: str) -> str:
    if not answer.strip():
        return '<span class="answer muted">(empty answer)</span>'
    return f'<span class="answer">{escape(answer)}</span>'


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="muted">The model's greedy answers to the same held-out items at each sampling step, newest first.
A mark: the answer has the task's full marks (reward 1).</p>
</header>
{body}
</body>
</html>
"""
