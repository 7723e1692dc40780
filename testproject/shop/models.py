from __future__ import annotations

from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.PositiveIntegerField(default=0)
    attributes = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.pk,
            "name": self.name,
            "price": str(self.price),
            "stock": self.stock,
            "attributes": self.attributes,
            "updated_at": self.updated_at.isoformat(),
        }
