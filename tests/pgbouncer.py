"""A throwaway PgBouncer in front of a test server, for the production-topology tests.

Usage, in Python::

    with ThrowawayPgBouncer(server_info, pool_mode="transaction") as bouncer:
        conn = psycopg2.connect(**bouncer.info.connect_kwargs())
        bouncer.admin("SHOW POOLS")   # -> [{"database": ..., "cl_active": ..., ...}]

or through the module-scoped pytest fixtures ``pgbouncer_session`` and
``pgbouncer_transaction`` (they need the suite's ``server`` fixture).  A test
module enables them by importing ``pgbouncer_session_fixture`` /
``pgbouncer_transaction_fixture`` (with ``# noqa: F401``): they register under
the names without ``_fixture``, so test arguments do not shadow the imports.
(``pytest_plugins = ["tests.pgbouncer"]`` in a test module fails under
``-W error``: the module is already imported, so pytest cannot rewrite it.)

Each instance lives in a private directory (``pgbouncer.ini``, ``userlist.txt``,
``pgbouncer.log``, ``pgbouncer.pid``), listens on 127.0.0.1 on a free port
(no unix socket), forwards every database name to the server (``* =``), and
knows one user: the server's, with its plain password in the auth file, so
PgBouncer can answer SCRAM challenges from both sides (client ``auth_type`` is
``scram-sha-256``, the server asks for SCRAM too).  That user is also the
admin (``admin_users``), so ``SHOW POOLS``, ``SHOW SERVERS``, ``PAUSE``,
``RESUME`` and ``RELOAD`` work through :meth:`ThrowawayPgBouncer.admin`.

The binary is ``$PGBOUNCER`` or ``pgbouncer`` on ``PATH`` or
``/usr/sbin/pgbouncer``.  When none exists and we are root on a Debian-like
system, Debian's package is installed once (``apt-get update`` then
``apt-get install -y pgbouncer`` through tests/apt.py); the package's
own system service is then stopped and disabled, and its ``/etc/pgbouncer``
configuration is never used.  PgBouncer refuses to run as root, so as root it
runs as the ``postgres`` OS user (the one tests/pgserver.py uses).

Startup parameters (checked with PgBouncer 1.18.0 from Debian 12 and
psycopg2 2.9 on libpq 17):

* What plain ``psycopg2.connect(host=, port=, user=, password=, dbname=)``
  sends in its StartupMessage: ``user``, ``database`` and nothing else
  (libpq adds ``application_name`` / ``client_encoding`` / ``options`` only
  when they are given as parameters or ``PG*`` variables).  No
  ``extra_float_digits``: that is what the JDBC driver and psycopg 3 send.
  Checked by ``test_plain_psycopg2_sends_only_user_and_database``.
* PgBouncer 1.18 accepts ``user``, ``database`` and the parameters it
  tracks per client: ``client_encoding``, ``DateStyle``, ``TimeZone``,
  ``standard_conforming_strings`` and ``application_name`` (names compared
  case-insensitively).  Anything else gets ``FATAL: unsupported startup
  parameter: <name>`` before authentication: ``options``,
  ``extra_float_digits``, ``search_path``, ``IntervalStyle`` and
  ``replication`` were tried.  Listing a name in
  ``ignore_startup_parameters`` makes PgBouncer drop it silently: the server
  never sees it (``options='-c statement_timeout=1234'`` then leaves
  ``statement_timeout`` at 0).  ``options`` is understood only from 1.20 on.
  So the default here is no ``ignore_startup_parameters`` at all: an ordinary
  configuration, and plain psycopg2 needs none.  Stock Django on psycopg2
  sends nothing more either (it runs ``SET TIME ZONE`` after connecting when
  needed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import psycopg2
import pytest

from tests import apt
from tests.pgserver import HOST, SERVER_OS_USER, ServerInfo, free_port

__all__ = [
    "PgBouncerError",
    "PgBouncerUnavailable",
    "ThrowawayPgBouncer",
    "find_pgbouncer",
    "pgbouncer_session_fixture",
    "pgbouncer_transaction_fixture",
]

ADMIN_DBNAME = "pgbouncer"  # PgBouncer's virtual admin-console database
POOL_MODES = ("session", "transaction", "statement")

_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
_START_TIMEOUT = 15.0  # seconds until it accepts connections
_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5

# An ordinary configuration (these are PgBouncer's defaults, spelled out);
# anything can be overridden by keyword.
_DEFAULTS: dict[str, str] = {
    "max_client_conn": "100",
    "default_pool_size": "20",
    "ignore_startup_parameters": "",
}


class PgBouncerError(RuntimeError):
    """Finding, installing, starting or stopping the throwaway PgBouncer failed."""


class PgBouncerUnavailable(PgBouncerError):
    """There is no pgbouncer binary and we cannot install one."""


# --------------------------------------------------------------------------- #
# The binary
# --------------------------------------------------------------------------- #


def _locate() -> str | None:
    explicit = os.environ.get("PGBOUNCER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise PgBouncerError(f"PGBOUNCER={explicit!r} is not an executable file")
        return explicit
    on_path = shutil.which("pgbouncer")
    if on_path:
        return on_path
    return next((path for path in _CANDIDATES if os.access(path, os.X_OK)), None)


def _quiet(cmd: list[str]) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=60,
        )


def _disable_system_service() -> None:
    """Stop the package's own PgBouncer (port 6432, /etc/pgbouncer) and keep it off."""
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        _quiet(["systemctl", "disable", "--now", "pgbouncer.service"])
    if os.path.exists("/etc/init.d/pgbouncer"):
        _quiet(["/etc/init.d/pgbouncer", "stop"])
        if shutil.which("update-rc.d"):
            _quiet(["update-rc.d", "pgbouncer", "disable"])


def find_pgbouncer(install: bool = True) -> str:
    """Return the path of the pgbouncer binary, installing Debian's package if need be.

    Installs only when ``install`` is true, we are root and ``apt-get`` exists;
    otherwise raises :class:`PgBouncerUnavailable`.
    """
    path = _locate()
    if path is not None:
        return path
    if not install or apt.why_not_installable() is not None:
        raise PgBouncerUnavailable(
            "pgbouncer is not installed: install it (Debian: apt-get install pgbouncer), "
            "put it on PATH or set PGBOUNCER=/path/to/pgbouncer"
        )
    try:
        apt.install(
            ["pgbouncer"], present=lambda: _locate() is not None, after=_disable_system_service
        )
    except apt.AptUnavailable as exc:
        raise PgBouncerUnavailable(str(exc)) from exc
    path = _locate()
    if path is None:
        raise PgBouncerUnavailable("apt-get installed pgbouncer, but no pgbouncer binary is found")
    return path


def pgbouncer_version(binary: str | None = None) -> str:
    """Return the version line of the binary, e.g. ``PgBouncer 1.18.0``."""
    proc = subprocess.run(
        [binary or find_pgbouncer(), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return (proc.stdout or proc.stderr).splitlines()[0].strip()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _run_as_ids() -> tuple[int, int] | None:
    """uid and gid to run PgBouncer as: the server's OS user when we are root."""
    if not apt.is_root():
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PgBouncerError(
            f"running as root, but there is no {SERVER_OS_USER!r} OS user to run "
            "PgBouncer as (it refuses to run as root)"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _quote_userlist(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:]).rstrip() or "(empty)"
    except OSError as exc:
        return f"(unreadable: {exc})"


# --------------------------------------------------------------------------- #
# The bouncer
# --------------------------------------------------------------------------- #


class ThrowawayPgBouncer:
    """A private PgBouncer process in front of ``server``; :meth:`stop` removes everything.

    ``pool_mode`` is ``"session"``, ``"transaction"`` or ``"statement"``; any
    other keyword is a ``[pgbouncer]`` setting written as is (values are
    stringified), e.g. ``default_pool_size=2`` or
    ``ignore_startup_parameters="extra_float_digits"``.  Starts at once;
    usable as a context manager.
    """

    def __init__(
        self,
        server: ServerInfo,
        pool_mode: str = "session",
        *,
        binary: str | None = None,
        **settings: object,
    ) -> None:
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, not {pool_mode!r}")
        self.server = server
        self.binary = binary or find_pgbouncer()
        self.settings: dict[str, str] = {
            **_DEFAULTS,
            "pool_mode": pool_mode,
            **{key: str(value) for key, value in settings.items()},
        }
        self._ids = _run_as_ids()
        self.basedir = tempfile.mkdtemp(prefix="pgpool-bouncer-", dir="/tmp")
        self.config = os.path.join(self.basedir, "pgbouncer.ini")
        self.userlist = os.path.join(self.basedir, "userlist.txt")
        self.logfile = os.path.join(self.basedir, "pgbouncer.log")
        self.pidfile = os.path.join(self.basedir, "pgbouncer.pid")
        self._stderr = os.path.join(self.basedir, "stderr.log")
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            if self._ids is not None:
                os.chown(self.basedir, *self._ids)
            os.chmod(self.basedir, 0o700)
            self._start()
        except BaseException:
            self.stop()
            raise

    @property
    def info(self) -> ServerInfo:
        """How to reach the server through PgBouncer (``datadir`` is None)."""
        return ServerInfo(
            host=HOST,
            port=self.port,
            user=self.server.user,
            password=self.server.password,
            dbname=self.server.dbname,
            datadir=None,
        )

    @property
    def pool_mode(self) -> str:
        return self.settings["pool_mode"]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- files -------------------------------------------------------------- #

    def _write(self, path: str, content: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
        if self._ids is not None:
            os.chown(path, *self._ids)

    def _write_files(self) -> None:
        user = self.server.user
        self._write(
            self.userlist,
            f"{_quote_userlist(user)} {_quote_userlist(self.server.password)}\n",
        )
        settings = {
            "listen_addr": HOST,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": self.userlist,
            "admin_users": user,
            "logfile": self.logfile,
            "pidfile": self.pidfile,
            **self.settings,
        }
        lines = [
            "; written by tests/pgbouncer.py",
            "[databases]",
            f"* = host={self.server.host} port={self.server.port}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        self._write(self.config, "\n".join(lines) + "\n")

    # -- lifecycle ---------------------------------------------------------- #

    def _start(self) -> None:
        for attempt in range(_PORT_ATTEMPTS):
            self._write_files()
            with open(self._stderr, "wb") as err:
                kwargs: dict[str, Any] = {}
                if self._ids is not None:
                    kwargs = {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}
                self._proc = subprocess.Popen(
                    [self.binary, self.config],
                    cwd=self.basedir,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,  # a ^C in the terminal is ours to handle
                    **kwargs,
                )
            if self._wait_ready():
                return
            log = _tail(self._stderr) + "\n" + _tail(self.logfile)
            self._kill()
            if "Address already in use" in log and attempt < _PORT_ATTEMPTS - 1:
                self.port = free_port()  # lost a race for the port
                continue
            raise PgBouncerError(
                f"pgbouncer did not start on {HOST}:{self.port}\n--- {self._stderr} ---\n"
                f"{_tail(self._stderr)}\n--- {self.logfile} ---\n{_tail(self.logfile)}"
            )

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if _accepts(self.port):
                return True
            time.sleep(0.02)
        return False

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # 1.18: immediate shutdown
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)

    def stop(self) -> None:
        """Shut PgBouncer down (its clients are disconnected) and remove its directory."""
        self._kill()
        shutil.rmtree(self.basedir, ignore_errors=True)

    def reload(self, **settings: object) -> None:
        """Rewrite the configuration with ``settings`` changed and send ``RELOAD``.

        Settings PgBouncer reads only at startup (``listen_port``, ...) do not
        change this way.
        """
        self.settings.update({key: str(value) for key, value in settings.items()})
        self._write_files()
        self.admin("RELOAD")

    def retarget(self, server: ServerInfo) -> None:
        """Point every database at ``server`` (same user and password) and ``RELOAD``.

        With ``PAUSE`` before and ``RESUME`` after, this is a planned
        switchover: clients keep their PgBouncer connections, and PgBouncer
        closes its server connections to the old address as they are released.
        """
        if (server.user, server.password) != (self.server.user, self.server.password):
            raise ValueError("retarget() needs a server with the same user and password")
        self.server = server
        self._write_files()
        self.admin("RELOAD")

    # -- admin console ------------------------------------------------------ #

    def admin_connect(self) -> Any:
        """A new autocommit connection to the admin console (the caller closes it)."""
        conn = psycopg2.connect(**{**self.info.connect_kwargs(), "dbname": ADMIN_DBNAME})
        conn.autocommit = True  # the console knows no BEGIN
        return conn

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run an admin-console command (``SHOW POOLS``, ``PAUSE db``...); rows as dicts."""
        conn = self.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def pool(self, dbname: str | None = None, user: str | None = None) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of one database and user (defaults: ``info``'s)."""
        dbname = dbname or self.server.dbname
        user = user or self.server.user
        for row in self.admin("SHOW POOLS"):
            if row["database"] == dbname and row["user"] == user:
                return row
        raise PgBouncerError(f"SHOW POOLS has no pool for database {dbname!r}, user {user!r}")

    def log(self) -> str:
        """The text of PgBouncer's log so far."""
        return _tail(self.logfile, 10_000)

    def __enter__(self) -> ThrowawayPgBouncer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"ThrowawayPgBouncer(port={self.port}, pool_mode={self.pool_mode!r}, "
            f"server={self.server.host}:{self.server.port})"
        )


# --------------------------------------------------------------------------- #
# pytest fixtures
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def _fixture_bouncer(server: ServerInfo, pool_mode: str) -> Iterator[ThrowawayPgBouncer]:
    try:
        bouncer = ThrowawayPgBouncer(server, pool_mode)
    except PgBouncerUnavailable as exc:
        apt.unavailable(str(exc))
    with bouncer:
        yield bouncer


@pytest.fixture(scope="module", name="pgbouncer_session")
def pgbouncer_session_fixture(server: ServerInfo) -> Iterator[ThrowawayPgBouncer]:
    """A PgBouncer in session pooling mode in front of ``server``, for the module."""
    with _fixture_bouncer(server, "session") as bouncer:
        yield bouncer


@pytest.fixture(scope="module", name="pgbouncer_transaction")
def pgbouncer_transaction_fixture(server: ServerInfo) -> Iterator[ThrowawayPgBouncer]:
    """A PgBouncer in transaction pooling mode in front of ``server``, for the module."""
    with _fixture_bouncer(server, "transaction") as bouncer:
        yield bouncer
