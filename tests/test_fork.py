"""fork(): a child never uses, resets or terminates a connection it inherited.

Nor does it open sessions for an inherited pool it doesn't borrow from.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections

from django_pgpool.pool import ConnectionPool
from tests.conftest import backend_pid
from tests.helpers import fork_child, wait_for
from tests.pgserver import ServerInfo
from tests.testapp.models import Item

MakePool = Callable[..., ConnectionPool]


def run_queries(pool: ConnectionPool, base: int, count: int) -> list[int]:
    """Run ``SELECT n`` for distinct n; return the values that came back wrong."""
    wrong = []
    for n in range(base, base + count):
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SELECT %s", [n])
            if cur.fetchone()[0] != n:
                wrong.append(n)
        if not conn.autocommit:
            conn.rollback()
        pool.putconn(conn)
    return wrong


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_parent_and_child_each_get_their_own_results_after_fork(make_pool: MakePool) -> None:
    pool = make_pool(2, 4)
    # The parent has idle connections and one checked out at fork time.
    pool.putconn(pool.getconn())
    held = pool.getconn()
    held_pid = backend_pid(held)
    parent_wrong: list[int] = []
    thread = threading.Thread(target=lambda: parent_wrong.extend(run_queries(pool, 0, 1000)))

    def child() -> int:
        wrong = run_queries(pool, 1_000_000, 1000)
        pool.putconn(held)  # an inherited connection: forgotten, not reset or closed
        return 1 if wrong else 0

    thread.start()
    status = fork_child(child)
    thread.join()
    assert status == 0, "the child got results of another session"
    assert parent_wrong == []
    assert backend_pid(held) == held_pid, "the parent's session must survive the child"
    pool.putconn(held)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("exit_with", ["exit", "_exit"])
def test_a_child_exiting_leaves_the_parents_sessions_alive(
    make_pool: MakePool, exit_with: str
) -> None:
    pool = make_pool(0, 3)
    idle, held = pool.getconn(), pool.getconn()
    idle_pid, held_pid = backend_pid(idle), backend_pid(held)
    pool.putconn(idle)

    def child() -> int:
        # Returning, closing and collecting the inherited connections must
        # send nothing to the parent's sessions.
        pool.putconn(held)
        pool.closeall()
        return 0

    assert fork_child(child, exit_with) == 0
    assert backend_pid(held) == held_pid
    again = pool.getconn()
    assert backend_pid(again) == idle_pid
    pool.putconn(again)
    pool.putconn(held)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.django_db(transaction=True)
def test_a_django_connection_held_at_fork_is_replaced_in_the_child() -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        parent_pid = cur.fetchone()[0]
    read_end, write_end = os.pipe()

    def child() -> int:
        os.close(read_end)
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            child_pid = cur.fetchone()[0]
        connection.close()
        os.write(write_end, str(child_pid).encode())
        return 0

    assert fork_child(child) == 0
    os.close(write_end)
    child_pid = int(os.read(read_end, 100))
    os.close(read_end)
    assert child_pid != parent_pid
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] == parent_pid


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_child_can_use_an_inherited_pool_object(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    pool.putconn(pool.getconn())

    def child() -> int:
        conn = pool.getconn()
        ok = backend_pid(conn) > 0 and pool.get_stats()["connections_num"] == 1
        pool.putconn(conn)
        pool.closeall()
        return 0 if ok else 1

    assert fork_child(child) == 0


# -- a pool the parent used must not open sessions in a child (no zombie pool) --------

ZOMBIE_ROUNDS_WAIT = 2.5  # about two rounds of maintenance (maintenance.INTERVAL is 1 s)
CHILD_TIMEOUT = 30.0  # the longest the parent waits for a child, at each step


def sessions_named(admin: Any, part: str) -> dict[int, str]:
    """Return {backend pid: application_name} of the server's sessions whose name contains part."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pid, application_name FROM pg_stat_activity"
            " WHERE strpos(application_name, %s) > 0",
            [part],
        )
        return dict(cur.fetchall())


def count_in_child(
    body: Callable[[], int], count: Callable[[], dict[int, str]]
) -> tuple[int, int, dict[int, str]]:
    """Fork a child that runs ``body`` then stays alive until ``count()`` is done.

    Return (the child's pid, its exit status, what ``count`` returned). The
    child reports through a pipe that ``body`` is over, and ends with
    os._exit when the parent closes the other pipe; the parent always reaps
    it, killing it if it doesn't end in time.
    """
    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 70
        try:
            os.close(ready_read)
            os.close(done_write)
            status = body()
            os.write(ready_write, bytes([status]))
            select.select([done_read], [], [], CHILD_TIMEOUT)  # EOF: the parent counted
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(ready_write)
    os.close(done_read)
    counted: dict[int, str] | None = None
    try:
        if select.select([ready_read], [], [], CHILD_TIMEOUT)[0] and os.read(ready_read, 1):
            counted = count()
    finally:
        os.close(done_write)
        os.close(ready_read)
        status = reap(pid)
    assert counted is not None, f"the child didn't report within {CHILD_TIMEOUT} s"
    return pid, status, counted


def reap(pid: int) -> int:
    """Wait (bounded) for the child to end, killing it past CHILD_TIMEOUT; return its exit code."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("child_uses", ["nothing", "another_alias", "this_alias"])
def test_a_forked_child_opens_no_sessions_for_the_parents_pool(
    add_alias: Callable[..., str], admin: Any, child_uses: str
) -> None:
    """gunicorn --preload: a worker must not hold minconn sessions of the master's pool."""
    minconn = 2
    options = {**connections["default"].settings_dict["OPTIONS"], "minconn": minconn}
    alias = add_alias("fork_zombie", OPTIONS=options)
    # Every session of this alias, from any process: the tag carries the pid
    # of the process that worked out the connect parameters, so a pool
    # inherited from the parent would connect with the parent's pid in it.
    tag = f"[pgpool {alias}@"
    parent_tag = f"{tag}{socket.gethostname()[:24]}:{os.getpid()}]"
    # The parent uses the alias (its pool and the wrapper's borrow plan now
    # exist) and its pool fills up to minconn.
    Item.objects.using(alias).count()
    connections[alias].close()
    wait_for(lambda: len(sessions_named(admin, parent_tag)) == minconn, what="the parent's pool")
    parents = sessions_named(admin, tag)
    assert len(parents) == minconn

    def child() -> int:
        # A few rounds of maintenance after the child's use of the database
        # (a pool of its own starts its maintenance thread).
        if child_uses != "nothing":
            using = alias if child_uses == "this_alias" else "default"
            Item.objects.using(using).count()
            connections[using].close()
        time.sleep(ZOMBIE_ROUNDS_WAIT)
        return 0

    def childs_sessions() -> dict[int, str]:
        return {pid: name for pid, name in sessions_named(admin, tag).items() if pid not in parents}

    child_pid, status, opened = count_in_child(child, childs_sessions)
    assert status == 0
    if child_uses == "this_alias":
        # Its own pool, filled to minconn, and nothing more: no zombie pool
        # refilled too (its sessions would carry the parent's pid).
        own_tag = f":{child_pid}]"
        assert 0 < len(opened) <= max(minconn, 1), f"the child's sessions: {opened}"
        assert all(name.endswith(own_tag) for name in opened.values()), opened
    else:
        assert opened == {}, f"a child that didn't borrow from {alias!r} opened sessions: {opened}"
    # The child's sessions end with it; the parent's survive it.
    wait_for(lambda: sessions_named(admin, tag) == parents, what="only the parent's sessions left")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("child_uses", ["nothing", "another_pool"])
def test_a_forked_child_opens_no_sessions_for_an_inherited_pool_it_doesnt_use(
    make_pool: MakePool, admin: Any, server: ServerInfo, child_uses: str
) -> None:
    name = f"pgpool fork zombie {os.getpid()}"
    pool = make_pool(2, 4, application_name=name)
    pool.putconn(pool.getconn())
    wait_for(lambda: len(sessions_named(admin, name)) == 2, what="the parent's pool at minconn")
    parents = sessions_named(admin, name)

    def child() -> int:
        if child_uses == "another_pool":  # the child's own: it starts maintenance there
            other = ConnectionPool(0, 1, **server.connect_kwargs())
            other.putconn(other.getconn())
        time.sleep(ZOMBIE_ROUNDS_WAIT)
        return 0

    def childs_sessions() -> dict[int, str]:
        return {pid: app for pid, app in sessions_named(admin, name).items() if pid not in parents}

    _, status, opened = count_in_child(child, childs_sessions)
    assert status == 0
    assert opened == {}, f"a child that didn't use the pool opened sessions for it: {opened}"
    wait_for(lambda: sessions_named(admin, name) == parents, what="the parent's sessions intact")
