"""Turn a run's raw figures into tables, target verdicts, plots and docs/benchmarks.md."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies import BY_KEY, REFERENCE

BENCH_DIR = Path(__file__).resolve().parent
OURS = "pgpool"
LEASES = "pgpoollease"  # django_pgpool with CONN_MAX_AGE=None
FINDINGS = BENCH_DIR / "findings.md"  # hand-written analysis, inserted into the docs page

COLOURS = {
    "nopool": "#9e9e9e",
    "persistent": "#4d4d4d",
    "djangopool": "#4c72b0",
    "dbcp": "#dd8452",
    "pgbouncer": "#8172b3",
    "pgpool": "#2ca02c",
    "pgpoollease": "#98df8a",
}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """One strategy in one workload (one T, or HTTP), over all rounds."""

    strategy: str
    threads: int | None
    rounds: int = 0
    rps: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)  # to the reference, same round
    ours_over: list[float] = field(default_factory=list)  # django_pgpool's rps / this, same round
    lease_over: list[float] = field(default_factory=list)  # the same, for LEASES
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # client CPU µs per request (in-process)
    errors: Counter[str] = field(default_factory=Counter)
    peak_backends: int = 0
    failed_runs: int = 0
    round_trips: float | None = None
    connections_per_request: float | None = None
    statements: dict[str, float] = field(default_factory=dict)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def worst_spike(self) -> float:
        """The largest max/p99 of any round (a stalled request shows here)."""
        return max((m / p for m, p in zip(self.max, self.p99, strict=True) if p), default=0.0)


def _rows(runs: list[dict[str, Any]], threads: int | None) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    by_round: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        if threads is not None and run.get("threads") != threads:
            continue
        key = run["strategy"]
        row = rows.setdefault(key, Row(key, threads))
        if "failed" in run:
            row.failed_runs += 1
            continue
        by_round[run["round"]][key] = run
        row.rounds += 1
        row.rps.append(run["rps"])
        row.p50.append(run["p50_ms"])
        row.p99.append(run["p99_ms"])
        row.max.append(run["max_ms"])
        row.share.append(run["least_served_share"])
        if "cpu_us_per_request" in run:
            row.cpu.append(run["cpu_us_per_request"])
        row.errors.update(run.get("errors", {}))
        row.peak_backends = max(row.peak_backends, run.get("peak_backends", 0))
    for runs_of_round in by_round.values():
        reference = runs_of_round.get(REFERENCE)
        ours = runs_of_round.get(OURS)
        leases = runs_of_round.get(LEASES)
        for key, run in runs_of_round.items():
            if reference is not None and reference["rps"]:
                rows[key].ratio.append(run["rps"] / reference["rps"])
            if ours is not None and run["rps"]:
                rows[key].ours_over.append(ours["rps"] / run["rps"])
            if leases is not None and run["rps"]:
                rows[key].lease_over.append(leases["rps"] / run["rps"])
    return rows


@dataclass
class Verdict:
    target: str
    met: bool | None  # None: not measured in this run
    figures: str


@dataclass
class Summary:
    meta: dict[str, Any]
    order: list[str]
    inprocess: dict[int, dict[str, Row]]
    http: dict[str, Row]
    pool_micro: dict[str, dict[str, Any]]
    django_micro: dict[str, dict[str, Any]]
    verdicts: list[Verdict]


def summarize(results: dict[str, Any]) -> Summary:
    meta = results["meta"]
    order = [key for key in BY_KEY if key in meta["strategies"]]
    threads = sorted({run["threads"] for run in results["inprocess"]})
    inprocess = {t: _rows(results["inprocess"], t) for t in threads}
    round_trips = {r["strategy"]: r for r in results["round_trips"] if "failed" not in r}
    for rows in inprocess.values():
        for key, row in rows.items():
            if key in round_trips:
                row.round_trips = round_trips[key]["round_trips_per_request"]
                row.connections_per_request = round_trips[key]["connections_per_request"]
                row.statements = round_trips[key]["statements_per_request"]
    http = _rows(results["http"], None)
    pool_micro = _micro_over_rounds(results["pool_micro"])
    django_micro = _micro_over_rounds(results["django_micro"])
    summary = Summary(meta, order, inprocess, http, pool_micro, django_micro, [])
    summary.verdicts = _verdicts(summary, round_trips)
    return summary


def _micro_over_rounds(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One microbenchmark result per strategy: each figure's median over the rounds.

    A run measures every strategy once per round; a round's figure is the
    median of its batches (see worker.per_operation).
    """
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if "failed" not in run:
            by_strategy.setdefault(run["strategy"], []).append(run)
    merged: dict[str, dict[str, Any]] = {}
    for key, rounds in by_strategy.items():
        result = merged[key] = dict(rounds[-1])
        if len(rounds) == 1:
            continue  # a run from before the microbenchmarks ran in every round
        for name, value in rounds[-1].items():
            if isinstance(value, dict) and "median_us" in value:
                figures = [r[name] for r in rounds]
                result[name] = {
                    "median_us": _median([f["median_us"] for f in figures]),
                    "min_us": min(f["min_us"] for f in figures),
                    "max_us": max(f["max_us"] for f in figures),
                    "batches": sum(f["batches"] for f in figures),
                    "rounds": len(figures),
                }
    return merged


def _verdicts(summary: Summary, round_trips: dict[str, Any]) -> list[Verdict]:
    verdicts: list[Verdict] = []
    maxconn = summary.meta["plan"]["maxconn"]
    ours = summary.pool_micro.get("pgpool")
    if ours:
        borrow = ours["borrow_return"]["median_us"]
        connect = ours["new_connection"]["median_us"]
        verdicts.append(
            Verdict(
                "borrow + return, no health check: median under 10 µs",
                borrow < 10,
                f"{borrow:.1f} µs",
            )
        )
        verdicts.append(
            Verdict(
                "borrow + return at least 100x cheaper than a new connection",
                connect / borrow >= 100,
                f"{connect / 1000:.2f} ms / {borrow:.1f} µs = {connect / borrow:.0f}x",
            )
        )
    else:
        verdicts.append(Verdict("borrow + return microbenchmarks", None, "not run"))

    t8 = summary.inprocess.get(8, {})
    if "pgpool" in t8 and t8["pgpool"].ratio:
        ratio = _median(t8["pgpool"].ratio)
        verdicts.append(
            Verdict(
                "T=8: throughput at least 0.97 of persistent connections",
                ratio >= 0.97,
                f"median ratio {ratio:.3f} (rounds: "
                + ", ".join(f"{r:.2f}" for r in t8["pgpool"].ratio)
                + ")",
            )
        )
    if "pgpool" in round_trips and REFERENCE in round_trips:
        ours_rt = round_trips["pgpool"]["round_trips_per_request"]
        theirs = round_trips[REFERENCE]["round_trips_per_request"]
        verdicts.append(
            Verdict(
                "no more round trips per request than persistent connections",
                ours_rt <= theirs,
                f"{ours_rt:.2f} vs {theirs:.2f}",
            )
        )

    t32 = summary.inprocess.get(32, {})
    if "pgpool" in t32 and t32["pgpool"].rounds:
        row = t32["pgpool"]
        verdicts.append(
            Verdict(
                f"T=32, maxconn {maxconn}: zero errors",
                row.error_total == 0 and row.failed_runs == 0,
                f"{row.error_total} errors in {row.rounds} rounds"
                + (f", {row.failed_runs} failed runs" if row.failed_runs else ""),
            )
        )
        pools = [k for k in summary.order if BY_KEY[k].bounded_pool and k != OURS]
        # Compared within each round, as the ratio to persistent connections.
        others = {k: _median(t32[k].ours_over) for k in pools if k in t32 and t32[k].ours_over}
        if others:
            verdicts.append(
                Verdict(
                    "T=32: throughput at least that of every other pool",
                    all(v >= 1.0 for v in others.values()),
                    "django_pgpool's req/s over theirs, same round (median): "
                    + ", ".join(f"{BY_KEY[k].label} {v:.2f}" for k, v in others.items()),
                )
            )
        spike = row.worst_spike()
        verdicts.append(
            Verdict(
                "T=32: max latency within 3x of p99 (every round)",
                spike <= 3,
                f"worst round max/p99 = {spike:.2f}; median max {_median(row.max):.1f} ms, "
                f"p99 {_median(row.p99):.1f} ms",
            )
        )
        least = min(row.share)
        verdicts.append(
            Verdict(
                "T=32: the least-served thread gets at least half the mean (every round)",
                least >= 0.5,
                f"worst round {least:.2f}, median {_median(row.share):.2f}",
            )
        )
    peaks = [
        rows["pgpool"].peak_backends for rows in summary.inprocess.values() if "pgpool" in rows
    ]
    http_peak = summary.http["pgpool"].peak_backends if "pgpool" in summary.http else None
    if peaks:
        per_http = 2  # gunicorn workers, each a process with its own pool
        text = f"in-process peak {max(peaks)} (maxconn {maxconn})"
        met = max(peaks) <= maxconn
        if http_peak is not None:
            text += f"; HTTP peak {http_peak} for {per_http} processes (<= {per_http * maxconn})"
            met = met and http_peak <= per_http * maxconn
        verdicts.append(Verdict("peak server backends never above maxconn per process", met, text))
    return verdicts + _lease_verdicts(summary, round_trips)


def _lease_verdicts(summary: Summary, round_trips: dict[str, Any]) -> list[Verdict]:
    """The targets of django_pgpool with CONN_MAX_AGE=None (leases)."""
    verdicts: list[Verdict] = []
    label = BY_KEY[LEASES].label
    for threads in (1, 8):
        row = summary.inprocess.get(threads, {}).get(LEASES)
        if row is not None and row.ratio:
            ratio = _median(row.ratio)
            verdicts.append(
                Verdict(
                    f"{label}, T={threads}: at least 0.98 of persistent connections",
                    ratio >= 0.98,
                    f"median ratio {ratio:.3f} (rounds: "
                    + ", ".join(f"{r:.2f}" for r in row.ratio)
                    + ")",
                )
            )
    if LEASES in round_trips and REFERENCE in round_trips:
        ours_rt = round_trips[LEASES]["round_trips_per_request"]
        theirs = round_trips[REFERENCE]["round_trips_per_request"]
        verdicts.append(
            Verdict(
                f"{label}: the same round trips per request as persistent connections",
                ours_rt <= theirs,
                f"{ours_rt:.2f} vs {theirs:.2f}",
            )
        )
    t32 = summary.inprocess.get(32, {})
    row = t32.get(LEASES)
    if row is not None and row.rounds:
        maxconn = summary.meta["plan"]["maxconn"]
        verdicts.append(
            Verdict(
                f"{label}, T=32, maxconn {maxconn}: zero errors",
                row.error_total == 0 and row.failed_runs == 0,
                f"{row.error_total} errors in {row.rounds} rounds",
            )
        )
        verdicts.append(
            Verdict(
                f"{label}, T=32: the least-served thread gets at least half the mean",
                min(row.share) >= 0.5,
                f"worst round {min(row.share):.2f}, median {_median(row.share):.2f}",
            )
        )
        spike = row.worst_spike()
        verdicts.append(
            Verdict(
                f"{label}, T=32: max latency within 3x of p99 (every round)",
                spike <= 3,
                f"worst round max/p99 = {spike:.2f}",
            )
        )
        pools = [k for k in summary.order if BY_KEY[k].bounded_pool and k != LEASES]
        others = {k: _median(t32[k].lease_over) for k in pools if k in t32 and t32[k].lease_over}
        if others:
            verdicts.append(
                Verdict(
                    f"{label}, T=32: throughput at least that of every other pool",
                    all(v >= 1.0 for v in others.values()),
                    "its req/s over theirs, same round (median): "
                    + ", ".join(f"{BY_KEY[k].label} {v:.2f}" for k, v in others.items()),
                )
            )
    http = summary.http.get(LEASES)
    if http is not None and http.ratio:
        ratio = _median(http.ratio)
        verdicts.append(
            Verdict(
                f"{label}, HTTP (gunicorn): at least 1.0 of persistent connections",
                ratio >= 1.0,
                f"median ratio {ratio:.3f} (rounds: "
                + ", ".join(f"{r:.2f}" for r in http.ratio)
                + ")",
            )
        )
    return verdicts


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #


def _errors_text(row: Row) -> str:
    if row.failed_runs:
        return f"{row.failed_runs} run(s) failed"
    if not row.errors:
        return "0"
    return "; ".join(f"{n} {kind}" for kind, n in row.errors.most_common(3))


def _table(header: list[str], lines: list[list[str]], align: str) -> str:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _row_cells(row: Row, label: str, with_rt: bool) -> list[str]:
    cells = [
        label,
        f"{_median(row.rps):.0f}",
        f"{_median(row.ratio):.2f}" if row.ratio else "-",
        f"{_median(row.p50):.1f}",
        f"{_median(row.p99):.1f}",
        f"{_median(row.max):.1f}",
        f"{_median(row.share):.2f} ({min(row.share):.2f})" if row.share else "-",
        _errors_text(row),
        str(row.peak_backends),
    ]
    if with_rt:
        cells.append(f"{_median(row.cpu):.0f}" if row.cpu else "-")
        cells.append(f"{row.round_trips:.2f}" if row.round_trips is not None else "-")
        cells.append(
            f"{row.connections_per_request:.2f}" if row.connections_per_request is not None else "-"
        )
    return cells


INPROCESS_HEADER = [
    "strategy",
    "req/s",
    "ratio to persistent",
    "p50 ms",
    "p99 ms",
    "max ms",
    "least-served share (worst)",
    "errors",
    "peak backends",
    "client CPU µs / request",
    "round trips / request",
    "new connections / request",
]
HTTP_HEADER = INPROCESS_HEADER[:-3]


def inprocess_table(summary: Summary, threads: int) -> str:
    rows = summary.inprocess[threads]
    lines = [_row_cells(rows[k], BY_KEY[k].label, True) for k in summary.order if k in rows]
    return _table(INPROCESS_HEADER, lines, "l" + "r" * (len(INPROCESS_HEADER) - 1))


def http_table(summary: Summary) -> str:
    lines = [
        _row_cells(summary.http[k], BY_KEY[k].label, False)
        for k in summary.order
        if k in summary.http
    ]
    return _table(HTTP_HEADER, lines, "l" + "r" * (len(HTTP_HEADER) - 1))


def _us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.1f} µs"


def pool_micro_table(summary: Summary) -> str:
    lines = []
    for key in summary.order:
        figures = summary.pool_micro.get(key)
        if not figures:
            continue
        borrow = figures["borrow_return"]["median_us"]
        connect = figures["new_connection"]["median_us"]
        lines.append(
            [
                f"{BY_KEY[key].label}: {figures['library']}",
                _us(borrow),
                f"{_us(figures['borrow_return_checked']['median_us'])} "
                f"({figures['checked_label']})",
                _us(connect),
                f"{connect / borrow:.0f}x",
            ]
        )
    header = [
        "pool library, alone",
        "borrow + return",
        "with a health check",
        "new connection",
        "connection / borrow",
    ]
    return _table(header, lines, "lrrrr")


def django_micro_table(summary: Summary) -> str:
    lines = []
    for key in summary.order:
        figures = summary.django_micro.get(key)
        if not figures:
            continue
        lines.append(
            [
                BY_KEY[key].label,
                _us(figures["ensure_connection_close"]["median_us"]),
                _us(figures["request_cycle"]["median_us"]),
            ]
        )
    header = [
        "strategy",
        "ensure_connection() + close()",
        "request_started + ensure_connection() + request_finished",
    ]
    return _table(header, lines, "lrr")


def versus_table(summary: Summary) -> str:
    """django_pgpool's throughput over each other strategy's, within each round (median)."""
    others = [k for k in summary.order if k != OURS]
    workloads: list[tuple[str, dict[str, Row]]] = [
        (f"in-process T={t}", rows) for t, rows in summary.inprocess.items()
    ]
    if summary.http:
        workloads.append(("HTTP", summary.http))
    lines = [
        [name]
        + [
            f"{_median(rows[k].ours_over):.2f}" if k in rows and rows[k].ours_over else "-"
            for k in others
        ]
        for name, rows in workloads
    ]
    return _table(["workload", *(BY_KEY[k].label for k in others)], lines, "l" + "r" * len(others))


def verdicts_table(summary: Summary) -> str:
    marks = {True: "met", False: "**missed**", None: "not measured"}
    lines = [[v.target, marks[v.met], v.figures] for v in summary.verdicts]
    return _table(["target", "result", "figures"], lines, "lll")


def text_tables(summary: Summary) -> str:
    parts = []
    for threads in summary.inprocess:
        parts += [f"\nIn-process, T={threads}", inprocess_table(summary, threads)]
    if summary.http:
        parts += ["\nHTTP (gunicorn gthread)", http_table(summary)]
    if summary.pool_micro:
        parts += ["\nPool libraries alone", pool_micro_table(summary)]
    if summary.django_micro:
        parts += ["\nDjango level", django_micro_table(summary)]
    parts += ["\ndjango_pgpool's req/s over each strategy's, same round", versus_table(summary)]
    parts += ["\nTargets", verdicts_table(summary)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #


def _grouped_bars(ax: Any, series: list[tuple[str, list[float], str]], width: float) -> None:
    """Bars side by side at each x = 0, 1, ...: one (label, values, colour) per series."""
    middle = (len(series) - 1) / 2
    for m, (label, values, colour) in enumerate(series):
        xs = [x + (m - middle) * width for x in range(len(values))]
        ax.bar(xs, values, width, label=label, color=colour)


def _micro_bars(
    ax: Any,
    figures: dict[str, dict[str, Any]],
    present: list[str],
    series: list[tuple[str, str, str]],
    width: float,
) -> None:
    """Bars of microbenchmark medians: a group per strategy, a bar per (label, field, colour)."""
    _grouped_bars(
        ax,
        [
            (label, [figures[k][field]["median_us"] for k in present], colour)
            for label, field, colour in series
        ],
        width,
    )


def _strategy_ticks(ax: Any, keys: list[str], **style: Any) -> None:
    ax.set_xticks(range(len(keys)), [BY_KEY[k].label for k in keys], fontsize=8, **style)


def plot(summary: Summary, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    threads = list(summary.inprocess)
    keys = summary.order
    width = 0.8 / len(keys)

    def save(fig: Any, name: str, rect: tuple[float, ...] | None = None) -> None:
        fig.tight_layout(rect=rect)
        path = directory / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. In-process throughput and ratio, by T.
    fig, (ax_rps, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, key in enumerate(keys):
        xs, rps, low, high, ratios = [], [], [], [], []
        for j, t in enumerate(threads):
            row = summary.inprocess[t].get(key)
            if not row or not row.rps:
                continue
            xs.append(j + (i - (len(keys) - 1) / 2) * width)
            med = _median(row.rps)
            rps.append(med)
            low.append(med - min(row.rps))
            high.append(max(row.rps) - med)
            ratios.append(_median(row.ratio) if row.ratio else 0.0)
        colour = COLOURS.get(key)
        ax_rps.bar(xs, rps, width, yerr=[low, high], label=BY_KEY[key].label, color=colour)
        ax_ratio.bar(xs, ratios, width, color=colour)
    for ax in (ax_rps, ax_ratio):
        ax.set_xticks(range(len(threads)), [f"T={t}" for t in threads])
        ax.grid(axis="y", alpha=0.3)
    ax_rps.set_ylabel("requests/s (median; bars: min-max of rounds)")
    ax_rps.set_title("In-process: simulated requests per second")
    ax_ratio.axhline(0.97, color="#2ca02c", linestyle="--", linewidth=1)
    ax_ratio.axhline(1.0, color="#4d4d4d", linewidth=0.8)
    ax_ratio.set_ylabel("throughput / persistent (same round, median)")
    ax_ratio.set_title("Ratio to CONN_MAX_AGE=None (dashed: 0.97)")
    # Below the plots: inside, it would hide the T=1 bars.
    fig.legend(*ax_rps.get_legend_handles_labels(), loc="lower center", ncol=len(keys), fontsize=8)
    save(fig, "bench-inprocess.png", rect=(0, 0.07, 1, 1))

    # 2. Latency (p50, p99, max) at each T, log scale.
    fig, axes = plt.subplots(1, len(threads), figsize=(4.2 * len(threads), 4.2), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        rows = summary.inprocess[t]
        present = [k for k in keys if k in rows and rows[k].rps]
        _grouped_bars(
            ax,
            [
                (name, [_median(getattr(rows[k], name)) for k in present], colour)
                for name, colour in (("p50", "#a6cee3"), ("p99", "#1f78b4"), ("max", "#e31a1c"))
            ],
            0.27,
        )
        ax.set_yscale("log")
        _strategy_ticks(ax, present, rotation=35, ha="right")
        ax.set_title(f"Latency, T={t} (ms, log)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save(fig, "bench-latency.png")

    # 3. HTTP.
    if summary.http:
        present = [k for k in keys if k in summary.http and summary.http[k].rps]
        fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.2))
        values = [_median(summary.http[k].rps) for k in present]
        ax_rps.bar(range(len(present)), values, color=[COLOURS[k] for k in present])
        ax_rps.set_title("HTTP: gunicorn gthread, 2 workers x 8 threads: requests/s")
        _grouped_bars(
            ax_lat,
            [
                (name, [_median(getattr(summary.http[k], name)) for k in present], colour)
                for name, colour in (("p50", "#a6cee3"), ("p99", "#1f78b4"))
            ],
            0.4,
        )
        ax_lat.set_title("HTTP latency (ms)")
        ax_lat.legend(fontsize=8)
        for ax in (ax_rps, ax_lat):
            _strategy_ticks(ax, present, rotation=25, ha="right")
            ax.grid(axis="y", alpha=0.3)
        save(fig, "bench-http.png")

    # 4. Microbenchmarks, log scale.
    if summary.django_micro or summary.pool_micro:
        fig, (ax_pool, ax_django) = plt.subplots(1, 2, figsize=(12, 4.2))
        present = [k for k in keys if k in summary.pool_micro]
        _micro_bars(
            ax_pool,
            summary.pool_micro,
            present,
            [
                ("borrow + return", "borrow_return", "#2ca02c"),
                ("with health check", "borrow_return_checked", "#ff7f0e"),
                ("new connection", "new_connection", "#d62728"),
            ],
            0.27,
        )
        ax_pool.axhline(10, color="#2ca02c", linestyle="--", linewidth=1)
        _strategy_ticks(ax_pool, present)
        ax_pool.set_title("Pool library alone (µs, log; dashed: 10 µs)")
        ax_pool.legend(fontsize=8)
        present = [k for k in keys if k in summary.django_micro]
        _micro_bars(
            ax_django,
            summary.django_micro,
            present,
            [
                ("ensure_connection + close", "ensure_connection_close", "#1f78b4"),
                ("empty request cycle", "request_cycle", "#a6cee3"),
            ],
            0.4,
        )
        _strategy_ticks(ax_django, present, rotation=25, ha="right")
        ax_django.set_title("Django level (µs, log)")
        ax_django.legend(fontsize=8)
        for ax in (ax_pool, ax_django):
            ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
        save(fig, "bench-micro.png")
    return written


# --------------------------------------------------------------------------- #
# The docs page
# --------------------------------------------------------------------------- #


def _strategies_list(summary: Summary) -> str:
    return "\n".join(
        f"{n}. **{BY_KEY[k].label}**: {BY_KEY[k].setup}."
        for n, k in enumerate(summary.order, start=1)
    )


def _versions(summary: Summary) -> str:
    seen: dict[str, str] = {}
    for figures in summary.django_micro.values():
        for package, version in figures.get("versions", {}).items():
            seen.setdefault(package, version)
    meta = summary.meta
    parts = [f"PostgreSQL {meta['postgresql']}"]
    if meta.get("pgbouncer"):
        parts.append(meta["pgbouncer"])
    parts += [f"{k} {v}" for k, v in seen.items() if k not in ("driver",)]
    drivers = sorted({f["versions"]["driver"] for f in summary.django_micro.values()})
    parts += drivers
    return ", ".join(parts)


def markdown(summary: Summary) -> str:
    meta = summary.meta
    plan = meta["plan"]
    threads = list(summary.inprocess)
    maxconn = plan["maxconn"]
    lines = [
        "# Benchmarks",
        "",
        "How django_pgpool compares with every other way of reaching PostgreSQL from",
        "Django, measured by `benchmarks/run.py` in one run, on one throwaway PostgreSQL,",
        "with the same Django version, app and workload for every strategy.",
        "",
        "```sh",
        "tox -e bench                  # the full run, about 15 minutes; rewrites this page",
        "tox -e bench -- --quick       # 1 round, fewer requests (doesn't touch the docs)",
        "python benchmarks/run.py --help",
        "```",
        "",
        f"This page was written by the run of {meta['date']} "
        f"on commit {meta.get('commit', 'unknown')} "
        f"({meta['machine']}, Python {meta['python']}, {meta['minutes']:.0f} minutes; "
        f"load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after).",
        f"Versions: {_versions(summary)}.",
        "",
        "## Strategies",
        "",
        _strategies_list(summary),
        "",
        "Each pool may hold at most "
        f"{maxconn} connections per process (PgBouncer: {maxconn} in all).",
        "",
        "## Method",
        "",
        f"- **In-process** (`benchmarks/worker.py inprocess`): T threads (T = "
        f"{', '.join(map(str, threads))}) in one process each do R simulated requests: "
        "Django's `request_started` signal, one primary-key read through the ORM "
        "(`Product.objects.get(pk=...)`), one `UPDATE` in `transaction.atomic()`, "
        f"`request_finished`. R = {plan['requests_per_run']} / T, after "
        f"{plan['warmup_per_thread']} warm-up requests per thread; the threads start "
        f"together (a barrier). With maxconn {maxconn}, T=32 must wait for connections.",
        "- **HTTP**: gunicorn (`-k gthread -w 2 --threads 8`) serving testproject "
        "(`benchmarks/httpsettings.py`: its settings with the strategy's DATABASES), loaded "
        f"from another process (`benchmarks/httpload.py`) by {plan['http_clients']} keep-alive "
        "clients alternating `GET /api/products/<id>/` and `POST /api/products/<id>/buy/` "
        f"for {plan['http_seconds']:g} s after {plan['http_warmup']:g} s of warm-up.",
        "- **Microbenchmarks**: each pool library alone (`getconn()` + `putconn()` with no "
        "query), a new connection (`connect()` + `close()`), and at Django level "
        "`connection.ensure_connection(); connection.close()` and an empty request cycle. "
        "Every call is timed on its own (the clock's ~0.1 µs included), so that a call the "
        "scheduler interrupts is an outlier rather than a share of a batch's mean; each "
        f"round measures {plan['micro_batches']} batches of every strategy, and the figure is "
        "the median over the rounds of each round's median batch (each batch's figure: its "
        "median call).",
        "- **Round trips per request**: each strategy once more (T=8) through "
        "`tests/tcpproxy.TcpProxy`, which counts the client's query messages (`Q`, and "
        "extended-protocol `Sync`); for PgBouncer the proxy sits between Django and "
        "PgBouncer. New connections per request are counted there too.",
        "- **Peak backends**: `pg_stat_activity` (client backends on the benchmark "
        "database) sampled every 20 ms during each measurement.",
        "- **Noise**: the machine has 2 shared cores. Every strategy runs in a process of its "
        "own (Django's pool in a virtual environment with psycopg 3, "
        "django-db-connection-pool in one of its own), strategies are interleaved within "
        f"each of {plan['rounds']} rounds (the order rotates each round), and each figure is "
        "the median over rounds; the ratio to persistent connections is computed within "
        "each round, then the median taken.",
        "- **Columns**: *least-served share* is the number of requests completed by the "
        "least-served thread (HTTP: client) while all were running, divided by the mean "
        "(median over rounds, the worst round in brackets): a starved thread shows here "
        "even when the average looks good. *max* is the slowest single request. "
        "*client CPU µs / request* is the worker process's CPU time (all threads, user + "
        "system) over the measured requests: less disturbed by the machine's other tenants "
        "than requests/s, and what a CPU-bound Python process's throughput follows.",
        "- The database has `timezone = 'UTC'` (as Django's docs advise), so no strategy "
        "needs a `SET` per new connection.",
        "",
        "## Targets",
        "",
        verdicts_table(summary),
        "",
        "django_pgpool's throughput divided by each other strategy's, within each round "
        "(median over rounds; above 1: django_pgpool served more):",
        "",
        versus_table(summary),
        "",
        "## In-process workload",
        "",
        "![in-process throughput](img/bench-inprocess.png)",
        "",
    ]
    for t in threads:
        lines += [f"### T={t}", "", inprocess_table(summary, t), ""]
    statements = (
        {k: row.statements for k, row in summary.inprocess[threads[0]].items() if row.statements}
        if threads
        else {}
    )
    if statements:
        lines += [
            "Statements per request, as counted by the proxy:",
            "",
            _table(
                ["strategy", "statements"],
                [
                    [
                        BY_KEY[k].label,
                        ", ".join(f"{name} {n:.2f}" for name, n in statements[k].items()),
                    ]
                    for k in summary.order
                    if k in statements
                ],
                "ll",
            ),
            "",
        ]
    lines += ["![latency](img/bench-latency.png)", ""]
    if summary.http:
        lines += [
            "## HTTP workload",
            "",
            http_table(summary),
            "",
            "![HTTP](img/bench-http.png)",
            "",
        ]
    if summary.pool_micro or summary.django_micro:
        lines += ["## Microbenchmarks", ""]
        if summary.pool_micro:
            lines += [pool_micro_table(summary), ""]
        if summary.django_micro:
            lines += [django_micro_table(summary), ""]
        lines += ["![microbenchmarks](img/bench-micro.png)", ""]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines)


def write_docs(summary: Summary, docs: Path) -> list[Path]:
    written = plot(summary, docs / "img")
    page = docs / "benchmarks.md"
    page.write_text(markdown(summary), encoding="utf-8")
    return [page, *written]


__all__ = ["Summary", "markdown", "plot", "summarize", "text_tables", "write_docs"]
