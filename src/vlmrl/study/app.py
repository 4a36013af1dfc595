"""The study's web app (FastAPI, server-rendered HTML): rater pages, votes, images, admin page.

Routes (every one needs a token in the path; nothing is shown without one):

- ``GET  /r/{token}``                         the rater's next item (or the one they left open)
- ``POST /r/{token}/vote``                    form: item, choice, comment, csrf -> 303 back
- ``GET  /r/{token}/image/{item}/{index}``    an image of an item assigned to this rater
- ``GET  /admin/{token}``                     live progress and results with a chart
- ``GET  /admin/{token}/results.json``        the same results as JSON

Safety: images are looked up by item id in the database and must resolve (symlinks followed)
inside the data set's folder, so no client-supplied path is ever opened. A POST must carry the
rater's CSRF token and an Origin (or Referer) of this host. A vote is stored once (see
``voting.record_vote``); refused requests write nothing. No cookies are used.
"""

from __future__ import annotations

import mimetypes
import os
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from vlmrl.study import db, pages, voting
from vlmrl.study.summary import format_results, results_dict, summarize


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(db_path: str | Path) -> FastAPI:
    db_path = Path(db_path)
    db.connect(db_path).close()  # fail early, with a clear message, on a missing or foreign file
    app = FastAPI(title="vlmrl study", docs_url=None, redoc_url=None, openapi_url=None)

    def with_db(fn: Callable[..., Response], *args) -> Response:
        conn = db.connect(db_path)
        nonce = secrets.token_urlsafe(16)
        try:
            response = fn(conn, nonce, *args)
        except HttpError as e:
            response = HTMLResponse(pages.message_page(f"Error {e.status}", e.message, nonce), status_code=e.status)
        except voting.VoteRejected as e:
            response = HTMLResponse(pages.message_page(f"Error {e.status}", str(e), nonce), status_code=e.status)
        finally:
            conn.close()
        return _secure(response, nonce)

    @app.get("/healthz")
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/r/{token}")
    def rater_page(token: str) -> Response:
        return with_db(_rater_page, token)

    @app.post("/r/{token}/vote")
    async def vote(token: str, request: Request) -> Response:
        form = await request.form()
        fields = {k: form.get(k) for k in ("item", "choice", "comment", "csrf")}
        return await run_in_threadpool(with_db, _vote, token, _same_origin(request), fields)

    @app.get("/r/{token}/image/{item}/{index}")
    def image(token: str, item: str, index: str) -> Response:
        return with_db(_image, token, item, index)

    @app.get("/admin/{token}")
    def admin(token: str) -> Response:
        return with_db(_admin_page, token)

    @app.get("/admin/{token}/results.json")
    def admin_json(token: str) -> Response:
        return with_db(_admin_json, token)

    return app


def _secure(response: Response, nonce: str) -> Response:
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; img-src 'self'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"  # rater tokens are in URLs: keep them here
    response.headers["Cache-Control"] = "no-store"
    return response


def _same_origin(request: Request) -> bool:
    """The POST comes from a page of this server: its Origin (else Referer) names this host."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc == host
    referer = request.headers.get("referer")
    return referer is not None and urlsplit(referer).netloc == host


def _rater(conn: sqlite3.Connection, token: str) -> db.Rater:
    rater = db.rater_by_token(conn, token)
    if rater is None:
        raise HttpError(403, "This link is not valid. Ask the study's organiser for your personal link.")
    return rater


def _rater_page(conn: sqlite3.Connection, nonce: str, token: str) -> Response:
    rater = _rater(conn, token)
    info = db.study_info(conn)
    assignment = voting.next_assignment(conn, rater.id, int(info["raters_per_item"]))
    done, total = voting.progress(conn, rater.id)
    if assignment is None:
        return HTMLResponse(pages.done_page(study=info["name"], rater=rater.name, done=done, total=total, nonce=nonce))
    record = db.load_record(conn, assignment.item_id)
    answers = db.load_answers(conn, assignment.item_id)
    left, right = ("A", "B") if assignment.a_on_left else ("B", "A")
    html = pages.rater_page(
        study=info["name"], rater=rater.name, token=rater.token, csrf=rater.csrf, item_id=assignment.item_id,
        n_images=len(record.images), question=_question(record), left=answers[left], right=answers[right],
        done=done, total=total, nonce=nonce,
    )
    return HTMLResponse(html)


def _question(record) -> str:
    return record.prompt_text().replace("<image>", "").strip()


def _vote(conn: sqlite3.Connection, nonce: str, token: str, same_origin: bool, fields: dict) -> Response:
    rater = _rater(conn, token)
    if not same_origin:
        raise HttpError(403, "Votes are only accepted from this study's own pages (Origin/Referer check).")
    csrf = fields["csrf"]
    if not isinstance(csrf, str) or not secrets.compare_digest(csrf.encode(), rater.csrf.encode()):
        raise HttpError(403, "The form's security token is missing or wrong; reload your link and vote again.")
    item = fields["item"]
    if not isinstance(item, str) or not item.isdigit():
        raise HttpError(404, "No such item in this study.")
    choice, comment = fields["choice"], fields["comment"] or ""
    if not isinstance(choice, str) or not isinstance(comment, str):
        raise HttpError(400, "choice and comment must be text fields")
    voting.record_vote(conn, rater.id, int(item), choice, comment)
    return RedirectResponse(f"/r/{rater.token}", status_code=303)


def _image(conn: sqlite3.Connection, nonce: str, token: str, item: str, index: str) -> Response:
    rater = db.rater_by_token(conn, token)
    not_found = HttpError(404, "No such image.")
    if rater is None or not item.isdigit() or not index.isdigit():
        raise not_found
    if voting.find_assignment(conn, rater.id, int(item)) is None:
        raise not_found
    record = db.load_record(conn, int(item))
    if record is None or int(index) >= len(record.images):
        raise not_found
    path = safe_image_path(record.images[int(index)], db.study_info(conn)["data_root"])
    if path is None:
        raise not_found
    return FileResponse(path, media_type=mimetypes.guess_type(path)[0])


def safe_image_path(image: str, data_root: str) -> str | None:
    """The real path of a stored image when it is an image file inside the data folder, else None.

    Symlinks are followed before the check, so a link that points out of the folder is refused.
    """
    root = os.path.realpath(data_root)
    real = os.path.realpath(os.path.join(root, image))
    if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
        return None
    kind = mimetypes.guess_type(real)[0]
    return real if kind is not None and kind.startswith("image/") else None


def _admin_check(conn: sqlite3.Connection, token: str) -> dict[str, str]:
    if not db.is_admin(conn, token):
        raise HttpError(403, "This admin link is not valid.")
    return db.study_info(conn)


def _admin_page(conn: sqlite3.Connection, nonce: str, token: str) -> Response:
    info = _admin_check(conn, token)
    n = int(info["raters_per_item"])
    results = summarize(db.load_votes(conn), n)
    raters = [
        (row["name"], row["n"])
        for row in conn.execute(
            "SELECT r.name, COUNT(v.id) AS n FROM raters r LEFT JOIN votes v ON v.rater_id = r.id "
            "GROUP BY r.id ORDER BY r.id"
        )
    ]
    html = pages.admin_page(
        study=info["name"], info=info, progress=voting.study_progress(conn, n), raters=raters,
        results=results, report=format_results(results, info["name"]), nonce=nonce,
    )
    return HTMLResponse(html)


def _admin_json(conn: sqlite3.Connection, nonce: str, token: str) -> Response:
    info = _admin_check(conn, token)
    n = int(info["raters_per_item"])
    body = results_dict(summarize(db.load_votes(conn), n))
    body["progress"] = voting.study_progress(conn, n)
    return JSONResponse(body)


def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn (blocking). Access logs are off: they would record rater tokens."""
    import uvicorn

    uvicorn.run(create_app(db_path), host=host, port=port, log_level="warning", access_log=False)
