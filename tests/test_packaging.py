"""The package as a user gets it: built, installed from its wheel, used by a new project.

``python -m build`` makes the sdist and, from it, the wheel, as a release does.
The wheel is installed in a fresh virtual environment (with Django and
psycopg2-binary at the versions this test run uses, from the package index or
pip's cache), where ``django-admin startproject`` makes a project configured
exactly as the README's install section says, on a database of its own on the
test server. That project is migrated, serves real HTTP requests from
``runserver`` through the pool, and answers ``manage.py poolstatus`` and
``poolclose``. Nothing from this checkout is on that project's path: a module
missing from the wheel fails here.

The sdist ships no tests (see MANIFEST.in): the suite runs from a checkout.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from tests import apt
from tests.helpers import ROOT, scratch_database
from tests.pgserver import free_port
from tests.settings import SERVER

REPOSITORY = "https://github.com/django-pgpool/django-pgpool"
README = ROOT / "README.md"
DATABASE = f"packaging_e2e_{os.getpid()}"  # unique: tox envs may share a server
#: Seconds allowed for a build, an install, a manage.py command.
STEP_TIMEOUT = 180
#: What pip or build print when the package index can't be reached: building is
#: impossible here (no network), which skips the tests that need it, saying so
#: (fails them under CI: tests/apt.py unavailable()).
NO_INDEX = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution"
    r"|Name or service not known|Network is unreachable|ProxyError|ConnectTimeoutError"
)
#: What a checkout may hold that is no source of the distributions.
BUILD_LEFTOVERS = (
    ".git",
    ".venv",
    ".tox",
    "*.egg-info",
    "build",
    "dist",
    "site",
    "__pycache__",
    "*.pyc",
    ".*_cache",
    ".hypothesis",
    ".bench",
    ".cache",
)
#: The settings a README user fills in for their own server.
CONNECTION_KEYS = {"NAME", "USER", "PASSWORD", "HOST", "PORT"}

# A view that touches the database and says where it ran: which database,
# which backend, with which application_name (the pool's tag), which ENGINE
# class and from which file django_pgpool was imported.
VIEWS = """
import django_pgpool
from django.contrib.auth.models import User
from django.db import connection, connections
from django.http import JsonResponse


def dbcheck(request):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_database(), pg_backend_pid(), current_setting('application_name')"
        )
        database, backend_pid, application_name = cursor.fetchone()
    return JsonResponse(
        {
            "database": database,
            "backend_pid": backend_pid,
            "application_name": application_name,
            "users": User.objects.count(),
            "wrapper": type(connections["default"]).__module__,
            "django_pgpool": django_pgpool.__file__,
        }
    )
"""


def run(
    args: Sequence[str | Path], env: Mapping[str, str], cwd: Path, what: str
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; skip (fail under CI) if it failed for want of the
    package index, else assert it exited 0."""
    proc = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    if proc.returncode != 0 and NO_INDEX.search(proc.stdout + proc.stderr):
        apt.unavailable(f"{what} is impossible here: the package index can't be reached\n{output}")
    command = " ".join(map(str, args))
    assert proc.returncode == 0, f"{what}: {command} exited {proc.returncode}\n{output}"
    return proc


def sorted_files(names: Sequence[str], prefix: str) -> list[str]:
    """The files (not directories) among ``names`` under ``prefix``, without the prefix."""
    return sorted(name.removeprefix(prefix) for name in names if name.startswith(prefix))


def package_sources() -> list[str]:
    """Every file of the package in this checkout, as the distributions should name them."""
    package = ROOT / "django_pgpool"
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


# -- the README ------------------------------------------------------------------------


def readme_settings() -> tuple[list[str], dict[str, Any]]:
    """The apps and the database settings of the README's install section.

    That is the first ``python`` block that sets an ENGINE of django_pgpool;
    ``[..., "django_pgpool"]`` is Python (an Ellipsis), read as "add these apps".
    """
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    block = next((b for b in blocks if '"ENGINE": "django_pgpool"' in b), None)
    assert block is not None, "README.md has no python block with the django_pgpool ENGINE"
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    apps = [app for app in namespace["INSTALLED_APPS"] if app is not Ellipsis]
    return apps, namespace["DATABASES"]["default"]


def test_readme_install_section_names_the_engine_the_pool_and_the_app() -> None:
    apps, database = readme_settings()
    assert apps == ["django_pgpool"]
    assert database["ENGINE"] == "django_pgpool"
    assert {"minconn", "maxconn"} <= set(database["OPTIONS"])
    text = README.read_text(encoding="utf-8")
    assert "pip install django-pgpool" in text
    for extra in ("opentelemetry", "test"):
        assert f"django-pgpool[{extra}]" in text


def test_readme_links_are_absolute_as_the_package_index_needs() -> None:
    """The README is the long description on the package index, where a relative
    link (docs/configuration.md) leads nowhere."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, re.M)
    assert targets, "README.md has no links: has the pattern gone stale?"
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, f"README.md links that break on the package index: {relative}"
    for target in targets:
        if target.startswith(REPOSITORY + "/blob/main/"):
            path = target.removeprefix(REPOSITORY + "/blob/main/").split("#")[0]
            assert (ROOT / path).is_file(), f"README.md links to {target}: no {path} here"


# -- the distributions -----------------------------------------------------------------


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist and the wheel built from it, by ``python -m build`` as a release does."""
    # From a copy without build leftovers: setuptools reads an existing
    # *.egg-info/SOURCES.txt into the sdist, which would hide a file the
    # configuration no longer includes (and the build would write into the checkout).
    source = tmp_path_factory.mktemp("source") / "django-pgpool"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([sys.executable, "-m", "build", "--outdir", out, source], env, source, "building")
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


def test_wheel_has_every_module_the_license_and_no_tests(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = wheel.namelist()
        (dist_info,) = {name.split("/")[0] for name in names if ".dist-info/" in name}
        license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert license_text == (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in license_text
    assert sorted_files(names, "django_pgpool/") == [
        name.removeprefix("django_pgpool/") for name in package_sources()
    ]
    assert {name.split("/")[0] for name in names} == {"django_pgpool", dist_info}


def test_sdist_has_the_package_the_license_and_no_tests(dists: Dists) -> None:
    """No test tree at all rather than tests/test_*.py without what they import."""
    with tarfile.open(dists.sdist) as sdist:
        names = [member.name for member in sdist.getmembers() if member.isfile()]
        (top,) = {name.split("/")[0] for name in names}
        license_file = sdist.extractfile(f"{top}/LICENSE")
        assert license_file is not None
        license_text = license_file.read().decode()
    assert license_text == (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert sorted_files(names, f"{top}/django_pgpool/") == [
        name.removeprefix("django_pgpool/") for name in package_sources()
    ]
    assert not [name for name in names if "/tests/" in name or name.endswith("/conftest.py")]
    assert {name.split("/")[1] for name in names} == {
        "LICENSE",
        "MANIFEST.in",
        "PKG-INFO",
        "README.md",
        "django_pgpool",
        "django_pgpool.egg-info",
        "pyproject.toml",
        "setup.cfg",
    }


def tox_versions() -> tuple[set[str], set[str]]:
    """The Python and Django versions tox tests (its env_list and its django factors)."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini", encoding="utf-8")
    envs = tox["tox"]["env_list"].split()
    pythons = {f"{m[1]}.{m[2]}" for e in envs if (m := re.match(r"py(\d)(\d+)-", e))}
    djangos = {f"{m[1]}.{m[2]}" for e in envs if (m := re.search(r"-django(\d)(\d)$", e))}
    return pythons, djangos


def test_metadata_says_license_urls_and_what_ci_tests(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier") or []
    assert not [c for c in classifiers if c.startswith("License ::")], (
        "a License classifier beside a license expression"
    )
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert set(urls) == {"Homepage", "Documentation", "Source", "Changelog", "Issues"}
    assert all(url.startswith(REPOSITORY) for url in urls.values())
    pythons, djangos = tox_versions()
    assert pythons and djangos, "tox.ini's env_list no longer reads as pyXY-djangoXY"
    assert {
        c.removeprefix("Programming Language :: Python :: ")
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    } == pythons
    assert {
        c.removeprefix("Framework :: Django :: ")
        for c in classifiers
        if c.startswith("Framework :: Django :: ")
    } == djangos
    minimum = min(pythons, key=lambda v: tuple(map(int, v.split("."))))
    assert metadata["Requires-Python"] == f">={minimum}"
    assert {"test", "opentelemetry"} <= set(metadata.get_all("Provides-Extra") or [])
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload() == README.read_text(encoding="utf-8")


# -- a new project on the installed wheel -----------------------------------------------


@dataclass(frozen=True)
class Project:
    root: Path  # where manage.py is
    python: Path  # the fresh virtual environment's interpreter
    site_packages: Path
    env: dict[str, str]

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``manage.py *args`` in the fresh environment; assert it exits 0."""
        return run([self.python, "manage.py", *args], self.env, self.root, f"manage.py {args}")


def test_the_declared_setuptools_floor_builds_without_build_isolation(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``license = "MIT"`` (a license expression) needs setuptools 77: a floor below it
    let ``pip wheel --no-build-isolation`` fail on a machine with an older one."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'requires = \["setuptools>=(\d+)"\]', pyproject)
    assert floor, "pyproject.toml's build requires no longer reads setuptools>=N"
    top = tmp_path_factory.mktemp("floor")
    source = top / "django-pgpool"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    run([sys.executable, "-m", "venv", top / "venv"], env, top, "creating a virtual environment")
    python = top / "venv" / "bin" / "python"
    oldest = f"setuptools=={floor[1]}.*"  # the oldest release the floor admits
    run([python, "-m", "pip", "install", "--quiet", oldest], env, top, f"installing {oldest}")
    build = [python, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps"]
    run([*build, "--wheel-dir", top / "out", source], env, top, f"building with {oldest}")
    (wheel,) = (top / "out").glob("django_pgpool-*.whl")
    with zipfile.ZipFile(wheel) as built:
        (metadata_name,) = [n for n in built.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(built.read(metadata_name).decode())
    assert metadata["License-Expression"] == "MIT"


def pinned(distribution: str) -> str:
    """``name==version`` as installed in this test run, so the fresh environment runs the
    same Django as this tox env (and pip finds it in its cache); else just the name."""
    try:
        return f"{distribution}=={version(distribution)}"
    except PackageNotFoundError:
        return distribution


def settings_addition(apps: list[str], readme_database: dict[str, Any]) -> str:
    """What the project's settings.py gets: the README's settings, the server from PG*."""
    options = {k: v for k, v in readme_database.items() if k not in CONNECTION_KEYS}
    return f"""

# django-pgpool, as its README's install section says (tests/test_packaging.py);
# the server from the PG* environment variables of the test run.
import os  # noqa: E402

INSTALLED_APPS += {apps!r}
DATABASES = {{
    "default": {{
        **{options!r},
        "NAME": {DATABASE!r},
        "USER": os.environ["PGUSER"],
        "PASSWORD": os.environ["PGPASSWORD"],
        "HOST": os.environ["PGHOST"],
        "PORT": os.environ["PGPORT"],
    }}
}}
"""


@pytest.fixture(scope="module")
def project(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """A fresh venv with the wheel, a new project configured as the README says, migrated."""
    top = tmp_path_factory.mktemp("packaging")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE"}
        and not key.startswith("PG")
    }
    venv = top / "venv"
    env.update(SERVER.env())
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        DJANGO_PGPOOL_STATUS_DIR=str(top / "pgpool-status"),
    )
    run([sys.executable, "-m", "venv", venv], env, top, "creating a virtual environment")
    python = venv / "bin" / "python"
    install = [python, "-m", "pip", "install", "--quiet", dists.wheel]
    run([*install, pinned("Django"), pinned("psycopg2-binary")], env, top, "installing the wheel")
    site_packages = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            env,
            top,
            "sysconfig",
        ).stdout.strip()
    )
    root = top / "mysite"
    root.mkdir()
    run([venv / "bin" / "django-admin", "startproject", "mysite", root], env, top, "startproject")
    apps, readme_database = readme_settings()
    settings = root / "mysite" / "settings.py"
    settings.write_text(
        settings.read_text(encoding="utf-8") + settings_addition(apps, readme_database),
        encoding="utf-8",
    )
    (root / "mysite" / "views.py").write_text(VIEWS, encoding="utf-8")
    urls = root / "mysite" / "urls.py"
    route = 'urlpatterns += [path("dbcheck/", views.dbcheck)]'
    urls.write_text(
        urls.read_text(encoding="utf-8") + f"\nfrom . import views  # noqa: E402\n\n{route}\n",
        encoding="utf-8",
    )
    with scratch_database(DATABASE):
        yield Project(root, python, site_packages, env)


class RunServer:
    """``manage.py runserver`` of the project, in a process group of its own."""

    def __init__(self, project: Project, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(project.python), "manage.py", "runserver", "--noreload", f"{self.port}"],
                cwd=project.root,
                env=project.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"runserver exited:\n{self.output()}"
            try:
                self.get("/dbcheck/")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
                continue
            return
        raise AssertionError(f"runserver not serving after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def dbcheck(server: RunServer) -> dict[str, Any]:
    status, body = server.get("/dbcheck/")
    assert status == 200, f"GET /dbcheck/ answered {status}:\n{body[:2000]!r}\n{server.output()}"
    data: dict[str, Any] = json.loads(body)
    return data


def test_new_project_configured_as_the_readme_says_serves_through_the_pool(
    project: Project, tmp_path: Path
) -> None:
    check = project.manage("check")
    assert "System check identified no issues" in check.stdout
    migrate = project.manage("migrate", "--noinput")
    assert "Applying auth.0001_initial... OK" in migrate.stdout

    server = RunServer(project, tmp_path / "runserver.log")
    try:
        server.wait_until_serving()
        status, body = server.get("/admin/login/")
        assert status == 200
        assert b"Django administration" in body

        # Every request runs on the project's database, on a pooled connection of
        # the runserver process (the pool's tag), with django_pgpool from the wheel.
        tag = re.compile(r"\[pgpool default@[^:\]]*:(\d+)\]")
        answers = [dbcheck(server) for _ in range(6)]
        for answer in answers:
            assert answer["database"] == DATABASE
            assert answer["users"] == 0
            assert answer["wrapper"].startswith("django_pgpool.")
            assert Path(answer["django_pgpool"]).is_relative_to(project.site_packages)
            match = tag.search(answer["application_name"])
            assert match, answer["application_name"]
            assert int(match[1]) == server.pid
        # Six requests one after the other: the pool lends its connections again
        # (Django alone, with CONN_MAX_AGE=0, opens one per request).
        before = {answer["backend_pid"] for answer in answers}
        assert len(before) < len(answers), before

        # poolstatus: this host's table lists the runserver process (its snapshot is
        # published about once a second), the server's view its sessions.
        deadline = time.monotonic() + 15
        while True:
            status_out = project.manage("poolstatus").stdout
            rows = [line.split() for line in status_out.splitlines()]
            mine = [row for row in rows if row[:3] == ["default", DATABASE, str(server.pid)]]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "Pools of the processes on this host" in status_out
        assert "Sessions on the server" in status_out
        assert mine, f"runserver (pid {server.pid}) not in poolstatus:\n{status_out}"
        sessions = [row for row in rows if row[:2] == ["default", DATABASE] and len(row) > 4]
        assert [row for row in sessions if row[3] == str(server.pid)], status_out
        config = dict(row for row in rows if len(row) == 2)
        _, readme_database = readme_settings()
        for option in ("minconn", "maxconn"):
            assert config[option] == str(readme_database["OPTIONS"][option]), status_out

        # poolclose: the runserver process reconnects; the next request gets a new backend.
        close = project.manage("poolclose", "--wait", "10")
        assert "Asked 1 process on host" in close.stdout, close.stdout
        assert re.search(rf"\(pids? {server.pid}\)", close.stdout), close.stdout
        assert "every process has reconnected" in close.stdout, close.stdout
        after = dbcheck(server)
        assert after["backend_pid"] not in before, (before, after)
    finally:
        server.stop()
    assert server.proc.returncode is not None
