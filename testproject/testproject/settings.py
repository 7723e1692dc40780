"""Settings of testproject: a small shop on the django_pgpool ENGINE.

The database comes from libpq's environment variables:

- ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``: the server;
- ``TESTPROJECT_DATABASE``: the database (default ``testproject``). Not
  ``PGDATABASE``: in this repository that names the server's maintenance
  database (``postgres``), which ``demo.py`` connects to when it creates
  this one;
- ``PGPOOL_MINCONN`` (2), ``PGPOOL_MAXCONN`` (8), ``PGPOOL_TIMEOUT`` (10 s):
  the pool.

``DJANGO_DEBUG=1`` turns DEBUG on; ``DJANGO_SECRET_KEY`` sets the secret key.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "django-insecure-testproject-only-for-loopback"
DEBUG = _env_flag("DJANGO_DEBUG")
ALLOWED_HOSTS = ["*"]  # served on the loopback interface only

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_pgpool",
    "shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "shop.middleware.BackendPidMiddleware",
]

ROOT_URLCONF = "testproject.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "testproject.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django_pgpool",
        "NAME": os.environ.get("TESTPROJECT_DATABASE") or "testproject",
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
        "USER": os.environ.get("PGUSER", ""),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        # The pool keeps the connections: each request borrows one and gives it back.
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "minconn": int(os.environ.get("PGPOOL_MINCONN") or 2),
            "maxconn": int(os.environ.get("PGPOOL_MAXCONN") or 8),
            "timeout": float(os.environ.get("PGPOOL_TIMEOUT") or 10),
        },
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pgpool": {"handlers": ["console"], "level": "WARNING"}},
}
