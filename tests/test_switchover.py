"""A planned switchover to the synchronous replica, under a write load (issue 11's target).

testproject runs under gunicorn (2 gthread workers) on a primary and its
synchronous replica (``remote_apply``: an acknowledged commit is on the
replica), reached through libpq's multi-host connection string: ``HOST``
``127.0.0.1,127.0.0.1``, ``PORT`` ``<primary>,<replica>``,
``target_session_attrs=read-write``. testproject's settings take ``HOST`` and
``PORT`` from ``PGHOST`` and ``PGPORT``; ``target_session_attrs`` is given as
libpq's ``PGTARGETSESSIONATTRS`` (the same parameter, read by libpq from the
environment), so the settings need no hook for it.

While client threads buy a product (``POST /api/products/<pk>/buy/``: a row
locked and updated in a transaction), the primary is stopped cleanly
(``pg_ctl stop -m fast``) and the replica promoted:

- with ``manage.py poolpause --wait`` before and ``manage.py poolresume``
  after (within the pools' ``timeout``): no request fails, no write is lost;
- without them: the requests in flight may fail (their sessions end with
  SQLSTATE 57P01, their idle connections are dead), the pools ride through
  the rest with their connect retry (``failover_timeout``) and retire their
  old connections; no request fails later than 2 s after the promotion and
  no acknowledged write is lost.

The figures are printed (run pytest with ``-s``); docs/commands.md quotes them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from django_pgpool.identity import TAG_PATTERN
from tests.helpers import project_env
from tests.pgserver import ServerInfo
from tests.replication import ReplicaPair, sync_replica_pair_fixture  # noqa: F401
from tests.test_multiprocess import TAG_HOST, WORKERS, Project, Server, send

DATABASE = "shop"
MAXCONN = 4
THREADS = 8  # buying threads
TIMEOUT = 15  # the pools' timeout: the pause must be shorter
STOCK = 1_000_000
PROMOTED_FAILURES_GRACE = 2.0  # seconds after the promotion a request may still fail (no pause)

# THREADS threads POST the buy URL until STOP_FILE exists; prints one JSON
# line: the Unix times at which each buy was acknowledged, and each failure
# (when it came back, and what it was), and the slowest request.
BUYER = r"""
import json, os, sys, threading, time, urllib.request

url, stop_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
lock = threading.Lock()
bought, failed, slowest = [], [], 0.0


def work():
    global slowest
    while not os.path.exists(stop_file):
        started = time.monotonic()
        try:
            request = urllib.request.Request(url, data=b"", method="POST")
            with opener.open(request, timeout=30) as response:
                assert response.status == 200, response.status
                json.loads(response.read())
            with lock:
                bought.append(time.time())
        except Exception as exc:
            with lock:
                failed.append((time.time(), f"{type(exc).__name__}: {exc}"))
        with lock:
            slowest = max(slowest, time.monotonic() - started)


pool = [threading.Thread(target=work) for _ in range(threads)]
for thread in pool:
    thread.start()
for thread in pool:
    thread.join()
print(json.dumps({"bought": bought, "failed": failed, "slowest": slowest}))
"""


@dataclass
class Buys:
    """What the buying threads saw (Unix times)."""

    bought: list[float]
    failed: list[tuple[float, str]]
    slowest: float


class Buyer:
    """A BUYER process, started now; ``stop()`` ends it and returns what it saw."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.stop_file = tmp_path / "stop-buying"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BUYER, url, str(self.stop_file), str(THREADS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> Buys:
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=45)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, f"buyer exited {self.proc.returncode}:\n{err}"
        result = json.loads(out)
        return Buys(result["bought"], [tuple(f) for f in result["failed"]], result["slowest"])


def query(info: ServerInfo, statement: str, args: list[Any] | None = None, **kw: Any) -> Any:
    """Run one statement on one server of the pair (autocommit); return all rows."""
    conn = psycopg2.connect(**{**info.connect_kwargs(), "connect_timeout": 2, **kw})
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement, args)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def pool_sessions(info: ServerInfo) -> set[int]:
    """The backend pids of testproject's pools (alias default, this host) on one server."""
    rows = query(
        info, "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s", [DATABASE]
    )
    return {
        pid
        for pid, name in rows
        if (match := TAG_PATTERN.search(name or ""))
        and match["alias"] == "default"
        and match["host"] == TAG_HOST
    }


def stock(info: ServerInfo, pk: int) -> int:
    ((value,),) = query(info, "SELECT stock FROM shop_product WHERE id = %s", [pk], dbname=DATABASE)
    return int(value)


class Gunicorn(Server):
    """Server, whose process group is ended too when it does not start."""

    def __init__(self, args: list[str], project: Project, log: Path) -> None:
        try:
            super().__init__(args, r"Listening at: http://127.0.0.1:(\d+)", project, log)
        except BaseException:
            if hasattr(self, "proc"):
                self.stop()
            raise


def reported_seconds(output: str, line_start: str) -> float:
    """The "(1.5 s)" or ", 2.2 s ago" figure of a poolpause or poolresume output line."""
    (line,) = (line for line in output.splitlines() if line.startswith(line_start))
    match = re.search(r"[(,] ?(\d+\.\d) s\b", line)
    assert match, line
    return float(match[1])


@dataclass
class Shop:
    """testproject on the pair, served by gunicorn; ``pk`` is the product bought."""

    pair: ReplicaPair
    project: Project
    server: Server
    pk: int

    @property
    def buy_url(self) -> str:
        return self.server.url.replace("/api/health/", f"/api/products/{self.pk}/buy/")


@pytest.fixture
def shop(sync_replica_pair: ReplicaPair, tmp_path: Path) -> Iterator[Shop]:
    pair = sync_replica_pair
    primary, replica = pair.primary_info, pair.replica_info
    # The pair's primary is a fresh cluster: the database, then the tables, there.
    query(primary, f"CREATE DATABASE {DATABASE}")
    status_dir = tmp_path / "status"
    environ = project_env(
        DATABASE,
        MAXCONN,
        status_dir,
        PGHOST=f"{primary.host},{replica.host}",
        PGPORT=f"{primary.port},{replica.port}",
        PGUSER=primary.user,
        PGPASSWORD=primary.password,
        PGDATABASE=primary.dbname,
        PGTARGETSESSIONATTRS="read-write",
        PGCONNECT_TIMEOUT="2",
        PGPOOL_TIMEOUT=str(TIMEOUT),
    )
    project = Project(DATABASE, status_dir, environ)
    project.manage("migrate", "--noinput", "-v", "0")
    ((pk,),) = query(
        primary,
        "INSERT INTO shop_product (name, price, stock, attributes, updated_at) "
        "VALUES ('switchover', 1, %s, '{}', now()) RETURNING id",
        [STOCK],
        dbname=DATABASE,
    )
    pair.wait_replica_caught_up()
    assert stock(replica, pk) == STOCK

    config = tmp_path / "gunicorn_conf.py"
    config.write_text("control_socket_disable = True\ngraceful_timeout = 5\n")
    args = ["gunicorn", "--workers", str(WORKERS), "--worker-class", "gthread"]
    args += ["--threads", "4", "--bind", "127.0.0.1:0", "--config", str(config)]
    args += ["testproject.wsgi:application"]
    server = Gunicorn(args, project, tmp_path / "gunicorn.log")
    try:
        send(server.url, 50, tmp_path)  # both workers have a pool
        assert pool_sessions(primary), "the pools are not on the primary"
        yield Shop(pair, project, server, pk)
    finally:
        server.stop()


def switch(pair: ReplicaPair) -> tuple[float, float]:
    """Stop the primary cleanly and promote the replica; return when each was done (Unix)."""
    pair.primary.stop("fast")
    stopped = time.time()
    pair.promote_replica()
    return stopped, time.time()


def test_a_paused_switchover_to_the_replica_fails_no_request_and_loses_no_write(
    shop: Shop, tmp_path: Path
) -> None:
    pair, project = shop.pair, shop.project
    buyer = Buyer(shop.buy_url, tmp_path)
    try:
        time.sleep(1.0)
        started = time.monotonic()
        paused = project.manage("poolpause", "--wait", "10").stdout
        drained = time.monotonic() - started
        assert not pool_sessions(pair.primary_info)  # nothing of the pools' left to end
        switch(pair)
        switched = time.monotonic() - started
        resumed = project.manage("poolresume", "--wait", "10").stdout
        paused_for = time.monotonic() - started
        time.sleep(1.0)
    finally:
        load = buyer.stop()

    assert not load.failed, load.failed[:5]
    bought = len(load.bought)
    # Every acknowledged buy is on the new primary, and no other.
    assert STOCK - stock(pair.replica_info, shop.pk) == bought
    assert "to pause database 'default'" in paused
    assert "every process is paused, with no connection left" in paused
    assert "every process has resumed" in resumed
    assert paused_for < TIMEOUT
    assert pool_sessions(pair.replica_info), "the pools did not reconnect to the new primary"
    assert "Traceback" not in shop.server.log(), shop.server.log()
    # The commands' own figures: how long the pools took to drain, how long they were paused.
    pause_drained = reported_seconds(paused, "Database 'default': every process is paused")
    pause_lasted = reported_seconds(resumed, "Database 'default' was paused")
    print(
        f"\npaused switchover under {THREADS} buying threads: {bought} buys, 0 failed, slowest "
        f"{load.slowest:.2f} s, stock down by exactly {bought} on the promoted replica; "
        f"poolpause --wait returned after {drained:.2f} s (the pools drained in "
        f"{pause_drained:.1f} s), switched over at {switched:.2f} s, poolresume --wait returned "
        f"at {paused_for:.2f} s (paused {pause_lasted:.1f} s when it asked)"
    )


def test_an_unpaused_switchover_fails_only_requests_in_flight_and_loses_no_write(
    shop: Shop, tmp_path: Path
) -> None:
    pair = shop.pair
    buyer = Buyer(shop.buy_url, tmp_path)
    try:
        time.sleep(1.0)
        started = time.time()
        stopped, promoted = switch(pair)
        time.sleep(PROMOTED_FAILURES_GRACE + 1.0)
    finally:
        load = buyer.stop()

    bought = len(load.bought)
    taken = STOCK - stock(pair.replica_info, shop.pk)
    late = [failure for failure in load.failed if failure[0] > promoted + PROMOTED_FAILURES_GRACE]
    assert not late, late[:5]
    # Every acknowledged buy is there; a failed one may be too (its commit was
    # made, its answer lost with the session).
    assert bought <= taken <= bought + len(load.failed)
    after = sum(1 for at in load.bought if at > promoted)
    assert after, "no buy acknowledged after the promotion"
    last_failure = max((at for at, _ in load.failed), default=promoted)
    print(
        f"\nunpaused switchover under {THREADS} buying threads: primary stopped at "
        f"{stopped - started:.2f} s, replica promoted at {promoted - started:.2f} s; "
        f"{bought} buys ({after} after the promotion), {len(load.failed)} failed (the last "
        f"{last_failure - promoted:+.2f} s from the promotion), slowest {load.slowest:.2f} s, "
        f"stock down by {taken} on the promoted replica"
    )
    for at, error in load.failed[:5]:
        print(f"  {at - promoted:+.2f} s: {error}")
