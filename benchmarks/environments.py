"""What the benchmark needs around it: virtual environments, PgBouncer, the database.

Stdlib + psycopg2 (which the runner's environment has: django_pgpool needs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from strategies import PRODUCTS

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
#: Virtual environments and raw results live here (ignored by git: benchmarks/.gitignore).
CACHE_DIR = BENCH_DIR / ".cache"

PGBOUNCER_OS_USER = "postgres"  # PgBouncer refuses to run as root


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process meant to listen on port {port} exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def stop_group(process: subprocess.Popen[Any], first: signal.Signals, timeout: float) -> None:
    """Send ``first`` to a process's group (its own session); SIGKILL it after ``timeout`` s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """The environment of every child: ours without what would skew a measurement."""
    env = {
        key: value
        for key, value in os.environ.items()
        # tox's [testenv] turns dev mode on (slower, extra checks); the
        # children configure Django themselves.
        if key not in ("PYTHONDEVMODE", "PYTHONWARNINGS", "DJANGO_SETTINGS_MODULE", "PYTHONPATH")
        and not key.startswith("PG")
    }
    env.update(extra)
    return env


# --------------------------------------------------------------------------- #
# Virtual environments
# --------------------------------------------------------------------------- #


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise SystemExit(
            f"bench: {package} is not installed in this environment ({sys.executable}); "
            "run the benchmark with `tox -e bench`"
        ) from None


def strategy_requirements() -> dict[str, list[str]]:
    """The packages of each strategy's venv: the runner's Django, gunicorn and psycopg2."""
    common = [
        f"Django=={_installed('django')}",
        f"gunicorn=={_installed('gunicorn')}",
        # shop.views (testproject) imports django_pgpool, which imports psycopg2;
        # with psycopg 3 installed too, Django still picks psycopg 3.
        f"psycopg2-binary=={_installed('psycopg2-binary')}",
    ]
    return {
        "psycopg3": [*common, "psycopg[binary]", "psycopg-pool"],
        "dbcp": [*common, "django-db-connection-pool[psycopg2]"],
    }


def ensure_venv(name: str, requirements: list[str]) -> str:
    """Return the interpreter of ``.cache/venv-NAME``; (re)create it if its requirements changed."""
    directory = CACHE_DIR / f"venv-{name}"
    python = directory / "bin" / "python"
    marker = directory / "bench-requirements.json"
    wanted = json.dumps({"python": sys.version, "requirements": requirements})
    if python.exists() and marker.exists() and marker.read_text(encoding="utf-8") == wanted:
        return str(python)
    log(f"creating {directory} ({', '.join(requirements)})")
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(directory)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ],
        check=True,
        env=child_environment({}),
    )
    marker.write_text(wanted, encoding="utf-8")
    return str(python)


def interpreters(venvs: set[str]) -> dict[str, str]:
    """The interpreter of each venv named: "main" is this one."""
    found = {"main": sys.executable}
    requirements = strategy_requirements()
    for name in sorted(venvs - {"main"}):
        found[name] = ensure_venv(name, requirements[name])
    return found


# --------------------------------------------------------------------------- #
# PgBouncer
# --------------------------------------------------------------------------- #


def ensure_pgbouncer() -> str:
    """Return the pgbouncer binary, installing Debian's package if it is missing (as root)."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("bench: pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    log("installing PgBouncer (apt-get install pgbouncer)")
    quiet = {"stdout": subprocess.DEVNULL}
    subprocess.run(["apt-get", "update", "-qq"], check=True, **quiet)  # type: ignore[call-overload]
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "pgbouncer"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        **quiet,  # type: ignore[call-overload]
    )
    # The package starts a system-wide PgBouncer on 6432 where it can; ours
    # listens on a port of its own and doesn't need it.
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """A private PgBouncer in transaction mode in front of the throwaway server.

    Started afresh for each measurement (as each other strategy's pool lives
    and dies with its worker process), so its idle server connections never
    count in another strategy's backends.
    """

    def __init__(self, binary: str, server: Any, database: str, pool_size: int) -> None:
        self.binary = binary
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="pgpool-bench-pgbouncer-")
        self._as_root = os.geteuid() == 0
        self.process: subprocess.Popen[bytes] | None = None
        config = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": f"{self.directory}/userlist.txt",
            "pool_mode": "transaction",
            "default_pool_size": str(pool_size),
            "max_db_connections": str(pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": "1000",
            "logfile": f"{self.directory}/pgbouncer.log",
            "pidfile": f"{self.directory}/pgbouncer.pid",
            "log_connections": "0",
            "log_disconnections": "0",
            "log_pooler_errors": "1",
            "admin_users": server.user,
        }
        target = f"host={server.host} port={server.port} dbname={database}"
        text = f"[databases]\n{database} = {target}\n\n[pgbouncer]\n"
        text += "".join(f"{key} = {value}\n" for key, value in config.items())
        self._write("pgbouncer.ini", text)
        # A plain-text password: PgBouncer then does SCRAM with both sides.
        self._write("userlist.txt", f'"{server.user}" "{server.password}"\n')
        if self._as_root:
            import pwd

            entry = pwd.getpwnam(PGBOUNCER_OS_USER)
            for path in [self.directory, *(str(p) for p in Path(self.directory).iterdir())]:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _write(self, name: str, text: str) -> None:
        fd = os.open(f"{self.directory}/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)

    def start(self) -> None:
        command = [self.binary, "-q", f"{self.directory}/pgbouncer.ini"]
        if self._as_root:
            command = ["runuser", "-u", PGBOUNCER_OS_USER, "--", *command]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(self.port, 10, self.process)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"PgBouncer did not start:\n{self.log_tail()}") from None

    def log_tail(self) -> str:
        try:
            lines = Path(f"{self.directory}/pgbouncer.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "".join(lines.splitlines(keepends=True)[-20:])

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT: PgBouncer's "safe shutdown"; runuser passes it on.
            stop_group(self.process, signal.SIGINT, 10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()


# --------------------------------------------------------------------------- #
# The database
# --------------------------------------------------------------------------- #


def prepare_database(server: Any, database: str) -> None:
    """Create the database, migrate testproject's apps into it and seed the products."""
    import psycopg2
    from psycopg2 import sql

    admin = psycopg2.connect(**server.connect_kwargs())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        # What Django's docs advise ("Optimizing PostgreSQL's configuration"):
        # then no connection needs a SET at connect time, for every strategy.
        for name, value in (
            ("timezone", "UTC"),
            ("client_encoding", "UTF8"),
            ("default_transaction_isolation", "read committed"),
        ):
            cursor.execute(
                sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
                    sql.Identifier(database), sql.Identifier(name), sql.Literal(value)
                )
            )
    admin.close()

    env = child_environment({**server.env(), "TESTPROJECT_DATABASE": database})
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "testproject" / "manage.py"), "migrate", "-v", "0"],
        check=True,
        env=env,
    )
    conn = psycopg2.connect(**{**server.connect_kwargs(), "dbname": database})
    with conn, conn.cursor() as cursor:
        rows = [
            (i, f"Product {i:03d}", f"{1 + (i * 37) % 200}.{i % 100:02d}", 1_000_000)
            for i in range(1, PRODUCTS + 1)
        ]
        cursor.executemany(
            "INSERT INTO shop_product (id, name, price, stock, attributes, updated_at) "
            "VALUES (%s, %s, %s, %s, '{}', now())",
            rows,
        )
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('shop_product', 'id'), %s)", [PRODUCTS]
        )
        cursor.execute("ANALYZE shop_product")
    conn.close()


class BackendSampler:
    """Samples the number of server backends connected to the database, in a thread."""

    def __init__(self, server: Any, database: str, interval: float = 0.02) -> None:
        import psycopg2

        self._conn = psycopg2.connect(**server.connect_kwargs())  # the "postgres" database
        self._conn.autocommit = True
        self.database = database
        self.interval = interval
        self.peak = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def backends(self) -> int:
        with self._conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend'",
                [self.database],
            )
            row = cursor.fetchone()
            return int(row[0]) if row else 0

    def wait_until_idle(self, timeout: float = 15.0) -> None:
        """Wait for the backends of the previous measurement to exit.

        A worker's process exits before the server has ended its sessions;
        they would count in the next measurement's peak.
        """
        deadline = time.monotonic() + timeout
        while self.backends() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _loop(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.backends())
            time.sleep(self.interval)

    @contextlib.contextmanager
    def sampling(self, wait: bool = True) -> Iterator[BackendSampler]:
        if wait:
            self.wait_until_idle()
        self.peak = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="backend-sampler", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop = True
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._conn.close()
