"""testproject under a real gunicorn: --preload, 2 gthread workers, a bounded load.

With ``--preload`` the master imports the app and, here, holds pooled
connections when it forks the workers: one checked out by its main thread
and one idle in its pool (a gunicorn config hook borrows them). Every
worker inherits that pool and those sockets. A worker that used, reset or
closed an inherited connection would answer with another process's session
(wrong or failed responses) or end the master's session; neither may
happen. The workers must serve every request from backends of their own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql

from tests.helpers import (
    admin_connection,
    admin_execute,
    project_env,
    run_python,
    scratch_database,
    start_python,
)

DATABASE = f"gunicorn_e2e_{os.getpid()}"  # unique: tox envs may share a server
WORKERS = 2
THREADS = 4
MAXCONN = 4
REQUESTS = 600
CLIENTS = 16
#: Seconds allowed from starting gunicorn to its exit (startup, load and shutdown).
SERVING_BUDGET = 30.0
HEADER = "X-Backend-Pid"

# The gunicorn config module. when_ready() runs in the master after --preload
# has imported the app and before the workers are forked: it leaves one
# connection checked out by the main thread and one idle in the pool, and
# says where gunicorn listens and which backends the master holds.
GUNICORN_CONFIG = """
import json
import os
import threading

graceful_timeout = 5
control_socket_disable = True  # no control socket file (gunicorn ignores unknown names)


def _backend_pid(connection):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def when_ready(server):
    from django.db import connection

    held = _backend_pid(connection)  # never closed: checked out at fork time
    idle = []

    def borrow_and_return():
        from django.db import connection

        idle.append(_backend_pid(connection))
        connection.close()  # back to the pool: idle at fork time

    thread = threading.Thread(target=borrow_and_return)
    thread.start()
    thread.join()
    port = server.LISTENERS[0].sock.getsockname()[1]
    info = {"master": os.getpid(), "held": held, "idle": idle[0], "port": port}
    path = os.environ["GUNICORN_E2E_INFO"]
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)
"""

# Seeds products 1..demo.PRODUCTS as the demo does, and says how many and their stock.
SEED_SCRIPT = """
import json
import demo
demo.seed()
print("SEEDED " + json.dumps({"products": demo.PRODUCTS, "stock": demo.INITIAL_STOCK}))
"""


def live_backends(pids: list[int]) -> set[int]:
    rows = admin_execute(sql.SQL("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)"), [pids])
    return {row[0] for row in rows}


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """testproject's environment: the test server, its own database, a small pool."""
    return project_env(
        DATABASE,
        MAXCONN,
        status_dir=tmp_path / "pgpool-status",
        GUNICORN_E2E_INFO=str(tmp_path / "master.json"),
    )


@dataclass(frozen=True)
class Shop:
    products: int
    stock: int  # each product's initial stock


@pytest.fixture
def shop(environ: dict[str, str]) -> Iterator[Shop]:
    """A migrated, seeded database for testproject; dropped afterwards."""
    with scratch_database(DATABASE):
        run_python(["testproject/manage.py", "migrate", "--noinput", "-v", "0"], environ)
        out = run_python(["testproject/manage.py", "shell", "-c", SEED_SCRIPT], environ).stdout
        (line,) = [line for line in out.splitlines() if line.startswith("SEEDED ")]
        seeded = json.loads(line.removeprefix("SEEDED "))
        yield Shop(seeded["products"], seeded["stock"])


class Gunicorn:
    """gunicorn serving testproject, started in a process group of its own."""

    def __init__(self, environ: dict[str, str], tmp_path: Path) -> None:
        config = tmp_path / "gunicorn_conf.py"
        config.write_text(GUNICORN_CONFIG, encoding="utf-8")
        self.info_file = Path(environ["GUNICORN_E2E_INFO"])
        self.log_file = tmp_path / "gunicorn.log"
        args = [
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            str(WORKERS),
            "--worker-class",
            "gthread",
            "--threads",
            str(THREADS),
            "--bind",
            "127.0.0.1:0",  # any free port: the config hook says which
            "--config",
            str(config),
            "testproject.wsgi:application",
        ]
        self.proc = start_python(args, environ, self.log_file)

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def master_info(self, timeout: float) -> dict[str, int]:
        """Wait for the config hook's file (written just before the workers fork)."""
        deadline = time.monotonic() + timeout
        while not self.info_file.exists():
            assert self.proc.poll() is None, f"gunicorn exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"gunicorn did not start:\n{self.log()}"
            time.sleep(0.05)
        info: dict[str, int] = json.loads(self.info_file.read_text(encoding="utf-8"))
        return info

    def stop(self, timeout: float) -> int:
        """SIGTERM (graceful shutdown); return the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# No proxies: an http_proxy in the environment must not see loopback requests.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Reply:
    status: int  # 0: no HTTP response at all
    body: Any = None  # the decoded JSON
    backend_pid: int | None = None
    error: str = ""


def fetch(url: str, method: str = "GET", timeout: float = 10.0) -> Reply:
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with _opener.open(request, timeout=timeout) as response:
            pid = response.headers.get(HEADER)
            return Reply(response.status, json.loads(response.read()), int(pid) if pid else None)
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, error=f"HTTP {exc.code}: {exc.read()[:300]!r}")
    except (OSError, ValueError) as exc:
        return Reply(0, error=f"{type(exc).__name__}: {exc}")


def wait_until_serving(base_url: str, gunicorn: Gunicorn, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (reply := fetch(f"{base_url}/api/health/", timeout=2.0)).status != 200:
        assert gunicorn.proc.poll() is None, f"gunicorn exited:\n{gunicorn.log()}"
        assert time.monotonic() < deadline, f"not serving: {reply.error}\n{gunicorn.log()}"
        time.sleep(0.05)


@dataclass
class Load:
    problems: list[str] = field(default_factory=list)  # failed or wrong responses
    backend_pids: set[int] = field(default_factory=set)
    worker_pids: set[int] = field(default_factory=set)
    buys: int = 0
    served: int = 0


def check_reply(kind: str, pk: int, reply: Reply, shop: Shop, load: Load) -> str | None:
    """Record a reply; return what is wrong with it, if anything."""
    if reply.status != 200 or reply.backend_pid is None:
        return reply.error or f"HTTP {reply.status} without {HEADER}"
    load.backend_pids.add(reply.backend_pid)
    body = reply.body
    problem = None
    if kind == "get":
        expected = {"id": pk, "name": f"Product {pk:03d}"}
        if {k: body.get(k) for k in expected} != expected:
            problem = f"asked for product {pk}, got {body}"
    elif kind == "buy":
        stock = body.get("stock")
        if body.get("id") != pk or not isinstance(stock, int) or not 0 <= stock < shop.stock:
            problem = f"bought product {pk}, got {body}"
        else:
            load.buys += 1
    elif body.get("backend_pid") != reply.backend_pid:
        problem = f"health: backend {body.get('backend_pid')}, header {reply.backend_pid}"
    elif not all(p["stats"]["pool_size"] <= MAXCONN for p in body["pools"]):
        problem = f"a worker's pool is over maxconn: {body['pools']}"
    else:
        load.worker_pids.add(body["process"])
    return problem


def run_load(base_url: str, shop: Shop) -> Load:
    """REQUESTS requests from CLIENTS threads: 70 % product reads, 20 % buys, 10 % health."""
    rng = random.Random(2024)
    plan = [
        (rng.choices(["get", "buy", "health"], weights=[7, 2, 1])[0], rng.randint(1, shop.products))
        for _ in range(REQUESTS)
    ]
    load = Load()
    lock = threading.Lock()

    def one(kind: str, pk: int) -> None:
        if kind == "get":
            reply = fetch(f"{base_url}/api/products/{pk}/")
        elif kind == "buy":
            reply = fetch(f"{base_url}/api/products/{pk}/buy/", method="POST")
        else:
            reply = fetch(f"{base_url}/api/health/")
        with lock:
            load.served += 1
            problem = check_reply(kind, pk, reply, shop, load)
            if problem is not None:
                load.problems.append(f"{kind} {pk}: {problem}")

    with ThreadPoolExecutor(max_workers=CLIENTS, thread_name_prefix="client") as executor:
        for future in [executor.submit(one, kind, pk) for kind, pk in plan]:
            future.result()
    return load


def stock_sold(shop: Shop) -> int:
    conn = admin_connection(DATABASE)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT sum(%s - stock) FROM shop_product WHERE id <= %s",
                [shop.stock, shop.products],
            )
            sold: int = cursor.fetchone()[0]
    finally:
        conn.close()
    return sold


def test_preloaded_gunicorn_workers_serve_a_load_without_a_wrong_or_failed_response(
    environ: dict[str, str], shop: Shop, tmp_path: Path
) -> None:
    gunicorn = Gunicorn(environ, tmp_path)
    started = time.monotonic()
    try:
        master = gunicorn.master_info(timeout=SERVING_BUDGET / 2)
        master_backends = [master["held"], master["idle"]]
        base_url = f"http://127.0.0.1:{master['port']}"
        wait_until_serving(base_url, gunicorn, timeout=SERVING_BUDGET / 2)

        load = run_load(base_url, shop)

        assert load.served == REQUESTS
        assert load.problems == [], f"{len(load.problems)} bad responses: {load.problems[:10]}"
        # Only backends the workers opened: none of the master's, at most maxconn per worker.
        assert not load.backend_pids & set(master_backends), (
            f"a worker used the master's connection: {load.backend_pids & set(master_backends)}"
        )
        assert 1 <= len(load.backend_pids) <= WORKERS * MAXCONN, load.backend_pids
        assert master["master"] not in load.worker_pids
        assert len(load.worker_pids) == WORKERS, f"served by workers {load.worker_pids}"
        # The master's sessions survived the workers (none was closed or reset by a child).
        assert live_backends(master_backends) == set(master_backends)
        assert stock_sold(shop) == load.buys > 0

        status = gunicorn.stop(timeout=max(SERVING_BUDGET - (time.monotonic() - started), 1.0))
        assert status == 0, f"gunicorn exited with {status}:\n{gunicorn.log()}"
    finally:
        gunicorn.kill()
    log = gunicorn.log()
    assert "Traceback" not in log, log
    assert time.monotonic() - started < SERVING_BUDGET
