"""Settings for the test suite: two aliases on the pooled ENGINE against a real server.

The server is the one named by the PG* environment variables, or a throwaway
cluster started from the installed PostgreSQL binaries (tests/pgserver.py).
"""

from __future__ import annotations

import os
import tempfile

from tests.pgserver import ensure_server

SERVER = ensure_server()

SECRET_KEY = "django-pgpool-tests"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django_pgpool",
    "tests.testapp",
]


def database(name: str, **options: object) -> dict[str, object]:
    return {
        "ENGINE": "django_pgpool",
        "NAME": name,
        "USER": SERVER.user,
        "PASSWORD": SERVER.password,
        "HOST": SERVER.host,
        "PORT": SERVER.port,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"minconn": 1, "maxconn": 4, "timeout": 5, **options},
        "TEST": {"NAME": f"test_{name}"},
    }


DATABASES = {
    "default": database("pgpool"),
    "other": database("pgpool_other"),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pgpool": {"handlers": ["console"], "level": "WARNING"}},
}

# A private status directory for this test run (poolstatus across processes).
PGPOOL_STATUS_DIR = os.path.join(tempfile.mkdtemp(prefix="pgpool-status-"), "status")
