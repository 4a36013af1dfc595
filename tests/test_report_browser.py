"""report.html in a real browser: opened from file:// in headless Chromium with no network.

Checks that every image decodes, every plot is drawn, and that each gallery filter (for each
tuned model in the selector) shows exactly the records it should. Saves a screenshot to the
test's tmp dir, and to ``$VLMTUNE_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from test_eval_tasks import mixed_eval_dirs
from test_report import EXPECTED, GOLD, build_fixture

from vlmtune.report.html import write_report

FILTERS = ("improved", "regressed", "both-wrong")


@pytest.fixture
def page(tmp_path, chromium):
    report = write_report(tmp_path / "out", build_fixture(tmp_path, three_models=True))
    with sync_playwright() as p:
        browser = p.chromium.launch(**chromium)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        requests = []
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        yield page
        assert all(u.startswith(("file:", "data:")) for u in requests), requests
        browser.close()


def visible_ids(page) -> set[str]:
    return set(page.eval_on_selector_all(
        "#gallery .card", "cs => cs.filter(c => c.offsetParent !== null).map(c => c.dataset.id)"))


def test_images_and_plots_render(page, tmp_path):
    sizes = page.eval_on_selector_all("img", "xs => xs.map(x => [x.complete, x.naturalWidth])")
    assert len(sizes) == len(GOLD)
    assert all(done and width > 0 for done, width in sizes)
    plots = page.eval_on_selector_all("svg.plot", """ss => ss.map(s => [
        s.getBoundingClientRect().width, s.getBBox().width, s.querySelectorAll('path').length])""")
    assert len(plots) == 3
    assert all(shown > 100 and drawn > 100 and paths > 5 for shown, drawn, paths in plots)
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("VLMTUNE_SCREENSHOT_DIR"):
        target = Path(os.environ["VLMTUNE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "report.png")


def test_filters_show_exactly_the_expected_cards(page):
    everything = {f"r{i}" for i in range(len(GOLD))}
    assert visible_ids(page) == everything
    for vs, model in (("1", "tuned"), ("2", "other")):
        page.select_option("#vs", vs)
        for name in FILTERS:
            page.click(f'button[data-filter="{name}"]')
            expected = {i for i, o in EXPECTED[model].items() if o == name}
            assert visible_ids(page) == expected, (model, name)
            count = page.inner_text(f'button[data-filter="{name}"] .count')
            assert count == f"({len(expected)})"
            assert page.inner_text("#shown") == f"showing {len(expected)} of {len(GOLD)}"
        page.click('button[data-filter="all"]')
        assert visible_ids(page) == everything


def test_family_filter_combines_with_the_outcome_filter(tmp_path, chromium):
    report = write_report(tmp_path / "out", mixed_eval_dirs(tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(**chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert len(visible_ids(page)) == 10
        page.select_option("#family", "grounding")
        assert visible_ids(page) == {"r3", "r4"}
        assert page.inner_text("#shown") == "showing 2 of 10"
        assert page.inner_text('button[data-filter="improved"] .count') == "(1)"
        page.click('button[data-filter="improved"]')
        assert visible_ids(page) == {"r4"}
        page.select_option("#family", "arithmetic")
        assert visible_ids(page) == {"r1"}
        page.select_option("#family", "all")
        assert visible_ids(page) == {"r1", "r4"}
        if os.environ.get("VLMTUNE_SCREENSHOT_DIR"):
            page.screenshot(path=str(Path(os.environ["VLMTUNE_SCREENSHOT_DIR"]) / "report_families.png"), full_page=True)
        browser.close()
