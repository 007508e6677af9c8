"""bench/exact_profile.py runs and reports consistent numbers (a smoke run, not a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "exact_profile.py"


def test_exact_profile_reports_hooks_kernels_and_alternatives(tmp_path):
    out = tmp_path / "profile.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parents[1])}
    done = subprocess.run([sys.executable, str(BENCH), "--steps", "3", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["iteration_ms"] > 0 and results["hooks_exact_ms"] > results["hooks_grad_ms"] > 0
    assert {"aten::index_select", "aten::index_copy_"} <= set(results["kernels_ms_per_step"])
    # exact mode with AdamW (element-wise) restores the dropped rows and leaves their gradient alone
    assert "aten::index_fill_" not in results["kernels_ms_per_step"]
    assert results["copy_bandwidth_gb_s"] > 0 and results["exact_lower_bound_ms"] > 0
    assert 0 < results["grad_lower_bound_ms"] < results["exact_lower_bound_ms"]
    # half of 23 layers' elements, half their rows, 3 fp32 tensors read and written: the model's own size
    assert 10 < results["save_traffic_mb"] < 20
    assert "restore: index_copy_ (used)" in results["row_kernels_us"] and all(
        us > 0 for us in results["row_kernels_us"].values())
    assert "exact mode's save" in done.stdout
