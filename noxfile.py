"""The Django x Python matrix, a run without DRF, and the linters.

``nox -l`` lists the sessions; ``nox -s tests`` runs the whole matrix (slow),
``nox -s "tests(3.12-django6.1)"`` one cell of it. The database comes from
``DATABASE_URL`` as with ``make test``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "nodrf", "lint"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
DJANGO = {"5.2": "Django~=5.2.0", "6.0": "Django~=6.0.0", "6.1": "Django~=6.1.0"}
MATRIX = [
    *((python, "5.2") for python in ("3.10", "3.11", "3.12", "3.13")),
    *((python, django) for django in ("6.0", "6.1") for python in ("3.12", "3.13")),
]


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


def install_test_requirements(session: nox.Session, *requirements: str) -> None:
    groups = ["test"]
    if os.environ.get("DATABASE_URL", "").startswith("mysql"):
        groups.append("mysql")
    session.install(
        "-e", ".[drf,redis]", *nox.project.dependency_groups(PYPROJECT, *groups), *requirements
    )


@nox.session
@nox.parametrize(
    ("python", "django"), MATRIX, ids=[f"{python}-django{django}" for python, django in MATRIX]
)
def tests(session: nox.Session, django: str) -> None:
    """The test suite on one Python and Django version."""
    install_test_requirements(session, DJANGO[django])
    session.run("python", "-m", "pytest", *session.posargs)


# Without DRF installed, the core must import and work: a replay through
# @idempotent on an in-memory SQLite database, with nothing from DRF loaded.
NODRF_SMOKE = """
import sys
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django_idempotency"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    SILENCED_SYSTEM_CHECKS=["django_idempotency.W001"],
)
django.setup()
from django.core.management import call_command
from django.http import HttpResponse
from django.test import RequestFactory
from django_idempotency.decorators import idempotent

call_command("check", fail_level="WARNING")
call_command("migrate", verbosity=0)
runs = []

@idempotent
def view(request):
    runs.append(1)
    return HttpResponse("created", status=201)

request = lambda: RequestFactory().post("/", headers={"Idempotency-Key": "k"})
first, second = view(request()), view(request())
assert (first.status_code, second.status_code, len(runs)) == (201, 201, 1), (first, second, runs)
assert second["Idempotent-Replayed"] == "true"
assert "rest_framework" not in sys.modules, "DRF was imported"
print("django_idempotency works without DRF")
"""


@nox.session(python="3.12")
def nodrf(session: nox.Session) -> None:
    """The package without DRF: imports, checks and replays."""
    session.install("-e", ".")
    session.run("python", "-c", "import rest_framework", success_codes=[1], silent=True)
    session.run("python", "-c", NODRF_SMOKE)


@nox.session(python="3.12")
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    install_test_requirements(session, *nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("mypy")
