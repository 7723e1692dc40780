"""A throwaway PostgreSQL cluster for the tests, the demo and the benchmarks.

Stdlib only, so it can run from any Python (``./dev`` uses it before the
project is installed).  Importable as ``tests.pgserver`` from the repository
root, or runnable as a plain file::

    python tests/pgserver.py start --envfile /tmp/x/pg.env   # leaves it running
    . /tmp/x/pg.env && psql -c 'select 1'
    python tests/pgserver.py stop --envfile /tmp/x/pg.env    # stops + removes it

In Python, :func:`ensure_server` is the usual entry point: it reuses the
server named by ``PGHOST`` (and the other libpq ``PG*`` variables) when there
is one, and otherwise starts a private cluster for the life of the process.

When run as root, the server binaries (which refuse to run as root) are run
as the ``postgres`` OS user through ``runuser``, and the base directory is
owned by that user.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "PgServerError",
    "ServerInfo",
    "ThrowawayServer",
    "ensure_server",
    "find_bindir",
    "read_envfile",
    "server_from_env",
]

SUPERUSER = "pgpool"
DEFAULT_DBNAME = "postgres"
HOST = "127.0.0.1"
SERVER_OS_USER = "postgres"  # used only when we are root

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DATA = "data"
_SOCKETS = "sockets"
_PASSWORD_FILE = "password"  # basedir/password, mode 0600, so a cluster can be reused
_MARKER = ".pgpool-throwaway"  # basedir/<marker>: we created basedir, destroy() removes it
_CONF_FILE = "pgpool_test.conf"  # our settings, included from postgresql.conf
_LOG_FILE = "postgresql.log"
_START_TIMEOUT = 60  # seconds, for pg_ctl -w
_PORT_ATTEMPTS = 5

_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_connections": "off",
    "log_disconnections": "off",
}


class PgServerError(RuntimeError):
    """Finding, starting or stopping the throwaway server failed."""


@dataclass(frozen=True)
class ServerInfo:
    """How to reach a PostgreSQL server (ours or an external one)."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    datadir: str | None  # None when we did not start it (external server)
    bindir: str | None = None  # where pg_ctl lives, when datadir is known

    def env(self) -> dict[str, str]:
        """libpq environment variables naming this server.

        Includes ``PGPOOL_TEST_DATADIR`` / ``PGPOOL_TEST_BINDIR`` when we own
        the cluster, so another process can restart or stop it.
        """
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": self.dbname,
        }
        if self.datadir is not None:
            env["PGPOOL_TEST_DATADIR"] = self.datadir
            if self.bindir is not None:
                env["PGPOOL_TEST_BINDIR"] = self.bindir
        return env

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg2.connect``."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
        }

    def __repr__(self) -> str:  # never show the password
        return (
            f"ServerInfo(host={self.host!r}, port={self.port!r}, user={self.user!r}, "
            f"password='***', dbname={self.dbname!r}, datadir={self.datadir!r}, "
            f"bindir={self.bindir!r})"
        )

    __str__ = __repr__


# --------------------------------------------------------------------------- #
# Locating the binaries
# --------------------------------------------------------------------------- #


def _has_binaries(directory: str) -> bool:
    return all(os.access(os.path.join(directory, name), os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); /usr/lib/postgresql/9.6/bin -> (9, 6)
    version = os.path.basename(os.path.dirname(path))
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> str:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks at ``$PG_BINDIR``, then ``pg_ctl`` on ``PATH`` (symlinks resolved),
    then the highest ``/usr/lib/postgresql/*/bin``.
    """
    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        if _has_binaries(explicit):
            return os.path.abspath(explicit)
        raise PgServerError(
            f"PG_BINDIR={explicit!r} does not contain all of {', '.join(_REQUIRED_BINARIES)}"
        )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidate = os.path.dirname(os.path.realpath(on_path))
        if _has_binaries(candidate):
            return candidate
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_binaries(candidate):
            return candidate
    raise PgServerError(
        "cannot find the PostgreSQL server binaries (initdb, pg_ctl, postgres): "
        "set PG_BINDIR, put them on PATH, or install them "
        "(Debian: apt-get install postgresql)"
    )


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _server_ids() -> tuple[int, int]:
    """uid and gid of the OS user that runs the server when we are root."""
    import pwd  # POSIX only; imported lazily

    try:
        entry = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PgServerError(
            f"running as root, but there is no {SERVER_OS_USER!r} OS user to run the "
            "server as (PostgreSQL refuses to run as root); create it or run as a normal user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _clean_env() -> dict[str, str]:
    """Our environment minus libpq's variables, for the server binaries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            content = fh.readlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "".join(content[-lines:]) or "(log is empty)"


def _quote_conf(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #


class ThrowawayServer:
    """Start/stop/restart a private cluster.

    Layout: ``basedir/data`` (the cluster, with ``postgresql.log`` in it),
    ``basedir/sockets`` (unix socket directory), ``basedir/password``.

    Works as root (runs the server binaries as the ``postgres`` OS user via
    ``runuser -u postgres --``, basedir chowned to it) and as a normal user.
    """

    def __init__(
        self,
        basedir: str | None = None,
        port: int | None = None,
        password: str | None = None,
        bindir: str | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        basebackup_from: ServerInfo | None = None,
    ) -> None:
        """Describe a cluster; nothing starts before :meth:`start`.

        ``settings`` are extra ``postgresql.conf`` lines (raw values, quote
        strings yourself: ``{"cluster_name": "'replica'"}``) that override the
        defaults.  With ``basebackup_from``, a new cluster is not made by
        initdb but copied from that running server with ``pg_basebackup -R``
        (so it starts as its streaming standby); its password must be the
        source's.
        """
        self.bindir = bindir or find_bindir()
        self.settings: dict[str, str] = dict(settings or {})
        self.basebackup_from = basebackup_from
        self._as_root = _is_root()
        if self._as_root:
            self._uid, self._gid = _server_ids()
        else:
            self._uid, self._gid = os.getuid(), os.getgid()
        if basedir is None:
            tmp = "/tmp" if os.path.isdir("/tmp") else None  # short path: socket names are limited
            basedir = tempfile.mkdtemp(prefix="pgpool-pg-", dir=tmp)
            with open(os.path.join(basedir, _MARKER), "w"):
                pass
        else:
            basedir = os.path.abspath(basedir)
            os.makedirs(basedir, exist_ok=True)
        self.basedir = basedir
        self.datadir = os.path.join(basedir, _DATA)
        self.socketdir = os.path.join(basedir, _SOCKETS)
        self.logfile = os.path.join(self.datadir, _LOG_FILE)
        self._fixed_port = port is not None

        if password is None:
            password = self._stored_password() or secrets.token_urlsafe(24)
        if port is None:
            port = self._configured_port() or free_port()
        self.info = ServerInfo(
            host=HOST,
            port=port,
            user=SUPERUSER,
            password=password,
            dbname=DEFAULT_DBNAME,
            datadir=self.datadir,
            bindir=self.bindir,
        )

    @classmethod
    def attach(cls, info: ServerInfo) -> ThrowawayServer:
        """Control an existing throwaway cluster, e.g. one named by the env."""
        if info.datadir is None:
            raise PgServerError("this server was not started by us (no datadir); cannot control it")
        return cls(
            basedir=os.path.dirname(info.datadir),
            port=info.port,
            password=info.password,
            bindir=info.bindir,
        )

    # -- running commands -------------------------------------------------- #

    def _run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", SERVER_OS_USER, "--", *cmd]
        proc = subprocess.run(
            cmd,
            cwd=self.basedir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise PgServerError(self._failure(" ".join(args[:2]), proc))
        return proc

    def _failure(self, what: str, proc: subprocess.CompletedProcess[str]) -> str:
        message = f"{what.strip()} failed with exit status {proc.returncode}"
        if proc.stdout and proc.stdout.strip():
            message += f"\n--- output ---\n{proc.stdout.rstrip()}"
        if os.path.exists(self.logfile):
            message += f"\n--- tail of {self.logfile} ---\n{_tail(self.logfile).rstrip()}"
        return message

    # -- setup -------------------------------------------------------------- #

    def _stored_password(self) -> str | None:
        try:
            with open(os.path.join(self.basedir, _PASSWORD_FILE), encoding="utf-8") as fh:
                return fh.readline().strip() or None
        except OSError:
            return None

    def _configured_port(self) -> int | None:
        try:
            with open(os.path.join(self.datadir, _CONF_FILE), encoding="utf-8") as fh:
                match = re.search(r"^port\s*=\s*(\d+)", fh.read(), re.MULTILINE)
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def _initialized(self) -> bool:
        return os.path.exists(os.path.join(self.datadir, "PG_VERSION"))

    def _prepare_basedir(self) -> None:
        os.makedirs(self.socketdir, exist_ok=True)
        if self._as_root:
            _chown_tree(self.basedir, self._uid, self._gid)
        os.chmod(self.basedir, 0o700)
        os.chmod(self.socketdir, 0o700)
        if self._as_root and not os.path.exists(os.path.join(self.basedir, _MARKER)):
            test = ["test", "-w", self.basedir, "-a", "-x", self.basedir]
            probe = subprocess.run(
                ["runuser", "-u", SERVER_OS_USER, "--", *test],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if probe.returncode != 0:
                raise PgServerError(
                    f"the {SERVER_OS_USER!r} OS user cannot reach {self.basedir}: every directory "
                    "above it must be searchable (o+x) by that user; use a basedir under /tmp"
                )

    def _write_private(self, path: str, content: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
        os.chmod(path, 0o600)
        os.chown(path, self._uid, self._gid)

    def _initdb(self) -> None:
        self._prepare_basedir()
        self._write_private(os.path.join(self.basedir, _PASSWORD_FILE), self.info.password + "\n")
        pwfile = os.path.join(self.basedir, "initdb.pw")
        self._write_private(pwfile, self.info.password + "\n")
        try:
            self._run(
                [
                    "initdb",
                    f"--pgdata={self.datadir}",
                    f"--username={SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(pwfile)
        with open(os.path.join(self.datadir, "postgresql.conf"), "a", encoding="utf-8") as fh:
            fh.write(f"\n# added by tests/pgserver.py\ninclude = {_quote_conf(_CONF_FILE)}\n")

    def _basebackup(self, source: ServerInfo) -> None:
        self._prepare_basedir()
        self._write_private(os.path.join(self.basedir, _PASSWORD_FILE), self.info.password + "\n")
        conninfo = " ".join(
            f"{key}={_quote_conf(str(value))}" for key, value in source.connect_kwargs().items()
        )
        # -R writes primary_conninfo (password included) and standby.signal
        self._run(
            [
                "pg_basebackup",
                f"--pgdata={self.datadir}",  # first: errors show args[:2], not the password
                f"--dbname={conninfo}",
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ]
        )
        with contextlib.suppress(FileNotFoundError):  # the source's log, copied along
            os.truncate(self.logfile, 0)

    def _write_conf(self) -> None:
        settings = {
            "listen_addresses": _quote_conf(HOST),
            "port": str(self.info.port),
            "unix_socket_directories": _quote_conf(self.socketdir),
            **_SETTINGS,
            **self.settings,
        }
        body = "".join(f"{key} = {value}\n" for key, value in settings.items())
        path = os.path.join(self.datadir, _CONF_FILE)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("# written by tests/pgserver.py; rewritten at every start\n" + body)
        os.chown(path, self._uid, self._gid)

    # -- lifecycle ---------------------------------------------------------- #

    def is_running(self) -> bool:
        if not self._initialized():
            return False
        return self._run(["pg_ctl", "status", "-D", self.datadir], check=False).returncode == 0

    def start(self) -> None:
        """initdb (once) and ``pg_ctl start -w``; does nothing if it is running."""
        if not self._initialized():
            if self.basebackup_from is not None:
                self._basebackup(self.basebackup_from)
            else:
                self._initdb()
        elif self.is_running():
            return
        else:
            self._prepare_basedir()
        for attempt in range(_PORT_ATTEMPTS):
            self._write_conf()
            proc = self._pg_ctl_start("start")
            if proc.returncode == 0:
                return
            port_taken = "could not bind" in _tail(self.logfile, 15) or not _port_is_free(
                self.info.port
            )
            if self._fixed_port or not port_taken or attempt == _PORT_ATTEMPTS - 1:
                raise PgServerError(self._failure("pg_ctl start", proc))
            # lost a race for the port: pick another one
            self.info = replace(self.info, port=free_port())

    def _pg_ctl_start(self, action: str) -> subprocess.CompletedProcess[str]:
        args = ["pg_ctl", action, f"--pgdata={self.datadir}", f"--log={self.logfile}"]
        args += ["--wait", f"--timeout={_START_TIMEOUT}"]
        if action == "restart":
            args += ["--mode=fast"]
        return self._run(args, check=False)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE -w``; does nothing if it is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad shutdown mode {mode!r}")
        if not self.is_running():
            return
        proc = self._run(
            ["pg_ctl", "stop", "-D", self.datadir, "-m", mode, "-w", "-t", str(_START_TIMEOUT)],
            check=False,
        )
        if proc.returncode != 0 and self.is_running():
            raise PgServerError(self._failure("pg_ctl stop", proc))

    def restart(self) -> None:
        """``pg_ctl restart -m fast -w`` (keeps the port, so clients can reconnect)."""
        if not self._initialized():
            self.start()
            return
        proc = self._pg_ctl_start("restart")
        if proc.returncode != 0:
            raise PgServerError(self._failure("pg_ctl restart", proc))

    def destroy(self) -> None:
        """Stop the server and remove its files (the whole basedir if we made it)."""
        with contextlib.suppress(PgServerError):
            self.stop("fast")
        if self.is_running():
            self.stop("immediate")
        if os.path.exists(os.path.join(self.basedir, _MARKER)):
            shutil.rmtree(self.basedir, ignore_errors=True)
        else:
            for path in (self.datadir, self.socketdir):
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.basedir, _PASSWORD_FILE))

    def __enter__(self) -> ThrowawayServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"ThrowawayServer(basedir={self.basedir!r}, port={self.info.port})"


# --------------------------------------------------------------------------- #
# Process-wide server
# --------------------------------------------------------------------------- #

_owned: list[ThrowawayServer] = []  # the server this process started, if any


def server_from_env(environ: Mapping[str, str] | None = None) -> ServerInfo:
    """A :class:`ServerInfo` from libpq's ``PG*`` variables (PGHOST must be set)."""
    env = os.environ if environ is None else environ
    host = env.get("PGHOST")
    if not host:
        raise PgServerError("PGHOST is not set")
    datadir = env.get("PGPOOL_TEST_DATADIR") or None
    return ServerInfo(
        host=host,
        port=int(env.get("PGPORT") or 5432),
        user=env.get("PGUSER") or "postgres",
        password=env.get("PGPASSWORD", ""),
        dbname=env.get("PGDATABASE") or DEFAULT_DBNAME,
        datadir=datadir,
        bindir=(env.get("PGPOOL_TEST_BINDIR") or None) if datadir else None,
    )


def _destroy_owned(pid: int) -> None:
    if os.getpid() != pid or not _owned:
        return  # a forked child: the server belongs to the parent
    server = _owned.pop()
    server.destroy()
    for key, value in server.info.env().items():
        if os.environ.get(key) == value:
            del os.environ[key]


def ensure_server() -> ServerInfo:
    """Return a server to test against, starting one if need be.

    If ``PGHOST`` is set, that server is used (the other ``PG*`` variables
    default to port 5432, user ``postgres``, database ``postgres``).
    Otherwise a :class:`ThrowawayServer` is started, its :meth:`ServerInfo.env`
    is exported into ``os.environ`` (so subprocesses and later calls reuse it),
    and it is destroyed at exit by the process that started it.
    """
    if os.environ.get("PGHOST"):
        return server_from_env()
    server = ThrowawayServer()
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    _owned.append(server)
    atexit.register(_destroy_owned, os.getpid())
    os.environ.update(server.info.env())
    return server.info


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def read_envfile(path: str) -> dict[str, str]:
    """Parse the ``export KEY=VALUE`` lines that ``start --envfile`` writes."""
    result: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            words = shlex.split(line, comments=True)
            if words and words[0] == "export":
                words = words[1:]
            for word in words:
                key, sep, value = word.partition("=")
                if sep:
                    result[key] = value
    return result


def _write_envfile(path: str, env: Mapping[str, str]) -> None:
    lines = ["# written by tests/pgserver.py start; source it\n"]
    lines += [f"export {key}={shlex.quote(value)}\n" for key, value in env.items()]
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


@contextlib.contextmanager
def _timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"pgserver: {label} in {time.monotonic() - started:.1f}s", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pgserver.py", description="Start or stop a throwaway PostgreSQL cluster."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start", help="start a cluster that outlives this command")
    start_p.add_argument("--envfile", required=True, help="write `export PG...=` lines here")
    start_p.add_argument("--basedir", help="directory for the cluster (default: a new temp dir)")
    start_p.add_argument("--port", type=int, help="TCP port (default: a free one)")
    stop_p = sub.add_parser("stop", help="stop the cluster named by --envfile and remove it")
    stop_p.add_argument("--envfile", required=True)
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            server = ThrowawayServer(basedir=args.basedir, port=args.port)
            try:
                with _timed("started"):
                    server.start()
                _write_envfile(args.envfile, server.info.env())
            except BaseException:
                server.destroy()
                raise
            print(
                f"pgserver: PostgreSQL on {server.info.host}:{server.info.port}, "
                f"user {server.info.user}, data in {server.datadir}",
                file=sys.stderr,
            )
        else:
            try:
                env = read_envfile(args.envfile)
            except FileNotFoundError:
                print(f"pgserver: no envfile {args.envfile}; nothing to stop", file=sys.stderr)
                return 0
            info = server_from_env(env)
            if info.datadir is None:
                print(
                    f"pgserver: {args.envfile} names no server of ours; nothing to stop",
                    file=sys.stderr,
                )
                return 0
            if not os.path.isdir(info.datadir):
                print(f"pgserver: {info.datadir} is gone; nothing to stop", file=sys.stderr)
                return 0
            with _timed("stopped and removed"):
                ThrowawayServer.attach(info).destroy()
    except PgServerError as exc:
        print(f"pgserver: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
