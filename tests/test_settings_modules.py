"""Workers and commands under different settings modules, on the default status directory.

The workers run under one settings module (``settings.production``), the
commands under another (manage.py's default). The default status directory
is named after the databases both reach, so the commands find the workers;
when their DATABASES differ, the commands see the workers' sessions on the
server, say which processes they could not reach and how to fix it, and
poolclose exits non-zero instead of reporting success.

Real processes: a worker started with ``python -c`` and the commands run as
``python -m django`` (manage.py), each in a private temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from django_pgpool.identity import HOSTNAME
from tests.helpers import ROOT, admin_execute, run_python, wait_for
from tests.settings import SERVER

WORKER_SETTINGS = "tests.script_settings"
COMMAND_SETTINGS = "tests.script_settings_production"

# A worker: one query, then it keeps its pool (minconn 1) until killed.
WORKER = """
import time
import django
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
connection.close()
print("ready", flush=True)
while True:
    time.sleep(0.2)
"""


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """The environment of every process of a test: the server, a private TMPDIR."""
    private = tmp_path / "tmp"
    private.mkdir()
    env = {**os.environ, **SERVER.env(), "TMPDIR": str(private)}
    env.pop("DJANGO_PGPOOL_STATUS_DIR", None)
    env.pop("PGPOOL_TEST_EXTRA_DATABASE", None)
    return env


@pytest.fixture
def start_worker(
    environ: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    workers: list[subprocess.Popen[bytes]] = []

    def start(**extra: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(workers)}.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER],
                cwd=ROOT,
                env={**environ, "DJANGO_SETTINGS_MODULE": WORKER_SETTINGS, **extra},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        workers.append(worker)
        wait_for(lambda: "ready" in log.read_text(), timeout=30, what="the worker's first query")
        # Its snapshot, somewhere in its default status directory.
        top = Path(environ["TMPDIR"]) / f"django_pgpool-{os.getuid()}"
        wait_for(lambda: list(top.glob(f"*/{worker.pid}.json")), what="the worker's snapshot")
        # Settled: the commands count a process only once its sessions are 2 s old.
        wait_for(lambda: worker_sessions(worker.pid, min_age=2.5), what="settled sessions")
        return worker

    yield start
    for worker in workers:
        worker.kill()
        worker.wait()


def worker_sessions(pid: int, min_age: float = 0.0) -> list[int]:
    """Return the server pids of a worker's pooled sessions (of alias 'default')."""
    rows = admin_execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s "
        "AND backend_start <= clock_timestamp() - make_interval(secs => %s)",
        [f"%[pgpool default@%:{pid}]", min_age],
    )
    return sorted(pid for (pid,) in rows)


def manage(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(
        ["-m", "django", *args],
        {**environ, "DJANGO_SETTINGS_MODULE": COMMAND_SETTINGS},
        timeout=60,
        check=False,
    )


def test_poolclose_under_another_settings_module_reaches_the_workers(
    environ: dict[str, str], start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    worker = start_worker()
    before = worker_sessions(worker.pid)
    assert before

    closed = manage(environ, "poolclose", "--database", "default", "--wait", "10")

    assert closed.returncode == 0, closed.stderr
    asked, done = closed.stdout.splitlines()
    assert asked.startswith(
        f"Asked 1 process on host {HOSTNAME} to reconnect database 'default' (pids {worker.pid})"
    )
    assert done.startswith("Database 'default': every process has reconnected (")
    wait_for(
        lambda: worker_sessions(worker.pid) and not set(before) & set(worker_sessions(worker.pid)),
        what="the worker's connections replaced",
    )


def test_poolstatus_under_another_settings_module_shows_the_workers(
    environ: dict[str, str], start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    worker = start_worker()

    shown = manage(environ, "poolstatus", "--database", "default", "--format", "json")

    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)["databases"]["default"]
    assert [p["pid"] for p in info["processes"]] == [worker.pid]
    assert info["unreached"] == []
    text = manage(environ, "poolstatus", "--database", "default").stdout
    assert "no process on this host" not in text


def test_workers_with_other_databases_are_named_and_poolclose_fails_with_the_fix(
    environ: dict[str, str], start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # Its DATABASES have one more alias: its status directory is another one.
    worker = start_worker(PGPOOL_TEST_EXTRA_DATABASE="1")
    before = worker_sessions(worker.pid)

    closed = manage(environ, "poolclose", "--database", "default")

    assert closed.returncode == 1
    assert closed.stdout == (
        f"No process on host {HOSTNAME} has a pool of database 'default': nothing to reconnect.\n"
    )
    message = " ".join(closed.stderr.split())
    top = Path(environ["TMPDIR"]) / f"django_pgpool-{os.getuid()}"
    (theirs,) = (path.parent for path in top.glob(f"*/{worker.pid}.json"))
    assert (
        f"1 process on host {HOSTNAME} (pids {worker.pid}) has sessions of database 'default' "
        "on the server but publishes no status in this command's status directory "
    ) in message
    assert "so they were not asked to reconnect" in message
    assert (
        f"pid {worker.pid} (1 session) publishes its status in {theirs} (other DATABASES, "
        f"DJANGO_SETTINGS_MODULE={WORKER_SETTINGS})"
    ) in message
    assert (
        "Run the command with the same DATABASES as the workers, e.g. with their settings "
        f"module (DJANGO_SETTINGS_MODULE={WORKER_SETTINGS}), or give both the same status "
        "directory (settings.PGPOOL_STATUS_DIR or the DJANGO_PGPOOL_STATUS_DIR environment "
        "variable)"
    ) in message
    assert SERVER.password not in closed.stdout + closed.stderr
    assert worker_sessions(worker.pid) == before  # nothing was done, and it says so

    shown = manage(environ, "poolstatus", "--database", "default")
    assert shown.returncode == 0, shown.stderr
    assert re.search(
        r"\ndefault +postgres +no process publishes a pool of this database", shown.stdout
    )
    assert f"pid {worker.pid} (1 session) publishes its status in {theirs}" in " ".join(
        shown.stdout.split()
    )
    document = json.loads(
        manage(environ, "poolstatus", "--database", "default", "--format", "json").stdout
    )
    assert document["databases"]["default"]["unreached"] == [
        {
            "pid": worker.pid,
            "sessions": 1,
            "uid": os.getuid(),
            "status_dir": str(theirs),
            "settings_module": WORKER_SETTINGS,
        }
    ]

    # With the workers' settings module, the command reaches it.
    reached = run_python(
        ["-m", "django", "poolclose", "--database", "default", "--wait", "10"],
        {**environ, "DJANGO_SETTINGS_MODULE": WORKER_SETTINGS, "PGPOOL_TEST_EXTRA_DATABASE": "1"},
        timeout=60,
    )
    assert f"(pids {worker.pid})" in reached.stdout
