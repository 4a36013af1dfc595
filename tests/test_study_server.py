"""The study's web app against a real server (uvicorn in a subprocess on 127.0.0.1, one per module):
tokens, blindness, image safety (traversal, encodings, symlinks), CSRF / origin, bad votes, malformed
ids, security headers on every response (errors included), and `serve` on a busy port."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from vlmtune.cli import build_parser
from vlmtune.cli.study import bind_warning
from vlmtune.study import db
from vlmtune.study.images import resolve_image, safe_image_path
from vlmtune.study.create import build_study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_path: Path, port: int, log: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    """`vlmtune study serve` in a subprocess; returns once /healthz answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtune", "study", "serve", "--db", str(db_path), "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )
    # Only a guard against a server that never answers (an exit is seen at once): generous, because
    # the subprocess imports the library, which can take long on a machine shared by many jobs.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


def make_inputs(folder: Path, n: int) -> tuple[Path, Path, Path]:
    data = folder / "data"
    data.mkdir(parents=True)
    rows, a, b = [], [], []
    for i in range(n):
        Image.new("RGB", (32, 24), (20 * i % 255, 80, 200)).save(data / f"img{i}.png")
        text = {"type": "text", "text": f"Count the vehicles ({i})."}
        prompt = [{"role": "user", "content": [{"type": "image"}, text]}]
        rows.append({"id": f"r{i}", "images": [f"img{i}.png"], "prompt": prompt, "chosen": "c", "rejected": "r"})
        a.append({"id": f"r{i}", "answer": f"answer-A-{i}"})
        b.append({"id": f"r{i}", "answer": f"answer-B-{i}"})
    paths = data / "pairs.jsonl", folder / "a.jsonl", folder / "b.jsonl"
    for path, content in zip(paths, (rows, a, b)):
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study-server")
    data_file, a, b = make_inputs(tmp, 6)
    data = data_file.parent
    db_path = tmp / "s.sqlite"
    admin, _ = build_study(db_path, "server-test", data_file, str(a), str(b), raters_per_item=2)
    # After creation (which refuses links out of the images root), r4's image becomes a symlink to a
    # file outside the folder, r5's a symlink that stays inside: the server must check each request.
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp / "secret.png")
    (data / "img4.png").unlink()
    (data / "img4.png").symlink_to(tmp / "secret.png")
    (data / "img5.png").unlink()
    (data / "img5.png").symlink_to(data / "img0.png")
    conn = db.connect(db_path)
    raters = {name: db.add_rater(conn, name) for name in ("ann", "bob", "cy")}
    conn.close()
    port = free_port()
    proc = start_server(db_path, port, tmp / "server.log")
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, db=db_path, admin=admin, raters=raters, tmp=tmp)
    proc.terminate()
    proc.wait(timeout=10)


def n_votes(server) -> int:
    conn = db.connect(server.db)
    try:
        return conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    finally:
        conn.close()


def current_item(html: str) -> tuple[int, str]:
    item = re.search(r'name="item" value="(\d+)"', html).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    return int(item), csrf


def post_vote(server, token, data, headers=None):
    headers = {"Origin": server.url} if headers is None else headers
    return httpx.post(f"{server.url}/r/{token}/vote", data=data, headers=headers, follow_redirects=False)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (httpx would normalise ``..`` away)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_nothing_without_a_valid_token(server):
    assert httpx.get(f"{server.url}/").status_code == 404
    page = httpx.get(f"{server.url}/r/not-a-token")
    assert page.status_code == 403 and "answer-" not in page.text
    assert httpx.get(f"{server.url}/admin/not-a-token").status_code == 403
    assert httpx.get(f"{server.url}/admin/{server.raters['ann'].token}").status_code == 403
    assert httpx.get(f"{server.url}/r/{server.admin}").status_code == 403
    assert post_vote(server, "not-a-token", {"item": "1", "choice": "left", "csrf": "x"}).status_code == 403
    assert n_votes(server) == 0


def test_rater_page_is_blind_and_stable_on_reload(server):
    token = server.raters["ann"].token
    first = httpx.get(f"{server.url}/r/{token}")
    assert first.status_code == 200 and "0 / 6" in first.text
    item, _ = current_item(first.text)
    left = re.search(r'id="left"><h2>Left answer</h2>([^<]*)<', first.text).group(1)
    for word in ("a.jsonl", "b.jsonl", "model A", "model B"):
        assert word not in first.text
    again = httpx.get(f"{server.url}/r/{token}")
    assert current_item(again.text)[0] == item
    assert re.search(r'id="left"><h2>Left answer</h2>([^<]*)<', again.text).group(1) == left
    conn = db.connect(server.db)
    a_on_left = conn.execute("SELECT a_on_left FROM assignments WHERE item_id = ?", (item,)).fetchone()[0]
    assert left == f"answer-{'A' if a_on_left else 'B'}-{item - 1}"
    assert "default-src 'none'" in first.headers["content-security-policy"]


def test_images_only_for_the_raters_own_items(server):
    token = server.raters["bob"].token
    item, _ = current_item(httpx.get(f"{server.url}/r/{token}").text)
    got = httpx.get(f"{server.url}/r/{token}/image/{item}/0")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == (server.tmp / "data" / f"img{item - 1}.png").read_bytes()
    other = 6 if item != 6 else 5
    assert httpx.get(f"{server.url}/r/{token}/image/{other}/0").status_code == 404  # not assigned to bob
    assert httpx.get(f"{server.url}/r/{token}/image/{item}/1").status_code == 404  # no second image
    assert httpx.get(f"{server.url}/r/nope/image/{item}/0").status_code == 404


@pytest.mark.parametrize("path", [
    "/r/{t}/image/../../../../etc/passwd",
    "/r/{t}/image/1/../../../../../etc/passwd",
    "/r/{t}/image/..%2f..%2f..%2fetc%2fpasswd/0",
    "/r/{t}/image/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd/0",
    "/r/{t}/image/1/%2e%2e%2f%2e%2e%2fsecret.png",
    "/r/{t}/image/%252e%252e%252f%252e%252e%252fetc%252fpasswd/0",
    "/r/{t}/image/1/%252e%252e%252fsecret.png",
    "/r/{t}/image//etc/passwd/0",
    "/r/{t}/image/1/%2fetc%2fpasswd",
    "/r/{t}/image/%2fetc%2fpasswd/0",
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/data/pairs.jsonl",
    "/secret.png",
])
def test_traversal_and_encoded_paths_get_404(server, path):
    status, body = raw_get(server.port, path.format(t=server.raters["ann"].token))
    assert status == 404
    assert b"root:" not in body and b"\x89PNG" not in body


def test_symlink_out_of_the_data_folder_is_refused_at_serve_time(server):
    rater = server.raters["cy"]
    conn = db.connect(server.db)
    with db.transaction(conn):  # hand cy the two symlinked items directly
        for item in (5, 6):
            conn.execute("INSERT INTO assignments (rater_id, item_id, a_on_left, created_at) VALUES (?, ?, 1, 'now')",
                         (rater.id, item))
    conn.close()
    outside = httpx.get(f"{server.url}/r/{rater.token}/image/5/0")
    assert outside.status_code == 404 and b"\x89PNG" not in outside.content
    inside = httpx.get(f"{server.url}/r/{rater.token}/image/6/0")
    assert inside.status_code == 200 and inside.content == (server.tmp / "data" / "img0.png").read_bytes()


def test_safe_image_path_unit(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "d" / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "out.png")
    (tmp_path / "d" / "link.png").symlink_to(tmp_path / "out.png")
    (tmp_path / "d" / "notes.txt").write_text("x")
    root = str(tmp_path / "d")
    assert safe_image_path(str(tmp_path / "d" / "ok.png"), root) == os.path.realpath(tmp_path / "d" / "ok.png")
    assert safe_image_path("ok.png", root) is not None
    for bad in ("../out.png", str(tmp_path / "out.png"), "link.png", "notes.txt", "missing.png", "/etc/passwd"):
        assert safe_image_path(bad, root) is None, bad
    real_root = os.path.realpath(root)
    assert resolve_image("link.png", root)[1] == (f"image link.png links to {os.path.realpath(tmp_path / 'out.png')}, "
                                                  f"outside the images root {real_root}")
    assert resolve_image("../out.png", root)[1] == f"image ../out.png lies outside the images root {real_root}"
    assert resolve_image("missing.png", root)[1] == "image missing.png does not exist (or is not a file)"
    assert "does not have an image file type" in resolve_image("notes.txt", root)[1]


def test_cross_site_and_forged_forms_are_refused(server):
    token = server.raters["ann"].token
    item, csrf = current_item(httpx.get(f"{server.url}/r/{token}").text)
    before = n_votes(server)
    good = {"item": str(item), "choice": "left", "csrf": csrf}
    cases = [
        ({**good, "csrf": "forged"}, None),
        ({k: v for k, v in good.items() if k != "csrf"}, None),
        ({**good, "csrf": server.raters["bob"].csrf}, None),  # another rater's token
        (good, {"Origin": "http://evil.example"}),
        (good, {"Origin": "null"}),
        (good, {"Referer": "http://evil.example/page"}),
        (good, {}),  # neither Origin nor Referer
    ]
    for data, headers in cases:
        response = post_vote(server, token, data, headers)
        assert response.status_code == 403, (data, headers)
    assert n_votes(server) == before
    ok = post_vote(server, token, good, {"Referer": f"{server.url}/r/{token}"})
    assert ok.status_code == 303 and ok.headers["location"] == f"/r/{token}"
    assert n_votes(server) == before + 1


def test_bad_votes_get_clear_4xx_and_no_write(server):
    token = server.raters["bob"].token
    item, csrf = current_item(httpx.get(f"{server.url}/r/{token}").text)
    conn = db.connect(server.db)
    bob_items = {r[0] for r in conn.execute("SELECT item_id FROM assignments WHERE rater_id = ?",
                                            (server.raters["bob"].id,))}
    conn.close()
    not_assigned = min(set(range(1, 7)) - bob_items)
    before = n_votes(server)
    for data, status, text in [
        ({"item": "abc", "choice": "left"}, 400, "item must be an item number"),
        ({"item": "999", "choice": "left"}, 404, "no item 999"),
        ({"item": str(not_assigned), "choice": "left"}, 409, "not assigned"),
        ({"item": str(item), "choice": "middle"}, 400, "choice must be"),
        ({"item": str(item), "choice": "left", "comment": "x" * 2001}, 400, "longer than"),
    ]:
        response = post_vote(server, token, {**data, "csrf": csrf})
        assert response.status_code == status and text in response.text, data
    assert n_votes(server) == before
    vote = {"item": str(item), "choice": "both_bad", "comment": "both wrong", "csrf": csrf}
    assert post_vote(server, token, vote).status_code == 303
    again = post_vote(server, token, {**vote, "choice": "left"})
    assert again.status_code == 409 and "already voted" in again.text
    assert n_votes(server) == before + 1
    page = httpx.get(f"{server.url}/r/{token}")
    assert "1 / 6" in page.text and current_item(page.text)[0] != item


def test_admin_page_shows_progress_and_chart(server):
    page = httpx.get(f"{server.url}/admin/{server.admin}")
    assert page.status_code == 200
    assert "<svg" in page.text and "win rate of B" in page.text and "/ 12 votes" in page.text
    body = httpx.get(f"{server.url}/admin/{server.admin}/results.json").json()
    assert body["progress"]["votes"] == n_votes(server)
    overall = body["overall"]
    assert overall["a"] + overall["b"] + overall["ties"] + overall["both_bad"] == n_votes(server)


def test_binds_to_localhost_by_default_and_warns_otherwise(tmp_path, server):
    args = build_parser().parse_args(["study", "serve", "--db", "x.sqlite"])
    assert args.host == "127.0.0.1"
    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None
    assert "reachable from other machines" in bind_warning("0.0.0.0")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtune", "study", "serve", "--db", str(server.db), "--host", "0.0.0.0",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "warning: binding to 0.0.0.0" in proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def assert_secure(response: httpx.Response) -> None:
    """The security headers the app sends on every response, with a fresh nonce in the CSP."""
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and re.search(r"script-src 'nonce-[\w-]{16,}'", csp), response.headers
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "same-origin"


BAD_IDS = ["²", "1" * 30, "9" * 5000, "9" * 19, "-1", "+1", "1.0", "0x1", " 1", "١"]  # ١: Arabic-Indic one


def test_malformed_ids_in_image_urls_get_404_with_headers(server):
    token = server.raters["ann"].token
    for bad in BAD_IDS:
        for path in (f"/r/{token}/image/{bad}/0", f"/r/{token}/image/1/{bad}"):
            response = httpx.get(server.url + path)
            assert response.status_code == 404 and "No such image" in response.text, (bad, path)
            assert_secure(response)


def test_malformed_ids_in_the_vote_form_get_400_with_headers(server):
    token = server.raters["cy"].token
    _, csrf = current_item(httpx.get(f"{server.url}/r/{token}").text)
    before = n_votes(server)
    for bad in BAD_IDS:
        response = post_vote(server, token, {"item": bad, "choice": "left", "csrf": csrf})
        assert response.status_code == 400 and "item must be an item number" in response.text, bad
        assert_secure(response)
    eighteen = post_vote(server, token, {"item": "9" * 18, "choice": "left", "csrf": csrf})  # the largest id taken
    assert eighteen.status_code == 404 and f"no item {'9' * 18}" in eighteen.text
    assert n_votes(server) == before


def test_every_response_carries_the_security_headers(server):
    token = server.raters["ann"].token
    responses = [
        httpx.get(f"{server.url}/healthz"),  # 200
        httpx.get(f"{server.url}/nowhere"),  # 404 from the router
        httpx.get(f"{server.url}/r/{token}/vote"),  # 405 from the router
        httpx.get(f"{server.url}/r/not-a-token"),  # 403 from the app
        post_vote(server, token, {"item": "1", "choice": "left"}, {"Origin": "http://evil.example"}),  # 403
    ]
    assert [r.status_code for r in responses] == [200, 404, 405, 403, 403]
    for response in responses:
        assert_secure(response)
    nonces = {re.search(r"'nonce-([^']+)'", r.headers["content-security-policy"]).group(1) for r in responses}
    assert len(nonces) == len(responses)  # a fresh nonce per response


def test_a_server_failure_is_a_500_page_with_headers_and_a_log_line(server, tmp_path):
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(server.db.read_bytes())
    port = free_port()
    proc = start_server(copy, port, tmp_path / "server.log")
    try:
        copy.unlink()  # the study file disappears under the running server
        response = httpx.get(f"http://127.0.0.1:{port}/r/{server.raters['ann'].token}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert response.status_code == 500 and "Something went wrong" in response.text
    assert "Traceback" not in response.text and str(copy) not in response.text
    assert_secure(response)
    log = (tmp_path / "server.log").read_text()
    assert "study app: a GET request failed" in log and "no study database here" in log
    assert server.raters["ann"].token not in log


def test_serve_on_a_busy_port_says_so_and_serves_nothing(server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "vlmtune", "study", "serve", "--db", str(server.db), "--port", str(port)],
            capture_output=True, text=True, timeout=300,
        )
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: cannot serve on 127.0.0.1:{port}: the port is already in use")
    assert "pick another --port" in run.stderr
    assert "serving" not in run.stderr + run.stdout and "Traceback" not in run.stderr
