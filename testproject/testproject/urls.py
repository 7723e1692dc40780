from __future__ import annotations

from django.contrib import admin
from django.urls import path
from shop import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/health/", views.health, name="health"),
    path("api/products/<int:pk>/", views.product_detail, name="product-detail"),
    path("api/products/<int:pk>/buy/", views.product_buy, name="product-buy"),
]
