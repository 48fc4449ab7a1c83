"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``, ``demo``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

PYTHON = ["3.11"]
# The tests run on every Python sbs supports that is installed (nox skips the
# others): an early 3.12 warned where 3.11 and 3.13 did not (sqlite3 placeholders).
TEST_PYTHONS = ["3.11", "3.12", "3.13"]


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session(python=TEST_PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, simulation, real processes on loopback)."""
    _install(session)
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    _install(session)
    session.run("ruff", "check", "src", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "bench", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy")
    # The Windows shell as Windows sees it (pywin32's stubs, no POSIX-only calls).
    session.run("mypy", "--platform", "win32", "-p", "sbs_winsvc")
    # The library as Windows and macOS see it: POSIX-only calls stay behind platform checks.
    session.run("mypy", "--platform", "win32", "-p", "sbs_core")
    session.run("mypy", "--platform", "darwin", "-p", "sbs_core")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Failover figures of real nodes on loopback; writes docs/benchmarks.md."""
    _install(session)
    session.run("python", "bench/failover.py", "--output", "docs/benchmarks.md", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation with mkdocs; any warning (broken link, page not in nav) fails."""
    _install(session)
    site = session.create_tmp()
    session.run("mkdocs", "build", "--strict", "--site-dir", f"{site}/site")


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """The chaos soak in two network namespaces (root): ``nox -s soak -- --seed 7 --minutes 30``."""
    _install(session)
    session.run("python", "tests/faultlab/soak.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    _install(session)
    session.run("sbs", "demo")
