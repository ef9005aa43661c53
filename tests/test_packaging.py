"""The distributions: what the wheel and the sdist hold, and that the wheel runs.

``python -m build`` makes the sdist and, from it, the wheel, without build
isolation (setuptools comes from the test environment). The wheel is then
installed into a fresh virtual environment with the Django, DRF and
dj-database-url versions running these tests, through pip as configured on this
machine (``PIP_INDEX_URL`` / ``PIP_FIND_LINKS`` / ``PIP_NO_INDEX`` point it at a
local wheelhouse when offline), and the example project, copied away from the
source tree so that the installed package is the one imported, runs ``check``
and ``migrate`` on a new SQLite file.
"""

from __future__ import annotations

import contextlib
import email.parser
import importlib.metadata
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "django_idempotency"

pytestmark = [
    pytest.mark.packaging,
    # As in `nox -s wheel`, which runs a copy of tests/ against the installed wheel.
    pytest.mark.skipif(
        not (ROOT / PACKAGE / "__init__.py").is_file(), reason="needs the source tree to build"
    ),
]
#: What the example project imports besides the package.
RUNTIME_REQUIREMENTS = ("Django", "djangorestframework", "dj-database-url")
#: Environment variables of the test run that must not leak into the fresh
#: environment: they would point it at the source tree or at the test settings.
LEAKY_VARIABLES = ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV", "REDIS_URL", "PYTHONHOME")
SUBPROCESS_TIMEOUT = 120


@dataclass(frozen=True)
class Distributions:
    wheel: Path
    sdist: Path

    def wheel_names(self) -> set[str]:
        with zipfile.ZipFile(self.wheel) as archive:
            return set(archive.namelist())

    def sdist_names(self) -> set[str]:
        with tarfile.open(self.sdist) as archive:
            # Without the leading "django_idempotency-<version>/".
            return {name.partition("/")[2] for name in archive.getnames()}

    def metadata(self) -> Message:
        with zipfile.ZipFile(self.wheel) as archive:
            [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            return email.parser.BytesParser().parsebytes(archive.read(name))


def run(*command: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its output, or a failure that shows it."""
    completed = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    if completed.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {completed.returncode}\n"
            f"--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr}"
        )
    return completed.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Distributions:
    outdir = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", outdir, ROOT)
    [wheel] = outdir.glob("*.whl")
    [sdist] = outdir.glob("*.tar.gz")
    return Distributions(wheel=wheel, sdist=sdist)


def package_files() -> set[str]:
    """Every file of the package in the source tree, as a path inside the wheel."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_wheel_holds_exactly_the_package(dists: Distributions) -> None:
    names = dists.wheel_names()
    shipped = {name for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert shipped == package_files()
    assert f"{PACKAGE}/py.typed" in names
    assert f"{PACKAGE}/migrations/0001_initial.py" in names
    templates = {name for name in package_files() if name.startswith(f"{PACKAGE}/templates/")}
    assert templates <= names
    assert any(name.endswith("/licenses/LICENSE") for name in names)


def test_wheel_metadata(dists: Distributions) -> None:
    metadata = dists.metadata()
    assert metadata["Name"] == "django-idempotency"
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert extras == {"drf", "redis", "spectacular", "celery", "crypto", "otel"}
    requirements = metadata.get_all("Requires-Dist") or []
    assert "Django>=5.2" in requirements
    assert 'drf-spectacular>=0.28; extra == "spectacular"' in requirements
    assert 'celery>=5.4; extra == "celery"' in requirements
    assert 'cryptography>=42; extra == "crypto"' in requirements
    # The API only: the SDK and exporters are the project's choice.
    assert [r for r in requirements if 'extra == "otel"' in r] == [
        'opentelemetry-api>=1.25; extra == "otel"'
    ]
    classifiers = set(metadata.get_all("Classifier") or [])
    for django in ("5.2", "6.0", "6.1"):
        assert f"Framework :: Django :: {django}" in classifiers
    for python in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {python}" in classifiers
    assert "Typing :: Typed" in classifiers


def test_sdist_holds_the_package_the_tests_and_the_example(dists: Distributions) -> None:
    names = dists.sdist_names()
    assert package_files() <= names
    for name in ("pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md", "MANIFEST.in"):
        assert name in names
    for name in (
        "manage.py",
        "tests/conftest.py",
        "tests/settings.py",
        "example_project/settings.py",
    ):
        assert name in names
    assert not [name for name in names if name.endswith((".pyc", ".sqlite3"))]


def test_twine_check_passes(dists: Distributions) -> None:
    output = run(sys.executable, "-m", "twine", "check", "--strict", dists.wheel, dists.sdist)
    assert output.count("PASSED") == 2, output


def fresh_environment(path: Path) -> dict[str, str]:
    """os.environ for a subprocess in the virtual environment at ``path``."""
    env = {name: value for name, value in os.environ.items() if name not in LEAKY_VARIABLES}
    env["PATH"] = os.pathsep.join([str(path / "bin"), env.get("PATH", "")])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_installed_wheel_checks_and_migrates_the_example_project(
    dists: Distributions, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    env = fresh_environment(venv)
    # pip of this environment installs into the new one: no ensurepip, faster.
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_REQUIREMENTS]
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        dists.wheel,
        *pins,
        env=env,
    )

    project = tmp_path / "project"
    shutil.copytree(
        ROOT / "example_project",
        project / "example_project",
        ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"),
    )
    shutil.copy2(ROOT / "manage.py", project / "manage.py")
    database = tmp_path / "shop.sqlite3"
    env["DATABASE_URL"] = f"sqlite:///{database}"

    imported = run(
        python, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)", cwd=project, env=env
    )
    assert Path(imported.strip()).is_relative_to(venv), imported
    run(python, "manage.py", "check", "--fail-level", "WARNING", cwd=project, env=env)
    run(python, "manage.py", "migrate", "--no-input", cwd=project, env=env)

    # sqlite3's own context manager commits but does not close.
    with contextlib.closing(sqlite3.connect(database)) as connection:
        applied = {
            name
            for (name,) in connection.execute(
                "SELECT name FROM django_migrations WHERE app = ?", (PACKAGE,)
            )
        }
    assert applied == {path.stem for path in (ROOT / PACKAGE / "migrations").glob("0*.py")}
