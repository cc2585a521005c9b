"""The benchmark harness runs end to end (tiny durations); no timing is asserted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    for figure in ("throughput, non-streaming", "throughput, streaming", "latency p50",
                   "latency p99", "time to first body byte", "RSS growth", "ledger",
                   "paced streams (40 open): CPU per answer", "growth per open stream"):
        assert figure in text, figure
    # Every paced stream of every target (bare hop and gates) came back whole.
    delivered = next(ln for ln in text.splitlines() if "answers delivered" in ln)
    assert delivered.endswith("| all, equal | **yes** |"), delivered
    assert "| wattgate |" in text.splitlines()[text.splitlines().index("## Figures") + 2]
    assert "errors)" not in text  # every call of every run answered 200
