"""The ENGINE ``django_pgpool.postgis``: GeoDjango's PostGIS backend, pooled."""
