"""Settings for a script run in a subprocess by the tests (``python -c``, ``manage.py shell``).

On the server's maintenance database (the test databases are the test run's),
with ``django_pgpool`` left out of INSTALLED_APPS when ``PGPOOL_TEST_WITHOUT_APP``
is set (the missing-app warning).
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS, database

DATABASES = {"default": database("postgres"), "other": database("postgres", maxconn=2)}
if os.environ.get("PGPOOL_TEST_WITHOUT_APP"):
    INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "django_pgpool"]

# The default status directory (tests.settings has a private one).
PGPOOL_STATUS_DIR = None
if os.environ.get("PGPOOL_TEST_EXTRA_DATABASE"):  # other DATABASES than the commands'
    DATABASES["reports"] = database("postgres", maxconn=1)
