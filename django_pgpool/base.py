"""The ENGINE ``django_pgpool``: Django's postgresql backend, pooled."""

from __future__ import annotations

from django.db.backends.postgresql.base import DatabaseWrapper as PostgresDatabaseWrapper

from .wrapper import PooledWrapperMixin

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(PooledWrapperMixin, PostgresDatabaseWrapper):
    """PostgreSQL through a process-global pool of psycopg2 connections."""
