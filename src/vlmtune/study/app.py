"""The study's web app (FastAPI, server-rendered HTML): rater pages, votes, images, admin page.

Routes (every one needs a token in the path; nothing is shown without one):

- ``GET  /r/{token}``                         the rater's next item (or the one they left open)
- ``POST /r/{token}/vote``                    form: item, choice, comment, csrf -> 303 back
- ``GET  /r/{token}/image/{item}/{index}``    an image of an item assigned to this rater
- ``GET  /admin/{token}``                     live progress and results with a chart
- ``GET  /admin/{token}/results.json``        the same results as JSON

Safety: ids in URLs and forms are taken only as 1-18 ASCII digits (anything else is a 404 in a
URL, a 400 in a form). Images are looked up by item id in the database and must resolve
(symlinks followed) inside the study's images root (``vlmtune.study.images``), so no
client-supplied path is ever opened. A POST must carry the rater's CSRF token and an Origin (or
Referer) of this host. A vote is stored once (see ``voting.record_vote``); refused requests write
nothing. No cookies are used. A middleware puts the security headers (a CSP with a fresh nonce
per response, no framing, no sniffing, no caching) on every response, errors included, and
turns an unexpected exception into a logged 500 page.

``bind`` takes the port before anything is announced, so ``serve`` never starts on a busy one.
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import re
import secrets
import socket
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from vlmtune.errors import VlmtuneError
from vlmtune.study import db, pages, voting
from vlmtune.study.images import safe_image_path
from vlmtune.study.summary import format_results, results_dict, summarize

log = logging.getLogger(__name__)
ID = re.compile(r"[0-9]{1,18}")  # ASCII only; 18 digits stay below SQLite's 64-bit integer limit


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(db_path: str | Path) -> FastAPI:
    db_path = Path(db_path)
    db.connect(db_path).close()  # fail early, with a clear message, on a missing or foreign file
    app = FastAPI(title="vlmtune study", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def secure_every_response(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                                    ) -> Response:
        nonce = request.state.nonce = secrets.token_urlsafe(16)
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - whatever failed, the client gets a 500 page with the headers
            _log_failure(request, e)
            response = HTMLResponse(pages.message_page(
                "Error 500", "Something went wrong on the server; the study's organiser can see why in its log.",
                nonce), status_code=500)
        return _secure(response, nonce)

    def with_db(request: Request, fn: Callable[..., Response], *args) -> Response:
        nonce = request.state.nonce
        conn = db.connect(db_path)
        try:
            return fn(conn, nonce, *args)
        except HttpError as e:
            return HTMLResponse(pages.message_page(f"Error {e.status}", e.message, nonce), status_code=e.status)
        except voting.VoteRejected as e:
            return HTMLResponse(pages.message_page(f"Error {e.status}", str(e), nonce), status_code=e.status)
        finally:
            conn.close()

    @app.get("/healthz")
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/r/{token}")
    def rater_page(token: str, request: Request) -> Response:
        return with_db(request, _rater_page, token)

    @app.post("/r/{token}/vote")
    async def vote(token: str, request: Request) -> Response:
        form = await request.form()
        fields = {k: form.get(k) for k in ("item", "choice", "comment", "csrf")}
        return await run_in_threadpool(with_db, request, _vote, token, _same_origin(request), fields)

    @app.get("/r/{token}/image/{item}/{index}")
    def image(token: str, item: str, index: str, request: Request) -> Response:
        return with_db(request, _image, token, item, index)

    @app.get("/admin/{token}")
    def admin(token: str, request: Request) -> Response:
        return with_db(request, _admin_page, token)

    @app.get("/admin/{token}/results.json")
    def admin_json(token: str, request: Request) -> Response:
        return with_db(request, _admin_json, token)

    return app


def _log_failure(request: Request, error: Exception) -> None:
    """A VlmtuneError (e.g. the study file went away) says what is wrong itself; anything else needs
    its traceback. The path is left out: it holds the rater's token."""
    if isinstance(error, VlmtuneError):
        log.error("study app: a %s request failed: %s", request.method, error)
    else:
        log.exception("study app: a %s request failed", request.method)


def parse_id(text: object) -> int | None:
    """A client-sent id as an int when it is 1-18 ASCII digits, else None (never an exception)."""
    return int(text) if isinstance(text, str) and ID.fullmatch(text) else None


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
    item = parse_id(fields["item"])
    if item is None:
        raise HttpError(400, "The form's item must be an item number of this study; reload your link and vote again.")
    choice, comment = fields["choice"], fields["comment"] or ""
    if not isinstance(choice, str) or not isinstance(comment, str):
        raise HttpError(400, "choice and comment must be text fields")
    voting.record_vote(conn, rater.id, item, choice, comment)
    return RedirectResponse(f"/r/{rater.token}", status_code=303)


def _image(conn: sqlite3.Connection, nonce: str, token: str, item_text: str, index_text: str) -> Response:
    rater = db.rater_by_token(conn, token)
    item, index = parse_id(item_text), parse_id(index_text)
    not_found = HttpError(404, "No such image.")
    if rater is None or item is None or index is None:
        raise not_found
    if voting.find_assignment(conn, rater.id, item) is None:
        raise not_found
    record = db.load_record(conn, item)
    if record is None or index >= len(record.images):
        raise not_found
    path = safe_image_path(record.images[index], db.study_info(conn)["data_root"])
    if path is None:
        raise not_found
    return FileResponse(path, media_type=mimetypes.guess_type(path)[0])


def _admin_check(conn: sqlite3.Connection, token: str) -> dict[str, str]:
    if not db.is_admin(conn, token):
        raise HttpError(403, "This admin link is not valid.")
    return db.study_info(conn)


def _admin_page(conn: sqlite3.Connection, nonce: str, token: str) -> Response:
    info = _admin_check(conn, token)
    n = int(info["raters_per_item"])
    results = summarize(db.load_votes(conn), n)
    raters = [(rater.name, n) for rater, n in db.raters_with_votes(conn)]
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


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a VlmtuneError that names host:port and what to do."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise VlmtuneError(f"cannot serve on {where}: a port is a number from 1 to 65535 (0: any free one); "
                         "pick another --port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise VlmtuneError(f"cannot serve on {where}: {host!r} is not a host name or address ({e.strerror}); "
                         "pass --host 127.0.0.1 (this machine only) or an address of this machine") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise VlmtuneError(f"cannot serve on {where}: {_bind_advice(e, host)}") from e
    return sock


def _bind_advice(error: OSError, host: str) -> str:
    if error.errno == errno.EADDRINUSE:
        return ("the port is already in use (by another `vlmtune study serve` or another program); "
                "pick another --port, or stop what holds this one")
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root); pick another --port, e.g. 8000"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; pass --host 127.0.0.1 or one of its addresses"
    return f"{error.strerror}; pick another --port or --host"


def serve(db_path: str | Path, sock: socket.socket) -> None:
    """Run the app with uvicorn on a socket from ``bind`` (blocking). Access logs are off: they
    would record rater tokens."""
    import uvicorn

    config = uvicorn.Config(create_app(db_path), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
