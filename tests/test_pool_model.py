"""The pool against a simple model (a hypothesis state machine), on a real PostgreSQL.

The model knows the connections the test holds, the backends of the ones it
gave back (idle in the pool), how many idle ones it killed and whether the
pool is closed. It predicts every borrow: PoolClosed once closed, else success
while fewer than maxconn are held (reusing an idle connection if there is a
live one), else PoolTimeout; and that a killed idle connection is never
handed out.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import psycopg2
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from django_pgpool.errors import PoolClosed, PoolTimeout
from django_pgpool.pool import ConnectionPool
from tests.helpers import wait_for
from tests.settings import SERVER

MAXCONN = 3
TIMEOUT = 0.05


class PoolAgainstItsModel(RuleBasedStateMachine):
    """One fresh pool (minconn 0, maxconn 3, timeout 0.05 s) per example, closed at teardown.

    Preconditions and draws depend on the model only, never on the server or
    the pool, so that hypothesis can replay and shrink an example.
    """

    def __init__(self) -> None:
        super().__init__()
        self.app = f"pgpool-model-{uuid.uuid4().hex[:10]}"
        connect: dict[str, Any] = SERVER.connect_kwargs()
        self.pool = ConnectionPool(
            0, MAXCONN, timeout=TIMEOUT, application_name=self.app, **connect
        )
        self.admin = psycopg2.connect(**connect)
        self.admin.autocommit = True
        # The model.
        self.held: list[Any] = []  # connections the test holds
        self.idle: list[int] = []  # backend pids of live connections given back, oldest first
        self.kills = 0  # idle connections killed (each one ends up counted as lost)
        self.closed = False
        self.requests = 0
        self.timeouts = 0

    # -- helpers -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return self.pool.get_stats()

    def server_pids(self) -> set[int]:
        with self.admin.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [self.app])
            return {row[0] for row in cur.fetchall()}

    def take(self, index: int) -> Any:
        return self.held.pop(index % len(self.held))

    def give(self, conn: Any) -> None:
        pid = conn.info.backend_pid
        self.pool.putconn(conn)
        # Kept for reuse while the pool is open, closed once it is not.
        assert bool(conn.closed) == self.closed
        if not self.closed:
            self.idle.append(pid)

    def kill(self, victims: list[int]) -> None:
        with self.admin.cursor() as cur:
            for victim in victims:
                cur.execute("SELECT pg_terminate_backend(%s)", [victim])
                assert cur.fetchone()[0]
        self.kills += len(victims)
        # pg_terminate_backend() returns before the backend has gone.
        wait_for(lambda: not self.server_pids() & set(victims))

    # -- rules ---------------------------------------------------------------

    @rule()
    def borrow(self) -> None:
        self.requests += 1
        if self.closed:
            with pytest.raises(PoolClosed):
                self.pool.getconn()
            return
        if len(self.held) == MAXCONN:
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                self.pool.getconn()
            assert time.monotonic() - started >= TIMEOUT * 0.9
            self.timeouts += 1
            return
        before = self.stats()
        conn = self.pool.getconn()
        after = self.stats()
        if after["connections_lost"] > before["connections_lost"]:
            event("a borrow replaced a killed connection")
        # Alive (a killed one is never handed out) and on a backend of its own.
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()
        conn.rollback()
        assert pid == conn.info.backend_pid
        assert all(conn is not other for other in self.held)
        assert pid not in {other.info.backend_pid for other in self.held}
        if pid in self.idle:
            self.idle.remove(pid)
        elif self.idle and before["connections_lost"] == self.kills:
            # No killed connection was left in the pool: a live idle one must be reused.
            raise AssertionError(f"opened a new connection with {self.idle} idle")
        self.held.append(conn)

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(min_value=0, max_value=MAXCONN - 1))
    def give_back(self, index: int) -> None:
        self.give(self.take(index))

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(min_value=0, max_value=MAXCONN - 1))
    def give_back_broken(self, index: int) -> None:
        conn = self.take(index)
        size = self.stats()["pool_size"]
        conn.close()
        self.pool.putconn(conn)  # never raises
        # Its slot is free (the maintenance thread may free others meanwhile).
        assert self.stats()["pool_size"] <= size - 1

    @precondition(lambda self: not self.closed and bool(self.held or self.idle))
    @rule(index=st.integers(min_value=0, max_value=MAXCONN - 1))
    def kill_an_idle_connection(self, index: int) -> None:
        """Terminate the backend of an idle connection (giving one back first if none is)."""
        if not self.idle:
            self.give(self.take(index))
        event(f"killed one of {len(self.idle)} idle")
        self.kill([self.idle.pop(index % len(self.idle))])

    @precondition(lambda self: not self.closed and len(self.idle) > 1)
    @rule()
    def kill_every_idle_connection(self) -> None:
        event(f"killed all {len(self.idle)} idle")
        self.kill(self.idle)
        self.idle = []

    @precondition(lambda self: not self.closed)
    @rule()
    def close_the_pool(self) -> None:
        self.pool.closeall()
        self.closed = True
        self.idle.clear()
        assert self.stats()["pool_available"] == 0
        # The idle connections are closed now, the held ones stay open until returned.
        held = {conn.info.backend_pid for conn in self.held}
        wait_for(lambda: self.server_pids() == held)

    # -- invariants ----------------------------------------------------------

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        # Maintenance may be closing a killed idle connection right now: not quiescent.
        self.pool.check_invariants()

    @invariant()
    def pool_figures_agree_with_the_model(self) -> None:
        stats = self.stats()
        assert stats["pool_size"] <= MAXCONN
        assert stats["pool_in_use"] == len(self.held)
        assert stats["pool_available"] + stats["pool_in_use"] <= stats["pool_size"]
        assert stats["requests_waiting"] == 0
        assert stats["requests_num"] == self.requests
        assert stats["requests_timeouts"] == stats["requests_errors"] == self.timeouts
        # Every connection opened is still counted in pool_size or was counted as closed.
        assert stats["connections_num"] == stats["connections_closed"] + stats["pool_size"]
        if not self.closed:
            # Idle: the live ones the test gave back, plus killed ones not noticed yet
            # (the maintenance thread may be closing one: it is counted in pool_size).
            dead = self.kills - stats["connections_lost"]
            assert dead >= 0
            assert len(self.idle) <= stats["pool_available"]
            assert stats["pool_size"] - stats["pool_in_use"] <= len(self.idle) + dead

    def teardown(self) -> None:
        try:
            for conn in self.held:
                self.pool.putconn(conn)
            self.pool.closeall()
        finally:
            self.admin.close()


def test_the_pool_behaves_like_its_model(caplog: pytest.LogCaptureFixture) -> None:
    # The timeouts the model predicts are logged as errors: keep them off the console.
    with caplog.at_level(logging.CRITICAL, logger="django_pgpool"):
        run_state_machine_as_test(
            PoolAgainstItsModel,
            settings=settings(
                max_examples=30, stateful_step_count=20, deadline=None, database=None
            ),
        )
