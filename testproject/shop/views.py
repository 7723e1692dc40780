"""The JSON API: read a product, buy one, and a health check with the pool's figures."""

from __future__ import annotations

import json
import os
from typing import Any

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from django_pgpool import registry

from .middleware import HEADER
from .models import Product


def _not_found(pk: int) -> JsonResponse:
    return JsonResponse({"error": f"product {pk} does not exist"}, status=404)


@require_GET
def product_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """One product, read by primary key: one query."""
    try:
        product = Product.objects.get(pk=pk)
    except Product.DoesNotExist:
        return _not_found(pk)
    return JsonResponse(product.as_json())


def _quantity(request: HttpRequest) -> int | None:
    """The quantity of a buy: JSON body {"quantity": n}, a form field or 1; None if invalid."""
    value: Any = 1
    try:
        if request.content_type == "application/json" and request.body:
            value = json.loads(request.body).get("quantity", 1)
        else:
            value = request.POST.get("quantity", 1)
        if isinstance(value, bool | float):
            return None
        quantity = int(value)
    except (ValueError, TypeError, AttributeError):
        return None
    return quantity if quantity >= 1 else None


@csrf_exempt  # a JSON API for scripts, with no session cookies
@require_POST
def product_buy(request: HttpRequest, pk: int) -> JsonResponse:
    """Take ``quantity`` (default 1) from the stock; return the new stock.

    The row is locked (SELECT ... FOR UPDATE) for the transaction, so
    concurrent buyers of one product queue and no sale is lost.
    """
    quantity = _quantity(request)
    if quantity is None:
        return JsonResponse(
            {"error": 'quantity must be an integer >= 1, as JSON {"quantity": n} or a form field'},
            status=400,
        )
    with transaction.atomic():
        product = Product.objects.select_for_update().filter(pk=pk).first()
        if product is None:
            return _not_found(pk)
        if product.stock < quantity:
            return JsonResponse(
                {"error": "out of stock", "id": pk, "stock": product.stock}, status=409
            )
        product.stock -= quantity
        product.save(update_fields=["stock", "updated_at"])
    return JsonResponse({"id": pk, "stock": product.stock})


def pool_figures() -> list[dict[str, Any]]:
    """This process's pools: what they reach (never a password), options and statistics."""
    return [
        {
            "aliases": sorted(entry.aliases),
            "database": entry.database,
            "options": entry.options.as_dict(),
            "stats": entry.pool.get_stats(),
        }
        for entry in registry.entries()
    ]


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """One query; the backend that answered it and this process's pool figures."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend_pid,) = cursor.fetchone()
    response = JsonResponse(
        {
            "status": "ok",
            "process": os.getpid(),
            "backend_pid": backend_pid,
            "pools": pool_figures(),
        }
    )
    response[HEADER] = str(backend_pid)
    return response
