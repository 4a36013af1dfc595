"""The gallery: one card per record with its image, the prompt, each model's answer and the truth,
tagged with its outcome per tuned model and its task family (the page's filters read both).

Images are embedded as downscaled JPEG data URIs so the page needs nothing beside it. Every
text that reaches the page goes through ``html.escape``: answers are model output.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from vlmtune.report.deltas import outcomes
from vlmtune.report.inputs import EvalResult, Sample

THUMBNAIL_SIZE = 224
# Cards kept first when the gallery is cut to --max-gallery: the instructive ones.
PRIORITY = {"improved": 0, "regressed": 1, "both-wrong": 2, "both-right": 3, "unscored": 4}


def thumbnail_data_uri(path: str | Path, size: int = THUMBNAIL_SIZE) -> str | None:
    """The image shrunk to fit ``size`` x ``size``, as a ``data:image/jpeg;base64,...`` URI.

    ``None`` when the file cannot be read; the card then says so instead of showing a broken image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def select_ids(results: list[EvalResult], max_items: int | None) -> list[str]:
    """Record ids for the gallery in data order; past ``max_items`` the instructive ones win
    (improved or regressed under any tuned model, then both wrong, then the rest)."""
    base = results[0]
    ids = [s.id for s in base.samples]
    if max_items is None or len(ids) <= max_items:
        return ids
    per_tuned = [outcomes(base, r) for r in results[1:]]

    def rank(record_id: str) -> int:
        return min((PRIORITY[o[record_id]] for o in per_tuned if record_id in o), default=4)

    keep = set(sorted(ids, key=rank)[:max_items])  # sorted is stable: data order within a rank
    return [i for i in ids if i in keep]


def gallery_html(results: list[EvalResult], ids: list[str]) -> str:
    """The cards; each carries ``data-vs-<k>`` = its outcome for tuned model ``k`` (1-based) and
    ``data-family`` = its task family (``none`` for a record without a task)."""
    by_model = [{s.id: s for s in r.samples} for r in results]
    per_tuned = [outcomes(results[0], r) for r in results[1:]]
    cards = [
        _card(record_id, [m.get(record_id) for m in by_model], results, per_tuned)
        for record_id in ids
    ]
    return "\n".join(cards)


def _card(record_id: str, samples: list[Sample | None], results, per_tuned) -> str:
    base = samples[0]
    attrs = " ".join(
        f'data-vs-{k}="{o.get(record_id, "missing")}"' for k, o in enumerate(per_tuned, start=1)
    )
    uri = thumbnail_data_uri(base.image) if base.image else None
    if uri:
        figure = f'<img src="{uri}" alt="{escape(Path(base.image).name)}" loading="eager">'
    else:
        figure = f'<div class="noimg">image not readable:<br>{escape(str(base.image))}</div>'
    answers = "\n".join(
        _answer_row(r.name, s) for r, s in zip(results, samples)
    )
    return (
        f'<article class="card" {attrs} data-id="{escape(record_id)}" data-family="{escape(base.family or "none")}">'
        f"<figure>{figure}</figure>"
        f'<div class="body"><div class="rid">{escape(record_id)}</div>'
        f'<p class="prompt">{escape(base.prompt)}</p>'
        f'<p class="gold"><b>truth</b> {escape(_gold_text(base))}</p>'
        f'<table class="answers">{answers}</table></div></article>'
    )


def _answer_row(name: str, sample: Sample | None) -> str:
    if sample is None:
        return f'<tr><th>{escape(name)}</th><td class="mark"></td><td class="muted">not evaluated</td></tr>'
    mark = {True: '<span class="ok" title="right">&#10003;</span>',
            False: '<span class="bad" title="wrong">&#10007;</span>', None: ""}[sample.correct]
    wrong = [c for c, hit in sample.class_hits().items() if not hit]
    detail = f'<div class="muted">off: {escape(", ".join(wrong))}</div>' if wrong and sample.correct is False else ""
    return (
        f"<tr><th>{escape(name)}</th><td class=\"mark\">{mark}</td>"
        f"<td>{_answer_text(sample.answer)}{detail}</td></tr>"
    )


def _gold_text(sample: Sample) -> str:
    """The gold answer as its task writes it (the row's ``gold_text``; for a counting row written
    before it existed, the count task's sentence), else the chosen answer."""
    if isinstance(sample.row.get("gold_text"), str):
        return sample.row["gold_text"]
    if sample.gold:
        from vlmtune.tasks import answers

        return answers.render("counts", sample.gold, {"classes": list(sample.gold)})
    return str(sample.row.get("chosen") or "(no reference answer)")


def _answer_text(answer: str) -> str:
    if not answer.strip():
        return '<span class="answer muted">(empty answer)</span>'
    return f'<span class="answer">{escape(answer)}</span>'
