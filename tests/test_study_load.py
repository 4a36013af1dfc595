"""100 concurrent votes from 10 raters against the real server, killed (SIGKILL) and restarted
mid-study: every acknowledged vote is stored exactly once, none is lost, every item gets N."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import httpx
import pytest
from test_study_server import free_port, make_inputs, start_server

from vlmrl.study import db
from vlmrl.study.create import build_study

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
    """Vote until the rater is done; each vote is sent twice at once (a double submit)."""
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
        assert statuses.count(303) <= 1, statuses  # never two acknowledgements for one vote
        assert all(s in (303, 409) for s in statuses), statuses
        if 303 in statuses:
            acked.append((token, item, choice))
        doubles.append(statuses)


async def run_study(server: Server, raters: list[db.Rater]) -> tuple[list, list]:
    acked, doubles = [], []
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

        async def killer():
            while len(acked) < KILL_AFTER:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.kill_and_restart)

        tasks = [rater_loop(client, server, r.token, acked, doubles) for r in raters]
        await asyncio.wait_for(asyncio.gather(killer(), *tasks), timeout=240)
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
    assert set(acked) <= set(stored)  # every acknowledged vote is there, with its choice
    assert len(acked) >= 100 - N_RATERS  # at most one vote per rater was cut by the kill
    assert Counter(i for _, i, _ in stored) == {i: PER_ITEM for i in range(1, N_ITEMS + 1)}
    assert sum(s == [303, 409] for s in doubles) >= 90  # double submits: one stored, one refused
