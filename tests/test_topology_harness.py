"""The production-topology harness works: PgBouncer in front of the server, a primary + replica.

Plain psycopg2 only (no django_pgpool), so these tests prove the harness, and
record what PgBouncer 1.18 and libpq multi-host do, for the topology
features built on it (DESIGN.md section 9).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from tests.pgbouncer import (  # the fixtures register under their names without _fixture
    ThrowawayPgBouncer,
    pgbouncer_session_fixture,  # noqa: F401
    pgbouncer_transaction_fixture,  # noqa: F401
)
from tests.pgserver import ServerInfo
from tests.replication import (
    ReplicaPair,
    replica_pair_fixture,  # noqa: F401
    sync_replica_pair_fixture,  # noqa: F401
    wait_until,
)

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_PROTOCOL_3 = 196608


def scalar(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


@pytest.fixture
def connect() -> Iterator[Any]:
    """``connect(**kwargs)``: psycopg2 connections closed after the test."""
    opened: list[Any] = []

    def connect(autocommit: bool = True, **kwargs: Any) -> Any:
        conn = psycopg2.connect(**{"connect_timeout": 2, **kwargs})
        conn.autocommit = autocommit
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


# --------------------------------------------------------------------------- #
# Startup parameters
# --------------------------------------------------------------------------- #


def _parse_startup(body: bytes) -> dict[str, str]:
    (protocol,) = struct.unpack("!i", body[:4])
    assert protocol == _PROTOCOL_3
    words = body[4:].split(b"\0")
    pairs = words[: len(words) - 2]  # the list ends with an empty name, then the final NUL
    return {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs) - 1, 2)}


def _capture_startup(listener: socket.socket, captured: dict[str, str]) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        while True:
            (length,) = struct.unpack("!i", conn.recv(4, socket.MSG_WAITALL))
            body = conn.recv(length - 4, socket.MSG_WAITALL)
            code = struct.unpack("!i", body[:4])[0]
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                conn.sendall(b"N")  # no TLS, no GSS: go on in the clear
                continue
            captured.update(_parse_startup(body))
            break
        fields = b"SFATAL\0C28000\0Mcaptured\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)


def test_plain_psycopg2_sends_only_user_and_database(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGAPPNAME", "PGOPTIONS", "PGCLIENTENCODING", "PGDATESTYLE", "PGTZ"):
        monkeypatch.delenv(name, raising=False)
    captured: dict[str, str] = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        thread = threading.Thread(target=_capture_startup, args=(listener, captured))
        thread.start()
        with pytest.raises(psycopg2.OperationalError, match="captured"):
            psycopg2.connect(
                host="127.0.0.1",
                port=listener.getsockname()[1],
                user="someone",
                password="secret",
                dbname="somedb",
                connect_timeout=5,
            )
        thread.join(5)
    assert captured == {"user": "someone", "database": "somedb"}


def _raw_startup(port: int, params: dict[str, str]) -> tuple[str, str]:
    """Send a StartupMessage to ``port``; return the reply's type and its message text."""
    body = struct.pack("!i", _PROTOCOL_3)
    body += b"".join(f"{k}\0{v}\0".encode() for k, v in params.items()) + b"\0"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        kind = sock.recv(1, socket.MSG_WAITALL).decode()
        (length,) = struct.unpack("!i", sock.recv(4, socket.MSG_WAITALL))
        payload = sock.recv(length - 4, socket.MSG_WAITALL)
    if kind != "E":
        return kind, ""
    fields = {f[:1].decode(): f[1:].decode() for f in payload.split(b"\0") if f}
    return kind, f"{fields['S']}: {fields['M']}"


def test_pgbouncer_refuses_libpq_options(
    pgbouncer_session: ThrowawayPgBouncer, connect: Any
) -> None:
    # The premise: PgBouncer < 1.20 knows no `options`.
    with pytest.raises(psycopg2.OperationalError) as caught:
        connect(**pgbouncer_session.info.connect_kwargs(), options="-c TimeZone=UTC")
    assert "unsupported startup parameter: options" in str(caught.value)


def test_pgbouncer_tracks_application_name(
    pgbouncer_session: ThrowawayPgBouncer, connect: Any
) -> None:
    conn = connect(**pgbouncer_session.info.connect_kwargs(), application_name="harness")
    assert scalar(conn, "SHOW application_name") == "harness"


def test_pgbouncer_refuses_extra_float_digits_unless_ignored(
    pgbouncer_session: ThrowawayPgBouncer, server: ServerInfo
) -> None:
    params = {"user": server.user, "database": server.dbname, "extra_float_digits": "2"}
    assert _raw_startup(pgbouncer_session.port, params) == (
        "E",
        "FATAL: unsupported startup parameter: extra_float_digits",
    )
    with ThrowawayPgBouncer(server, ignore_startup_parameters="extra_float_digits") as bouncer:
        kind, _ = _raw_startup(bouncer.port, params)
    assert kind == "R"  # on to authentication


def test_ignored_options_are_dropped_silently(server: ServerInfo, connect: Any) -> None:
    with ThrowawayPgBouncer(server, ignore_startup_parameters="options") as bouncer:
        conn = connect(**bouncer.info.connect_kwargs(), options="-c statement_timeout=1234")
        assert scalar(conn, "SHOW statement_timeout") == "0"


# --------------------------------------------------------------------------- #
# PgBouncer
# --------------------------------------------------------------------------- #


def _pool_if(bouncer: ThrowawayPgBouncer, **expected: int) -> dict[str, Any] | None:
    """The SHOW POOLS row of the default pool if it has the ``expected`` counts, else None."""
    pool = bouncer.pool()
    return pool if all(pool[key] == value for key, value in expected.items()) else None


def test_admin_console_answers_show_commands(pgbouncer_session: ThrowawayPgBouncer) -> None:
    (version,) = pgbouncer_session.admin("SHOW VERSION")
    assert version["version"].startswith("PgBouncer ")
    databases = {row["name"] for row in pgbouncer_session.admin("SHOW DATABASES")}
    assert "pgbouncer" in databases
    config = {row["key"]: row["value"] for row in pgbouncer_session.admin("SHOW CONFIG")}
    assert config["pool_mode"] == "session"


def test_session_mode_links_the_client_to_one_server_connection(
    pgbouncer_session: ThrowawayPgBouncer, server: ServerInfo, connect: Any
) -> None:
    conn = connect(**pgbouncer_session.info.connect_kwargs())
    pid = scalar(conn, "SELECT pg_backend_pid()")
    assert scalar(conn, "SELECT 1") == 1
    assert scalar(conn, "SELECT pg_backend_pid()") == pid

    # (wait: a client another test closed may take a moment to leave)
    pool = wait_until(
        lambda: _pool_if(pgbouncer_session, cl_active=1, sv_active=1), 5, "SHOW POOLS to settle"
    )
    assert pool["pool_mode"] == "session"
    (link,) = [row for row in pgbouncer_session.admin("SHOW SERVERS") if row["link"]]
    assert link["remote_pid"] == pid
    # The server sees that backend's client as PgBouncer's end of the link.
    direct = connect(**server.connect_kwargs())
    client = scalar(direct, "SELECT client_port FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert client == link["local_port"]

    conn.close()
    wait_until(lambda: pgbouncer_session.pool()["cl_active"] == 0, 5, "the client to go")
    assert pgbouncer_session.pool()["sv_active"] == 0


def test_transaction_mode_holds_a_server_connection_only_for_a_transaction(
    pgbouncer_transaction: ThrowawayPgBouncer, connect: Any
) -> None:
    first = connect(autocommit=False, **pgbouncer_transaction.info.connect_kwargs())
    second = connect(**pgbouncer_transaction.info.connect_kwargs())
    pid = scalar(first, "SELECT pg_backend_pid()")  # opens a transaction

    pool = wait_until(
        lambda: _pool_if(pgbouncer_transaction, cl_active=2, sv_active=1), 5, "SHOW POOLS to settle"
    )
    assert pool["pool_mode"] == "transaction"
    first.commit()
    pool = pgbouncer_transaction.pool()
    assert (pool["cl_active"], pool["sv_active"]) == (2, 0)
    # The idle server connection serves the other client now.
    assert scalar(second, "SELECT pg_backend_pid()") == pid


def test_pause_holds_queries_until_resume(
    pgbouncer_session: ThrowawayPgBouncer, connect: Any
) -> None:
    dbname = pgbouncer_session.info.dbname
    results: list[Any] = []

    def query() -> None:
        conn = connect(**pgbouncer_session.info.connect_kwargs())
        results.append(scalar(conn, "SELECT 42"))

    pgbouncer_session.admin(f"PAUSE {dbname}")
    thread = threading.Thread(target=query)
    try:
        thread.start()
        wait_until(lambda: pgbouncer_session.pool()["cl_waiting"] == 1, 5, "a waiting client")
        assert results == []
    finally:
        pgbouncer_session.admin(f"RESUME {dbname}")
        thread.join(10)
    assert results == [42]


def test_reload_applies_a_changed_setting(server: ServerInfo) -> None:
    with ThrowawayPgBouncer(server, default_pool_size=3) as bouncer:
        bouncer.reload(default_pool_size=5)
        config = {row["key"]: row["value"] for row in bouncer.admin("SHOW CONFIG")}
        assert config["default_pool_size"] == "5"
        basedir, pid = bouncer.basedir, bouncer.pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(basedir)


# --------------------------------------------------------------------------- #
# Primary and replica
# --------------------------------------------------------------------------- #


def test_write_on_primary_is_visible_on_replica(replica_pair: ReplicaPair, connect: Any) -> None:
    primary = connect(**replica_pair.primary_info.connect_kwargs())
    replica = connect(**replica_pair.replica_info.connect_kwargs())
    with primary.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
        cur.execute("INSERT INTO t VALUES (1)")
    replica_pair.wait_replica_caught_up()
    assert scalar(replica, "SELECT count(*) FROM t") == 1
    assert scalar(replica, "SELECT pg_is_in_recovery()") is True
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        scalar(replica, "INSERT INTO t VALUES (2) RETURNING x")


def test_acknowledged_write_is_on_sync_replica_at_once(
    sync_replica_pair: ReplicaPair, connect: Any
) -> None:
    primary = connect(**sync_replica_pair.primary_info.connect_kwargs())
    replica = connect(**sync_replica_pair.replica_info.connect_kwargs())
    assert scalar(primary, "SHOW synchronous_commit") == "remote_apply"
    for n in range(20):
        scalar(
            primary,
            "CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (%s) RETURNING x",
            (n,),
        )
        assert scalar(replica, "SELECT count(*) FROM t") == n + 1  # no waiting


def test_multi_host_read_write_reaches_the_primary(replica_pair: ReplicaPair, connect: Any) -> None:
    conn = connect(**replica_pair.multi_host_params())
    assert scalar(conn, "SELECT inet_server_port()") == replica_pair.primary_info.port
    # Listed first, the replica is skipped as read-only.
    primary, replica = replica_pair.primary_info, replica_pair.replica_info
    conn = connect(**replica_pair.multi_host_params(port=f"{replica.port},{primary.port}"))
    assert scalar(conn, "SELECT inet_server_port()") == primary.port


def test_in_place_demotion_fails_writes_on_existing_session_with_25006(
    replica_pair: ReplicaPair, connect: Any
) -> None:
    conn = connect(**replica_pair.multi_host_params())
    scalar(conn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1) RETURNING x")

    replica_pair.demote_in_place()
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction) as caught:
        scalar(conn, "INSERT INTO t VALUES (2) RETURNING x")
    assert caught.value.pgcode == "25006"
    assert conn.closed == 0  # still connected, still reading
    assert scalar(conn, "SELECT count(*) FROM t") == 1
    # No server is writable now: libpq finds none for a new connection.
    with pytest.raises(psycopg2.OperationalError, match="read-only"):
        connect(**replica_pair.multi_host_params())

    replica_pair.undo_demotion()
    assert scalar(conn, "INSERT INTO t VALUES (3) RETURNING x") == 3


def test_after_crash_and_promotion_multi_host_reaches_the_promoted_replica(
    sync_replica_pair: ReplicaPair, connect: Any
) -> None:
    pair = sync_replica_pair
    old = connect(**pair.multi_host_params())
    scalar(old, "CREATE TABLE t (x int); INSERT INTO t VALUES (1) RETURNING x")

    pair.crash_primary()
    with pytest.raises(psycopg2.OperationalError):
        scalar(old, "SELECT 1")
    assert old.closed != 0
    pair.promote_replica()

    conn = connect(**pair.multi_host_params())
    assert scalar(conn, "SELECT inet_server_port()") == pair.replica_info.port
    assert scalar(conn, "INSERT INTO t VALUES (2) RETURNING x") == 2
    assert scalar(conn, "SELECT count(*) FROM t") == 2  # the acknowledged write survived


def test_pause_retarget_resume_switches_pgbouncer_to_the_promoted_replica(
    sync_replica_pair: ReplicaPair, connect: Any
) -> None:
    pair = sync_replica_pair
    with ThrowawayPgBouncer(pair.primary_info, "transaction") as bouncer:
        client = connect(**bouncer.info.connect_kwargs())
        scalar(client, "CREATE TABLE t (x int); INSERT INTO t VALUES (1) RETURNING x")
        assert scalar(client, "SELECT inet_server_port()") == pair.primary_info.port

        bouncer.admin(f"PAUSE {bouncer.info.dbname}")
        pair.primary.stop("fast")
        pair.promote_replica()
        bouncer.retarget(pair.replica_info)
        bouncer.admin(f"RESUME {bouncer.info.dbname}")

        # The same client connection, no error: its next transaction runs on the new primary.
        assert scalar(client, "SELECT inet_server_port()") == pair.replica_info.port
        assert scalar(client, "INSERT INTO t VALUES (2) RETURNING x") == 2
        assert scalar(client, "SELECT count(*) FROM t") == 2
