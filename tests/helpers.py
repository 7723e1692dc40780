"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import psycopg2
from django.db import connections
from psycopg2 import sql

from django_pgpool import base, status
from tests.settings import SERVER

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "", interval: float = 0.02
) -> float:
    """Wait until ``predicate()`` is true; return how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached within {timeout} s: {what or predicate}")
        time.sleep(interval)
    return time.monotonic() - started


class Workers:
    """Threads running until stopped; a base for the loads the tests put on a pool.

    Use as a context manager: the threads start on entry, are told to stop
    (``_stop``) and joined on exit. ``_lock`` guards what they record.
    """

    def __init__(self, threads: list[threading.Thread]) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = threads

    def __enter__(self) -> Any:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float = 30.0) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.join()


class PoolLoad(Workers):
    """Threads borrowing, running ``SELECT 1`` and returning, until stopped or
    ``each`` times each; ``done`` counts the requests, ``errors`` keeps every failure.
    """

    def __init__(self, pool: Any, threads: int = 4, each: int | None = None) -> None:
        super().__init__([threading.Thread(target=self._work) for _ in range(threads)])
        self.pool = pool
        self.each = each
        self.done = 0
        self.errors: list[BaseException] = []

    def _work(self) -> None:
        count = 0
        while not self._stop.is_set() and (self.each is None or count < self.each):
            count += 1
            try:
                conn = self.pool.getconn()
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                conn.rollback()
                self.pool.putconn(conn)
                with self._lock:
                    self.done += 1
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)


def terminate(admin: Any, pids: set[int]) -> None:
    """End these backends with pg_terminate_backend() (FATAL 57P01) and wait until
    they are gone.

    pg_terminate_backend() only signals the backend: it returns before the
    backend has sent its FATAL message and exited.
    """
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s) AS pid", [sorted(pids)])

    def gone() -> bool:
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [sorted(pids)])
            count: int = cur.fetchone()[0]
        return count == 0

    wait_for(gone, what=f"backends {sorted(pids)} gone")


def own_snapshot() -> dict[str, Any] | None:
    """This process's published status snapshot (None before the first)."""
    return next((s for s in status.read_snapshots() if s["pid"] == os.getpid()), None)


def server_connections(admin: Any, application_name: str) -> int:
    """Count the server's sessions with this exact application_name."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        count: int = cur.fetchone()[0]
    return count


def make_wrapper(alias: str, **changes: Any) -> Any:
    """A wrapper on a copy of 'default' with changes (Django allows such ad-hoc ones in tests)."""
    settings_dict = {**connections["default"].settings_dict, **changes}
    engine = settings_dict["ENGINE"]
    wrapper_class = import_module(f"{engine}.base").DatabaseWrapper if "." in engine else None
    return (wrapper_class or base.DatabaseWrapper)(settings_dict, alias=alias)


def scalar(sql: str, using: str = "default") -> Any:
    """Run ``sql`` on a Django alias and return the first column of the first row."""
    with connections[using].cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


# -- the test server outside Django, and testproject in subprocesses ------------------


def admin_connection(dbname: str = "") -> Any:
    """A new autocommit superuser connection to the test server (its own database by default)."""
    conn = psycopg2.connect(**{**SERVER.connect_kwargs(), **({"dbname": dbname} if dbname else {})})
    conn.autocommit = True
    return conn


def admin_execute(
    statement: sql.Composable | str, args: Sequence[Any] | None = None, dbname: str = ""
) -> list[Any]:
    """Run one statement on a connection of its own (``admin_connection``); return the rows."""
    conn = admin_connection(dbname)
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement, args)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def drop_database(name: str) -> None:
    """DROP DATABASE IF EXISTS, ending its sessions first from PostgreSQL 13 on (FORCE)."""
    drop: sql.Composable = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
    conn = admin_connection()
    try:
        if conn.server_version >= 130000:
            drop = sql.SQL("{} WITH (FORCE)").format(drop)
        with conn.cursor() as cursor:
            cursor.execute(drop)
    finally:
        conn.close()


@contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """A new database on the test server (a leftover of that name dropped first); dropped after."""
    drop_database(name)
    admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        drop_database(name)


def project_env(
    database: str, maxconn: int, status_dir: Path | None = None, **extra: str
) -> dict[str, str]:
    """The environment of testproject's processes: the test server, a database, a small pool.

    ``status_dir`` becomes DJANGO_PGPOOL_STATUS_DIR; ``extra`` variables are added last.
    """
    environ = {
        **os.environ,
        **SERVER.env(),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",  # not this process's tests.settings
        "TESTPROJECT_DATABASE": database,
        "PGPOOL_MINCONN": "1",
        "PGPOOL_MAXCONN": str(maxconn),
        "PGPOOL_TIMEOUT": "10",
    }
    if status_dir is not None:
        environ["DJANGO_PGPOOL_STATUS_DIR"] = str(status_dir)
    environ.update(extra)
    return environ


def run_python(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: Path = ROOT,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` to its end, its output captured; with ``check``, assert it exits 0."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def start_python(
    args: Sequence[str], env: Mapping[str, str], log: Path, *, cwd: Path = TESTPROJECT
) -> subprocess.Popen[bytes]:
    """Start ``python *args`` in a process group of its own, stdout and stderr to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


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
