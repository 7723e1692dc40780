"""Settings for the test suite: two aliases on the pooled ENGINE against a real server.

The server is the one named by the PG* environment variables, or a throwaway
cluster started from the installed PostgreSQL binaries (tests/pgserver.py).
"""

from __future__ import annotations

import os
import tempfile

from tests.base_settings import INSTALLED_APPS, SERVER, database

__all__ = ["DATABASES", "INSTALLED_APPS", "SERVER", "database"]

SECRET_KEY = "django-pgpool-tests"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

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
