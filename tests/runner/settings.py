"""Settings for running Django's own test runner on the ENGINE, in a subprocess.

The real databases named here do not exist: any query that reached them
instead of the test databases would fail the run.
"""

from __future__ import annotations

from tests.pgserver import ensure_server

SERVER = ensure_server()

SECRET_KEY = "django-pgpool-runner"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django_pgpool",
    "tests.testapp",
]


def database(name: str, **test: object) -> dict[str, object]:
    return {
        "ENGINE": "django_pgpool",
        "NAME": name,
        "USER": SERVER.user,
        "PASSWORD": SERVER.password,
        "HOST": SERVER.host,
        "PORT": SERVER.port,
        "OPTIONS": {"minconn": 1, "maxconn": 4},
        "TEST": test,
    }


DATABASES = {
    "default": database("pgpool_runner_absent"),
    "replica": database("pgpool_runner_absent", MIRROR="default"),
    "other": database("pgpool_runner_other_absent"),
}
