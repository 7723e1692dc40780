"""PostGIS and GeoDjango's libraries for the tests, installed with apt when missing.

GeoDjango on PostGIS needs two things on the machine: the ``postgis``
extension in the server's own PostgreSQL (Debian package
``postgresql-<major>-postgis-3``, for the major version the test server
runs) and the GDAL and GEOS C libraries that Django loads with
``ctypes.util.find_library("gdal")`` / ``("geos_c")``. On Debian 12 those
are ``libgdal32`` (``libgdal.so.32``) and ``libgeos-c1v5``
(``libgeos_c.so.1``), both dependencies of the PostGIS package, so one
``apt-get install`` gives all three (tests/apt.py: as root only, once).

:func:`require_postgis` is what a test calls: it installs what is missing,
and otherwise skips the test naming the package, except under CI (the
``CI`` environment variable), where the GeoDjango tests must run and a
missing package fails them instead.
"""

from __future__ import annotations

from ctypes.util import find_library

import psycopg2

from tests import apt
from tests.pgserver import ServerInfo

__all__ = ["missing", "postgis_package", "require_postgis"]

LIBRARIES = ("gdal", "geos_c")  # the names Django's GeoDjango looks up


def server_major(server: ServerInfo) -> int:
    conn = psycopg2.connect(**server.connect_kwargs())
    try:
        return int(conn.server_version) // 10000
    finally:
        conn.close()


def postgis_package(server: ServerInfo) -> str:
    """Return the Debian package of PostGIS for the server's PostgreSQL major version."""
    return f"postgresql-{server_major(server)}-postgis-3"


def _extension_available(server: ServerInfo) -> bool:
    conn = psycopg2.connect(**server.connect_kwargs())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'")
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def missing(server: ServerInfo) -> list[str]:
    """Return what GeoDjango on PostGIS lacks here (empty: nothing)."""
    absent = [f"lib{name}" for name in LIBRARIES if find_library(name) is None]
    if not _extension_available(server):
        absent.insert(0, f"the postgis extension on {server.host}:{server.port}")
    return absent


def require_postgis(server: ServerInfo) -> None:
    """Make PostGIS, GDAL and GEOS available (apt-get as root), or skip the test.

    Under CI a test that can't have them fails instead of being skipped.
    """
    package = postgis_package(server)
    try:
        apt.install([package], present=lambda: not missing(server))
    except apt.AptUnavailable as exc:
        apt.unavailable(f"GeoDjango on PostGIS needs Debian's {package}: {exc}")
    if absent := missing(server):
        # Installed, yet still missing: an external server (PGHOST) that the
        # package on this machine doesn't reach, or a library under another name.
        apt.unavailable(f"after apt-get install {package}, still missing: {', '.join(absent)}")
