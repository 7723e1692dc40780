"""Tenants, threads and forks on django-tenants over the pooled ENGINE; prints a JSON report.

Run by tests/test_tenants.py as ``python -m tests.tenantsproject.isolation
TENANTS THREADS ROUNDS FORK_EVERY`` on an empty database (``TENANTS_DATABASE``):

1. ``migrate_schemas --shared``, a sentinel row in ``public.notes_note``, then
   TENANTS tenants (``t0``...), each with its schema and a seed row tagged
   with its schema name.
2. THREADS threads, ROUNDS "requests" each, sharing a pool of ``maxconn``
   connections: each request enters ``tenant_context()`` of one tenant
   (round robin), checks what it reads (every row's tag and
   ``current_schema()`` must be that tenant's), writes a row tagged with it
   and checks again; it ends with ``connection.close()`` (back to the pool)
   or, one request in two, goes on to the next tenant on the same connection.
   Every FORK_EVERY-th request forks *inside* the tenant context, right after
   its queries (the wrapper holds a connection with the tenant's
   search_path set, and django-tenants remembers it did so): the child checks
   and writes as the request did, then reports through a pipe.

The report: what was checked and every leak seen (a row of another tenant or
of public, another current_schema), plus the rows each schema must now hold,
for the test to audit on the server.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
import warnings
from collections import Counter
from typing import Any

import django

# Forking a process with threads is what this scenario is about.
warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)


class Tally:
    """What one process (or thread) checked, wrote and saw wrong."""

    def __init__(self) -> None:
        self.queries = 0
        self.leaks: list[str] = []
        self.written: Counter[str] = Counter()

    def merge(self, other: dict[str, Any]) -> None:
        self.queries += other["queries"]
        self.leaks.extend(other["leaks"])
        self.written.update(other["written"])

    def as_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "leaks": self.leaks, "written": dict(self.written)}


def check_and_write(schema: str, writer: str, tally: Tally) -> None:
    """In tenant ``schema``'s context: read, write one row, read again; record every leak."""
    from django.db import connection

    from tests.tenantsproject.notes.models import Note

    for step in ("before", "after"):
        with connection.cursor() as cur:
            cur.execute("SELECT current_schema()")
            current = cur.fetchone()[0]
        tally.queries += 1
        if current != schema:
            tally.leaks.append(f"{writer} {step}: current_schema() is {current!r}, not {schema!r}")
        tags = set(Note.objects.values_list("tag", flat=True))
        tally.queries += 1
        if tags != {schema}:
            tally.leaks.append(f"{writer} {step}: read tags {sorted(tags)} in {schema!r}")
        if step == "before":
            Note.objects.create(tag=schema, writer=writer)
            tally.queries += 1
            tally.written[schema] += 1


def fork_here(schema: str, writer: str, parent: Tally, children: list[dict[str, Any]]) -> None:
    """Fork; the child checks and writes in the tenant context it inherited."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 70
        try:
            os.close(read_end)
            tally = Tally()
            check_and_write(schema, writer, tally)
            from django.db import connection

            connection.close()
            os.write(write_end, json.dumps(tally.as_dict()).encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    if code != 0 or not chunks:
        parent.leaks.append(f"{writer}: child exited with {code}")
        return
    children.append(json.loads(b"".join(chunks)))


def work(
    index: int,
    schemas: list[str],
    *,
    rounds: int,
    fork_every: int,
    tally: Tally,
    children: list[dict[str, Any]],
) -> None:
    from django.db import connection
    from django_tenants.utils import tenant_context

    from tests.tenantsproject.customers.models import Client

    tenants = {client.schema_name: client for client in Client.objects.all()}
    connection.close()
    try:
        for request in range(rounds):
            schema = schemas[(index + request) % len(schemas)]
            writer = f"thread{index}/request{request}"
            with tenant_context(tenants[schema]):
                check_and_write(schema, writer, tally)
                if request % fork_every == fork_every - 1:
                    fork_here(schema, f"{writer}/child", tally, children)
                    check_and_write(schema, f"{writer}/after-fork", tally)
            if request % 2 == 0:
                connection.close()  # the end of a request: back to the pool
    except BaseException:
        tally.leaks.append(f"thread{index}: {traceback.format_exc()}")
    finally:
        connection.close()


def main() -> None:
    tenant_count, thread_count, rounds, fork_every = (int(arg) for arg in sys.argv[1:5])
    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django_tenants.utils import tenant_context

    from tests.tenantsproject.customers.models import Client
    from tests.tenantsproject.notes.models import Note

    call_command("migrate_schemas", shared=True, interactive=False, verbosity=0)
    Note.objects.create(tag="public", writer="sentinel")
    schemas = [f"t{i}" for i in range(tenant_count)]
    for schema in schemas:
        tenant = Client(schema_name=schema, name=schema)
        tenant.save(verbosity=0)
        with tenant_context(tenant):
            Note.objects.create(tag=schema, writer="seed")
    connection.close()

    tallies = [Tally() for _ in range(thread_count)]
    children: list[dict[str, Any]] = []
    threads = [
        threading.Thread(
            target=work,
            args=(i, schemas),
            kwargs={
                "rounds": rounds,
                "fork_every": fork_every,
                "tally": tallies[i],
                "children": children,
            },
        )
        for i in range(thread_count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    total = Tally()
    for tally in tallies:
        total.merge(tally.as_dict())
    for child in children:
        total.merge(child)
    expected = Counter(dict.fromkeys(schemas, 1))  # the seed rows
    expected.update(total.written)
    report = {
        "tenants": tenant_count,
        "threads": thread_count,
        "requests": thread_count * rounds,
        "forks": len(children),
        "queries_checked": total.queries,
        "leaks": total.leaks,
        "expected_rows": dict(expected),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
