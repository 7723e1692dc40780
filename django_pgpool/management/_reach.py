"""The processes of this host that the commands can't reach through the status directory.

The commands reach a worker only if it publishes its snapshot in the same
status directory (``status.py``). The server sees every pooled session, with
its tag ``[pgpool <alias>@<host>:<pid>]``: a process of this host that has
sessions of a database there but publishes nothing here is one the command
did not reach (it runs with other DATABASES, another status directory, as
another user, or its status directory fails). ``unreached_processes()``
finds them; ``describe()`` says so with the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from django.core.management import CommandError

from .. import maintenance, status
from ..identity import HOSTNAME
from ._host import read_host_snapshots
from ._server import this_hosts_clients
from ._words import pid_list, plural

__all__ = ["SETTLE", "Unreached", "describe", "unreached_processes"]

#: Seconds a process's oldest session must have been open for it to count:
#: a process publishes its first snapshot within a maintenance round of its
#: pool's creation.
SETTLE = 2 * maintenance.INTERVAL


@dataclass(frozen=True)
class Unreached:
    """A process of this host with sessions on the server that publishes no status here."""

    pid: int
    sessions: int
    uid: int  # its owner; -1 if unknown (another user's, without /proc)
    elsewhere: Path | None  # the status directory it publishes in, if found
    settings_module: str  # its DJANGO_SETTINGS_MODULE, if found


def _owner(pid: int) -> int | None:
    """Return the uid of a live process of this host, -1 if unknown, None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # gone (or of another host or container of the same name)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return -1
    return os.getuid()


def unreached_processes(alias: str, command: str) -> list[Unreached]:
    """Return the processes of this host with sessions of ``alias``'s database (as its
    user) on the server that publish no snapshot in this command's status directory.

    Raises CommandError if the database can't be reached.
    """
    clients = this_hosts_clients(alias, command)
    published = {int(snapshot.get("pid", 0)) for snapshot in read_host_snapshots()}
    published.add(os.getpid())
    found = []
    for pid, (sessions, oldest) in sorted(clients.items()):
        if pid in published or oldest < SETTLE:
            continue
        uid = _owner(pid)
        if uid is None:
            continue
        elsewhere = status.find_elsewhere(pid) if uid == os.getuid() else None
        found.append(
            Unreached(
                pid,
                sessions,
                uid,
                None if elsewhere is None else elsewhere[0],
                "" if elsewhere is None else str(elsewhere[1].get("settings_module") or ""),
            )
        )
    return found


def describe(alias: str, unreached: list[Unreached], missed: str) -> str:
    """Say which processes were not reached, why as far as known, and the fix.

    ``missed``: what they did not get, e.g. "they were not asked to reconnect".
    """
    here = status.status_dir(create=False)
    reasons = []
    modules = sorted({u.settings_module for u in unreached if u.settings_module})
    for u in unreached:
        who = f"pid {u.pid} ({plural(u.sessions, 'session')})"
        if u.uid != os.getuid():
            owner = "another user" if u.uid < 0 else f"uid {u.uid}"
            reasons.append(f"{who} runs as {owner}: run the command as that user")
        elif u.elsewhere is not None:
            module = f", DJANGO_SETTINGS_MODULE={u.settings_module}" if u.settings_module else ""
            reasons.append(f"{who} publishes its status in {u.elsewhere} (other DATABASES{module})")
        else:
            reasons.append(
                f"{who} publishes no status where this user's commands look (another "
                "PGPOOL_STATUS_DIR, or its status directory fails: see its log)"
            )
    pids = pid_list([u.pid for u in unreached])
    with_module = f" (DJANGO_SETTINGS_MODULE={' or '.join(modules)})" if modules else ""
    return (
        f"{plural(len(unreached), 'process')} on host {HOSTNAME} (pids {pids}) "
        f"{'has' if len(unreached) == 1 else 'have'} sessions of database {alias!r} on the "
        f"server but {'publishes' if len(unreached) == 1 else 'publish'} no status in this "
        f"command's status directory {here}, so "
        f"{missed}: {'; '.join(reasons)}. Run the command with the same DATABASES as the "
        f"workers, e.g. with their settings module{with_module}, or give both the same "
        "status directory (settings.PGPOOL_STATUS_DIR or the DJANGO_PGPOOL_STATUS_DIR "
        "environment variable)"
    )


def check_reached(alias: str, command: str, missed: str) -> tuple[str | None, str | None]:
    """Return (the failure to report, or None; a warning if the server could not be asked)."""
    try:
        unreached = unreached_processes(alias, command)
    except CommandError as exc:
        return None, (
            f"couldn't ask the server whether processes of this host that this command "
            f"can't reach have sessions of database {alias!r}: {exc}"
        )
    return (describe(alias, unreached, missed) if unreached else None), None
