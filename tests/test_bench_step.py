"""Smoke test of benchmarks/bench_step.py --quick: it runs end to end and its last line is the JSON
it promises. The numbers of a quick run mean nothing; the targets are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_step_quick():
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[bench]')")
    # Two processes (ours, TRL) each import torch + transformers: ~22 CPU seconds in all; 54 s of
    # wall time at load average 8 on 2 cores.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last) == {"vs_trl", "context_overhead", "vs_trl_smollm2"}
    assert all(isinstance(v, float) and v > 0 for v in last.values()), last
