"""The benchmarks keep running as the code moves (they print figures; speed is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args", [("routing.py", ["--decisions", "300"]), ("evidence.py", ["--events", "2000"]),
                                          ("ttft.py", ["--requests", "3"]),
                                          ("soak.py", ["--minutes", "0.3", "--rate", "10", "--window", "5"]),
                                          ("broker_memory.py", ["--messages", "2000", "--step", "1000"]),
                                          ("admission.py", ["--kib", "4", "--decisions", "500", "--counted", "200"])])
def test_a_bench_runs_and_ends_with_one_json_line(script: str, args: list[str]) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(isinstance(v, int | float | str) for v in figures.values()) and len(figures) >= 4
