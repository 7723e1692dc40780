"""Demo: testproject's WSGI app under a burst of concurrent requests, on one small pool.

    python testproject/demo.py

Uses the PostgreSQL server named by PGHOST/PGPORT/PGUSER/PGPASSWORD, or starts
a throwaway one (tests/pgserver.py) if PGHOST is not set. Creates the database
(TESTPROJECT_DATABASE, default "testproject") if it is missing, migrates it,
seeds it, serves the app from a threaded WSGI server in this process and sends
it DEMO_REQUESTS (2000) requests from DEMO_CLIENTS (32) client threads. Every
response names, in its X-Backend-Pid header, the PostgreSQL backend that
served it: the burst is served by at most maxconn (PGPOOL_MAXCONN, 8)
connections. Exits 1 if any request failed or the stock does not add up.

DEMO_SUMMARY=FILE also writes the figures to FILE as JSON (for the tests).
"""

from __future__ import annotations

import json
import os
import random
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

PROJECT_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROJECT_DIR.parent
for _path in (PROJECT_DIR, REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PRODUCTS = 100
INITIAL_STOCK = 1_000_000
BUY_SHARE = 0.1  # the rest are GET /api/products/<id>/
HEADER = "X-Backend-Pid"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def header(text: str) -> None:
    print(f"\n== {text}", flush=True)


# --------------------------------------------------------------------------- #
# 1. Database
# --------------------------------------------------------------------------- #


def ensure_database() -> bool:
    """Create settings.DATABASES['default']['NAME'] if it is missing; return True if created.

    Connects to the server's "postgres" maintenance database, outside the pool.
    """
    import psycopg2
    import psycopg2.errors
    from django.conf import settings
    from psycopg2 import sql

    db = settings.DATABASES["default"]
    name = db["NAME"]
    given = {"host": db["HOST"], "port": db["PORT"], "user": db["USER"], "password": db["PASSWORD"]}
    conn = psycopg2.connect(dbname="postgres", **{k: v for k, v in given.items() if v})
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if cursor.fetchone() is not None:
                return False
            try:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg2.errors.DuplicateDatabase:
                return False  # created meanwhile by someone else
    finally:
        conn.close()
    return True


def seed() -> None:
    """Products 1..PRODUCTS with a large stock (idempotent: re-running resets them)."""
    from django.core.management.color import no_style
    from django.db import connection
    from django.utils import timezone
    from shop.models import Product

    now = timezone.now()
    products = [
        Product(
            id=i,
            name=f"Product {i:03d}",
            price=f"{1 + (i * 37) % 200}.{i % 100:02d}",
            stock=INITIAL_STOCK,
            attributes={"colour": ["red", "green", "blue"][i % 3], "size": i % 5},
            updated_at=now,
        )
        for i in range(1, PRODUCTS + 1)
    ]
    Product.objects.bulk_create(
        products,
        update_conflicts=True,
        unique_fields=["id"],
        update_fields=["name", "price", "stock", "attributes", "updated_at"],
    )
    # Explicit ids leave the id sequence behind: move it on, as loaddata does.
    with connection.cursor() as cursor:
        for statement in connection.ops.sequence_reset_sql(no_style(), [Product]):
            cursor.execute(statement)


def total_stock() -> int:
    from django.db.models import Sum
    from shop.models import Product

    total: int = Product.objects.filter(pk__lte=PRODUCTS).aggregate(s=Sum("stock"))["s"]
    return total


# --------------------------------------------------------------------------- #
# 2. Server and clients
# --------------------------------------------------------------------------- #


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server, one daemon thread per request."""

    daemon_threads = True
    request_queue_size = 256  # the default (5) drops connections under a burst


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server:
    """Serve a WSGI app on 127.0.0.1 (a free port) from a background thread."""

    def __init__(self, app: Any) -> None:
        self.httpd = make_server(
            "127.0.0.1", 0, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="wsgi", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


# No proxies: an http_proxy in the environment must not see loopback requests.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Reply:
    status: int  # 0: no HTTP response at all
    body: bytes = b""
    backend_pid: int | None = None
    error: str = ""


def fetch(url: str, method: str = "GET", timeout: float = 30.0) -> Reply:
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _opener.open(request, timeout=timeout) as response:
            pid = response.headers.get(HEADER)
            return Reply(response.status, response.read(), int(pid) if pid else None)
    except urllib.error.HTTPError as exc:
        with exc:
            pid = exc.headers.get(HEADER)
            return Reply(exc.code, exc.read(), int(pid) if pid else None, f"HTTP {exc.code}")
    except OSError as exc:
        return Reply(0, error=f"{type(exc).__name__}: {exc}")


@dataclass
class Burst:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)
    buys: int = 0  # successful buys
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


def run_burst(base_url: str, requests: int, clients: int) -> Burst:
    rng = random.Random(2024)
    plan = [
        ("buy" if rng.random() < BUY_SHARE else "get", rng.randint(1, PRODUCTS))
        for _ in range(requests)
    ]
    lock = threading.Lock()
    burst = Burst(requests=requests)

    def one(kind: str, pk: int) -> None:
        started = time.perf_counter()
        if kind == "buy":
            reply = fetch(f"{base_url}/api/products/{pk}/buy/", method="POST")
        else:
            reply = fetch(f"{base_url}/api/products/{pk}/")
        elapsed_ms = (time.perf_counter() - started) * 1000
        with lock:
            burst.by_kind[kind] += 1
            burst.statuses[reply.status] += 1
            burst.latencies_ms.append(elapsed_ms)
            if reply.backend_pid is not None:
                burst.pids[reply.backend_pid] += 1
            if reply.status == 200 and reply.backend_pid is not None:
                burst.buys += kind == "buy"
            else:
                detail = reply.error or f"HTTP {reply.status}"
                if reply.status and reply.backend_pid is None:
                    detail += f" without {HEADER}"
                burst.errors.append(f"{kind} {pk}: {detail}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="client") as executor:
        for future in [executor.submit(one, kind, pk) for kind, pk in plan]:
            future.result()
    burst.seconds = time.perf_counter() - started
    return burst


def wait_until_returned(timeout: float = 5.0) -> None:
    """Wait for the server's threads to give their connections back.

    A client has its whole response before the server thread closes it, and
    closing it is what returns the connection to the pool.
    """
    from django_pgpool import registry

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(e.pool.get_stats()["pool_in_use"] == 0 for e in registry.entries()):
            return
        time.sleep(0.02)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# --------------------------------------------------------------------------- #
# 3. Pool status
# --------------------------------------------------------------------------- #


def print_pool_status() -> None:
    """`manage.py poolstatus` in this process (the pools live here), or the registry's figures."""
    from django.core.management import call_command, get_commands

    if "poolstatus" in get_commands():
        try:
            call_command("poolstatus")
            return
        except Exception as exc:
            print(f"(poolstatus failed: {type(exc).__name__}: {exc}; the registry's figures:)")
    else:
        print("(no poolstatus command yet; django_pgpool.registry.entries():)")
    from shop.views import pool_figures

    for figures in pool_figures():
        where = ", ".join(f"{k}={v}" for k, v in figures["database"].items())
        print(f"pool of {', '.join(figures['aliases'])} ({where})")
        options = figures["options"]
        print(
            f"  minconn={options['minconn']} maxconn={options['maxconn']} "
            f"timeout={options['timeout']:g}s"
        )
        for key, value in sorted(figures["stats"].items()):
            print(f"  {key:<22} {value}")


# --------------------------------------------------------------------------- #


def main() -> int:
    requests = env_int("DEMO_REQUESTS", 2000)
    clients = env_int("DEMO_CLIENTS", 32)

    header("0. PostgreSQL server")
    if not os.environ.get("PGHOST"):
        from tests.pgserver import ensure_server

        print("PGHOST is not set: starting a throwaway PostgreSQL (removed at exit)")
        ensure_server()  # exports PG* for the settings below
    os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    import django

    django.setup()

    import django_pgpool

    try:
        return demo(requests, clients)
    finally:
        # Before the throwaway server (if any) is stopped at exit.
        django_pgpool.close_pools()


def demo(requests: int, clients: int) -> int:
    from django.conf import settings
    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from django.db import connection, connections
    from shop.views import pool_figures

    db = settings.DATABASES["default"]
    maxconn = db["OPTIONS"]["maxconn"]
    print(
        f"server {db['HOST'] or '(local socket)'}:{db['PORT'] or 5432}, user {db['USER'] or '?'}, "
        f"database {db['NAME']!r}; pool minconn={db['OPTIONS']['minconn']} "
        f"maxconn={maxconn} timeout={db['OPTIONS']['timeout']:g}s"
    )

    header(f"1. Database: create if missing, migrate, seed {PRODUCTS} products")
    started = time.perf_counter()
    created = ensure_database()
    print(f"database {db['NAME']!r} {'created' if created else 'exists'}")
    call_command("migrate", verbosity=0, interactive=False)
    seed()
    stock_before = total_stock()
    version = f"{connection.pg_version // 10000}.{connection.pg_version % 10000}"
    print(f"migrated and seeded in {time.perf_counter() - started:.1f}s (PostgreSQL {version})")
    # The main thread's connection back to the pool: the server gets all of it.
    connections.close_all()

    header(f"2. Burst: {requests} requests from {clients} client threads")
    with Server(get_wsgi_application()) as server:
        print(f"serving testproject on {server.url} (threaded wsgiref, a thread per request)")
        health = fetch(f"{server.url}/api/health/")
        admin = fetch(f"{server.url}/admin/login/")
        if health.status != 200 or admin.status != 200:
            print(f"smoke test failed: /api/health/ {health.status}, /admin/login/ {admin.status}")
            print((health.body or admin.body)[:2000].decode(errors="replace"))
            return 1
        print(
            f"GET /api/health/ 200 (backend pid {json.loads(health.body)['backend_pid']}), "
            "GET /admin/login/ 200"
        )
        burst = run_burst(server.url, requests, clients)
    wait_until_returned()
    stock_after = total_stock()
    connections.close_all()
    sold = stock_before - stock_after

    header("3. Figures")
    failed = len(burst.errors)
    served = burst.requests - failed
    print(
        f"{served} requests served by {plural(len(burst.pids), 'PostgreSQL connection')} "
        f"(maxconn {maxconn}): {plural(failed, 'error')}"
    )
    print(
        f"{burst.requests / burst.seconds:.0f} requests/s over {burst.seconds:.1f}s; "
        f"latency p50 {percentile(burst.latencies_ms, 0.5):.1f} ms, "
        f"p99 {percentile(burst.latencies_ms, 0.99):.1f} ms"
    )
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(burst.by_kind.items()))
    statuses = ", ".join(f"{s or 'no response'}: {n}" for s, n in sorted(burst.statuses.items()))
    print(f"requests: {kinds}; status codes: {statuses}")
    print(
        "requests per backend pid: "
        + ", ".join(f"{pid}: {n}" for pid, n in sorted(burst.pids.items()))
    )
    stock_ok = sold == burst.buys
    print(
        f"stock: {burst.buys} successful buys, stock total down by {sold}"
        + ("" if stock_ok else " (MISMATCH)")
    )
    for error in burst.errors[:10]:
        print(f"  error: {error}")
    if failed > 10:
        print(f"  ... and {failed - 10} more")

    header("4. Pool status (manage.py poolstatus, in this process)")
    print_pool_status()

    summary = {
        "requests": burst.requests,
        "served": served,
        "errors": failed,
        "seconds": round(burst.seconds, 3),
        "requests_per_second": round(burst.requests / burst.seconds, 1),
        "statuses": {str(k): v for k, v in burst.statuses.items()},
        "backend_pids": len(burst.pids),
        "requests_per_pid": {str(k): v for k, v in burst.pids.items()},
        "maxconn": maxconn,
        "buys": burst.buys,
        "stock_sold": sold,
        "pools": pool_figures(),
    }
    if path := os.environ.get("DEMO_SUMMARY"):
        Path(path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    ok = failed == 0 and stock_ok
    print(f"\n{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
