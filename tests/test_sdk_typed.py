"""The Python SDK is typed for its users: the package ships ``py.typed`` (PEP 561),
a consumer module using the whole public ``wattgate.sdk`` surface passes
``mypy --strict`` against the installed package, and the SDK itself is strict-clean.

The consumer is checked the way a user's project sees wattgate: installed in a
virtualenv's site-packages, from a folder with no mypy configuration, so nothing
reads the checkout's sources or settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONSUMER = Path(__file__).resolve().parent / "typing" / "sdk_consumer.py"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A virtualenv (seeing this interpreter's packages) whose site-packages holds the
    package as a wheel installs it (setuptools' build_py: the modules and the package
    data pyproject.toml lists); answers (its python, a mypy cache dir)."""
    tmp = tmp_path_factory.mktemp("typed")
    built = _run([sys.executable, "-c", "import setuptools; setuptools.setup()", "--quiet",
                  "build_py", "--build-lib", str(tmp / "lib")], ROOT)
    assert built.returncode == 0, built.stderr
    assert (tmp / "lib" / "wattgate" / "py.typed").is_file(), "py.typed is not package data"
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                 str(venv)], tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    shutil.copytree(tmp / "lib" / "wattgate", _site_packages(python) / "wattgate")
    return python, tmp / "mypy-cache"


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(python), "-c", code], python.parent).stdout.strip())


def _mypy(installed: tuple[Path, Path], consumer: Path) -> subprocess.CompletedProcess[str]:
    python, cache = installed
    return _run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                 "--python-executable", str(python), "--cache-dir", str(cache),
                 consumer.name], consumer.parent)


def test_a_consumer_of_the_installed_sdk_passes_mypy_strict(installed, tmp_path):
    consumer = tmp_path / "app.py"
    consumer.write_text(CONSUMER.read_text(encoding="utf-8"), encoding="utf-8")
    checked = _mypy(installed, consumer)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Without the marker the same project cannot use the SDK's types at all.
    marker = _site_packages(installed[0]) / "wattgate" / "py.typed"
    marker.unlink()
    try:
        untyped = _mypy(installed, consumer)
    finally:
        marker.touch()
    assert untyped.returncode == 1
    assert "missing library stubs or py.typed marker" in untyped.stdout


def test_the_sdk_itself_passes_mypy_strict(installed):
    _, cache = installed
    checked = _run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache),
                    "-p", "wattgate.sdk"], ROOT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
