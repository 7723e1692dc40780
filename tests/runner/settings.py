"""Settings for running Django's own test runner on the ENGINE, in a subprocess.

The real databases named here do not exist: any query that reached them
instead of the test databases would fail the run.
"""

from __future__ import annotations

from tests.base_settings import INSTALLED_APPS  # noqa: F401 (a setting here too: the same apps)
from tests.base_settings import database as suite_database

SECRET_KEY = "django-pgpool-runner"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database(name: str, **test: object) -> dict[str, object]:
    """The suite's settings for ``name`` on the test server, with these OPTIONS and TEST."""
    return {**suite_database(name), "OPTIONS": {"minconn": 1, "maxconn": 4}, "TEST": test}


DATABASES = {
    "default": database("pgpool_runner_absent"),
    "replica": database("pgpool_runner_absent", MIRROR="default"),
    "other": database("pgpool_runner_other_absent"),
}
