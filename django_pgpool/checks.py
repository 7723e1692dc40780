"""System checks: the same validation as the ENGINE, reported by ``manage.py check``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.db.utils import load_backend

from .options import option_problems
from .wrapper import PooledWrapperMixin

#: This package's ENGINE values (the first is the one to name in messages).
ENGINES = (
    "django_pgpool",
    "django_pgpool.base",
    "django_pgpool.postgis",
    "django_pgpool.postgis.base",
)


def pooled_engine(engine: object) -> bool:
    """Return True if ``engine`` is pooled: ours, or a backend that wraps ours.

    A wrapping backend (django-tenants' with ORIGINAL_BACKEND, a metrics
    one) has its own ENGINE string; its wrapper class tells.
    """
    if engine in ENGINES:
        return True
    if not isinstance(engine, str) or not engine:
        return False
    try:
        backend = load_backend(engine)
    except Exception:  # not loadable here: Django's own check reports it
        return False
    wrapper = getattr(backend, "DatabaseWrapper", None)
    return isinstance(wrapper, type) and issubclass(wrapper, PooledWrapperMixin)


@register()
def check_pool_options(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Report every invalid pool setting of every database on this ENGINE."""
    errors: list[CheckMessage] = []
    for alias, config in settings.DATABASES.items():
        if not pooled_engine(config.get("ENGINE")):
            continue
        for problem in option_problems(
            alias, config.get("OPTIONS", {}), config.get("CONN_MAX_AGE", 0)
        ):
            errors.append(Error(problem.message, hint=f"Fix {problem.setting}.", id=problem.id))
    return errors
