"""The Django x Python matrix, the suite against the built wheel, a run without DRF, lint.

``nox -l`` lists the sessions; ``nox -s tests`` runs the whole matrix,
``nox -s "tests(3.12-django6.1)"`` one cell of it, ``nox -s wheel`` the suite
against the installed wheel. The database comes from ``DATABASE_URL`` as with
``make test``. Arguments after ``--`` replace the default pytest arguments of
``tests`` and ``wheel``: ``nox -s tests -- -x -k replay``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

# uv where installed (pip install uv, or the "nox" dependency group): its installs
# take seconds where pip takes a minute per session.
nox.options.default_venv_backend = "uv|venv"
nox.options.sessions = ["tests", "postgres", "wheel", "nodrf", "lint"]

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
NEWEST_PYTHON = "3.13"
DJANGO = {"5.2": "Django~=5.2.0", "6.0": "Django~=6.0.0", "6.1": "Django~=6.1.0"}
#: The oldest DRF we support beside the LTS; the newest beside the others.
DRF = {
    "5.2": "djangorestframework~=3.16.0",
    "6.0": "djangorestframework",
    "6.1": "djangorestframework",
}
#: Django 5.2 runs on Python 3.10 to 3.13 (3.14 is not on our machines), 6.x on 3.12 and 3.13.
MATRIX = [
    *((python, "5.2") for python in ("3.10", "3.11", "3.12", "3.13")),
    *((python, django) for django in ("6.0", "6.1") for python in ("3.12", "3.13")),
]
#: Run by ``make test`` in one environment, not in each cell of the matrix:
#: the browser (Chromium), the wheel build and install, gunicorn on PostgreSQL,
#: the task workers on real brokers, the Redis Cluster and PgBouncer tests.
MATRIX_PYTEST_ARGS = (
    "-m",
    "not browser and not packaging and not multiprocess and not broker"
    " and not redis_cluster and not pgbouncer",
)


def add_pyenv_interpreters() -> None:
    """Put pyenv's installed interpreters on PATH.

    pyenv's shims run only the versions selected in pyenv, so ``python3.10``
    fails through a shim even though pyenv has it installed.
    """
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = sorted(str(path) for path in root.glob("versions/3.*/bin"))
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


add_pyenv_interpreters()


def test_groups() -> tuple[str, ...]:
    groups = ["test"]
    if os.environ.get("DATABASE_URL", "").startswith("mysql"):
        groups.append("mysql")
    return nox.project.dependency_groups(PYPROJECT, *groups)


def pytest_args(session: nox.Session) -> tuple[str, ...]:
    return ("-p", "no:cacheprovider", *(session.posargs or MATRIX_PYTEST_ARGS))


@nox.session
@nox.parametrize(
    ("python", "django"), MATRIX, ids=[f"{python}-django{django}" for python, django in MATRIX]
)
def tests(session: nox.Session, django: str) -> None:
    """The test suite on one Python and Django version."""
    session.install("-e", ".[drf,redis]", *test_groups(), DJANGO[django], DRF[django])
    session.run("python", "-m", "pytest", *pytest_args(session))


#: The oldest supported Python and Django (with the DRF beside it).
OLDEST_PYTHON, OLDEST_DJANGO = "3.10", "5.2"
SHOW_VERSIONS = "import django, rest_framework as drf; print(django.__version__, drf.VERSION)"


@nox.session(python=OLDEST_PYTHON)
def postgres(session: nox.Session) -> None:
    """The oldest Python, Django and DRF we support, on PostgreSQL (``DATABASE_URL``).

    The matrix runs on SQLite; here row locks, advisory locks, the store's SQL
    and the multi-process tests (gunicorn) meet the oldest versions too.
    """
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        session.skip("DATABASE_URL names no PostgreSQL database")
    django = OLDEST_DJANGO
    session.install("-e", ".[drf,redis]", *test_groups(), DJANGO[django], DRF[django])
    session.run("python", "-c", SHOW_VERSIONS)
    # Services of their own (brokers, a Redis Cluster, PgBouncer) run once, in `make test`.
    args = session.posargs or (
        "-m",
        "not browser and not packaging and not broker and not redis_cluster and not pgbouncer",
    )
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *args)


#: Fails unless django_idempotency comes from the environment's site-packages.
ASSERT_INSTALLED = """
import sysconfig, django_idempotency
from pathlib import Path
found = Path(django_idempotency.__file__).resolve()
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert found.is_relative_to(site), f"{found} is not the installed package in {site}"
print("django_idempotency from", found)
"""


@nox.session(python=NEWEST_PYTHON)
def wheel(session: nox.Session) -> None:
    """The test suite against the built and installed wheel, away from the source tree."""
    work = Path(session.create_tmp())
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.install(*nox.project.dependency_groups(PYPROJECT, "release"))
    session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT), silent=True)
    session.run("python", "-m", "twine", "check", "--strict", *map(str, dist.iterdir()))
    [built] = dist.glob("*.whl")
    session.install(f"{built}[drf,redis]", *test_groups())

    # The suite and what it imports besides the package, and nothing else: the
    # source package is not there to shadow the installed one.
    suite = work / "suite"
    shutil.rmtree(suite, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.sqlite3")
    for directory in ("tests", "example_project", "benchmarks"):
        shutil.copytree(ROOT / directory, suite / directory, ignore=ignore)
    for file in ("manage.py", "pyproject.toml"):
        shutil.copy2(ROOT / file, suite / file)
    session.chdir(suite)
    session.run("python", "-c", ASSERT_INSTALLED)
    session.run("python", "-m", "pytest", *pytest_args(session))


@nox.session
@nox.parametrize(
    ("python", "django"),
    [("3.10", "5.2"), (NEWEST_PYTHON, "6.1")],
    ids=["3.10-django5.2", f"{NEWEST_PYTHON}-django6.1"],
)
def nodrf(session: nox.Session, django: str) -> None:
    """The package without DRF: imports, system checks, a replay, a clear ImportError."""
    session.install(".", DJANGO[django], "pytest>=8", "pytest-timeout>=2.3")
    session.run("python", "-c", "import rest_framework", success_codes=[1], silent=True)
    # No conftest (tests/conftest.py needs DRF) and no pytest-django (it would
    # set Django up with tests/settings.py): the module configures Django itself.
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--noconftest",
        "-W",
        "ignore::pytest.PytestConfigWarning",  # the DJANGO_SETTINGS_MODULE of pytest-django
        "tests/without_drf.py",
    )


@nox.session(python=NEWEST_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy, as ``make lint``."""
    session.install("-e", ".[drf,redis]", *nox.project.dependency_groups(PYPROJECT, "test", "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
