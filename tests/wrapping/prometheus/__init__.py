"""ENGINE ``tests.wrapping.prometheus``: django-prometheus' PostgreSQL backend, pooled."""
