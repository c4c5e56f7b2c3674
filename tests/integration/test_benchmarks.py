"""``make bench`` keeps working: the benchmarks that drive the local fleet and the agent server, in their quick
form (small sizes, one run each). Figures are printed, never asserted (docs/performance.md holds them)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(900)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("number", ["2", "7", "8"])
def test_a_benchmark_runs_in_its_quick_form(number, tmp_path):
    env = dict(os.environ, BENCH_MAP_ELEMENTS="300", BENCH_PEERS="0")  # Ray and Dask: make bench
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", number, "--json",
                           str(tmp_path / "out.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"{number} ")]
    assert rows and not any("FAILED" in row for row in rows), done.stdout[-3000:]
