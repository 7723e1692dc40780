"""tests.script_settings under another name: the workers' ``settings.production`` and
manage.py's default settings module, with the same DATABASES."""

from __future__ import annotations

from tests.script_settings import *  # noqa: F403
