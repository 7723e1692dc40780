"""Status snapshots across processes, reconnect requests, and the application_name tag."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.db import connection

from django_pgpool import identity, status
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def backend_pid() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


def own_snapshot() -> dict[str, object] | None:
    return next((s for s in status.read_snapshots() if s["pid"] == os.getpid()), None)


def test_each_process_publishes_a_snapshot_without_secrets() -> None:
    backend_pid()
    connection.close()
    wait_for(own_snapshot)
    snapshot = own_snapshot()
    assert snapshot is not None
    pools = snapshot["pools"]
    assert isinstance(pools, list)
    default = next(p for p in pools if "default" in p["aliases"])
    assert default["requests_num"] >= 1
    assert default["database"]["dbname"] == "test_pgpool"
    directory = status.status_dir()
    assert directory.stat().st_mode & 0o777 == 0o700
    password = connection.settings_dict["PASSWORD"]
    for path in directory.iterdir():
        assert password not in path.read_text()


def test_snapshots_of_dead_processes_are_ignored_and_removed() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = status.status_dir() / f"{int(dead.stdout)}.json"
    path.write_text(json.dumps({"pid": int(dead.stdout), "pools": []}))
    assert all(s["pid"] != int(dead.stdout) for s in status.read_snapshots())
    assert not path.exists()


def test_a_reconnect_request_replaces_this_processes_connections() -> None:
    before = backend_pid()
    connection.close()
    wait_for(own_snapshot)  # the process has looked at the requests once
    generation = status.request_reconnect(["default"])["default"]
    wait_for(
        lambda: (own_snapshot() or {}).get("reconnect_seen", {}).get("default", 0) >= generation
    )
    assert backend_pid() != before


def test_pooled_sessions_carry_the_tag_and_keep_the_users_name() -> None:
    with connection.cursor() as cur:
        cur.execute("SHOW application_name")
        name = cur.fetchone()[0]
    match = identity.TAG_PATTERN.search(name)
    assert match is not None
    assert (match["alias"], match["pid"]) == ("default", str(os.getpid()))
    tagged = identity.application_name("default", "my-app")
    assert tagged.startswith("my-app [pgpool default@")
    long = identity.application_name("default", "é" * 80)
    assert len(long.encode()) <= 63
    assert identity.TAG_PATTERN.search(long)
