"""django-tenants on top of the pooled ENGINE, run in subprocesses by tests/test_tenants.py.

The recipe the docs give: django-tenants' ENGINE, wrapping ours through
``ORIGINAL_BACKEND``. Its database is the one named by ``TENANTS_DATABASE``
(the test makes and drops it); ``PGPOOL_TENANTS_MAXCONN`` sets ``maxconn``.
"""

from __future__ import annotations

import os

from tests.base_settings import database

SECRET_KEY = "django-pgpool-tenants"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

SHARED_APPS = [
    "django_tenants",
    "tests.tenantsproject.customers",
    "django.contrib.contenttypes",
    "django_pgpool",
    # Also shared, so that public has a notes table of its own: a query that
    # lands in public by mistake finds it (and its sentinel row) instead of failing.
    "tests.tenantsproject.notes",
]
TENANT_APPS = [
    "django.contrib.contenttypes",
    "tests.tenantsproject.notes",
]
INSTALLED_APPS = [*SHARED_APPS, *(app for app in TENANT_APPS if app not in SHARED_APPS)]

TENANT_MODEL = "customers.Client"
TENANT_DOMAIN_MODEL = "customers.Domain"
DATABASE_ROUTERS = ["django_tenants.routers.TenantSyncRouter"]
# SET search_path only when django-tenants thinks the session lacks it.
TENANT_LIMIT_SET_CALLS = True

ORIGINAL_BACKEND = "django_pgpool"
DATABASES = {
    "default": {
        **database(os.environ.get("TENANTS_DATABASE", "pgpool_tenants")),
        "ENGINE": "django_tenants.postgresql_backend",
        "OPTIONS": {
            "minconn": 1,
            "maxconn": int(os.environ.get("PGPOOL_TENANTS_MAXCONN", "3")),
            "timeout": 30,
        },
    },
}
