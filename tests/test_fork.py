"""fork(): a child never uses, resets or terminates a connection it inherited."""

from __future__ import annotations

import gc
import os
import threading
import traceback
from collections.abc import Callable

import pytest
from django.db import connection

from django_pgpool.pool import ConnectionPool
from tests.conftest import backend_pid

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


def fork_child(body: Callable[[], int], exit_with: str = "exit") -> int:
    """Run ``body`` in a forked child; return its exit status (body's return value).

    The child never returns into pytest. ``exit_with="exit"`` emulates a
    normal exit: every object is garbage collected (which closes inherited
    connections) before the process ends; ``"_exit"`` ends it at once.
    """
    pid = os.fork()
    if pid == 0:  # the child
        status = 70
        try:
            status = body()
        except BaseException:
            traceback.print_exc()
        finally:
            if exit_with == "exit":
                gc.collect()
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


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
