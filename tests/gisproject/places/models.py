from __future__ import annotations

from django.contrib.gis.db import models


class Place(models.Model):
    name = models.CharField(max_length=100)
    location = models.PointField(srid=4326)
    area = models.PolygonField(srid=4326, null=True)
