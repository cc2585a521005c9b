"""What an operator installs besides the package: the systemd unit, the license, the version,
and what git must never pick up (the ledger, its lock and its keys)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from wattgate.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "docs" / "wattgate.service"
INSTALLED_AT = "/opt/wattgate/bin/wattgate"  # where docs/deploy.md installs it


def exec_start() -> list[str]:
    [line] = [x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (scripts/test does)")
    # verify checks that ExecStart's program exists and is executable: point it at this
    # checkout's installed console script; every other line is checked as shipped.
    script = Path(sysconfig.get_path("scripts")) / "wattgate"
    assert script.exists(), script
    assert exec_start()[0] == INSTALLED_AT
    unit = tmp_path / "wattgate.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, str(script)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_unit_runs_a_command_wattgate_accepts_and_stops_in_time():
    args = build_parser().parse_args(exec_start()[1:])
    assert args.command == "serve" and args.config == "/etc/wattgate/wattgate.toml"
    text = UNIT.read_text()
    stop = int(next(x for x in text.splitlines() if x.startswith("TimeoutStopSec="))
               .split("=")[1])
    assert stop > 30  # server.shutdown_timeout's default: running calls settle first
    assert "WATTGATE_DATABASE__PATH=/var/lib/wattgate/" in text and "StateDirectory=wattgate" in text


def test_wattgate_version_is_the_package_version():
    done = subprocess.run([sys.executable, "-m", "wattgate", "--version"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert done.stdout.strip() == f"wattgate {version('wattgate')}" == f"wattgate {meta['version']}"


def test_the_license_file_matches_the_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


@pytest.mark.parametrize("name", ["wattgate.db", "wattgate.db-wal", "wattgate.db-shm",
                                  "wattgate.db.lock", "wattgate.db.keys.json",
                                  "data/ledger.db", "data/ledger.db.lock"])
def test_git_ignores_the_ledger_its_lock_and_its_keys(name):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("a git checkout is needed to check .gitignore")
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", name], cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, f"{name} is not ignored"
