"""End to end: testproject (a Django project on the ENGINE) run in subprocesses.

This process is configured by tests.settings, so testproject runs in child
processes, on a database of its own on the test server, created for this
module and dropped after it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, TESTPROJECT, project_env, run_python, scratch_database
from tests.settings import SERVER

DATABASE = f"testproject_e2e_{os.getpid()}"  # unique: tox envs may share a server
MAXCONN = 4
MARKER = "E2E-RESULT "


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with scratch_database(DATABASE):
        yield DATABASE


@pytest.fixture(scope="module")
def env(database: str) -> dict[str, str]:
    """The environment of testproject's processes: the test server, our database, a small pool."""
    return project_env(database, MAXCONN)


@pytest.fixture(scope="module")
def migrated(env: dict[str, str]) -> dict[str, str]:
    run_python(["testproject/manage.py", "migrate", "--noinput", "-v", "0"], env)
    return env


@pytest.mark.parametrize(
    ("cwd", "manage"),
    [(ROOT, "testproject/manage.py"), (TESTPROJECT, "manage.py")],
    ids=["from-repo-root", "from-testproject"],
)
def test_check(env: dict[str, str], cwd: Path, manage: str) -> None:
    proc = run_python([manage, "check"], env, cwd=cwd)
    assert "System check identified no issues" in proc.stdout


def test_migrations_are_committed(env: dict[str, str]) -> None:
    proc = run_python(["testproject/manage.py", "makemigrations", "--check", "--dry-run"], env)
    assert "No changes detected" in proc.stdout


def test_migrate(migrated: dict[str, str]) -> None:
    proc = run_python(["testproject/manage.py", "showmigrations", "shop", "admin"], migrated)
    assert "[X] 0001_initial" in proc.stdout
    assert "[ ]" not in proc.stdout


VIEWS_SCRIPT = """
import json
from django.test import Client
from shop.models import Product

product = Product.objects.create(name="e2e", price="9.99", stock=2, attributes={"tags": ["a"]})
pk = product.pk
client = Client()
buy = f"/api/products/{pk}/buy/"
results = {}

def record(name, response):
    results[name] = {
        "status": response.status_code,
        "json": response.json() if response["Content-Type"] == "application/json" else None,
        "pid": response.headers.get("X-Backend-Pid"),
    }

record("get", client.get(f"/api/products/{pk}/"))
record("buy1", client.post(buy))
record("buy2", client.post(buy, "{}", content_type="application/json"))
record("buy3", client.post(buy, {"quantity": "1"}))
record("buy_many", client.post(buy, '{"quantity": 5}', content_type="application/json"))
record("buy_bad", client.post(buy, "[1]", content_type="application/json"))
record("buy_get", client.get(buy))
record("missing", client.get("/api/products/999999999/"))
record("buy_missing", client.post("/api/products/999999999/buy/"))
record("health", client.get("/api/health/"))
record("admin", client.get("/admin/login/"))
results["stock"] = Product.objects.get(pk=pk).stock
print("E2E-RESULT " + json.dumps(results))
"""


def _script_result(proc: subprocess.CompletedProcess[str]) -> Any:
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert lines, f"no result line\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return json.loads(lines[-1][len(MARKER) :])


def test_views(migrated: dict[str, str]) -> None:
    proc = run_python(["testproject/manage.py", "shell", "-c", VIEWS_SCRIPT], migrated)
    r = _script_result(proc)

    assert r["get"]["status"] == 200
    assert r["get"]["json"]["name"] == "e2e"
    assert r["get"]["json"]["price"] == "9.99"
    assert r["get"]["json"]["attributes"] == {"tags": ["a"]}
    assert r["get"]["pid"] is not None and int(r["get"]["pid"]) > 0

    assert (r["buy1"]["status"], r["buy1"]["json"]["stock"]) == (200, 1)
    assert (r["buy2"]["status"], r["buy2"]["json"]["stock"]) == (200, 0)
    assert (r["buy3"]["status"], r["buy3"]["json"]["error"]) == (409, "out of stock")
    assert r["buy_many"]["status"] == 409
    assert r["buy_bad"]["status"] == 400
    assert r["buy_get"]["status"] == 405
    assert r["missing"]["status"] == 404
    assert r["buy_missing"]["status"] == 404
    assert r["stock"] == 0

    health = r["health"]
    assert health["status"] == 200
    assert health["pid"] == str(health["json"]["backend_pid"])
    pools = health["json"]["pools"]
    assert len(pools) == 1
    assert pools[0]["aliases"] == ["default"]
    assert pools[0]["database"]["dbname"] == DATABASE
    assert pools[0]["options"]["maxconn"] == MAXCONN
    assert 1 <= pools[0]["stats"]["pool_size"] <= MAXCONN
    assert "password" not in json.dumps(pools)

    assert r["admin"]["status"] == 200


def test_demo_burst(env: dict[str, str], tmp_path: Path) -> None:
    """demo.py, smaller: every request served, by at most maxconn backends, each reused."""
    summary_file = tmp_path / "summary.json"
    demo_env = {
        **env,
        "DEMO_REQUESTS": "300",
        "DEMO_CLIENTS": "16",
        "DEMO_SUMMARY": str(summary_file),
    }
    proc = run_python(["testproject/demo.py"], demo_env)
    summary = json.loads(summary_file.read_text(encoding="utf-8"))

    assert summary["requests"] == 300
    assert summary["errors"] == 0, proc.stdout
    assert summary["served"] == 300
    assert summary["statuses"] == {"200": 300}
    assert summary["maxconn"] == MAXCONN
    assert 1 <= summary["backend_pids"] <= MAXCONN
    assert summary["requests"] > summary["backend_pids"]
    assert sum(summary["requests_per_pid"].values()) == 300
    assert summary["buys"] == summary["stock_sold"] > 0
    (pool,) = summary["pools"]
    assert pool["stats"]["pool_size"] <= MAXCONN
    assert pool["stats"].get("connections_num", 0) <= MAXCONN

    headline = re.search(
        r"^300 requests served by (\d+) PostgreSQL connections? \(maxconn (\d+)\): 0 errors$",
        proc.stdout,
        re.MULTILINE,
    )
    assert headline, proc.stdout
    assert (int(headline[1]), int(headline[2])) == (summary["backend_pids"], MAXCONN)
    assert proc.stdout.rstrip().endswith("OK")
    if SERVER.password:
        assert SERVER.password not in proc.stdout + proc.stderr


def test_poolstatus_command(migrated: dict[str, str]) -> None:
    """INSTALLED_APPS has django_pgpool: its commands run (in a process whose pools are empty)."""
    # A missing command is a failure, not a skip: the app ships it.
    proc = run_python(["testproject/manage.py", "poolstatus"], migrated)
    assert "Pools of the processes on this host" in proc.stdout
    assert f"default  {DATABASE}" in proc.stdout
