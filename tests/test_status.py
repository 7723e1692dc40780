"""Status snapshots across processes, reconnect requests, and the application_name tag."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from pytest_django.fixtures import Settings

from django_pgpool import identity, maintenance, status
from tests.helpers import own_snapshot, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def backend_pid() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


def test_each_process_publishes_a_snapshot_without_secrets() -> None:
    backend_pid()
    connection.close()
    wait_for(own_snapshot)
    snapshot = own_snapshot()
    assert snapshot is not None
    pools = snapshot["pools"]
    assert isinstance(pools, list)
    default = next(p for p in pools if "default" in p["aliases"])
    assert default["requests_num"] >= 1
    assert default["database"]["dbname"] == "test_pgpool"
    directory = status.status_dir()
    assert directory.stat().st_mode & 0o777 == 0o700
    password = connection.settings_dict["PASSWORD"]
    for path in directory.iterdir():
        assert password not in path.read_text()


def test_snapshots_of_dead_processes_are_ignored_and_removed() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = status.status_dir() / f"{int(dead.stdout)}.json"
    path.write_text(json.dumps({"pid": int(dead.stdout), "pools": []}))
    assert all(s["pid"] != int(dead.stdout) for s in status.read_snapshots())
    assert not path.exists()


def test_a_reconnect_request_replaces_this_processes_connections() -> None:
    before = backend_pid()
    connection.close()
    wait_for(own_snapshot)  # the process has looked at the requests once
    generation = status.request_reconnect(["default"])["default"]
    wait_for(
        lambda: (own_snapshot() or {}).get("reconnect_seen", {}).get("default", 0) >= generation
    )
    assert backend_pid() != before


def test_pooled_sessions_carry_the_tag_and_keep_the_users_name() -> None:
    with connection.cursor() as cur:
        cur.execute("SHOW application_name")
        name = cur.fetchone()[0]
    match = identity.TAG_PATTERN.search(name)
    assert match is not None
    assert (match["alias"], match["pid"]) == ("default", str(os.getpid()))
    tagged = identity.application_name("default", "my-app")
    assert tagged.startswith("my-app [pgpool default@")
    long = identity.application_name("default", "é" * 80)
    assert len(long.encode()) <= 63
    assert identity.TAG_PATTERN.search(long)


# -- a status directory that fails -----------------------------------------------
#
# Real faults, made as they would happen: a file, a link or another user's
# directory at the predictable per-user path in a shared temporary
# directory (a private one here: tempfile.tempdir), a configured directory
# below a regular file, and, as root, a full or read-only file system (a
# small tmpfs: root ignores permission bits, so chmod 0500 is no fault for
# it). The hook is called here, round after round, instead of waiting for
# the maintenance thread (taken off the hook meanwhile).

ROUNDS = 5


@pytest.fixture
def rounds(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[int], None]]:
    """Run the maintenance thread's publishing hook, each time as if its retry were due."""
    caplog.set_level(logging.INFO, logger="django_pgpool")
    maintenance.remove_hook(status._publish_quietly)
    fresh()

    def run(count: int = ROUNDS) -> None:
        for _ in range(count):
            if hasattr(status, "_health"):
                status._health.retry_at = 0.0
            status._publish_quietly()

    yield run
    fresh()
    maintenance.add_hook(status._publish_quietly)


def fresh() -> None:
    """Forget what was published and how it went, so the next round writes a snapshot."""
    status._published.update(body=None)
    if hasattr(status, "_health"):
        status._health = type(status._health)()


@pytest.fixture
def default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Path:
    """Use the default status directory, in a private temporary directory; return its parent."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    del settings.PGPOOL_STATUS_DIR
    monkeypatch.delenv("DJANGO_PGPOOL_STATUS_DIR", raising=False)
    top = shared / f"django_pgpool-{os.getuid()}"
    default = status.status_dir(create=False)
    assert default.parent == top
    assert re.fullmatch(r"test_pgpool-[0-9a-f]{12}", default.name)  # the first database's name
    return top


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def own_file() -> Path:
    return status.status_dir(create=False) / f"{os.getpid()}.json"


def assert_said_once_then_recovers(
    caplog: pytest.LogCaptureFixture, rounds: Callable[[int], None], fix: Callable[[], None]
) -> str:
    """Over several rounds: one WARNING, no traceback; fixed: published again, one INFO."""
    rounds(ROUNDS)
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "PGPOOL_STATUS_DIR" in warnings[0]
    assert "DJANGO_PGPOOL_STATUS_DIR" in warnings[0]
    fix()
    rounds(ROUNDS)
    assert json.loads(own_file().read_text())["pid"] == os.getpid()
    recovered = [m for m in messages(caplog, logging.INFO) if "published again" in m]
    assert len(recovered) == 1, recovered
    assert len(messages(caplog, logging.WARNING)) == 1
    return warnings[0]


def test_a_file_squatting_the_per_user_directory_is_refused_said_once_and_left_when_gone(
    default_dir: Path, caplog: pytest.LogCaptureFixture, rounds: Callable[[int], None]
) -> None:
    default_dir.write_text("not yours")
    with pytest.raises(ImproperlyConfigured, match="is not a directory") as refused:
        status.status_dir()
    assert str(default_dir) in str(refused.value)
    warning = assert_said_once_then_recovers(caplog, rounds, default_dir.unlink)
    assert str(default_dir) in warning and "is not a directory" in warning


@pytest.mark.parametrize("level", ["per-user", "per-project"])
def test_a_symbolic_link_squatting_the_status_directory_is_never_followed(
    default_dir: Path,
    caplog: pytest.LogCaptureFixture,
    rounds: Callable[[int], None],
    level: str,
) -> None:
    # Even to a directory that would pass (this user's, 0700): whoever
    # planted the link may point it elsewhere at any time.
    target = default_dir.parent / "elsewhere"
    target.mkdir(mode=0o700)
    if level == "per-user":
        link = default_dir
    else:
        default_dir.mkdir(mode=0o700)
        link = status.status_dir(create=False)
    link.symlink_to(target)
    with pytest.raises(ImproperlyConfigured, match="is a symbolic link") as refused:
        status.status_dir()
    assert str(link) in str(refused.value)
    warning = assert_said_once_then_recovers(caplog, rounds, link.unlink)
    assert str(link) in warning
    assert list(target.iterdir()) == []


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user's needs root")
@pytest.mark.parametrize("level", ["per-user", "per-project"])
def test_a_directory_of_another_user_is_refused(
    default_dir: Path,
    caplog: pytest.LogCaptureFixture,
    rounds: Callable[[int], None],
    level: str,
) -> None:
    default_dir.mkdir(mode=0o700)
    theirs = default_dir if level == "per-user" else status.status_dir(create=False)
    theirs.mkdir(mode=0o700, exist_ok=True)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ImproperlyConfigured, match=f"belongs to uid {NOBODY}") as refused:
        status.status_dir()
    assert str(theirs) in str(refused.value)
    warning = assert_said_once_then_recovers(
        caplog, rounds, lambda: os.chown(theirs, os.getuid(), os.getgid())
    )
    assert f"belongs to uid {NOBODY}" in warning


def test_a_per_user_directory_writable_by_others_is_refused(
    default_dir: Path, caplog: pytest.LogCaptureFixture, rounds: Callable[[int], None]
) -> None:
    default_dir.mkdir()
    default_dir.chmod(0o777)
    with pytest.raises(ImproperlyConfigured, match="is writable by other users") as refused:
        status.status_dir()
    assert str(default_dir) in str(refused.value)
    assert_said_once_then_recovers(caplog, rounds, lambda: default_dir.chmod(0o700))


def test_a_per_user_directory_readable_by_others_is_closed_and_used(default_dir: Path) -> None:
    # As earlier versions left it (the umask's mode): no one else could write in it.
    default_dir.mkdir()
    default_dir.chmod(0o755)
    directory = status.status_dir()
    assert default_dir.stat().st_mode & 0o777 == 0o700
    assert directory.stat().st_mode & 0o777 == 0o700


def test_a_status_directory_below_a_file_is_said_once_retried_and_recovers(
    tmp_path: Path,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    rounds: Callable[[int], None],
) -> None:
    # mkdir() fails with an OSError (not ImproperlyConfigured), as root too.
    blocker = tmp_path / "volume"
    blocker.write_text("")
    settings.PGPOOL_STATUS_DIR = str(blocker / "status")
    warning = assert_said_once_then_recovers(caplog, rounds, blocker.unlink)
    assert str(blocker) in warning


def test_a_failing_status_directory_is_retried_with_a_doubling_delay_up_to_a_minute(
    tmp_path: Path,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    rounds: Callable[[int], None],
) -> None:
    blocker = tmp_path / "volume"
    blocker.write_text("")
    settings.PGPOOL_STATUS_DIR = str(blocker / "status")
    delays = []
    for _ in range(8):
        rounds(1)
        delays.append(status._health.delay)
    assert delays == [2, 4, 8, 16, 32, 60, 60, 60]
    blocker.unlink()
    status._publish_quietly()  # before the retry is due: not tried
    assert not own_file().exists()
    rounds(1)
    assert own_file().exists()
    assert status._health.delay == 0


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    """Mount a 64 KiB tmpfs at ``where`` (skip the test when this process may not)."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"can't mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def remount(volume: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(volume)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_status_directory_is_said_once_and_recovers(
    tmp_path: Path,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    rounds: Callable[[int], None],
    fault: str,
) -> None:
    with small_tmpfs(tmp_path / "mnt") as volume:
        settings.PGPOOL_STATUS_DIR = str(volume)
        filler = volume / "filler"
        if fault == "full":
            with contextlib.suppress(OSError), filler.open("wb") as out:
                while True:
                    out.write(b"\0" * 4096)
                    out.flush()
            fix: Callable[[], None] = filler.unlink
        else:
            remount(volume, "ro")

            def fix() -> None:
                remount(volume, "rw")

        warning = assert_said_once_then_recovers(caplog, rounds, fix)
        expected = "No space left on device" if fault == "full" else "Read-only file system"
        assert expected in warning


def test_the_database_key_names_what_libpq_reaches_and_never_a_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    key = identity.database_key
    assert key({"dbname": "shop", "host": "db", "port": 5433, "user": "app"}) == "app@db:5433/shop"
    assert key({"dbname": "shop", "host": "db", "user": "app", "password": "s3cr3t"}) == (
        "app@db:5432/shop"
    )
    conninfo = "host=db port=6432 dbname=shop user=app password=s3cr3t"
    assert key({"dbname": conninfo}) == "app@db:6432/shop"
    uri = "postgresql://app:s3cr3t@db:6432/shop"
    assert key({"dbname": uri}) == "app@db:6432/shop"
    monkeypatch.setenv("PGHOST", "envhost")
    monkeypatch.setenv("PGUSER", "envuser")
    assert key({"dbname": "shop"}) == "envuser@envhost:5432/shop"
    assert key({"service": "mine"}) == "envuser@envhost:/?service=mine"


def test_the_default_directory_follows_the_databases_not_the_settings_module() -> None:
    config = {"NAME": "shop", "HOST": "db", "PORT": "", "USER": "app", "PASSWORD": "s3cr3t"}
    name = identity.databases_key([("default", {**config, "OPTIONS": {"maxconn": 2}})])
    assert re.fullmatch(r"shop-[0-9a-f]{12}", name)
    # Pool options and the password are not what is reached; the alias and the database are.
    assert identity.databases_key([("default", {**config, "PASSWORD": "other"})]) == name
    assert identity.databases_key([("primary", config)]) != name
    assert identity.databases_key([("default", {**config, "HOST": "db2"})]) != name
