"""Test cases run by Django's test runner (not by pytest) in test_postgis.py.

Several classes, so that ``--parallel 2`` gives work to both workers (each
on its own clone of the test database, which must have PostGIS too).
"""

from __future__ import annotations

import io
import json
import os

from django.contrib.gis.db.models.functions import Distance
from django.contrib.gis.geos import Point, Polygon
from django.core.management import call_command
from django.db import connection, connections
from django.test import TestCase, TransactionTestCase

from django_pgpool.wrapper import PooledWrapperMixin
from tests.gisproject.places.models import Place

PARIS = Point(2.3522, 48.8566, srid=4326)
LYON = Point(4.8357, 45.7640, srid=4326)
BERLIN = Point(13.4050, 52.5200, srid=4326)
# Roughly metropolitan France.
FRANCE = Polygon(((-5.0, 42.0), (8.5, 42.0), (8.5, 51.5), (-5.0, 51.5), (-5.0, 42.0)), srid=4326)


def scalar(sql: str) -> object:
    with connection.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


class OnThePooledTestDatabase(TestCase):
    def test_the_connection_is_pooled_and_on_the_test_database(self) -> None:
        self.assertIsInstance(connections["default"], PooledWrapperMixin)
        self.assertEqual(connection.vendor, "postgresql")
        self.assertTrue(connection.ops.postgis)
        name = str(scalar("SELECT current_database()"))
        self.assertTrue(name.startswith("test_pgpool_gis_absent"), name)
        # Borrowed from this process's pool (set by the pool on each connection).
        self.assertEqual(connection.connection.pool_pid, os.getpid())

    def test_the_test_database_has_postgis(self) -> None:
        # Created by the test runner's migrate: CREATE EXTENSION postgis (and
        # copied by --parallel's CREATE DATABASE ... TEMPLATE).
        self.assertEqual(scalar("SELECT count(*) FROM pg_extension WHERE extname = 'postgis'"), 1)
        self.assertTrue(str(scalar("SELECT postgis_lib_version()")).startswith("3."))

    def test_poolstatus_reports_the_postgis_database(self) -> None:
        out = io.StringIO()
        call_command("poolstatus", "--format", "json", stdout=out)
        info = json.loads(out.getvalue())["databases"]["default"]
        self.assertIsNone(info["server"]["error"])
        self.assertEqual(info["server"]["database"], scalar("SELECT current_database()"))
        self.assertEqual(info["config"]["maxconn"], 2)


class GeometryRoundTrip(TestCase):
    def test_a_point_and_a_polygon_come_back_equal(self) -> None:
        place = Place.objects.create(name="Paris", location=PARIS, area=FRANCE)
        again = Place.objects.get(pk=place.pk)
        self.assertEqual(again.location.srid, 4326)
        self.assertTrue(again.location.equals_exact(PARIS, tolerance=1e-9))
        self.assertIsNotNone(again.area)
        assert again.area is not None
        self.assertTrue(again.area.equals(FRANCE))


class SpatialQueries(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        Place.objects.bulk_create(
            [
                Place(name="Paris", location=PARIS),
                Place(name="Lyon", location=LYON),
                Place(name="Berlin", location=BERLIN),
            ]
        )

    def test_within_a_polygon(self) -> None:
        inside = Place.objects.filter(location__within=FRANCE).order_by("name")
        self.assertEqual([place.name for place in inside], ["Lyon", "Paris"])

    def test_ordered_by_geodesic_distance(self) -> None:
        nearest = Place.objects.annotate(d=Distance("location", PARIS)).order_by("d")
        names = [place.name for place in nearest]
        self.assertEqual(names, ["Paris", "Lyon", "Berlin"])
        lyon = nearest.get(name="Lyon")
        self.assertAlmostEqual(lyon.d.km, 392, delta=5)  # Paris-Lyon on the spheroid


class CommittedThroughThePool(TransactionTestCase):
    def test_geometries_are_committed_and_the_session_is_reused(self) -> None:
        Place.objects.create(name="Lyon", location=LYON)
        first = scalar("SELECT pg_backend_pid()")
        connection.close()  # returned to the pool, not closed
        self.assertEqual(scalar("SELECT pg_backend_pid()"), first)
        self.assertEqual(Place.objects.filter(location__within=FRANCE).count(), 1)

    def test_each_test_starts_empty(self) -> None:
        self.assertEqual(Place.objects.count(), 0)
