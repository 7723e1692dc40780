"""testproject's settings with the database of one strategy (BENCH_STRATEGY), for gunicorn.

testproject/testproject/settings.py builds DATABASES for django_pgpool from
the environment; every other setting (apps, middleware, URLs) is kept, so
all strategies serve the same app.
"""

from __future__ import annotations

import os

import strategies
from testproject.settings import *  # noqa: F403

DEBUG = False
DATABASES = {"default": strategies.database_settings(os.environ["BENCH_STRATEGY"])}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
