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
``<tmp>/django_pgpool-<uid>/<settings module>``.

Lock discipline: ``_lock`` guards ``_published`` and ``_seen_generations``;
only the maintenance thread writes snapshots, commands only read them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import maintenance, registry
from .identity import HOSTNAME

__all__ = [
    "HOSTNAME",
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


def status_dir(create: bool = True) -> Path:
    """Return this project's status directory on this host, created owner-only."""
    configured = getattr(settings, "PGPOOL_STATUS_DIR", None) or os.environ.get(
        "DJANGO_PGPOOL_STATUS_DIR"
    )
    if configured:
        path = Path(configured)
    else:
        project = re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ.get("DJANGO_SETTINGS_MODULE", ""))
        path = Path(tempfile.gettempdir()) / f"django_pgpool-{os.getuid()}" / (project or "default")
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ImproperlyConfigured(
                f"The django_pgpool status directory {str(path)!r} must belong to this user "
                "and be accessible to it only (chmod 700); fix it or set "
                "settings.PGPOOL_STATUS_DIR to another directory."
            )
    return path


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
                "options": entry.options.as_dict(),
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


def _publish_quietly() -> None:
    try:
        publish()
    except ImproperlyConfigured as exc:
        # Said once: a misconfigured status directory must not stop the pool.
        maintenance.logger.warning("django_pgpool: status not published: %s", exc)
        maintenance.remove_hook(_publish_quietly)


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
    global _lock
    _lock = threading.Lock()
    _published.update(pid=0, body=None, path=None)


os.register_at_fork(after_in_child=_after_fork_in_child)
