"""The report page's inline stylesheet and script (kept here so the page needs no other file)."""

CSS = """
:root { --fg: #1f2933; --muted: #6b7280; --line: #e5e7eb; --bg: #f8fafc; --card: #fff;
        --good: #15803d; --good-bg: #dcfce7; --bad: #b91c1c; --bad-bg: #fee2e2; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
header, section { max-width: 1200px; margin: 0 auto; padding: 18px 24px; }
header { padding-top: 28px; }
h1 { font-size: 26px; margin: 0 0 10px; }
h2 { font-size: 19px; margin: 8px 0 12px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
.muted { color: var(--muted); font-size: 13px; font-weight: normal; }
.summary { font-size: 18px; font-weight: 600; margin: 6px 0; padding: 10px 14px; border-radius: 8px;
           background: var(--card); border-left: 5px solid var(--muted); }
.summary.better { border-left-color: var(--good); }
.summary.worse { border-left-color: var(--bad); }
table.metrics { border-collapse: collapse; background: var(--card); width: 100%;
                box-shadow: 0 1px 2px rgba(0,0,0,.06); border-radius: 8px; overflow: hidden; }
table.metrics th, table.metrics td { padding: 8px 12px; text-align: left; border-bottom: 1px solid var(--line);
                                     white-space: nowrap; }
table.metrics thead th { background: #f1f5f9; font-size: 13px; text-transform: uppercase; letter-spacing: .03em; }
table.metrics tbody tr:nth-child(even) { background: #fafbfc; }
.key { font: 11px ui-monospace, monospace; color: var(--muted); }
.num { font-variant-numeric: tabular-nums; font-weight: 600; }
.ci { color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
table.metrics .ci { display: block; }
table.metrics .badge { display: inline-block; margin: 2px 0 0; }
td.delta.better { background: var(--good-bg); color: var(--good); }
td.delta.worse { background: var(--bad-bg); color: var(--bad); }
.badge { font-size: 11px; padding: 1px 7px; border-radius: 10px; background: #eef2f7; color: var(--muted);
         margin-left: 4px; }
.better .badge { background: var(--good); color: #fff; }
.worse .badge { background: var(--bad); color: #fff; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plotbox { margin: 0; background: var(--card); border-radius: 8px; padding: 10px;
           box-shadow: 0 1px 2px rgba(0,0,0,.06); flex: 0 1 auto; max-width: 100%; }
.plotbox figcaption { font-weight: 600; margin-bottom: 4px; }
svg.plot { height: auto; display: block; }
.tablewrap { overflow-x: auto; }
.controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin-bottom: 8px; }
.filters button { font: inherit; padding: 6px 14px; border: 1px solid var(--line); background: var(--card);
                  border-radius: 18px; cursor: pointer; margin-right: 4px; }
.filters button.active { background: var(--accent); border-color: var(--accent); color: #fff; }
.filters .count { opacity: .75; font-size: 12px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.card { display: flex; gap: 12px; background: var(--card); border-radius: 8px; padding: 12px;
        box-shadow: 0 1px 2px rgba(0,0,0,.06); border-top: 3px solid var(--line); }
.card[hidden] { display: none; }
.card.improved { border-top-color: var(--good); }
.card.regressed { border-top-color: var(--bad); }
.card figure { margin: 0; flex: 0 0 120px; }
.card img { width: 120px; height: auto; border-radius: 4px; display: block; image-rendering: auto; }
.noimg { width: 120px; height: 90px; font-size: 11px; color: var(--bad); background: var(--bad-bg);
         padding: 6px; overflow: hidden; word-break: break-all; border-radius: 4px; }
.card .body { flex: 1; min-width: 0; }
.rid { font-size: 11px; color: var(--muted); font-family: ui-monospace, monospace; }
.prompt { margin: 2px 0 6px; font-style: italic; font-size: 13px; }
.gold { margin: 0 0 6px; font-size: 13px; }
table.answers { border-collapse: collapse; font-size: 13px; width: 100%; }
table.answers th { text-align: left; padding: 2px 6px 2px 0; vertical-align: top; white-space: nowrap; }
table.answers td { padding: 2px 4px; vertical-align: top; word-break: break-word; }
td.mark { width: 18px; }
.ok { color: var(--good); font-weight: 700; }
.bad { color: var(--bad); font-weight: 700; }
"""

# Filters the gallery by each card's outcome against the selected tuned model and by its task
# family; keeps the counts on the buttons in step with the selection.
JS = """
(function () {
  var state = { filter: "all", vs: "1", family: "all" };
  var cards = Array.prototype.slice.call(document.querySelectorAll("#gallery .card"));
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".filters button"));
  var select = document.getElementById("vs");
  var family = document.getElementById("family");
  function outcome(card) { return card.getAttribute("data-vs-" + state.vs); }
  function inFamily(card) { return state.family === "all" || card.getAttribute("data-family") === state.family; }
  function matches(card, filter) { return inFamily(card) && (filter === "all" || outcome(card) === filter); }
  function apply() {
    var shown = 0;
    cards.forEach(function (card) {
      var on = matches(card, state.filter);
      card.hidden = !on;
      card.classList.toggle("improved", outcome(card) === "improved");
      card.classList.toggle("regressed", outcome(card) === "regressed");
      if (on) { shown += 1; }
    });
    buttons.forEach(function (b) {
      var f = b.getAttribute("data-filter");
      b.classList.toggle("active", f === state.filter);
      var n = cards.filter(function (c) { return matches(c, f); }).length;
      b.querySelector(".count").textContent = "(" + n + ")";
    });
    var note = document.getElementById("shown");
    if (note) { note.textContent = "showing " + shown + " of " + cards.length; }
  }
  buttons.forEach(function (b) {
    b.addEventListener("click", function () { state.filter = b.getAttribute("data-filter"); apply(); });
  });
  if (select) { select.addEventListener("change", function () { state.vs = select.value; apply(); }); }
  if (family) { family.addEventListener("change", function () { state.family = family.value; apply(); }); }
  apply();
})();
"""
