"""`python -m pyturbo.bench --quick` end to end: files, table columns, equality check (not the speed)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

from pyturbo.tools.bench import TABLE_COLUMNS


def test_quick_bench_writes_every_output(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "pyturbo.bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| prompt tokens"))
    assert [c.strip() for c in header.strip("|").split("|")] == TABLE_COLUMNS
    for name in ("results.json", "results.csv", "report.md", "throughput.png", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert [r["prompt_tokens"] for r in doc["results"]] == [512, 1024]
    for r in doc["results"]:
        assert r["outputs_equal"] and r["path"] == "pipelined"
        assert r["stock_tps"] > 0 and r["pipelined_tps"] > 0 and 0 < r["efficiency"] <= 1
        assert abs(r["speedup"] - r["runs"]["stock"]["seconds"] / r["runs"]["pipelined"]["seconds"]) < 1e-9
    assert doc["timeline"] and doc["machine"]["cpus"] >= 1
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2


def test_bench_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyturbo.bench", "--model", str(tmp_path / "missing.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "file not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pyturbo.bench", "--lengths", "abc"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "comma-separated integers" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pyturbo.bench", "--rpc", "127.0.0.1:1", "--quick",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
