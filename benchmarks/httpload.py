"""A bounded HTTP load on testproject: keep-alive clients for a fixed time; prints one JSON line.

    python benchmarks/httpload.py --port 8000 --clients 32 --warmup 2 --seconds 10

Each client thread holds one keep-alive connection and alternates a read
(GET /api/products/<id>/: one query) and a buy (POST /api/products/<id>/buy/:
SELECT ... FOR UPDATE and UPDATE in a transaction), ids at random. Requests
completed during the warm-up are not counted. Stdlib only (and strategies.py,
beside it); runs on the loopback interface and stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter

from strategies import PRODUCTS


def percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        parser.error("this load generator only targets the loopback interface")

    started = time.monotonic()
    measure_from = started + args.warmup
    measure_until = measure_from + args.seconds
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[Counter[str]] = [Counter() for _ in range(args.clients)]
    body = json.dumps({"quantity": 1}).encode()

    def client(index: int) -> None:
        rng = random.Random(index)
        conn: http.client.HTTPConnection | None = None
        buy = index % 2 == 0
        while True:
            began = time.monotonic()
            if began >= measure_until:
                break
            buy = not buy
            pk = rng.randint(1, PRODUCTS)
            error = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(args.host, args.port, timeout=30)
                if buy:
                    conn.request(
                        "POST",
                        f"/api/products/{pk}/buy/",
                        body=body,
                        headers={"Content-Type": "application/json"},
                    )
                else:
                    conn.request("GET", f"/api/products/{pk}/")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    error = f"HTTP {response.status}"
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                error = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            finished = time.monotonic()
            if measure_from <= finished <= measure_until:
                latencies[index].append(finished - began)
                if error is not None:
                    errors[index][error] += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    ordered = sorted(x for client_latencies in latencies for x in client_latencies)
    error_counts: Counter[str] = sum(errors, Counter())
    failed = sum(error_counts.values())
    served = [len(x) for x in latencies]
    mean_served = statistics.fmean(served) if served else 0.0
    result = {
        "mode": "http",
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": len(ordered),
        "rps": (len(ordered) - failed) / args.seconds,
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "max_ms": (ordered[-1] if ordered else 0.0) * 1000,
        "mean_ms": (statistics.fmean(ordered) if ordered else 0.0) * 1000,
        "least_served_share": min(served) / mean_served if mean_served else 0.0,
        "errors": dict(error_counts),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
