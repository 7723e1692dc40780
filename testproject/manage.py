#!/usr/bin/env python
"""Django's command-line utility for testproject.

Works as ``cd testproject && python manage.py ...`` and as
``python testproject/manage.py ...`` from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # testproject/
ROOT = HERE.parent  # the repository: django_pgpool from a checkout, even if not installed

for path in (str(HERE), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
