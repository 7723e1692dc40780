"""Installing a Debian package the tests need, from the test harness itself.

CI runs the suite as root on a fresh Debian with the package registries
reachable, so a test that needs a system package (PgBouncer, PostGIS, GDAL)
installs it there, once, with ``apt-get``; a developer's machine that already
has it is left alone. Who is not root, or has no ``apt-get``, gets
:class:`AptUnavailable` naming the package to install by hand.

One installer at a time, whatever needs it: apt's own lock makes a second
``apt-get`` fail rather than wait, so every install here is serialized by one
lock file (pytest-xdist workers, parallel sessions), and ``present()`` is asked
again once it is held: someone else may have installed the package meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import NoReturn

import pytest

__all__ = ["AptUnavailable", "install", "is_root", "unavailable", "why_not_installable"]

INSTALL_LOCK = "/tmp/pgpool-apt-install.lock"
APT_TIMEOUT = 900  # seconds for one apt-get run (PostGIS pulls GDAL and PROJ: ~100 MB)


class AptUnavailable(RuntimeError):
    """A package is missing and cannot be installed here (not root, no apt-get, apt failed)."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test for want of something this machine lacks, naming it; fail under CI.

    CI (the ``CI`` environment variable; .ci/run sets it) installs everything
    the suite needs, so there a missing piece is a failure, never a skip that
    would let a test suite pass without running.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def why_not_installable() -> str | None:
    """Return why apt-get can't install packages here, or None if it can."""
    if not is_root():
        return "not running as root"
    if shutil.which("apt-get") is None:
        return "no apt-get (not a Debian-like system)"
    return None


def _apt_get(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(
        ["apt-get", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        timeout=APT_TIMEOUT,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise AptUnavailable(
            f"apt-get {' '.join(args)} failed with exit status {proc.returncode}:\n{tail}"
        )


def install(
    packages: Sequence[str],
    present: Callable[[], bool],
    after: Callable[[], None] | None = None,
) -> None:
    """Install Debian ``packages`` with apt-get unless ``present()`` says they are there.

    ``after`` runs once the packages are installed, still under the lock
    (e.g. to stop a system service the package started). Raises
    :class:`AptUnavailable`, naming the packages, when they can't be installed.
    """
    if present():
        return
    names = " ".join(packages)
    reason = why_not_installable()
    if reason is not None:
        raise AptUnavailable(f"{names} is not installed and can't be installed here: {reason}")
    import fcntl  # POSIX only

    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if present():
            return  # someone else installed it while we waited
        _apt_get("update")
        _apt_get("install", "-y", "--no-install-recommends", *packages)
        if after is not None:
            after()
