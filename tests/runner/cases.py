"""Test cases run by Django's test runner (not by pytest) in test_test_runner.py."""

from __future__ import annotations

from django.db import connections
from django.test import TestCase, TransactionTestCase

from tests.testapp.models import Item


def current_database(alias: str) -> str:
    with connections[alias].cursor() as cur:
        cur.execute("SELECT current_database()")
        name: str = cur.fetchone()[0]
    return name


class OnTheTestDatabase(TestCase):
    databases = {"default", "other"}

    def test_default_is_the_test_database(self) -> None:
        self.assertTrue(current_database("default").startswith("test_pgpool_runner_absent"))
        Item.objects.create(name="a")
        self.assertEqual(Item.objects.count(), 1)

    def test_other_is_its_test_database(self) -> None:
        self.assertTrue(current_database("other").startswith("test_pgpool_runner_other_absent"))
        Item.objects.using("other").create(name="b")
        self.assertEqual(Item.objects.using("other").count(), 1)


class MirrorReadsTheSameDatabase(TransactionTestCase):
    databases = {"default", "replica"}

    def test_replica_mirrors_default(self) -> None:
        self.assertEqual(current_database("replica"), current_database("default"))
        Item.objects.create(name="committed")
        self.assertEqual(Item.objects.using("replica").filter(name="committed").count(), 1)


class Transactional(TransactionTestCase):
    databases = {"default"}

    def test_rows_are_committed_and_flushed(self) -> None:
        Item.objects.create(name="t")
        connections["default"].close()
        self.assertEqual(Item.objects.count(), 1)

    def test_each_test_starts_empty(self) -> None:
        self.assertEqual(Item.objects.count(), 0)


class MoreCases(TestCase):
    def test_json_round_trip(self) -> None:
        item = Item.objects.create(name="j", data={"k": [1, 2]})
        self.assertEqual(Item.objects.get(pk=item.pk).data, {"k": [1, 2]})
