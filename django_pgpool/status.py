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
* ``pause.json``: per alias, the pause state that ``poolpause`` and
  ``poolresume`` write, ``{"generation": int, "paused_since": float | null}``
  (``paused_since``: Unix time of the pause, null once resumed). The
  generation grows at each of their writes. Once a round, and at once for
  each pool created, each process brings the pools of a paused alias to
  ``pause()`` and, at a new generation, those of a resumed one to
  ``resume()``; it publishes the generations it applied (``pause_seen``),
  so that the commands can tell an answer from an older snapshot. Unlike a
  reconnect request, a pause is a state: a process that starts while an
  alias is paused adopts it, and its pools lend nothing until
  ``poolresume``.

The commands read-modify-write ``reconnect.json`` and ``pause.json`` under
an exclusive ``flock()`` of ``.lock`` in the directory, so that two of them
at once lose no request; readers need no lock (the files are replaced
atomically).

The directory holds no secret (no password, no connect string) and is
created owner-only (0700). It is ``settings.PGPOOL_STATUS_DIR``, else the
``DJANGO_PGPOOL_STATUS_DIR`` environment variable, else
``<tmp>/django_pgpool-<uid>/<databases>``, where ``<databases>`` is named
after the pooled aliases of DATABASES and the databases they reach
(``identity.databases_key()``: user, host, port and database name, never a
password), not after the settings module: the workers (``settings.production``)
and a command run with manage.py's default settings module find each other
as long as they reach the same databases. Each snapshot says which settings
module its process runs under, so that a command can name the one to use
when they don't (``find_elsewhere()``). The default sits in the
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
them. ``_pause_lock`` guards ``_pause_seen`` and ``_pause_applied`` and is
held while pools are paused or resumed: the maintenance thread and a thread
that just created a pool may both apply the pause state, and the later read
of the file must be the last applied.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import forking, maintenance, registry
from .identity import HOSTNAME, databases_key

__all__ = [
    "HOSTNAME",
    "describe_failure",
    "find_elsewhere",
    "pause_seen",
    "publish",
    "read_pause_state",
    "read_reconnect_generations",
    "read_snapshots",
    "request_pause",
    "request_reconnect",
    "start_publishing",
    "status_dir",
]

RECONNECT_FILE = "reconnect.json"
PAUSE_FILE = "pause.json"
_LOCK_FILE = ".lock"
_SNAPSHOT_NAME = re.compile(r"^(\d+)\.json$")

_lock = threading.Lock()
_published: dict[str, Any] = {"pid": 0, "body": None, "path": None}
_seen_generations: dict[str, int] | None = None
_seen_mtime: float | None = None

_pause_lock = threading.Lock()
# The pause generation of each alias last applied to this process's pools.
_pause_seen: dict[str, int] = {}
# Per pool (registry key): the (alias, generation) pairs last applied to it.
_pause_applied: dict[tuple[int, str], tuple[tuple[str, int], ...]] = {}


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
        top = _default_top()
        path = top / _default_name()
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


def _default_top() -> Path:
    """Return the directory holding this user's default status directories."""
    return Path(tempfile.gettempdir()) / f"django_pgpool-{os.getuid()}"


def _default_name() -> str:
    """Return the default status directory's name: the pooled databases of DATABASES."""
    from .checks import pooled_engine  # imports the ENGINE, which imports this module

    return databases_key(
        (str(alias), config)
        for alias, config in settings.DATABASES.items()
        if pooled_engine(config.get("ENGINE"))
    )


def find_elsewhere(pid: int) -> tuple[Path, dict[str, Any]] | None:
    """Return where process ``pid`` publishes its snapshot, and the snapshot, if it
    does in another of this user's default status directories than this one."""
    here = status_dir(create=False)
    top = _default_top()
    with contextlib.suppress(OSError):
        for path in sorted(top.glob(f"*/{pid}.json")):
            if path.parent == here or path.parent.is_symlink():
                continue
            with contextlib.suppress(OSError, ValueError):
                snapshot = json.loads(path.read_text())
                if isinstance(snapshot, dict):
                    return path.parent, snapshot
    return None


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
    return {
        "pid": os.getpid(),
        "host": HOSTNAME,
        "settings_module": os.environ.get("DJANGO_SETTINGS_MODULE", ""),
        "pools": pools,
    }


def publish() -> None:
    """Write this process's snapshot if it changed; act on reconnect and pause requests."""
    _act_on_reconnect_requests()
    _apply_pause_state()
    body = {
        **snapshot(),
        "reconnect_seen": dict(_seen_generations or {}),
        "pause_seen": pause_seen(),
    }
    pid = os.getpid()
    path = status_dir() / f"{pid}.json"
    with _lock:
        if _published["pid"] == pid and _published["body"] == body and _published["path"] == path:
            return
    document = {**body, "updated": time.time()}
    _write_atomically(path, json.dumps(document, sort_keys=True))
    with _lock:
        first = _published["pid"] != pid
        moved = None if first else _published["path"]
        _published.update(pid=pid, body=body, path=path)
    if moved is not None and moved != path:
        # The default directory follows DATABASES (the test runner's NAME
        # switch): the snapshot moves with it.
        _remove_own_snapshot(pid, moved)
    if first or moved != path:
        atexit.register(_remove_own_snapshot, pid, path)


def _remove_own_snapshot(pid: int, path: Path) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the atexit hook
        with contextlib.suppress(OSError):
            path.unlink()


def start_publishing() -> None:
    """Publish from the maintenance thread from now on (idempotent).

    Called after each pool this process creates, before it lends anything.
    The reconnect requests made before now were for other processes (or
    this one's parent): adopt them, so that any later one is acted on. A
    pause is a state: a pool of a paused alias is paused now.
    """
    with contextlib.suppress(ImproperlyConfigured, OSError):
        _act_on_reconnect_requests()
    with contextlib.suppress(ImproperlyConfigured, OSError):
        _apply_pause_state()
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


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold the status directory's write lock (one command's read-modify-write at a time)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(directory / _LOCK_FILE, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def request_reconnect(aliases: list[str]) -> dict[str, int]:
    """Ask every process on this host to reconnect these aliases; return the new generations."""
    directory = status_dir()
    with _exclusive(directory):
        generations = _read_generations(directory / RECONNECT_FILE)
        for alias in aliases:
            generations[alias] = generations.get(alias, 0) + 1
        _write_atomically(directory / RECONNECT_FILE, json.dumps(generations, sort_keys=True))
    return {alias: generations[alias] for alias in aliases}


def read_pause_state() -> dict[str, dict[str, Any]]:
    """Return the pause state of each alias ever paused on this host, as in ``pause.json``."""
    return _read_pause_state(status_dir() / PAUSE_FILE)


def _read_pause_state(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    state: dict[str, dict[str, Any]] = {}
    if not isinstance(data, dict):
        return state
    for alias, entry in data.items():
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            since = entry.get("paused_since")
            state[str(alias)] = {
                "generation": int(entry["generation"]),
                "paused_since": None if since is None else float(since),
            }
    return state


def request_pause(
    aliases: list[str], paused: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Pause (or resume) these aliases in every process on this host, from the next round.

    Return the state each alias had before, and the state written. Pausing a
    paused alias keeps the time it was paused.
    """
    directory = status_dir()
    path = directory / PAUSE_FILE
    with _exclusive(directory):
        state = _read_pause_state(path)
        before = {
            alias: state.get(alias, {"generation": 0, "paused_since": None}) for alias in aliases
        }
        now = time.time()
        for alias in aliases:
            since = before[alias]["paused_since"]
            state[alias] = {
                "generation": before[alias]["generation"] + 1,
                "paused_since": (since or now) if paused else None,
            }
        _write_atomically(path, json.dumps(state, sort_keys=True))
    return before, {alias: state[alias] for alias in aliases}


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


def pause_seen() -> dict[str, int]:
    """Return the pause generation of each alias this process has applied."""
    with _pause_lock:
        return dict(_pause_seen)


def _apply_pause_state() -> None:
    """Bring this process's pools to the host's pause state (``pause.json``).

    A pool is paused while one of its aliases is; a pool already known is
    changed only when a generation of its aliases moved (so that a pool
    paused or resumed from Python keeps its state until the next command);
    a new pool is paused if one of its aliases is, and otherwise left alone.
    """
    path = status_dir() / PAUSE_FILE
    with _pause_lock:
        state = _read_pause_state(path)
        live = registry.entries()
        for entry in live:
            applied = tuple(
                sorted(
                    (alias, state[alias]["generation"]) for alias in entry.aliases if alias in state
                )
            )
            paused = [
                alias for alias in sorted(entry.aliases) if state.get(alias, {}).get("paused_since")
            ]
            known = _pause_applied.get(entry.key)
            if known == applied:
                continue
            _pause_applied[entry.key] = applied
            if paused and entry.pool.paused_since is None:
                if known is None:
                    maintenance.logger.warning(
                        "django_pgpool: pool %s created while database %s is paused on this "
                        "host (manage.py poolpause, %s): it lends nothing until manage.py "
                        "poolresume",
                        entry.pool.name,
                        ", ".join(repr(alias) for alias in paused),
                        time.ctime(state[paused[0]]["paused_since"]),
                    )
                entry.pool.pause()
            elif not paused and known is not None and entry.pool.paused_since is not None:
                entry.pool.resume()
        keys = {entry.key for entry in live}
        for key in [key for key in _pause_applied if key not in keys]:
            del _pause_applied[key]
        _pause_seen.clear()
        _pause_seen.update({alias: info["generation"] for alias, info in state.items()})


def _after_fork_in_child() -> None:
    # The child publishes its own snapshot and keeps the reconnect
    # generations it inherited (requests older than it were for its parent).
    # It says for itself whether its status directory works. Its pools are
    # new ones (the registry forgets the parent's).
    global _lock, _health, _pause_lock
    _lock = threading.Lock()
    _pause_lock = threading.Lock()
    _pause_applied.clear()
    _published.update(pid=0, body=None, path=None)
    _health = _Health()


forking.register("status", after_in_child=_after_fork_in_child)
