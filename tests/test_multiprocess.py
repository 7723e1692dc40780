"""poolstatus, poolclose, poolpause and poolresume seeing and steering real worker processes.

testproject runs under gunicorn (2 gthread workers) and under uvicorn (ASGI,
2 workers); a client process sends them a bounded load on loopback
(``GET /api/health/``: one query, and the worker and backend that served it);
the commands run from a third process, ``manage.py``, as in production. All
of them share a status directory of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from django_pgpool.identity import HOSTNAME, TAG_PATTERN
from tests.helpers import (
    ROOT,
    admin_execute,
    project_env,
    run_python,
    scratch_database,
    start_python,
    wait_for,
)
from tests.pgserver import ThrowawayServer
from tests.test_commands import STATUS_SHAPE, check_shape, host_table

WORKERS = 2
MAXCONN = 4
THREADS = 8  # client threads
TAG_HOST = HOSTNAME[:24]  # application_name() shortens the host name in the tag

# The load: GET URL from THREADS threads, up to LIMIT requests (0: no limit),
# for at most SECONDS, or until STOP_FILE exists. Prints one JSON line.
CLIENT = r"""
import json, os, sys, threading, time, urllib.request

url, limit, seconds, threads, stop_file = sys.argv[1:6]
limit, seconds, threads = int(limit), float(seconds), int(threads)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
deadline = time.monotonic() + seconds
lock = threading.Lock()
sent = 0
served = []
errors = []


def work():
    global sent
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        with lock:
            if limit and sent >= limit:
                return
            sent += 1
        try:
            with opener.open(url, timeout=15) as response:
                body = json.loads(response.read())
                header = int(response.headers["X-Backend-Pid"])
                assert response.status == 200 and body["backend_pid"] == header, body
            with lock:
                served.append((body["process"], header))
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")


pool = [threading.Thread(target=work) for _ in range(threads)]
for thread in pool:
    thread.start()
for thread in pool:
    thread.join()
workers, backends = {}, {}
for worker, backend in served:
    workers[worker] = workers.get(worker, 0) + 1
    backends.setdefault(worker, set()).add(backend)
print(json.dumps({
    "sent": sent,
    "failed": len(errors),
    "errors": errors[:5],
    "workers": workers,
    "backends": {worker: sorted(pids) for worker, pids in backends.items()},
}))
"""


@dataclass
class Load:
    """What the client saw: requests per worker pid, and the backends that served them."""

    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    workers: dict[int, int] = field(default_factory=dict)
    backends: dict[int, set[int]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, result: dict[str, Any]) -> Load:
        return cls(
            result["sent"],
            result["failed"],
            result["errors"],
            {int(worker): count for worker, count in result["workers"].items()},
            {int(worker): set(pids) for worker, pids in result["backends"].items()},
        )

    def add(self, other: Load) -> None:
        self.sent += other.sent
        self.failed += other.failed
        self.errors += other.errors
        for worker, count in other.workers.items():
            self.workers[worker] = self.workers.get(worker, 0) + count
        for worker, pids in other.backends.items():
            self.backends.setdefault(worker, set()).update(pids)

    def all_backends(self) -> set[int]:
        return set().union(*self.backends.values()) if self.backends else set()


class Client:
    """A load-sending process, started now; ``result()`` waits for it."""

    def __init__(self, url: str, limit: int, seconds: float, stop_file: Path) -> None:
        args = [url, str(limit), str(seconds), str(THREADS), str(stop_file)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> Load:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, f"client exited {self.proc.returncode}:\n{err}"
        return Load.from_json(json.loads(out))


def send(url: str, requests: int, tmp_path: Path) -> Load:
    """Send ``requests`` requests, again until both workers have served some."""
    load = Load()
    for _ in range(5):
        load.add(Client(url, requests, 30, tmp_path / "never").result())
        if len(load.workers) >= WORKERS:
            break
    assert load.failed == 0, load.errors
    assert len(load.workers) == WORKERS, f"served by {load.workers} only"
    return load


# -- the database, the status directory, the servers --------------------------------


def tagged_sessions(database: str) -> dict[int, set[int]]:
    """Return the pools' sessions on a database (the ground truth), by worker pid."""
    rows = admin_execute(
        "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s", [database]
    )
    sessions: dict[int, set[int]] = {}
    for pid, name in rows:
        match = TAG_PATTERN.search(name or "")
        if match and match["alias"] == "default" and match["host"] == TAG_HOST:
            sessions.setdefault(int(match["pid"]), set()).add(pid)
    return sessions


@dataclass(frozen=True)
class Project:
    """A database for testproject and the environment of its processes."""

    database: str
    status_dir: Path
    environ: dict[str, str]

    def snapshots(self) -> dict[int, dict[str, Any]]:
        """Return the published pools of alias default, by pid (dead processes included)."""
        pools = {}
        for path in self.status_dir.glob("[0-9]*.json"):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced
            for pool in snapshot["pools"]:
                if "default" in pool["aliases"]:
                    pools[int(snapshot["pid"])] = pool
        return pools

    def manage(
        self, *args: str, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return run_python(
            ["testproject/manage.py", *args], {**self.environ, **env}, timeout=60, check=check
        )

    def poolstatus(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.manage("poolstatus", "--format", "json").stdout)
        check_shape(document, STATUS_SHAPE)
        return document


def make_project(name: str, tmp_path: Path) -> Iterator[Project]:
    database = f"{name}_{os.getpid()}"  # unique: tox envs may share a server
    status_dir = tmp_path / "status"
    with scratch_database(database):
        yield Project(database, status_dir, project_env(database, MAXCONN, status_dir))


class Server:
    """An HTTP server serving testproject (in a process group of its own)."""

    def __init__(
        self, args: list[str], listening: str, project: Project, log: Path, ready: str = ""
    ) -> None:
        """Start ``python -m <args>``; return once the log has ``listening`` (its group 1:
        the port) and, if given, ``ready`` once per worker."""
        self.log_file = log
        self.proc = start_python(["-m", *args], project.environ, log)
        deadline = time.monotonic() + 30
        while not (match := re.search(listening, self.log())) or (
            ready and self.log().count(ready) < WORKERS
        ):
            assert self.proc.poll() is None, f"{args[0]} exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"{args[0]} did not start:\n{self.log()}"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{match[1]}/api/health/"

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def gunicorn_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    yield from make_project("multiprocess_gunicorn", tmp_path_factory.mktemp("gunicorn"))


@pytest.fixture(scope="module")
def gunicorn(gunicorn_project: Project) -> Iterator[Server]:
    config = gunicorn_project.status_dir.parent / "gunicorn_conf.py"
    # No control socket in ~/.gunicorn (gunicorn >= 27; older ones ignore the name).
    config.write_text("control_socket_disable = True\ngraceful_timeout = 5\n")
    args = ["gunicorn", "--workers", str(WORKERS), "--worker-class", "gthread"]
    args += ["--threads", "4", "--bind", "127.0.0.1:0", "--config", str(config)]
    args += ["testproject.wsgi:application"]
    log = gunicorn_project.status_dir.parent / "gunicorn.log"
    server = Server(args, r"Listening at: http://127.0.0.1:(\d+)", gunicorn_project, log)
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def uvicorn_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    yield from make_project("multiprocess_uvicorn", tmp_path_factory.mktemp("uvicorn"))


@pytest.fixture(scope="module")
def uvicorn(uvicorn_project: Project) -> Iterator[Server]:
    args = ["uvicorn", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", "0"]
    args += ["testproject.asgi:application"]
    log = uvicorn_project.status_dir.parent / "uvicorn.log"
    # The workers listen on the socket uvicorn bound once they have started.
    listening = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"
    server = Server(args, listening, uvicorn_project, log, ready="Application startup complete")
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()


def settle(project: Project, expected: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Wait until each worker has published its requests (snapshots lag up to a second)."""

    def settled() -> bool:
        pools = project.snapshots()
        return all(
            pid in pools and pools[pid]["requests_num"] == count and pools[pid]["pool_in_use"] == 0
            for pid, count in expected.items()
        )

    wait_for(settled, what=f"the workers publish requests_num {expected}")
    return project.snapshots()


# -- poolstatus ------------------------------------------------------------------


def check_poolstatus_matches_the_load(server: Server, project: Project, tmp_path: Path) -> None:
    before = {pid: pool["requests_num"] for pid, pool in project.snapshots().items()}
    load = send(server.url, 200, tmp_path)
    expected = {pid: before.get(pid, 0) + count for pid, count in load.workers.items()}
    settle(project, expected)

    document = project.poolstatus()
    text = project.manage("poolstatus").stdout

    info = document["databases"]["default"]
    assert document["host"] == HOSTNAME
    assert document["status_dir"] == str(project.status_dir)
    # Exactly the workers: not the master, not the command's own process.
    processes = {process["pid"]: process for process in info["processes"]}
    assert set(processes) == set(load.workers)
    rows = {row["pid"]: row for row in host_table(text) if row["alias"] == "default"}
    assert set(rows) == {str(pid) for pid in load.workers}
    truth = tagged_sessions(project.database)
    server_view = {(p["host"], p["pid"]): p for p in info["server"]["processes"]}
    assert info["server"]["database"] == project.database
    assert info["server"]["error"] is None
    assert set(server_view) == {(TAG_HOST, pid) for pid in load.workers}
    for pid, process in processes.items():
        (pool,) = process["pools"]
        assert process["host"] == HOSTNAME
        assert pool["requests_num"] == expected[pid]
        assert pool["requests_errors"] == pool["requests_timeouts"] == 0
        assert pool["pool_in_use"] == pool["requests_waiting"] == 0
        assert pool["oldest_checkout"] is None
        assert 1 <= pool["pool_size"] == pool["pool_available"] <= MAXCONN
        assert pool["pool_size"] == pool["connections_num"] - pool["connections_closed"]
        assert pool["database"]["dbname"] == project.database
        row = rows[str(pid)]
        assert (row["requests"], row["size"], row["in_use"]) == (
            str(expected[pid]),
            str(pool["pool_size"]),
            "0",
        )
        # The server's view: the same sessions as pg_stat_activity, as many as the pool has,
        # among them every backend that served this worker's requests.
        seen = server_view[(TAG_HOST, pid)]
        assert set(seen["backend_pids"]) == truth[pid]
        assert seen["connections"] == seen["idle"] == pool["pool_size"]
        assert load.backends[pid] <= truth[pid]
        assert seen["oldest_backend"]["pid"] in truth[pid]
    assert info["server"]["connections"] == sum(len(pids) for pids in truth.values())
    assert re.search(rf"\ndefault\s+{project.database}\s+{re.escape(TAG_HOST)}\s+\d+\s+\d", text)


def test_poolstatus_shows_both_gunicorn_workers_with_the_figures_of_the_load(
    gunicorn: Server, gunicorn_project: Project, tmp_path: Path
) -> None:
    check_poolstatus_matches_the_load(gunicorn, gunicorn_project, tmp_path)


def test_poolstatus_shows_both_uvicorn_workers_with_the_figures_of_the_load(
    uvicorn: Server, uvicorn_project: Project, tmp_path: Path
) -> None:
    check_poolstatus_matches_the_load(uvicorn, uvicorn_project, tmp_path)


def test_poolstatus_watch_shows_the_workers_until_interrupted(
    gunicorn: Server, gunicorn_project: Project, tmp_path: Path
) -> None:
    load = send(gunicorn.url, 20, tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "testproject/manage.py",
            "poolstatus",
            "--watch",
            "0.2",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=gunicorn_project.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()

    assert proc.returncode == 0, err
    documents = [json.loads(line) for line in lines]
    assert documents[1]["time"] > documents[0]["time"]
    for document in documents:
        check_shape(document, STATUS_SHAPE)
        processes = document["databases"]["default"]["processes"]
        assert {process["pid"] for process in processes} == set(load.workers)


def test_poolstatus_exits_non_zero_when_the_database_cannot_be_reached(
    gunicorn: Server, gunicorn_project: Project, tmp_path: Path
) -> None:
    load = send(gunicorn.url, 20, tmp_path)
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        proc = gunicorn_project.manage("poolstatus", check=False, PGPORT=str(sock.getsockname()[1]))

    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f"CommandError: couldn't connect to database 'default' ({gunicorn_project.database} on "
    )
    assert "for the server's view: " in proc.stderr
    # What this host's processes publish is shown all the same.
    rows = host_table(proc.stdout)
    assert {row["pid"] for row in rows} == {str(pid) for pid in load.workers}
    assert "ERROR: couldn't connect to database 'default'" in proc.stdout


# -- poolclose ---------------------------------------------------------------------


def check_poolclose_reconnects_every_worker_under_load(
    server: Server, project: Project, tmp_path: Path
) -> None:
    send(server.url, 50, tmp_path)
    old = set().union(*tagged_sessions(project.database).values())
    stop = tmp_path / "stop"
    during = Client(server.url, 0, 30, stop)  # a load all along
    try:
        time.sleep(0.5)
        out = project.manage("poolclose", "--wait", "15").stdout
        time.sleep(0.5)
    finally:
        stop.touch()
    load = during.result()

    assert load.failed == 0, load.errors
    asked, done = out.splitlines()
    assert asked.startswith(f"Asked 2 processes on host {HOSTNAME} to reconnect database ")
    assert re.fullmatch(r"Database 'default': every process has reconnected \(\d+\.\d s\)\.", done)
    # The load ran on old backends, then on new ones: every worker reconnected under load.
    assert len(load.backends) == WORKERS
    for pid, backends in load.backends.items():
        assert backends & old, f"worker {pid} served nothing before poolclose"
        assert backends - old, f"worker {pid} served nothing after poolclose"
    wait_for(
        lambda: not old & set().union(*tagged_sessions(project.database).values()),
        what="the old sessions closed",
    )
    after = send(server.url, 100, tmp_path)
    assert not after.all_backends() & old


def test_poolclose_makes_both_gunicorn_workers_reconnect_without_a_failed_request(
    gunicorn: Server, gunicorn_project: Project, tmp_path: Path
) -> None:
    check_poolclose_reconnects_every_worker_under_load(gunicorn, gunicorn_project, tmp_path)


def test_poolclose_makes_both_uvicorn_workers_reconnect_without_a_failed_request(
    uvicorn: Server, uvicorn_project: Project, tmp_path: Path
) -> None:
    check_poolclose_reconnects_every_worker_under_load(uvicorn, uvicorn_project, tmp_path)


def test_poolclose_kill_leaves_the_sessions_of_a_busy_gunicorn_alone(
    gunicorn: Server, gunicorn_project: Project, tmp_path: Path
) -> None:
    send(gunicorn.url, 50, tmp_path)
    stop = tmp_path / "stop"
    during = Client(gunicorn.url, 0, 30, stop)  # a load all along
    try:
        time.sleep(0.5)
        out = gunicorn_project.manage("poolclose", "--kill").stdout
        time.sleep(0.5)
    finally:
        stop.touch()
    load = during.result()

    # Lent sessions are idle between two statements: only those idle 5 s are ended.
    assert load.failed == 0, load.errors
    assert len(load.workers) == WORKERS
    assert "(--idle-for and --include-active end those too;" in out


def test_poolclose_kill_makes_both_gunicorn_workers_replace_idle_connections(
    gunicorn: Server, gunicorn_project: Project, tmp_path: Path
) -> None:
    load = send(gunicorn.url, 50, tmp_path)
    wait_for(
        lambda: all(p["pool_in_use"] == 0 for p in gunicorn_project.snapshots().values()),
        what="idle workers",
    )
    time.sleep(0.5)  # idle for --idle-for 0.5
    sessions = tagged_sessions(gunicorn_project.database)
    old = set().union(*sessions.values())
    lost = sum(pool["connections_lost"] for pool in gunicorn_project.snapshots().values())

    out = gunicorn_project.manage("poolclose", "--kill", "--idle-for", "0.5", "--wait", "10").stdout

    ended, gone = out.splitlines()
    assert ended.startswith(
        f"Ended {len(old)} idle sessions of database 'default' ({gunicorn_project.database}) "
        "on the server: "
    )
    for pid, pids in sessions.items():
        assert f"{len(pids)} of {TAG_HOST}:{pid}" in ended
    assert re.fullmatch(r"Database 'default': the ended sessions are gone \(\d+\.\d s\)\.", gone)
    after = send(gunicorn.url, 100, tmp_path)
    assert not after.all_backends() & old
    assert set(after.workers) == set(load.workers)
    # Each worker's pool found the ended sessions dead, once each.
    wait_for(
        lambda: (
            sum(p["connections_lost"] for p in gunicorn_project.snapshots().values())
            == lost + len(old)
        ),
        what="the workers counted the lost connections",
    )


# -- poolpause and poolresume --------------------------------------------------------

# A process with a pool of testproject's database: it borrows a connection (its
# pool's first borrow), holds it HOLD seconds, returns it, and lives on with its
# pool until killed. Each step is a JSON line in OUT: what it waited for, when.
HOLDER = r"""
import json, sys, time
import django

django.setup()
from django.db import connection

hold, out = float(sys.argv[1]), sys.argv[2]


def say(**event):
    with open(out, "a") as handle:
        handle.write(json.dumps({**event, "at": time.time()}) + "\n")


say(step="started")
started = time.monotonic()
with connection.cursor() as cursor:
    cursor.execute("SELECT pg_backend_pid()")
    say(step="borrowed", waited=time.monotonic() - started, backend=cursor.fetchone()[0])
time.sleep(hold)
connection.close()  # back to the pool
say(step="returned")
time.sleep(120)
"""

# The write load: THREADS threads POST /api/products/<pk>/buy/ (one row locked
# and updated in a transaction) until STOP_FILE exists. Prints one JSON line.
BUYER = r"""
import json, os, sys, threading, time, urllib.request

url, stop_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
lock = threading.Lock()
bought, errors, slowest = 0, [], 0.0


def work():
    global bought, slowest
    while not os.path.exists(stop_file):
        started = time.monotonic()
        try:
            request = urllib.request.Request(url, data=b"", method="POST")
            with opener.open(request, timeout=30) as response:
                assert response.status == 200, response.status
                json.loads(response.read())
            with lock:
                bought += 1
                slowest = max(slowest, time.monotonic() - started)
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")


pool = [threading.Thread(target=work) for _ in range(threads)]
for thread in pool:
    thread.start()
for thread in pool:
    thread.join()
print(json.dumps({"bought": bought, "failed": len(errors), "errors": errors[:5],
                  "slowest": slowest}))
"""


@pytest.fixture
def pause_project(tmp_path: Path) -> Iterator[Project]:
    yield from make_project("multiprocess_pause", tmp_path)


class Holder:
    """A HOLDER process of ``project``, started now."""

    def __init__(self, project: Project, hold: float, tmp_path: Path, name: str) -> None:
        self.out = tmp_path / f"{name}.jsonl"
        args = ["-c", HOLDER, str(hold), str(self.out)]
        self.proc = start_python(args, project.environ, tmp_path / f"{name}.log")
        self.pid = self.proc.pid

    def events(self) -> dict[str, dict[str, Any]]:
        if not self.out.exists():
            return {}
        lines = self.out.read_text().splitlines()
        return {event["step"]: event for event in map(json.loads, lines)}

    def wait_for(self, step: str, timeout: float = 20) -> dict[str, Any]:
        wait_for(
            lambda: step in self.events() or self.proc.poll() is not None,
            timeout,
            what=f"holder {self.pid} {step}",
        )
        assert step in self.events(), f"holder exited {self.proc.returncode}"
        return self.events()[step]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.stop()


def published_pool(project: Project, pid: int) -> dict[str, Any] | None:
    return project.snapshots().get(pid)


def test_poolpause_wait_waits_until_another_process_returns_its_connection(
    pause_project: Project, holders: list[Holder], tmp_path: Path
) -> None:
    holder = Holder(pause_project, 2.5, tmp_path, "holder")
    holders.append(holder)
    borrowed = holder.wait_for("borrowed")
    wait_for(lambda: published_pool(pause_project, holder.pid), what="the holder publishes")

    started = time.monotonic()
    out = pause_project.manage("poolpause", "--wait", "15").stdout
    took = time.monotonic() - started

    returned = holder.events()["returned"]
    asked, done = out.splitlines()
    assert asked == (
        f"Asked 1 process on host {HOSTNAME} to pause database 'default' (pids {holder.pid}): "
        "they lend no connection until poolresume (borrowers wait, up to their timeout), idle "
        "connections close within about a second, connections in use when they are returned."
    )
    assert re.fullmatch(
        r"Database 'default': every process is paused, with no connection left \(\d+\.\d s\)\.",
        done,
    )
    # It waited for the connection held 2.5 s, and returned soon after it came back.
    assert returned["at"] - borrowed["at"] >= 2.5
    assert took >= 1.0
    assert not tagged_sessions(pause_project.database)  # nothing of the pool's on the server
    pool = published_pool(pause_project, holder.pid)
    assert pool is not None and pool["paused_since"] is not None and pool["pool_size"] == 0
    print(f"\npoolpause --wait returned in {took:.2f} s, the connection held 2.5 s")

    out = pause_project.manage("poolresume", "--wait", "10").stdout
    assert out.splitlines()[-1].startswith("Database 'default': every process has resumed (")
    wait_for(lambda: tagged_sessions(pause_project.database), what="minconn refilled")


def test_poolpause_wait_times_out_naming_the_process_that_holds_a_connection(
    pause_project: Project, holders: list[Holder], tmp_path: Path
) -> None:
    holder = Holder(pause_project, 60, tmp_path, "holder")
    holders.append(holder)
    holder.wait_for("borrowed")
    wait_for(lambda: published_pool(pause_project, holder.pid), what="the holder publishes")

    started = time.monotonic()
    proc = pause_project.manage("poolpause", "--wait", "2", check=False)
    took = time.monotonic() - started

    assert proc.returncode == 1
    # The time it waited: 2.0 s, or a little more on a busy machine (2.1 s seen in CI).
    assert re.fullmatch(
        rf"CommandError: after 2\.\d s, these processes on host {re.escape(HOSTNAME)} still "
        rf"hold connections of database 'default': pid {holder.pid} \(1 connection open, 1 in "
        r"use\)\. The pause stays: the connections close when they are returned; run poolpause "
        r"--wait again to wait longer, or poolresume to lend again\n",
        proc.stderr,
    ), proc.stderr
    assert 2.0 <= took < 10
    # Paused, its idle connection (minconn) closed, the borrowed one kept by its borrower.
    pool = published_pool(pause_project, holder.pid)
    assert pool is not None and pool["paused_since"] is not None
    assert (pool["pool_size"], pool["pool_in_use"]) == (1, 1)
    out = pause_project.manage("poolresume").stdout
    assert out.startswith(f"Asked 1 process on host {HOSTNAME} to resume database 'default' ")


def test_a_process_started_while_paused_lends_nothing_until_poolresume(
    pause_project: Project, holders: list[Holder], tmp_path: Path
) -> None:
    out = pause_project.manage("poolpause", "--wait").stdout
    assert out == (
        f"Paused database 'default' on host {HOSTNAME}; no process has a pool of it now "
        "(processes that start meanwhile are paused too, until poolresume).\n"
    )
    state = json.loads((pause_project.status_dir / "pause.json").read_text())
    assert set(state) == {"default"}
    assert state["default"]["generation"] >= 1
    assert time.time() - 30 < state["default"]["paused_since"] <= time.time()

    holder = Holder(pause_project, 0, tmp_path, "late")
    holders.append(holder)
    holder.wait_for("started")
    # Its borrow waits: the pool was paused when it was created, before lending.
    wait_for(
        lambda: (published_pool(pause_project, holder.pid) or {}).get("requests_waiting") == 1,
        what="the late process waits for a connection",
    )
    time.sleep(1.5)
    assert "borrowed" not in holder.events()
    assert not tagged_sessions(pause_project.database)  # it opened none
    document = pause_project.poolstatus()
    info = document["databases"]["default"]
    assert info["pause"] == state["default"]
    (process,) = info["processes"]
    (pool,) = process["pools"]
    assert pool["paused_since"] is not None and pool["requests_waiting"] == 1
    assert process["pause_seen"] == state["default"]["generation"]
    text = pause_project.manage("poolstatus").stdout
    (row,) = host_table(text)
    assert (row["pid"], row["size"], row["waiting"]) == (str(holder.pid), "0", "1")
    assert re.fullmatch(r"\d+\.\d+s", row["paused"])
    assert re.search(
        r"\n  paused +since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+, \d+\.\d s ago \(poolpause; "
        r"1 borrower waiting; poolresume lends again\)\n",
        text,
    )

    resumed_at = time.time()
    out = pause_project.manage("poolresume", "--wait", "10").stdout

    borrowed = holder.wait_for("borrowed")
    asked, was, done = out.splitlines()
    assert asked.startswith(f"Asked 1 process on host {HOSTNAME} to resume database 'default' ")
    assert was.startswith(f"Database 'default' was paused on host {HOSTNAME} since ")
    assert done.startswith("Database 'default': every process has resumed (")
    # Served once resumed, within its timeout (10 s): it did not fail.
    assert borrowed["at"] >= resumed_at - 0.1
    assert 2.0 < borrowed["waited"] < 10
    assert (
        json.loads((pause_project.status_dir / "pause.json").read_text())["default"]["paused_since"]
        is None
    )
    print(f"\nthe late process waited {borrowed['waited']:.2f} s, served after poolresume")


def test_a_switchover_under_a_write_load_fails_no_request_and_loses_no_write(
    gunicorn: Server, gunicorn_project: Project, pg: ThrowawayServer, tmp_path: Path
) -> None:
    gunicorn_project.manage("migrate", "--noinput", "-v", "0")
    ((pk,),) = admin_execute(
        "INSERT INTO shop_product (name, price, stock, attributes, updated_at) "
        "VALUES ('switchover', 1, 1000000, '{}', now()) RETURNING id",
        dbname=gunicorn_project.database,
    )
    send(gunicorn.url, 50, tmp_path)  # both workers have a pool
    url = gunicorn.url.replace("/api/health/", f"/api/products/{pk}/buy/")
    stop = tmp_path / "stop-buying"
    buyer = subprocess.Popen(
        [sys.executable, "-c", BUYER, url, str(stop), str(THREADS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        started = time.monotonic()
        paused = gunicorn_project.manage("poolpause", "--wait", "20").stdout
        drained = time.monotonic() - started
        assert not tagged_sessions(gunicorn_project.database)
        pg.restart()  # the switchover: nothing of the pools' is connected meanwhile
        restarted = time.monotonic() - started
        resumed = gunicorn_project.manage("poolresume", "--wait", "10").stdout
        paused_for = time.monotonic() - started
        time.sleep(1.0)
    finally:
        stop.touch()
        out, err = buyer.communicate(timeout=60)
    assert buyer.returncode == 0, err
    load = json.loads(out)

    assert load["failed"] == 0, load["errors"]
    ((stock,),) = admin_execute(
        "SELECT stock FROM shop_product WHERE id = %s", [pk], dbname=gunicorn_project.database
    )
    assert 1000000 - stock == load["bought"]  # every write acknowledged is there, no other
    assert paused.startswith(f"Asked {WORKERS} processes on host {HOSTNAME} to pause ")
    assert "every process is paused, with no connection left" in paused
    assert "every process has resumed" in resumed
    print(
        f"\nswitchover under {THREADS} buying threads: drained in {drained:.2f} s, restarted "
        f"at {restarted:.2f} s, resumed at {paused_for:.2f} s; {load['bought']} buys, "
        f"0 failed, slowest {load['slowest']:.2f} s, stock down by exactly {load['bought']}"
    )
