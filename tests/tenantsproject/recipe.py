"""django-tenants over the pooled ENGINE, the plain recipe; prints a JSON report.

Run by tests/test_tenants.py as ``python -m tests.tenantsproject.recipe`` on an
empty database (``TENANTS_DATABASE``): shared and tenant migrations through
the pool, then what a request in a tenant's context sees.
"""

from __future__ import annotations

import json

import django


def backend_pid_and_path() -> tuple[int, str]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), current_setting('search_path')")
        pid, path = cur.fetchone()
    return pid, path


def main() -> None:
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, connections
    from django_tenants.utils import schema_context, tenant_context

    from django_pgpool import registry
    from django_pgpool.checks import pooled_engine
    from django_pgpool.wrapper import PooledWrapperMixin
    from tests.tenantsproject.customers.models import Client
    from tests.tenantsproject.notes.models import Note

    call_command("migrate_schemas", shared=True, interactive=False, verbosity=0)
    tenant = Client(schema_name="acme", name="Acme")
    tenant.save(verbosity=0)  # CREATE SCHEMA and the tenant apps' migrations, pooled
    connection.close()
    report: dict[str, object] = {
        "engine_is_pooled": pooled_engine(settings.DATABASES["default"]["ENGINE"]),
        "wrapper_is_pooled": isinstance(connections["default"], PooledWrapperMixin),
    }
    with tenant_context(tenant):
        Note.objects.create(tag="acme", writer="recipe")
        report["first"] = backend_pid_and_path()
        connection.close()  # back to the pool: the next request reuses the session
        report["second"] = backend_pid_and_path()
        report["acme_tags"] = sorted(Note.objects.values_list("tag", flat=True))
    connection.close()
    # The session acme's SET search_path was sent on, as the next borrower
    # gets it (straight from the pool, without django-tenants' own SET).
    (entry,) = registry.entries("default")
    raw = entry.pool.getconn()
    with raw.cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), current_setting('search_path')")
        report["next_borrower"] = cur.fetchone()
    entry.pool.putconn(raw)
    with schema_context("public"):
        report["public"] = backend_pid_and_path()
        report["public_tags"] = sorted(Note.objects.values_list("tag", flat=True))
    connection.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
