"""The study's HTML, rendered on the server: the rater's page, the admin page, errors.

No external JS, CSS or fonts. The one script (keyboard shortcuts, double-submit guard) and the
one style sheet carry a per-response nonce that the Content-Security-Policy header allows.
Everything that comes from data (prompts, answers, names, comments) goes through ``escape``.
"""

from __future__ import annotations

from html import escape

from vlmtune.study.summary import Results
from vlmtune.study.stats import WinRate

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1rem; color: #222; }
header { display: flex; justify-content: space-between; align-items: baseline; }
.progress { font-size: 1.2rem; font-weight: 600; }
.images img { height: min(360px, 45vh); width: auto; max-width: 100%; border: 1px solid #ccc; margin: .25rem; }
.question { font-size: 1.1rem; background: #f4f4f4; padding: .6rem; border-radius: 6px; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
.answer { border: 2px solid #bbb; border-radius: 6px; padding: .6rem; white-space: pre-wrap; }
.answer h2 { font-size: 1rem; margin: 0 0 .4rem 0; color: #555; }
.buttons { display: flex; gap: .5rem; flex-wrap: wrap; }
.buttons button { font-size: 1rem; padding: .6rem 1rem; cursor: pointer; }
textarea { width: 100%; margin-top: .6rem; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .25rem; font-size: .85rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: left; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; }
"""

SCRIPT = """
const form = document.getElementById('vote');
let sent = false;
form.addEventListener('submit', (e) => { if (sent) { e.preventDefault(); } sent = true; });
const keys = {'1': 'left', 'ArrowLeft': 'left', '2': 'right', 'ArrowRight': 'right',
              '3': 'tie', 't': 'tie', '4': 'both_bad', 'b': 'both_bad'};
document.addEventListener('keydown', (e) => {
  const tag = e.target.tagName;
  if (tag === 'TEXTAREA' || tag === 'INPUT' || e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = keys[e.key];
  if (!choice) return;
  e.preventDefault();
  form.requestSubmit(form.querySelector('button[value="' + choice + '"]'));
});
"""


def page(title: str, body: str, nonce: str, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style nonce=\"{nonce}\">{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def message_page(title: str, message: str, nonce: str) -> str:
    return page(title, f"<h1>{escape(title)}</h1><p>{escape(message)}</p>", nonce)


def rater_page(*, study: str, rater: str, token: str, csrf: str, item_id: int, n_images: int,
               question: str, left: str, right: str, done: int, total: int, nonce: str) -> str:
    images = "".join(
        f'<img src="/r/{escape(token)}/image/{item_id}/{i}" alt="image {i + 1} of the question">'
        for i in range(n_images)
    )
    body = f"""
<header><h1>{escape(study)}</h1><span class="progress" id="progress">{done} / {total}</span></header>
<p>Rater: {escape(rater)}. Which answer is better? Keys: <kbd>1</kbd>/<kbd>&larr;</kbd> left,
<kbd>2</kbd>/<kbd>&rarr;</kbd> right, <kbd>3</kbd>/<kbd>t</kbd> tie, <kbd>4</kbd>/<kbd>b</kbd> both bad.</p>
<div class="images">{images}</div>
<p class="question" id="question">{escape(question)}</p>
<div class="answers">
  <div class="answer" id="left"><h2>Left answer</h2>{escape(left)}</div>
  <div class="answer" id="right"><h2>Right answer</h2>{escape(right)}</div>
</div>
<form id="vote" method="post" action="/r/{escape(token)}/vote">
  <input type="hidden" name="item" value="{item_id}">
  <input type="hidden" name="csrf" value="{escape(csrf)}">
  <div class="buttons">
    <button type="submit" name="choice" value="left">&larr; Left is better <kbd>1</kbd></button>
    <button type="submit" name="choice" value="right">Right is better &rarr; <kbd>2</kbd></button>
    <button type="submit" name="choice" value="tie">Tie <kbd>3</kbd></button>
    <button type="submit" name="choice" value="both_bad">Both bad <kbd>4</kbd></button>
  </div>
  <textarea name="comment" rows="2" maxlength="2000" placeholder="Comment (optional)"></textarea>
</form>
<script nonce="{nonce}">{SCRIPT}</script>
"""
    return page(f"{study}: {done} / {total}", body, nonce)


def done_page(*, study: str, rater: str, done: int, total: int, nonce: str) -> str:
    body = (
        f'<header><h1>{escape(study)}</h1><span class="progress" id="progress">{done} / {total}</span></header>'
        f"<p>Thank you, {escape(rater)}: no item needs your rating now. You rated {done}.</p>"
    )
    return page(f"{study}: done", body, nonce)


def admin_page(*, study: str, info: dict[str, str], progress: dict[str, int], raters: list[tuple[str, int]],
               results: Results, report: str, nonce: str) -> str:
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{n}</td></tr>" for name, n in raters)
    comments = "".join(
        f"<tr><td>{escape(rid)}</td><td>{escape(who)}</td><td>{escape(text)}</td></tr>"
        for rid, who, text in results.comments
    )
    body = f"""
<header><h1>{escape(study)}: results</h1>
<span class="progress">{progress['votes']} / {progress['wanted']} votes</span></header>
<p>A = {escape(info.get('model_a', '?'))}; B = {escape(info.get('model_b', '?'))}.
{progress['items']} items, {progress['complete_items']} fully rated, {progress['pending']} pending.
This page refreshes every 15 s.</p>
{win_rate_chart(results)}
<h2>Raters</h2><table><tr><th>rater</th><th>votes</th></tr>{rows}</table>
<h2>Report</h2><pre>{escape(report)}</pre>
<h2>Comments</h2><table><tr><th>record</th><th>rater</th><th>comment</th></tr>{comments}</table>
"""
    return page(f"{study}: results", body, nonce, refresh=15)


COLORS = {"A": "#d9534f", "tie": "#bbbbbb", "B": "#2e7d32", "both_bad": "#555555"}


def win_rate_chart(results: Results) -> str:
    """Inline SVG: per row (overall, then categories) the vote shares as a stacked bar and the
    win rate of B (ties as half) with its 95% interval on a 0-100% axis."""
    rows = [("overall", results.overall), *results.categories.items()]
    label_w, bar_w, rate_w, row_h = 150, 360, 300, 28
    width, height = label_w + bar_w + rate_w + 80, 50 + row_h * len(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="votes and win rate of B per category">']
    x0, r0 = label_w, label_w + bar_w + 30
    legend = [("A wins", "A"), ("tie", "tie"), ("B wins", "B"), ("both bad", "both_bad")]
    for i, (text, key) in enumerate(legend):
        parts.append(f'<rect x="{x0 + i * 90}" y="4" width="12" height="12" fill="{COLORS[key]}"/>'
                     f'<text x="{x0 + i * 90 + 16}" y="15" font-size="12">{text}</text>')
    parts.append(f'<text x="{r0}" y="15" font-size="12">win rate of B, 95% CI</text>')
    for frac in (0.0, 0.5, 1.0):
        x = r0 + frac * rate_w
        parts.append(f'<line x1="{x}" y1="24" x2="{x}" y2="{height - 4}" stroke="#ccc"/>'
                     f'<text x="{x - 10}" y="{height}" font-size="10">{frac:.0%}</text>')
    for j, (name, w) in enumerate(rows):
        y = 30 + j * row_h
        parts.append(f'<text x="0" y="{y + 15}" font-size="13">{escape(name)} (n={w.n})</text>')
        parts.append(_stacked_bar(w, x0, y, bar_w))
        if w.rate is not None:
            lo, hi, mid = (r0 + v * rate_w for v in (w.ci[0], w.ci[1], w.rate))
            parts.append(f'<line x1="{lo:.1f}" y1="{y + 10}" x2="{hi:.1f}" y2="{y + 10}" '
                         'stroke="#222" stroke-width="2"/>'
                         f'<circle cx="{mid:.1f}" cy="{y + 10}" r="5" fill="{COLORS["B"]}"/>'
                         f'<text x="{hi + 6:.1f}" y="{y + 14}" font-size="11">{w.rate:.0%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _stacked_bar(w: WinRate, x: float, y: float, width: float) -> str:
    if w.n == 0:
        return ""
    out = []
    for key, count in (("A", w.a), ("tie", w.ties), ("B", w.b), ("both_bad", w.both_bad)):
        span = width * count / w.n
        if span > 0:
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{span:.1f}" height="20" fill="{COLORS[key]}">'
                       f"<title>{key}: {count}</title></rect>")
            x += span
    return "".join(out)
