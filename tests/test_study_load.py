"""100 concurrent votes from 10 raters against the real server, killed (SIGKILL) and restarted
mid-study: every acknowledged vote is stored exactly once, none is lost, every item gets N.

The assertions are correctness properties that hold however slowly the machine runs: no request
is answered with anything but 303 (stored) or 409 (already stored), a double submit stores one
vote, and every stored vote was either acknowledged or sent in a pair that lost a connection to
the kill. Client requests have no timeout and each has its own connection, so a slow server is
waited for, never counted as lost: only the kill breaks connections, and it can catch at most the
one pair each rater has in flight. The one time limit left only stops a hung run.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import httpx
import pytest
from test_study_server import free_port, make_inputs, start_server

from vlmtune.study import db
from vlmtune.study.create import build_study

N_ITEMS, PER_ITEM, N_RATERS = 20, 5, 10  # 20 x 5 = 100 votes
KILL_AFTER = 40


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study-load")
    data, a, b = make_inputs(tmp, N_ITEMS)
    build_study(tmp / "s.sqlite", "load", data, str(a), str(b), raters_per_item=PER_ITEM)
    conn = db.connect(tmp / "s.sqlite")
    raters = [db.add_rater(conn, f"rater{i}") for i in range(N_RATERS)]
    conn.close()
    return tmp, raters


class Server:
    """The server subprocess, restartable on the same port."""

    def __init__(self, tmp, port):
        self.tmp, self.port, self.url = tmp, port, f"http://127.0.0.1:{port}"
        self.proc = start_server(tmp / "s.sqlite", port, tmp / "server.log")
        self.restarts = 0

    def kill_and_restart(self):
        self.proc.kill()  # SIGKILL: no shutdown handler runs
        self.proc.wait(timeout=10)
        self.proc = start_server(self.tmp / "s.sqlite", self.port, self.tmp / "server.log")
        self.restarts += 1


async def rater_loop(client: httpx.AsyncClient, server: Server, token: str, acked: list, doubles: list) -> None:
    """Vote until the rater is done; each vote is sent twice at once (a double submit).

    ``doubles`` gets ``(token, item, statuses, lost)`` per pair: the answered statuses, sorted, and
    whether a request of the pair lost its connection."""
    choices = ["left", "right", "tie", "both_bad"]
    while True:
        try:
            page = await client.get(f"/r/{token}")
        except httpx.TransportError:
            await asyncio.sleep(0.2)  # the server is down: retry, as a rater would reload
            continue
        if "no item needs your rating" in page.text:
            return
        item = int(re.search(r'name="item" value="(\d+)"', page.text).group(1))
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        choice = choices[(item + len(acked)) % 4]
        form = {"item": str(item), "choice": choice, "csrf": csrf}
        sent = [client.post(f"/r/{token}/vote", data=form, headers={"Origin": server.url}) for _ in range(2)]
        responses = await asyncio.gather(*sent, return_exceptions=True)
        statuses = sorted(r.status_code for r in responses if isinstance(r, httpx.Response))
        lost = [r for r in responses if not isinstance(r, httpx.Response)]
        assert all(isinstance(e, httpx.TransportError) for e in lost), lost
        if 303 in statuses:
            acked.append((token, item, choice))
        doubles.append((token, item, statuses, bool(lost)))


async def run_study(server: Server, raters: list[db.Rater]) -> tuple[list, list]:
    acked, doubles = [], []
    # A new connection per request: a kept-alive one could be closed by the server's idle timeout
    # just as a request goes out, a lost response that the kill did not cause.
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=None, limits=limits) as client:

        async def killer():
            while len(acked) < KILL_AFTER:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.kill_and_restart)

        tasks = [rater_loop(client, server, r.token, acked, doubles) for r in raters]
        # Only against a hang (a deadlocked server): far above any run on a busy machine (~30 s idle).
        await asyncio.wait_for(asyncio.gather(killer(), *tasks), timeout=1800)
    return acked, doubles


def test_concurrent_votes_survive_a_killed_server(study):
    tmp, raters = study
    server = Server(tmp, free_port())
    try:
        acked, doubles = asyncio.run(run_study(server, raters))
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=10)
    assert server.restarts == 1
    conn = db.connect(tmp / "s.sqlite")
    rows = conn.execute("SELECT r.token, v.item_id, v.choice FROM votes v JOIN raters r ON r.id = v.rater_id")
    stored = [tuple(r) for r in rows]
    assert len(stored) == N_ITEMS * PER_ITEM == 100
    assert len(set((t, i) for t, i, _ in stored)) == 100  # no rater voted twice on an item
    assert Counter(i for _, i, _ in stored) == {i: PER_ITEM for i in range(1, N_ITEMS + 1)}
    assert set(acked) <= set(stored)  # every acknowledged vote is there, with its choice
    answered = [statuses for _, _, statuses, lost in doubles if not lost]
    assert all(statuses == [303, 409] for statuses in answered)  # a double submit: one stored, one refused
    cut = [(token, item) for token, item, _, lost in doubles if lost]
    assert all(statuses in ([], [303], [409]) for _, _, statuses, lost in doubles if lost)  # no 500, no 2nd 303
    assert len(cut) <= N_RATERS  # the kill catches at most the one pair each rater has in flight
    acked_votes = {(token, item) for token, item, _ in acked}
    assert {(t, i) for t, i, _ in stored} - acked_votes <= set(cut)  # an unacknowledged vote was cut by the kill
