"""The optional Prometheus collector, in one process and in multiprocess mode."""

from __future__ import annotations

import os
import time

import pytest
from django.db import connection

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest

from django_pgpool import prometheus, registry, status

pytestmark = pytest.mark.django_db(transaction=True)


def scrape() -> str:
    collectors = CollectorRegistry()
    prometheus.register(collectors)
    return generate_latest(collectors).decode()


def test_metrics_report_this_processes_pools() -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    text = scrape()
    pid = os.getpid()
    labels = f'alias="default",database="test_pgpool",pid="{pid}"'
    assert f'pgpool_connections{{{labels},state="active"}} 1.0' in text
    assert f"pgpool_connections_max{{{labels}}} 4.0" in text
    assert f"pgpool_connections_timeout_total{{{labels}}} 0.0" in text
    bucket = f'alias="default",database="test_pgpool",le="+Inf",pid="{pid}"'
    requests = registry.entries("default")[0].pool.get_stats()["requests_num"]
    assert f"pgpool_connections_acquire_seconds_bucket{{{bucket}}} {float(requests)}" in text


def test_multiprocess_mode_reports_every_process_from_the_snapshots(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    connection.close()
    status.publish()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    deadline = time.monotonic() + 5
    while f'pid="{os.getpid()}"' not in scrape():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert 'pgpool_connections{alias="default"' in scrape()
