"""Fault injection: see tests/fault_injection.py. In a subprocess, so that an abort or a segfault shows as
a failed test (a negative exit code) instead of ending pytest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_faults_at_random_points_give_correct_logits_or_typed_errors(tiny_model):
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_injection.py")), "--model", str(tiny_model),
                           "--seed", "13", "--iterations", "24", "--budget", "150"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died (exit code {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not summary["failures"], "\n".join(summary["failures"]) + "\n" + proc.stderr[-4000:]
    assert summary["iterations"] >= 20, summary
    assert summary["final_ok"], "a model on fresh workers no longer gives the reference logits"
    # not vacuous: faults landed during calls and each kind of outcome occurred
    outcomes = summary["outcomes"]
    assert outcomes.get("logits", 0) and outcomes.get("KeyboardInterrupt", 0) and outcomes.get("ContextDeadError", 0), summary
