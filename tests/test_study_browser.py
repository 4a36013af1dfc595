"""A real browser (Debian's headless Chromium through Playwright) opens a rater link, votes with the
mouse and with the keyboard, and the votes are in the database. A screenshot is saved to the
test's tmp dir and to $VLMTUNE_SCREENSHOT_DIR when set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from test_study_server import free_port, make_inputs, start_server

from vlmtune.study import db
from vlmtune.study.create import build_study


@pytest.fixture(scope="module")
def server(tmp_path_factory, chromium):
    tmp = tmp_path_factory.mktemp("study-browser")
    data, a, b = make_inputs(tmp, 6)
    for i in range(6):  # a scene with shapes, bigger than the default test image
        scene = Image.new("RGB", (224, 168), (120, 130, 125))
        draw = ImageDraw.Draw(scene)
        for k in range(i % 3 + 1):
            draw.rectangle((20 + 60 * k, 60, 60 + 60 * k, 90), fill=(200, 30, 30))
        scene.save(data.parent / f"img{i}.png")
    for path, offset in ((a, 0), (b, 1)):  # answers in the task's own words
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, row in enumerate(rows):
            row["answer"] = f"There are {i % 3 + 1 + offset} cars, 0 motorcycles, 0 buses, 0 bicycles in the image."
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    admin, _ = build_study(tmp / "s.sqlite", "Traffic counting study", data, str(a), str(b), raters_per_item=1)
    conn = db.connect(tmp / "s.sqlite")
    rater = db.add_rater(conn, "ann")
    conn.close()
    port = free_port()
    proc = start_server(tmp / "s.sqlite", port, tmp / "server.log")
    yield tmp, f"http://127.0.0.1:{port}", rater, admin
    proc.terminate()
    proc.wait(timeout=10)


def save_screenshot(page, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("VLMTUNE_SCREENSHOT_DIR"):
        Path(os.environ["VLMTUNE_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["VLMTUNE_SCREENSHOT_DIR"]) / path.name)
    return path


def expected_winner(conn, item: int, choice: str) -> str:
    a_on_left = conn.execute("SELECT a_on_left FROM assignments WHERE item_id = ?", (item,)).fetchone()[0]
    if choice in ("tie", "both_bad"):
        return choice
    return "A" if (choice == "left") == bool(a_on_left) else "B"


def test_vote_with_mouse_and_keyboard(server, tmp_path, chromium):
    from playwright.sync_api import sync_playwright

    tmp, url, rater, admin = server
    link = f"{url}/r/{rater.token}"
    clicked = []  # (item, choice) in the order the browser voted
    with sync_playwright() as p:
        browser = p.chromium.launch(**chromium)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(link)
            assert page.locator("#progress").inner_text() == "0 / 6"
            assert page.locator(".images img").evaluate("img => img.naturalWidth") == 224  # the image loaded
            shot = save_screenshot(page, tmp_path / "study-rater-page.png")

            def vote(action, choice):
                item = int(page.locator('input[name="item"]').get_attribute("value"))
                with page.expect_navigation():
                    action()
                clicked.append((item, choice))

            # mouse, with a comment whose "1" must not trigger the keyboard shortcut
            page.fill("textarea[name=comment]", "left one says 1 car")
            vote(lambda: page.click("button[value=right]"), "right")
            assert page.locator("#progress").inner_text() == "1 / 6"
            vote(lambda: page.keyboard.press("1"), "left")
            vote(lambda: page.keyboard.press("ArrowRight"), "right")
            vote(lambda: page.keyboard.press("t"), "tie")
            vote(lambda: page.keyboard.press("4"), "both_bad")
            assert page.locator("#progress").inner_text() == "5 / 6"
            page.reload()  # resumes on the same open item
            assert int(page.locator('input[name="item"]').get_attribute("value")) not in [i for i, _ in clicked]
            page.goto(f"{url}/admin/{admin}")
            assert page.locator("svg").count() == 1
            save_screenshot(page, tmp_path / "study-admin-page.png")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    conn = db.connect(tmp / "s.sqlite")
    rows = conn.execute("SELECT item_id, choice, winner, comment FROM votes ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == clicked
    assert [r[2] for r in rows] == [expected_winner(conn, item, choice) for item, choice in clicked]
    assert rows[0][3] == "left one says 1 car" and all(r[3] == "" for r in rows[1:])
