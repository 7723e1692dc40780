"""This host: the snapshots its processes publish in the status directory (``status.py``).

``read_host_snapshots()`` reads them; ``host_processes()`` picks those that
have a pool of an alias and puts each published pool in the documented shape.
``status.request_reconnect()`` asks those processes to reconnect,
``status.request_pause()`` to pause or resume.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError

from .. import registry, status
from ..identity import HOSTNAME
from ..pool import STATS_KEYS
from ._redaction import shown_database

__all__ = ["ACTIVITY_KEYS", "host_processes", "read_host_snapshots"]


#: What a published pool holds besides STATS_KEYS, and its value when missing.
ACTIVITY_KEYS: dict[str, Any] = {
    "longest_wait_s": 0.0,
    "oldest_checkout": None,
    "retired_in_use": 0,
    "wait_buckets": [],  # queued borrowers' waits, counted per pool.WAIT_BUCKETS bound, +Inf
    "paused_since": None,  # Unix time of pause(), or None while lending
}


def read_host_snapshots() -> list[dict[str, Any]]:
    """Return the snapshots of this host's live processes that have pools, by pid.

    This process (when it has pools: call_command() inside a worker) is
    described by its live figures, taken now; its published file may be a
    second old.
    """
    own_pid = os.getpid()
    try:
        published = status.read_snapshots()
    except (ImproperlyConfigured, OSError) as exc:
        raise CommandError(status.describe_failure(exc)) from exc
    snapshots = [s for s in published if s.get("pid") != own_pid]
    if registry.entries():
        own = next((s for s in published if s.get("pid") == own_pid), {})
        live = status.snapshot()
        live["updated"] = time.time()
        live["reconnect_seen"] = own.get("reconnect_seen", {})
        live["pause_seen"] = status.pause_seen()
        snapshots.append(live)
    return sorted(snapshots, key=lambda s: int(s.get("pid", 0)))


def _published_pool(pool: Mapping[str, Any]) -> dict[str, Any]:
    """Return a published pool with every documented key, in a stable order."""
    figures = {key: pool.get(key, 0) for key in STATS_KEYS}
    activity = {key: pool.get(key, default) for key, default in ACTIVITY_KEYS.items()}
    known = {"aliases", "database", "options", *figures, *activity}
    return {
        "aliases": list(pool.get("aliases", [])),
        "database": shown_database(pool.get("database", {})),
        "options": dict(pool.get("options", {})),
        **figures,
        **activity,
        **{key: value for key, value in pool.items() if key not in known},
    }


def host_processes(alias: str, snapshots: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the processes (of these snapshots) that have a pool of ``alias``, with those pools."""
    processes = []
    for snapshot in snapshots:
        pools = [
            _published_pool(pool)
            for pool in snapshot.get("pools", [])
            if alias in pool.get("aliases", ())
        ]
        if pools:
            processes.append(
                {
                    "pid": int(snapshot["pid"]),
                    "host": str(snapshot.get("host", HOSTNAME)),
                    "updated": snapshot.get("updated"),
                    "reconnect_seen": int(snapshot.get("reconnect_seen", {}).get(alias, 0)),
                    "pause_seen": int(snapshot.get("pause_seen", {}).get(alias, 0)),
                    "pools": pools,
                }
            )
    return processes
