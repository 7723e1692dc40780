"""A small GeoDjango project on ``"ENGINE": "django_pgpool.postgis"``, run in a subprocess.

Used by tests/test_postgis.py: Django's test runner creates (and with
``--parallel`` clones) its test database, and ``manage.py check`` reads its
pool options. The real database named here does not exist: a query that
reached it instead of the test database would fail the run.
``PGPOOL_GIS_MAXCONN`` sets ``maxconn`` (to try a wrong value).
"""

from __future__ import annotations

import os

from tests.base_settings import database

SECRET_KEY = "django-pgpool-gis"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.gis",
    "django_pgpool",
    "tests.gisproject.places",
]

DATABASES = {
    "default": {
        **database("pgpool_gis_absent"),
        "ENGINE": "django_pgpool.postgis",
        "OPTIONS": {"minconn": 1, "maxconn": int(os.environ.get("PGPOOL_GIS_MAXCONN", "2"))},
    },
}
