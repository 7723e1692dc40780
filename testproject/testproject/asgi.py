"""ASGI entry point: ``uvicorn testproject.asgi:application`` (run from testproject/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# testproject/ and the repository root (django_pgpool from a checkout, even if not installed).
for _path in Path(__file__).resolve().parents[1:3]:
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()
