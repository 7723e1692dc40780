"""System checks: the same validation as the ENGINE, reported by ``manage.py check``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

from .options import option_problems

#: The ENGINE values that select this backend.
ENGINES = ("django_pgpool", "django_pgpool.base")


@register()
def check_pool_options(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Report every invalid pool setting of every database on this ENGINE."""
    errors: list[CheckMessage] = []
    for alias, config in settings.DATABASES.items():
        if config.get("ENGINE") not in ENGINES:
            continue
        for problem in option_problems(
            alias, config.get("OPTIONS", {}), config.get("CONN_MAX_AGE", 0)
        ):
            errors.append(Error(problem.message, hint=f"Fix {problem.setting}.", id=problem.id))
    return errors
