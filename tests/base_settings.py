"""What the suite's settings and the test-runner settings share: the server, the apps
and the shape of a database on the pooled ENGINE.

A module of its own, so that tests/runner/settings.py can use it without the
side effects of tests/settings.py (its private status directory).
"""

from __future__ import annotations

from tests.pgserver import ensure_server

SERVER = ensure_server()

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
