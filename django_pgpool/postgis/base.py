"""The ENGINE ``django_pgpool.postgis``: GeoDjango's PostGIS backend, pooled.

Built as any pooled backend is: ``PooledWrapperMixin`` first, then the
backend it pools. The PostGIS wrapper's own work (its operations and
introspection, ``CREATE EXTENSION postgis`` when a test database is made)
is unchanged; its psycopg 3 geometry adapters are not needed on psycopg2.
"""

from __future__ import annotations

from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper

from ..wrapper import PooledWrapperMixin

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(PooledWrapperMixin, PostGISDatabaseWrapper):
    """PostGIS through a process-global pool of psycopg2 connections."""
