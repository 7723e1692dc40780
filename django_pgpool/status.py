"""What every process on this host is doing with its pools, and asking them to reconnect.

``manage.py poolstatus`` and ``poolclose`` run in a process of their own,
whose pools are empty; the pools that matter live in gunicorn, uwsgi,
uvicorn or Celery workers. Each worker publishes a snapshot of its pools in a
per-host status directory (the prometheus_client multiprocess pattern):

* one file per process, ``<pid>.json``, written atomically (temporary file
  then ``os.replace``) by the maintenance thread, at most once a round
  (about a second) and only when something changed; removed at exit;
  snapshots of dead processes are ignored and removed by readers;
* ``reconnect.json``: per alias, a generation number that ``poolclose``
  increments; each process compares it with the last one it acted on, once
  a round, and reconnects its pools of that alias (idle connections close
  now, borrowed ones at return). A process adopts the generations current
  when it starts, so it never acts on an old request.

The directory holds no secret (no password, no connect string) and is
created owner-only (0700). It is ``settings.PGPOOL_STATUS_DIR``, else the
``DJANGO_PGPOOL_STATUS_DIR`` environment variable, else
``<tmp>/django_pgpool-<uid>/<settings module>``. The default sits in the
shared temporary directory, at a name anyone can predict: another user may
have put a file, a symbolic link or a directory of theirs there first. So
each directory we create or rely on (``django_pgpool-<uid>`` and the one
below it, or the configured directory) must be a real directory (not a
link: opened with O_NOFOLLOW), owned by this user, writable by it only;
anything else is refused with an ImproperlyConfigured naming the path and
the fix. Its group and other permissions are then removed (0700).

A status directory that fails (refused as above, read-only, full...) never
stops the pools: the maintenance thread says so once (WARNING), tries again
with a doubling delay up to a minute, and says once when it works again
(INFO).

Lock discipline: ``_lock`` guards ``_published``, ``_seen_generations`` and
``_health``; only the maintenance thread writes snapshots, commands only read
them.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import forking, maintenance, registry
from .identity import HOSTNAME

__all__ = [
    "HOSTNAME",
    "describe_failure",
    "publish",
    "read_reconnect_generations",
    "read_snapshots",
    "request_reconnect",
    "start_publishing",
    "status_dir",
]

RECONNECT_FILE = "reconnect.json"
_SNAPSHOT_NAME = re.compile(r"^(\d+)\.json$")

_lock = threading.Lock()
_published: dict[str, Any] = {"pid": 0, "body": None, "path": None}
_seen_generations: dict[str, int] | None = None
_seen_mtime: float | None = None


#: The fix every status-directory message ends with.
FIX = (
    "set settings.PGPOOL_STATUS_DIR (or the DJANGO_PGPOOL_STATUS_DIR environment variable) "
    "to a directory of this user's"
)

#: Seconds between two attempts at a failing status directory: the first
#: delay, doubled after each failure up to the last.
RETRY_FIRST = 2.0
RETRY_MAX = 60.0


def status_dir(create: bool = True) -> Path:
    """Return this project's status directory on this host, created owner-only.

    With ``create``, raise ImproperlyConfigured if it, or the per-user
    directory above the default one, is not a real directory of this user's,
    accessible to it only; OSError if it can't be created.
    """
    configured = getattr(settings, "PGPOOL_STATUS_DIR", None) or os.environ.get(
        "DJANGO_PGPOOL_STATUS_DIR"
    )
    if configured:
        path = Path(configured)
        private = [path]  # its parents are the user's choice, maybe shared on purpose
    else:
        project = re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ.get("DJANGO_SETTINGS_MODULE", ""))
        top = Path(tempfile.gettempdir()) / f"django_pgpool-{os.getuid()}"
        path = top / (project or "default")
        private = [top, path]
    if create:
        private[0].parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(private[0].parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for directory in private:
                child = _open_private_dir(parent, directory)
                os.close(parent)
                parent = child
        finally:
            os.close(parent)
    return path


def _open_private_dir(parent: int, path: Path) -> int:
    """Create ``path`` (0700) in the directory open as ``parent`` unless it exists; open it.

    Relative to ``parent`` and with O_NOFOLLOW, so that what is checked is
    what is opened: a link planted there, even one swapped in after a
    check, is never followed.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path.name, flags, dir_fd=parent)
        except FileNotFoundError:
            # Created only when missing: mkdir() on a read-only file system
            # fails even for a directory that is there.
            with contextlib.suppress(FileExistsError):  # another process, just now
                os.mkdir(path.name, 0o700, dir_fd=parent)
            fd = os.open(path.name, flags, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        kind = "a symbolic link" if os.path.islink(path) else "not a directory"
        raise _unsafe(path, f"is {kind}") from exc
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    problem = None
    if info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    elif mode & 0o022:
        problem = f"is writable by other users (mode {mode:o})"
    elif mode & 0o077:
        # Ours, and no one else could have put anything in it: earlier
        # versions made the per-user directory with the umask's mode (often
        # 0755). Close it rather than refuse it.
        os.fchmod(fd, mode & 0o700)
    if problem is not None:
        os.close(fd)
        raise _unsafe(path, problem)
    return fd


def _unsafe(path: Path, problem: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(
        f"the django_pgpool status directory {str(path)!r} {problem}: it must be a directory "
        f"of this user's, accessible to it only (chmod 700). Remove or fix it, or {FIX}."
    )


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def snapshot() -> dict[str, Any]:
    """Return this process's pools as published (no secret in it)."""
    pools = []
    for entry in registry.entries():
        pools.append(
            {
                "aliases": sorted(entry.aliases),
                "database": entry.database,
                "options": entry.options.shown(),
                **entry.pool.activity(),
            }
        )
    return {"pid": os.getpid(), "host": HOSTNAME, "pools": pools}


def publish() -> None:
    """Write this process's snapshot if it changed; act on reconnect requests."""
    _act_on_reconnect_requests()
    body = {**snapshot(), "reconnect_seen": dict(_seen_generations or {})}
    pid = os.getpid()
    with _lock:
        if _published["pid"] == pid and _published["body"] == body:
            return
    path = status_dir() / f"{pid}.json"
    document = {**body, "updated": time.time()}
    _write_atomically(path, json.dumps(document, sort_keys=True))
    with _lock:
        first = _published["pid"] != pid
        _published.update(pid=pid, body=body, path=path)
    if first:
        atexit.register(_remove_own_snapshot, pid, path)


def _remove_own_snapshot(pid: int, path: Path) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the atexit hook
        with contextlib.suppress(OSError):
            path.unlink()


def start_publishing() -> None:
    """Publish from the maintenance thread from now on (idempotent).

    The reconnect requests made before now were for other processes (or
    this one's parent): adopt them, so that any later one is acted on.
    """
    with contextlib.suppress(ImproperlyConfigured, OSError):
        _act_on_reconnect_requests()
    maintenance.add_hook(_publish_quietly)


@dataclass
class _Health:
    """How publishing went lately: failing since when, and when to try again."""

    failing_since: float | None = None  # time.monotonic() of the first failure
    retry_at: float = 0.0
    delay: float = 0.0


_health = _Health()


def _publish_quietly() -> None:
    # The maintenance thread's hook: a status directory that fails must not
    # stop the pool, nor fill the log with a traceback a second.
    now = time.monotonic()
    with _lock:
        if now < _health.retry_at:
            return
    try:
        publish()
    except (ImproperlyConfigured, OSError) as exc:
        with _lock:
            first = _health.failing_since is None
            if first:
                _health.failing_since = now
            _health.delay = min(RETRY_MAX, 2 * _health.delay or RETRY_FIRST)
            _health.retry_at = now + _health.delay
            # What was published may be gone with the directory: write it
            # again once the directory works.
            _published["body"] = None
        if first:
            maintenance.logger.warning(
                "django_pgpool: status not published, so poolstatus and poolclose can't see "
                "or reach this process (pid %d): %s; retrying with a doubling delay, up to %g s",
                os.getpid(),
                describe_failure(exc),
                RETRY_MAX,
            )
        return
    with _lock:
        since = _health.failing_since
        _health.failing_since, _health.retry_at, _health.delay = None, 0.0, 0.0
    if since is not None:
        maintenance.logger.info(
            "django_pgpool: status published again in %s (pid %d), after %.0f s",
            status_dir(create=False),
            os.getpid(),
            time.monotonic() - since,
        )


def describe_failure(exc: ImproperlyConfigured | OSError) -> str:
    """Return what is wrong with the status directory, and the fix, in one line."""
    if isinstance(exc, ImproperlyConfigured):
        return str(exc)  # says the fix already
    reason = str(exc)
    if exc.strerror:
        reason = exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return (
        f"the django_pgpool status directory {str(status_dir(create=False))!r} failed: "
        f"{reason}. Make room or make it writable, or {FIX}"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots() -> list[dict[str, Any]]:
    """Return the snapshots of the live processes; remove those of dead ones."""
    directory = status_dir()
    snapshots = []
    for path in sorted(directory.iterdir()):
        match = _SNAPSHOT_NAME.match(path.name)
        if not match:
            if path.name.startswith(".tmp-"):
                _remove_if_stale(path)
            continue
        pid = int(match.group(1))
        if not _alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        try:
            snapshots.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # removed or replaced while reading: it will be back
    return snapshots


def _remove_if_stale(path: Path, age: float = 60.0) -> None:
    """Remove a temporary file a writer left behind (killed between write and rename)."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > age:
            path.unlink()


def read_reconnect_generations() -> dict[str, int]:
    return _read_generations(status_dir() / RECONNECT_FILE)


def _read_generations(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()}


def request_reconnect(aliases: list[str]) -> dict[str, int]:
    """Ask every process on this host to reconnect these aliases; return the new generations."""
    generations = read_reconnect_generations()
    for alias in aliases:
        generations[alias] = generations.get(alias, 0) + 1
    _write_atomically(status_dir() / RECONNECT_FILE, json.dumps(generations, sort_keys=True))
    return {alias: generations[alias] for alias in aliases}


def _act_on_reconnect_requests() -> None:
    global _seen_generations, _seen_mtime
    path = status_dir() / RECONNECT_FILE
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        mtime = None
    with _lock:
        if _seen_generations is not None and mtime == _seen_mtime:
            return
        first_look = _seen_generations is None
        current = _read_generations(path)
        seen = _seen_generations or {}
        due = [] if first_look else [a for a, g in current.items() if g > seen.get(a, 0)]
        _seen_generations, _seen_mtime = current, mtime
    for alias in due:
        for entry in registry.entries(alias):
            entry.pool.reconnect()


def _after_fork_in_child() -> None:
    # The child publishes its own snapshot and keeps the reconnect
    # generations it inherited (requests older than it were for its parent).
    # It says for itself whether its status directory works.
    global _lock, _health
    _lock = threading.Lock()
    _published.update(pid=0, body=None, path=None)
    _health = _Health()


forking.register("status", after_in_child=_after_fork_in_child)
