from __future__ import annotations

from django.db import models


class Note(models.Model):
    """A row tagged with the schema it was written for (public holds one sentinel)."""

    tag = models.CharField(max_length=63)
    writer = models.CharField(max_length=100)
