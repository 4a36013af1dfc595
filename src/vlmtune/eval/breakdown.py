"""Accuracy by family, hop count and OOD axis as plain-text tables, models and baselines side by side.

    breakdown_tables([("model", metrics)]) -> str

``metrics`` is what :func:`vlmtune.eval.run.evaluate` returns (or ``metrics.json``). Each table has
one row per group (``all``, then every ``family/<f>``, ``hops/<n>`` or ``axis/<a>`` found),
one column per model, then the baselines (:mod:`vlmtune.eval.baselines`): the majority answer
(the same for every model: the first's) and, where it was run, each model's blank-image
accuracy. Cells are accuracy in % with the 95% bootstrap CI.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

GROUPS = (("family", "accuracy by family"), ("hops", "accuracy by hop count"), ("axis", "accuracy by OOD axis"))


def baseline_columns(columns: Sequence[tuple[str, Mapping[str, dict]]]) -> list[tuple[str, Mapping[str, dict], str]]:
    """``(label, metrics, key prefix)`` of each baseline column: the majority answer (the first
    model's), then the blank image of every model that ran it (named when there are several)."""
    first = columns[0][1]
    cols = []
    if "baseline/majority/task/accuracy" in first:
        cols.append(("majority answer", first, "baseline/majority/"))
    for name, metrics in columns:
        if "baseline/blank/task/accuracy" in metrics:
            cols.append(("blank image" if len(columns) == 1 else f"blank image ({name})", metrics, "baseline/blank/"))
    return cols


def group_keys(metrics: Mapping[str, dict], group: str) -> list[str]:
    """``group``'s accuracy metrics in ``metrics`` (``family/count/accuracy``, ...), sorted by name
    (hop counts as numbers)."""
    keys = [k for k in metrics if k.startswith(f"{group}/") and k.endswith("/accuracy") and k.count("/") == 2]
    middle = [k.split("/")[1] for k in keys]
    order = sorted(middle, key=lambda m: (0, int(m), "") if m.isdigit() else (1, 0, m))
    return [f"{group}/{m}/accuracy" for m in order]


def breakdown_tables(columns: Sequence[tuple[str, Mapping[str, dict]]]) -> str:
    """The three tables (a group none of the models reports is left out); "" without task metrics."""
    first = columns[0][1]
    if "task/accuracy" not in first:
        return ""
    cols = [(name, m, "") for name, m in columns] + baseline_columns(columns)
    tables = []
    for group, title in GROUPS:
        keys = group_keys(first, group)
        if len(keys) < 2 and group != "family":
            continue  # one hop count or no OOD axis: the table would repeat "all"
        tables.append(_table(title, ["task/accuracy", *keys], cols))
    return "\n\n".join(tables)


def _table(title: str, keys: list[str], cols: list[tuple[str, Mapping[str, dict], str]]) -> str:
    names = ["all" if k == "task/accuracy" else k.split("/")[1] for k in keys]
    width = max(len(title), *(len(n) for n in names))
    head = f"{title:<{width}}  {'n':>5}" + "".join(f"  {name:<22}" for name, _, _ in cols)
    lines = [head]
    for key, name in zip(keys, names):
        n = cols[0][1].get(key, {}).get("n", "")
        cells = "".join(f"  {_cell(m.get(prefix + key)):<22}" for _, m, prefix in cols)
        lines.append(f"{name:<{width}}  {n!s:>5}{cells}")
    return "\n".join(line.rstrip() for line in lines)


def _cell(entry: Mapping[str, float] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    value = f"{100 * entry['value']:.1f}%"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return value
    return f"{value} [{100 * low:.1f}, {100 * high:.1f}]"
