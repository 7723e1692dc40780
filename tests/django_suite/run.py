"""Run Django's own test suite on django_pgpool and on the stock ENGINE, and compare.

Django's sdist ships ``tests/runtests.py`` and the test apps. This script:

1. downloads the sdist of the installed Django version (``pip download``,
   cached under ``.tox/django-sdist/``) and extracts it;
2. makes sure the few extras the chosen apps need are importable (``tblib``,
   so that ``--parallel`` workers can send failures back) and that psycopg 3
   is *not* (Django would then run its postgresql backend on it);
3. writes two settings modules, identical but for the ENGINE of ``default``
   and ``other``: ``django_pgpool`` and ``django.db.backends.postgresql``;
4. runs ``runtests.py`` for each ENGINE, serially and with ``--parallel 2``
   (which clones the test databases and forks workers), each run logged to
   its own file and bounded by a timeout;
5. prints a table of the results and the failures that happen on
   django_pgpool but not on the stock ENGINE.

It exits 0 iff every run completed and ran tests, and no test fails on
django_pgpool but not on the stock ENGINE in either mode, apart from the few
listed in ``EXPECTED_DIFFERENCES`` with the design choice that explains them
(printed as such; ``--strict`` counts them as failures too).

The PostgreSQL server is the one named by the ``PG*`` variables, or a
throwaway cluster started by ``tests/pgserver.py`` for the life of this script::

    python tests/django_suite/run.py                      # all apps, both modes
    python tests/django_suite/run.py --modes serial --apps basic,transactions
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.pgserver import PgServerError, ServerInfo, ensure_server  # noqa: E402

DEFAULT_APPS = (
    "backends",
    "transactions",
    "transaction_hooks",
    "select_for_update",
    "basic",
    # Beyond the five: live servers (threads sharing a connection), time
    # zones, request handlers, test utilities, several databases, and the
    # ORM, migration and schema apps most projects lean on.
    "servers",
    "queries",
    "expressions",
    "timezones",
    "handlers",
    "db_utils",
    "test_utils",
    "model_fields",
    "migrations",
    "schema",
    "introspection",
    "multiple_database",
)
ENGINES = {
    "pgpool": "django_pgpool",
    "stock": "django.db.backends.postgresql",
}
MODES = ("serial", "parallel")
DEFAULT_CACHE = REPO_ROOT / ".tox" / "django-sdist"
DEFAULT_LOGDIR = REPO_ROOT / ".tox" / "django-suite-logs"
DEFAULT_TIMEOUT = 1800.0  # seconds, per runtests.py run
SETTINGS_PREFIX = "django_suite_settings_"
# What the chosen apps import beyond Django and the stdlib (module -> pip requirement).
# tblib: without it a --parallel worker cannot send a failure's traceback back.
EXTRA_REQUIREMENTS = {"tblib": "tblib>=1.5.0"}

# Tests that fail on django_pgpool, and not on the stock ENGINE, because of a
# deliberate design choice: test id (the dotted id, plus the subTest parameters
# when only one subtest is concerned) -> (text its traceback must contain, why).
# Reported, but not a failure unless --strict; a listed test that fails in any
# other way is a failure like any other.
EXPECTED_DIFFERENCES: dict[str, tuple[str, str]] = {}

# unittest's summary of one failed test, e.g. "FAIL: test_x (app.tests.C.test_x)".
_PROBLEM = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (.+?)\s*$")
_RAN = re.compile(r"^Ran (\d+) tests? in ([0-9.]+)s\s*$")
_RESULT = re.compile(r"^(OK|FAILED)(?: \((.*)\))?\s*$")
# Parts of a test id that differ between runs: the subTest() sentinel that a
# --parallel worker pickles into "[<object object at 0x...>]", and addresses.
_SUBTEST_SENTINEL = re.compile(r" \[<object object at 0x[0-9a-f]+>\]")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_DOTTED = re.compile(r"\(([\w.]+)\)")
_SEPARATOR1 = "=" * 70
_SEPARATOR2 = "-" * 70


def log(message: str) -> None:
    print(f"django_suite: {message}", flush=True)


# --------------------------------------------------------------------------- #
# The sdist
# --------------------------------------------------------------------------- #


def installed_django_version() -> str:
    import django

    version: str = django.__version__
    return version


def _find_sdist(cache: Path, version: str) -> Path | None:
    # Recent sdists are django-X.tar.gz (PEP 625), older ones Django-X.tar.gz.
    wanted = f"django-{version}.tar.gz"
    for path in sorted(cache.glob("*.tar.gz")):
        if path.name.lower() == wanted:
            return path
    return None


def download_sdist(cache: Path, version: str) -> Path:
    """Return the sdist of Django ``version`` in ``cache``, downloading it if need be."""
    cache.mkdir(parents=True, exist_ok=True)
    found = _find_sdist(cache, version)
    if found is not None:
        log(f"using the cached sdist {found}")
        return found
    log(f"downloading the sdist of Django {version} into {cache}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"django=={version}",
        "-d",
        str(cache),
    ]
    proc = subprocess.run(
        command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found = _find_sdist(cache, version)
    if proc.returncode != 0 or found is None:
        raise SystemExit(
            f"django_suite: `{' '.join(command)}` failed (exit status {proc.returncode}):\n"
            f"{proc.stdout}"
        )
    return found


def _safe_members(tar: tarfile.TarFile, dest: Path) -> Iterable[tarfile.TarInfo]:
    # For Pythons without tarfile's extraction filters (< 3.11.4).
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not target.is_relative_to(root) or not (member.isfile() or member.isdir()):
            raise SystemExit(f"django_suite: refusing to extract {member.name!r}")
        yield member


def extract_sdist(sdist: Path, version: str) -> Path:
    """Extract ``sdist`` next to itself (once); return its ``tests`` directory."""
    top = sdist.parent / f"django-{version}"
    tests_dir = top / "tests"
    if (tests_dir / "runtests.py").is_file():
        return tests_dir
    log(f"extracting {sdist.name}")
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=sdist.parent))
    try:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:  # pragma: no cover - old 3.11
                tar.extractall(staging, members=_safe_members(tar, staging))
        roots = [p for p in staging.iterdir() if (p / "tests" / "runtests.py").is_file()]
        if len(roots) != 1:
            raise SystemExit(f"django_suite: {sdist} holds no tests/runtests.py")
        if top.exists() and not (tests_dir / "runtests.py").is_file():
            shutil.rmtree(top)  # a half-extracted leftover
        try:
            roots[0].rename(top)
        except OSError:
            if not (tests_dir / "runtests.py").is_file():  # not a concurrent extraction
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tests_dir


# --------------------------------------------------------------------------- #
# The environment
# --------------------------------------------------------------------------- #


def check_environment(install: bool) -> None:
    """Refuse psycopg 3; install what the test apps need and is missing."""
    if importlib.util.find_spec("psycopg") is not None:
        raise SystemExit(
            "django_suite: psycopg (3) is installed: Django's postgresql backend would run on "
            "it, not on psycopg2, and django_pgpool refuses it. Use an environment without it."
        )
    missing = [req for module, req in EXTRA_REQUIREMENTS.items() if not _importable(module)]
    if not missing:
        return
    if not install:
        log(f"not installing the missing {', '.join(missing)} (--no-install)")
        return
    log(f"installing {', '.join(missing)}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *missing],
        check=True,
    )


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    minconn: int
    maxconn: int
    pool_timeout: float
    use_tz: bool


def settings_source(engine: str, server: ServerInfo, config: SuiteConfig) -> str:
    """The settings module for one ENGINE (as Django's tests/test_sqlite.py, on PostgreSQL).

    The password is read from the environment at import time, never written.
    """
    options: dict[str, object] = {}
    if engine == ENGINES["pgpool"]:
        options = {
            "minconn": config.minconn,
            "maxconn": config.maxconn,
            "timeout": config.pool_timeout,
        }
    return textwrap.dedent(
        f'''\
        """Written by tests/django_suite/run.py: Django's test suite on {engine}."""

        import os


        def _database(name):
            return {{
                "ENGINE": {engine!r},
                "NAME": name,
                "HOST": {server.host!r},
                "PORT": {server.port!r},
                "USER": {server.user!r},
                "PASSWORD": os.environ.get("PGPASSWORD", ""),
                "CONN_MAX_AGE": 0,
                "OPTIONS": {options!r},  # a dict of its own for each alias
            }}


        DATABASES = {{
            "default": _database("django_default"),
            "other": _database("django_other"),
        }}

        SECRET_KEY = "django_tests_secret_key"

        # Use a fast hasher to speed up tests.
        PASSWORD_HASHERS = [
            "django.contrib.auth.hashers.MD5PasswordHasher",
        ]

        DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

        USE_TZ = {config.use_tz!r}
        '''
    )


def write_settings(directory: Path, server: ServerInfo, config: SuiteConfig) -> dict[str, str]:
    """Write one settings module per ENGINE into ``directory``; return engine -> module."""
    modules = {}
    for name, engine in ENGINES.items():
        module = SETTINGS_PREFIX + name
        (directory / f"{module}.py").write_text(
            settings_source(engine, server, config), encoding="utf-8"
        )
        modules[name] = module
    return modules


# --------------------------------------------------------------------------- #
# Running and parsing
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class RunResult:
    engine: str
    mode: str
    log_path: Path
    workers: int = 1  # runtests.py --parallel
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    ran: int = 0
    summary: str = ""  # "OK" / "FAILED" / "" (no summary: the run crashed)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: dict[str, str] = dataclasses.field(default_factory=dict)  # test id -> FAIL/ERROR
    tracebacks: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def failures(self) -> int:
        return self.counts.get("failures", 0)

    @property
    def errors(self) -> int:
        return self.counts.get("errors", 0)

    @property
    def skipped(self) -> int:
        return self.counts.get("skipped", 0)

    @property
    def status(self) -> str:
        if self.timed_out:
            return "TIMEOUT"
        if not self.summary:
            return f"CRASHED (exit {self.returncode})"
        return self.summary


def parse_output(text: str, result: RunResult) -> None:
    """Fill ``result`` from unittest's output (the summary and each FAIL/ERROR block)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if match := _RAN.match(line):
            result.ran = int(match.group(1))
        elif (match := _RESULT.match(line)) and index > 0 and not lines[index - 1].strip():
            result.summary = match.group(1)
            result.counts = {}
            for part in (match.group(2) or "").split(","):
                key, sep, value = part.strip().rpartition("=")
                if sep and value.isdigit():
                    result.counts[key] = int(value)
        elif (match := _PROBLEM.match(line)) and index > 0 and lines[index - 1] == _SEPARATOR1:
            kind, test_id = match.groups()
            test_id = _ADDRESS.sub(" at 0x...", _SUBTEST_SENTINEL.sub("", test_id))
            result.problems[test_id] = kind
            block = []
            for following in lines[index + 1 :]:
                if following == _SEPARATOR1 or _RAN.match(following):
                    break
                block.append(following)
            while block and block[-1] in ("", _SEPARATOR2):
                block.pop()
            if block and block[0] == _SEPARATOR2:
                block.pop(0)
            # A test can fail twice (in the test, then in its tear-down).
            previous = result.tracebacks.get(test_id)
            text = "\n".join(block)
            result.tracebacks[test_id] = f"{previous}\n\n{text}" if previous else text


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read it: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` and the workers it forked (its own process group)."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_suite(
    *,
    tests_dir: Path,
    settings_dir: Path,
    module: str,
    engine: str,
    mode: str,
    apps: Sequence[str],
    workers: int,
    verbosity: int,
    timeout: float,
    log_path: Path,
) -> RunResult:
    parallel = "1" if mode == "serial" else str(workers)
    command = [
        sys.executable,
        "runtests.py",
        f"--settings={module}",
        "--noinput",
        f"--verbosity={verbosity}",
        f"--parallel={parallel}",
        "--timing",
        *apps,
    ]
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["PYTHONUNBUFFERED"] = "1"
    # runtests.py puts its own directory first on sys.path; the settings and
    # (unless it is installed) django_pgpool come from here.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(settings_dir), env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p
    )
    result = RunResult(engine=engine, mode=mode, log_path=log_path, workers=int(parallel))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{engine} / {mode}: {' '.join(command[1:])}")
    started = time.monotonic()
    with log_path.open("wb") as out:
        out.write(f"# cwd: {tests_dir}\n# {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command,
            cwd=tests_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout stops the workers too
        )
        try:
            result.returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            _stop_group(proc)
            result.returncode = proc.returncode
        except BaseException:
            _stop_group(proc)
            raise
    result.seconds = time.monotonic() - started
    parse_output(log_path.read_text(encoding="utf-8", errors="replace"), result)
    log(
        f"{engine} / {mode}: {result.status}, {result.ran} tests, "
        f"{result.seconds:.1f} s (log: {log_path})"
    )
    return result


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def new_problems(results: Sequence[RunResult], mode: str) -> dict[str, str] | None:
    """Problems on pgpool that stock doesn't also show in ``mode`` (None: pgpool not run)."""
    by_engine = {r.engine: r for r in results if r.mode == mode}
    pgpool = by_engine.get("pgpool")
    if pgpool is None:
        return None
    stock = by_engine.get("stock")
    baseline = set(stock.problems) if stock is not None else set()
    return {t: kind for t, kind in pgpool.problems.items() if t not in baseline}


def expected_reason(test_id: str, traceback: str) -> str | None:
    """Why ``test_id`` fails on django_pgpool by design, or None if it shouldn't fail."""
    match = _DOTTED.search(test_id)
    if match is None:
        return None
    dotted, params = match.group(1), test_id[match.end() :].strip()
    entry = EXPECTED_DIFFERENCES.get(f"{dotted} {params}" if params else dotted)
    if entry is None:
        entry = EXPECTED_DIFFERENCES.get(dotted)
    if entry is None or entry[0] not in traceback:
        return None
    return entry[1]


def report(
    results: Sequence[RunResult], modes: Sequence[str], show_tracebacks: bool, strict: bool
) -> bool:
    """Print the comparison; return True if it passes."""
    header = ("mode", "engine", "status", "ran", "failures", "errors", "skipped", "time")
    rows = [
        (
            r.mode if r.workers == 1 else f"{r.mode} {r.workers}",
            r.engine,
            r.status,
            str(r.ran),
            str(r.failures),
            str(r.errors),
            str(r.skipped),
            f"{r.seconds:.1f} s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    for r in results:
        print(f"log {r.engine} / {r.mode}: {r.log_path}")
    print(f"total: {sum(r.seconds for r in results):.1f} s")
    print()

    ok = True
    for r in results:
        if r.ran == 0 or r.timed_out or not r.summary:
            ok = False  # no complete run, no comparison
            print(f"{r.engine} / {r.mode}: {r.status}, {r.ran} tests; the end of {r.log_path}:")
            print(textwrap.indent(_tail(r.log_path, 30), "    | "))
    for mode in modes:
        problems = new_problems(results, mode)
        if problems is None:
            continue
        if any(r.mode == mode and (r.timed_out or not r.summary) for r in results):
            print(f"{mode}: no comparison, a run did not complete")
            continue
        stock_ran = any(r.engine == "stock" and r.mode == mode for r in results)
        where = "" if stock_ran else " (the stock ENGINE was not run)"
        pgpool = next(r for r in results if r.engine == "pgpool" and r.mode == mode)
        reasons = {
            t: reason
            for t in problems
            if not strict and (reason := expected_reason(t, pgpool.tracebacks.get(t, "")))
        }
        unexpected = {t: k for t, k in problems.items() if t not in reasons}
        if reasons:
            print(f"{mode}: {len(reasons)} known, by-design difference(s) on django_pgpool:")
            for test_id, reason in sorted(reasons.items()):
                print(f"  {problems[test_id]}: {test_id}\n    known: {reason}")
        if not unexpected:
            print(f"{mode}: no other failure on django_pgpool than on the stock ENGINE{where}")
            continue
        ok = False
        print(f"{mode}: {len(unexpected)} failure(s) on django_pgpool only{where}:")
        for test_id, kind in sorted(unexpected.items()):
            print(f"  {kind}: {test_id}")
            if show_tracebacks:
                print(textwrap.indent(pgpool.tracebacks.get(test_id, "(no traceback)"), "    | "))
    print()
    print("django_suite: " + ("PASSED" if ok else "FAILED"))
    return ok


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def _csv(choices: Sequence[str] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item for item in re.split(r"[,\s]+", text) if item]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if choices is not None:
            bad = [item for item in items if item not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(bad)} (choose from {', '.join(choices)})"
                )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Run Django's test suite on django_pgpool and on the stock postgresql "
        "ENGINE; fail if django_pgpool shows a failure the stock ENGINE doesn't.",
    )
    parser.add_argument(
        "--apps",
        type=_csv(None),
        default=list(DEFAULT_APPS),
        help=f"test labels, comma-separated (default: {','.join(DEFAULT_APPS)})",
    )
    parser.add_argument(
        "--modes",
        type=_csv(MODES),
        default=list(MODES),
        help="serial (--parallel 1) and/or parallel (--parallel WORKERS); default: both",
    )
    parser.add_argument(
        "--engines",
        type=_csv(tuple(ENGINES)),
        default=list(ENGINES),
        help="pgpool (django_pgpool) and/or stock (django.db.backends.postgresql); default: both",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers in parallel mode (2)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where the sdist is downloaded and extracted (default: {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--logdir",
        type=Path,
        default=DEFAULT_LOGDIR,
        help=f"where each run's output goes (default: {DEFAULT_LOGDIR})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per runtests.py run (default: {DEFAULT_TIMEOUT:.0f})",
    )
    parser.add_argument("--verbosity", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--minconn", type=int, default=1, help="django_pgpool minconn (1)")
    parser.add_argument("--maxconn", type=int, default=8, help="django_pgpool maxconn (8)")
    parser.add_argument(
        "--pool-timeout", type=float, default=30.0, help="django_pgpool timeout (30)"
    )
    parser.add_argument(
        "--use-tz",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="USE_TZ in the settings (default: off, as Django's tests/test_sqlite.py)",
    )
    parser.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="don't pip install the missing test requirements (tblib)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="count the known, by-design differences (EXPECTED_DIFFERENCES) as failures too",
    )
    parser.add_argument(
        "--no-tracebacks",
        dest="tracebacks",
        action="store_false",
        help="don't print the tracebacks of the new failures",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 2 and "parallel" in args.modes:
        raise SystemExit("django_suite: --workers must be >= 2 for the parallel mode")
    check_environment(args.install)
    version = installed_django_version()
    cache = args.cache.resolve()
    tests_dir = extract_sdist(download_sdist(cache, version), version)
    log(f"Django {version}; runtests.py in {tests_dir}")

    try:
        server = ensure_server()
    except PgServerError as exc:
        raise SystemExit(f"django_suite: no PostgreSQL server: {exc}") from exc
    log(f"PostgreSQL at {server.host}:{server.port} as {server.user}")
    config = SuiteConfig(
        minconn=args.minconn,
        maxconn=args.maxconn,
        pool_timeout=args.pool_timeout,
        use_tz=args.use_tz,
    )

    results: list[RunResult] = []
    logdir = args.logdir.resolve()
    with tempfile.TemporaryDirectory(prefix="django-suite-") as tmp:
        settings_dir = Path(tmp)
        modules = write_settings(settings_dir, server, config)
        for mode in (m for m in MODES if m in args.modes):
            for engine in (e for e in ENGINES if e in args.engines):
                result = run_suite(
                    tests_dir=tests_dir,
                    settings_dir=settings_dir,
                    module=modules[engine],
                    engine=engine,
                    mode=mode,
                    apps=args.apps,
                    workers=args.workers,
                    verbosity=args.verbosity,
                    timeout=args.timeout,
                    log_path=logdir / f"{engine}-{mode}.log",
                )
                results.append(result)
    modes = [m for m in MODES if m in args.modes]
    return 0 if report(results, modes, args.tracebacks, args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
