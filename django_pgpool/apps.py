from __future__ import annotations

from django.apps import AppConfig


class DjangoPgpoolConfig(AppConfig):
    name = "django_pgpool"
    verbose_name = "django-pgpool"

    def ready(self) -> None:
        # Registers the system checks. Never create pools here: a pool
        # opened before fork (gunicorn --preload) or before the test runner
        # switches NAME would be the wrong one.
        from . import checks  # noqa: F401
