"""A throwaway primary and its streaming replica, for failover and read-only tests.

Usage::

    with ReplicaPair(synchronous=True) as pair:
        conn = psycopg2.connect(**pair.multi_host_params())   # reaches the primary
        pair.crash_primary()
        pair.promote_replica()
        conn = psycopg2.connect(**pair.multi_host_params())   # reaches the replica

or the function-scoped pytest fixtures ``replica_pair`` and
``sync_replica_pair`` (a test module enables them by importing
``replica_pair_fixture`` / ``sync_replica_pair_fixture``, with
``# noqa: F401``; the fixtures register under the names without
``_fixture``).  Function-scoped because most
tests that use a pair destroy its roles, and a pair is cheap: about 1.2 s to
make (initdb + start 0.6-0.9 s, ``pg_basebackup`` + start 0.3-0.6 s, streaming
in 0.05 s; :attr:`ReplicaPair.timings` has the numbers) and 0.25 s to remove;
a promotion takes about 0.15 s.

Both clusters are :class:`tests.pgserver.ThrowawayServer` instances on
127.0.0.1, each on its own free port, sharing the superuser and its password.
The primary keeps PostgreSQL's defaults for replication (``wal_level=replica``,
``max_wal_senders=10``, initdb's ``host replication all 127.0.0.1/32`` entry
in pg_hba.conf, SCRAM like every host line); they are spelled out in its
settings anyway.  The replica is ``pg_basebackup -R`` of the running primary
(run as the server's OS user when we are root), with ``cluster_name`` set to
:attr:`ReplicaPair.replica_name`, which its WAL receiver reports as its
``application_name``.  With ``synchronous=True`` the primary has
``synchronous_standby_names`` naming it and ``synchronous_commit =
remote_apply``: a commit returns once the replica has applied it, so an
acknowledged write is readable on the replica at once (and a write blocks
while the replica is down).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import psycopg2
import pytest

from tests.pgserver import ServerInfo, ThrowawayServer

__all__ = [
    "ReplicaPair",
    "ReplicationError",
    "replica_pair_fixture",
    "sync_replica_pair_fixture",
    "wait_until",
]

T = TypeVar("T")

WAIT_TIMEOUT = 30.0  # seconds, for every wait in here
_POLL = 0.02


class ReplicationError(RuntimeError):
    """Setting up, waiting for or changing the roles of the pair failed."""


def wait_until(
    predicate: Callable[[], T | None], timeout: float = WAIT_TIMEOUT, what: str = "condition"
) -> T:
    """Call ``predicate`` until it returns something truthy; return that or raise after timeout.

    psycopg2 errors raised by ``predicate`` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
        except psycopg2.Error as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error is not None else ""
            raise ReplicationError(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
        time.sleep(_POLL)


def _query(info: ServerInfo, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """First column of the first row of ``sql`` on a fresh autocommit connection."""
    conn = psycopg2.connect(**info.connect_kwargs(), connect_timeout=2)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
            return None if row is None else row[0]
    finally:
        conn.close()


class ReplicaPair:
    """A primary and a streaming replica; :meth:`start` makes both, :meth:`destroy` removes both.

    Which server is which does not change when roles do: ``primary`` stays
    the first cluster (port ``primary_info.port``, listed first by
    :meth:`multi_host_params`) even after :meth:`promote_replica`.
    """

    replica_name = "replica1"

    def __init__(self, synchronous: bool = False) -> None:
        self.synchronous = synchronous
        settings = {
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "'64MB'",
            "synchronous_commit": "on",  # pgserver's default is off: commits could be lost
        }
        if synchronous:
            settings["synchronous_standby_names"] = f"'{self.replica_name}'"
            settings["synchronous_commit"] = "remote_apply"
        self.primary = ThrowawayServer(settings=settings)
        self.replica = ThrowawayServer(
            password=self.primary.info.password,
            settings={"cluster_name": f"'{self.replica_name}'", "hot_standby": "on"},
            basebackup_from=self.primary.info,
        )
        self.timings: dict[str, float] = {}

    @property
    def primary_info(self) -> ServerInfo:
        return self.primary.info

    @property
    def replica_info(self) -> ServerInfo:
        return self.replica.info

    # -- lifecycle ---------------------------------------------------------- #

    def start(self) -> None:
        """Start the primary, copy it, start the replica and wait until it streams."""
        try:
            started = time.monotonic()
            self.primary.start()
            self.timings["primary"] = time.monotonic() - started
            started = time.monotonic()
            self.replica.start()  # pg_basebackup -R, then pg_ctl start
            self.timings["replica"] = time.monotonic() - started
            started = time.monotonic()
            self.wait_streaming()
            self.timings["streaming"] = time.monotonic() - started
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Stop both servers and remove their directories (replica first)."""
        for server in (self.replica, self.primary):
            with contextlib.suppress(Exception):
                server.destroy()

    def __enter__(self) -> ReplicaPair:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- connecting --------------------------------------------------------- #

    def connect(self, info: ServerInfo, autocommit: bool = True, **kwargs: Any) -> Any:
        """A new psycopg2 connection to one server of the pair (the caller closes it)."""
        conn = psycopg2.connect(**{**info.connect_kwargs(), "connect_timeout": 2, **kwargs})
        conn.autocommit = autocommit
        return conn

    def multi_host_params(self, **overrides: Any) -> dict[str, Any]:
        """libpq multi-host connect kwargs, primary first, that pick the writable server."""
        primary, replica = self.primary_info, self.replica_info
        return {
            "host": f"{primary.host},{replica.host}",
            "port": f"{primary.port},{replica.port}",
            "user": primary.user,
            "password": primary.password,
            "dbname": primary.dbname,
            "target_session_attrs": "read-write",
            "connect_timeout": 2,
            **overrides,
        }

    # -- waiting ------------------------------------------------------------ #

    def wait_streaming(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until the primary sees the replica streaming (and as sync, if synchronous)."""
        state = "sync" if self.synchronous else "async"
        wait_until(
            lambda: _query(
                self.primary_info,
                "SELECT count(*) FROM pg_stat_replication"
                " WHERE application_name = %s AND state = 'streaming' AND sync_state = %s",
                (self.replica_name, state),
            ),
            timeout,
            f"replica {self.replica_name!r} to stream ({state}) from the primary",
        )

    def wait_replica_caught_up(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until the replica has replayed all the WAL the primary has written so far."""
        # the insert position: with asynchronous commit, the write position can lag it
        lsn = _query(self.primary_info, "SELECT pg_current_wal_insert_lsn()::text")
        wait_until(
            lambda: _query(
                self.replica_info,
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                (lsn,),
            ),
            timeout,
            f"the replica to replay up to {lsn}",
        )

    # -- changing roles ----------------------------------------------------- #

    def crash_primary(self) -> None:
        """Stop the primary like a crash (``pg_ctl stop -m immediate``): clients see 57P01/EOF."""
        self.primary.stop("immediate")

    def promote_replica(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Promote the replica (``pg_promote()``) and wait until it accepts writes."""
        _query(self.replica_info, "SELECT pg_promote(true, %s)", (max(1, int(timeout)),))
        wait_until(
            lambda: _query(
                self.replica_info,
                "SELECT NOT pg_is_in_recovery()"
                " AND current_setting('transaction_read_only') = 'off'",
            ),
            timeout,
            "the promoted replica to accept writes",
        )

    def demote_in_place(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Turn the primary read-only without disconnecting anyone, as an Aurora writer flip does.

        ``ALTER SYSTEM SET default_transaction_read_only = on`` and
        ``pg_reload_conf()``; returns once a new session sees it (existing
        sessions have been signalled by then and apply it before their next
        command, so their next write fails with SQLSTATE 25006).
        """
        self._set_read_only(self.primary_info, True, timeout)

    def undo_demotion(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Make the primary writable again (``ALTER SYSTEM RESET``)."""
        self._set_read_only(self.primary_info, False, timeout)

    def _set_read_only(self, info: ServerInfo, read_only: bool, timeout: float) -> None:
        conn = self.connect(info)
        try:
            with conn.cursor() as cur:
                # this session must be able to run ALTER SYSTEM whatever the setting
                cur.execute("SET default_transaction_read_only = off")
                if read_only:
                    cur.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                else:
                    cur.execute("ALTER SYSTEM RESET default_transaction_read_only")
                cur.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()
        wanted = "on" if read_only else "off"
        wait_until(
            lambda: _query(info, "SHOW default_transaction_read_only") == wanted,
            timeout,
            f"default_transaction_read_only = {wanted} on {info.host}:{info.port}",
        )

    def __repr__(self) -> str:
        return (
            f"ReplicaPair(primary={self.primary_info.port}, replica={self.replica_info.port}, "
            f"synchronous={self.synchronous})"
        )


# --------------------------------------------------------------------------- #
# pytest fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(name="replica_pair")
def replica_pair_fixture() -> Iterator[ReplicaPair]:
    """A fresh asynchronous primary + replica for one test (removed after it)."""
    with ReplicaPair() as pair:
        yield pair


@pytest.fixture(name="sync_replica_pair")
def sync_replica_pair_fixture() -> Iterator[ReplicaPair]:
    """A fresh primary + synchronous replica (``remote_apply``) for one test."""
    with ReplicaPair(synchronous=True) as pair:
        yield pair
