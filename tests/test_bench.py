"""The benchmark: `--quick` end to end (files, columns, equality check, speedup from the runs it reports,
interleaving), every bad option as a clean argparse error, and the pieces (rows, table, files) without a model."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from pyturbo import synth
from pyturbo.timeline import Timeline, UbatchRecord
from pyturbo.tools.bench import PIPELINE_MODES, TABLE_COLUMNS, default_setup, legend, parse_args, plan, round_order, table
from pyturbo.tools.bench import layout, measure, report, run as bench_run


def bench(*args, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "pyturbo.bench", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_quick_bench_writes_every_output(tmp_path):
    out = tmp_path / "bench"
    proc = bench("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "--quick sets: model bench-small, --lengths 512,1024, --repeat 2, --no-sweep" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("layout: ") and "RPC workers" in lines[0]
    header = next(line for line in lines if line.startswith("| prompt tokens"))
    assert [c.strip() for c in header.strip("|").split("|")] == TABLE_COLUMNS
    table_end = max(i for i, line in enumerate(lines) if line.startswith("|"))
    files_at = next(i for i, line in enumerate(lines) if line.startswith("files: "))
    assert table_end < files_at                       # the table comes first
    assert any("M*S/(M+S-1)" in line for line in lines[table_end:files_at])   # and its legend
    doc = json.loads((out / "results.json").read_text())
    # the timeline is that of the default's run, which takes the pipeline only where auto measured it faster on this
    # machine (--quick's short prompts on many cores may keep stock): then there is a timeline and its picture
    files = ["results.json", "results.csv", "report.md", "throughput.png"] + (["timeline.png"] if doc["timeline"] else [])
    for name in files:
        assert (out / name).stat().st_size > 0, name
        assert name in lines[files_at]
    assert bool(doc["timeline"]) == ("timeline.png" in lines[files_at])
    assert not list(out.glob(".*.tmp")), "temporary files left behind"

    assert [r["prompt_tokens"] for r in doc["results"]] == [512, 1024]
    for r in doc["results"]:
        # the forced pipeline pipelines; the default takes the path its (calibrated) decision names
        assert r["outputs_equal"] and r["modes"]["forced"]["paths"] == ["pipelined"]
        if "standard" in r["path"]:   # auto chose stock: by measurement, and the row says from which numbers (or,
            # where the runs departed from the calibration's under a changing load, that it measures again)
            assert r["fallback_reason"].startswith(("calibrated: ", "calibrating: ")), r["fallback_reason"]
        runs = r["runs"]
        best, pipe = runs[r["stock_best_run"]], runs[r["pipelined_run"]]
        # the headline: stock-best vs pipelined, both reported, medians of their runs
        assert len(pipe["seconds"]) == 2 and pipe["median_seconds"] == pytest.approx(np.median(pipe["seconds"]))
        assert r["speedup"] == pytest.approx(best["median_seconds"] / pipe["median_seconds"], rel=1e-12)
        assert r["stock_best_tps"] == pytest.approx(max(v["tps"] for v in runs.values() if v["role"] == "stock"))
        assert r["stock_best_tps"] >= max(r["stock_tps"], r["stock_same_ub_tps"])
        assert 0 < r["speedup_low"] <= r["speedup_high"]
        assert r["ceiling_tps"] > 0 and r["vs_ceiling"] == pytest.approx(r["pipelined_tps"] / r["ceiling_tps"])
        if r["path"] == "pipelined":   # the timeline's numbers exist where the default pipelined
            assert 0 < r["efficiency"] <= 1 and r["n_stages"] == 4
            assert r["ideal_speedup"] == pytest.approx(r["n_ubatches"] * 4 / (r["n_ubatches"] + 3))
        elif r["path"] == "standard":
            assert r["n_stages"] == 0 and np.isnan(r["efficiency"])
    # interleaved: each round runs every setting once, stock and non-stock alternating
    for n in (512, 1024):
        rounds = [[s["setting"] for s in doc["schedule"] if s["prompt_tokens"] == n and s["round"] == k]
                  for k in (0, 1)]
        assert sorted(rounds[0]) == sorted(rounds[1]) and rounds[0] != rounds[1]
        assert [k.startswith("stock") for k in rounds[0]][:4] == [True, False, True, False]
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["load_before"]
    if doc["results"][-1]["path"] == "pipelined":   # the timeline shown is the last length's
        assert doc["timeline"]
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 2
    md = (out / "report.md").read_text()
    assert "stock-best" in md and "M*S/(M+S-1)" in md and "## Every run" in md


def _args(tmp_path, *argv):
    return parse_args([*argv, "--out", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory):
    good = synth.cached_model("tiny").read_bytes()
    d = tmp_path_factory.mktemp("damaged")
    (d / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (d / "header-only.gguf").write_bytes(good[:200])
    (d / "corrupt.gguf").write_bytes(good[:24] + bytes(range(256)) * 8 + good[24 + 2048:])
    (d / "text.gguf").write_text("not a model")
    return d


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "abc"], "comma-separated integers"),
    (["--lengths", "0"], "between 2 and"),
    (["--ubatch", "0"], "between 1 and"),
    (["--ubatch", "x,128"], "comma-separated integers"),
    (["--tensor-split", "abc"], "--tensor-split takes"),
    (["--tensor-split", "1,-1"], "proportions must be >= 0"),
    (["--tensor-split", "1,1"], "2 proportions for 4 stages"),
    (["--rpc", "abc"], "--rpc: RPC server 'abc' is not of the form host:port"),
    (["--rpc", ""], "--rpc"),
    (["--in-flight", "-1"], "--in-flight must be >= 0"),
    (["--first-ubatch", "-1"], "--first-ubatch must be >= 0"),
    (["--ubatch", "128,256", "--first-ubatch", "200"], "--first-ubatch must be from 1 to the smallest --ubatch (128)"),
    (["--devices", "NOPE"], "no device named 'NOPE'"),
    (["--devices", "CPU,CPU"], "names a device twice"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--preset", "bench-8l", "--workers", "9"], "cannot split 8 layers over 9 stages"),  # the default preset depends on the cores
    (["--gpu", "--rpc", "127.0.0.1:5"], "exclude each other"),
    (["--model", "MISSING.gguf"], "file not found"),
])
def test_bad_options_are_argparse_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        _args(tmp_path, *argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [("truncated.gguf", "truncated or corrupt"),
                                           ("header-only.gguf", "truncated or corrupt"),
                                           ("corrupt.gguf", "truncated or corrupt"),
                                           ("text.gguf", "not a GGUF file")])
def test_damaged_model_is_an_argparse_error(tmp_path, capsys, damaged_models, name, message):
    with pytest.raises(SystemExit) as e:
        _args(tmp_path, "--model", str(damaged_models / name))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_out_is_refused_before_running(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "file" / "sub")])
    assert "is a file, not a folder" in capsys.readouterr().err
    assert report.check_writable(tmp_path / "new" / "deeper") is None and not (tmp_path / "new").exists()


def test_gpu_without_cuda_is_an_argparse_error(tmp_path, capsys):
    import pyturbo
    if pyturbo.build_info()["cuda"]:
        pytest.skip("CUDA build")
    with pytest.raises(SystemExit):
        _args(tmp_path, "--gpu")
    assert "no CUDA devices" in capsys.readouterr().err


def test_large_preset_needs_yes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTURBO_CACHE", str(tmp_path / "cache"))
    proc = bench("--preset", "8b", "--out", str(tmp_path / "o"), stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--yes" in proc.stderr or "is free" in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cli_errors_without_traceback(tmp_path):
    """End to end through `python -m pyturbo.bench`: argparse errors and a worker that is not there."""
    proc = bench("--tensor-split", "1,-1", timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = bench("--rpc", "127.0.0.1:1", "--quick", "--out", str(tmp_path / "o"), timeout=300)
    assert proc.returncode == 2 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cores, threads", [(2, "1 thread"), (16, "4 threads")])
def test_quick_says_what_it_keeps(tmp_path, capsys, monkeypatch, cores, threads):
    # the default threads per worker follow the cores (default_setup): as on a 2- and a 16-core machine
    monkeypatch.setattr(layout, "usable_cpu_cores", lambda: cores)
    args = _args(tmp_path, "--quick", "--lengths", "300", "--workers", "2")
    assert args.lengths == [300] and args.workers == 2 and args.repeat == 2 and args.no_sweep
    err = capsys.readouterr().err
    assert f"2 local RPC workers x {threads} (as asked" in args.layout and "expect about 1.0x" in args.layout
    assert "kept as given: --lengths" in err and "layout (--workers, --threads) is not changed" in err


def test_default_layout_from_cores():
    two = default_setup(2)
    assert (two["workers"], two["threads"], two["preset"]) == (4, 1, "bench-8l")
    assert "share 2 cores" in two["why"] and "2 RPC stages" in two["why"]
    assert (default_setup(16)["workers"], default_setup(16)["threads"]) == (4, 4)
    assert (default_setup(64)["workers"], default_setup(64)["threads"]) == (4, 16)


# ---- rows, table and files from recorded runs (no model) --------------------------------------------------------------

def fake_result(seconds, logits, path="standard", timeline=None):
    return SimpleNamespace(seconds=seconds, logits=np.asarray(logits, np.float32), path=path, n_ubatches=4,
                           fallback_reason="", timeline=timeline or Timeline())


def fake_timeline(m=4, s=2, t=0.1):
    recs = [UbatchRecord(u, u * 8, 8, st, f"RPC{st}", (u + st) * t, (u + st + 1) * t) for u in range(m) for st in range(s)]
    return Timeline(recs, [f"RPC{i}" for i in range(s)], (m + s - 1) * t)


PIPELINED = tuple(name for name, _ in PIPELINE_MODES)   # the bench's pipelined columns: default, forced


def fake_series(n=1024):
    """stock 2048/512 slow, stock 2048/128 fastest stock, ceiling, pipelined fastest; 3 rounds."""
    secs = {"stock 2048/512": [2.0, 2.2, 2.1], "stock 2048/128": [1.5, 1.7, 1.6], "stock 2048/256": [1.9, 1.8, 2.0],
            "ceiling 2048/256": [1.2, 1.1, 1.3], "ceiling 2048/512": [1.0, 1.4, 1.05],
            "default 2048/128": [1.0, 0.8, 0.9], "forced 2048/128": [1.1, 0.9, 1.0]}
    sets = {s.key: s for s in plan(n, [128], sweep=True, ceiling=True, gpu=False)}
    assert set(sets) == set(secs)
    tl = fake_timeline()
    return {k: measure.Series(sets[k], n, [fake_result(x, [1, 2], "pipelined" if k.startswith(PIPELINED) else "standard",
                                                       tl if k.startswith(PIPELINED) else None) for x in v])
            for k, v in secs.items()}


def test_plan_alternates_and_rotates():
    keys = [s.key for s in plan(4096, [128], sweep=True, ceiling=True, gpu=False)]
    assert keys[:4] == ["stock 2048/128", "ceiling 2048/256", "stock 2048/256", "ceiling 2048/512"]
    assert "stock 4096/512" in keys and "default 2048/128" in keys and "forced 2048/128" in keys and len(keys) == 8
    settings = plan(4096, [128], sweep=False, ceiling=False, gpu=False)
    assert [s.key for s in settings] == ["stock 2048/128", "default 2048/128", "stock 2048/512", "forced 2048/128"]
    assert [s.key for s in round_order(settings, 1)][0] == "default 2048/128"


def test_rows_from_recorded_runs():
    series = fake_series()
    (row,) = measure.make_rows(1024, series, [128], None)
    assert row.stock_best_setting == "2048/128" and row.stock_best_run == "stock 2048/128"
    assert row.speedup == pytest.approx(1.6 / 0.9)
    assert (row.speedup_low, row.speedup_high) == pytest.approx((1.5, 1.7 / 0.8))
    assert row.speedup_vs_stock == pytest.approx(2.1 / 0.9) and row.stock_tps == pytest.approx(1024 / 2.1)
    assert row.ceiling_run == "ceiling 2048/512" and row.ceiling_tps == pytest.approx(1024 / 1.05)
    assert row.n_ubatches == 4 and row.n_stages == 2 and row.ideal_speedup == pytest.approx(8 / 5)
    assert row.efficiency == pytest.approx(0.8) and row.outputs_equal
    series["default 2048/128"].results[1].logits[0] += 1e-6          # one run differs: caught
    assert not measure.make_rows(1024, series, [128], None)[0].outputs_equal


def test_rows_with_a_first_ubatch_check_the_tolerance():
    """--first-ubatch: the pipelined modes run other kernel shapes than stock same-ub, so their logits are checked
    against the stated tolerance (pyturbo.results.FIRST_UBATCH_TOLERANCE) instead of bit for bit."""
    sets = {s.key: s for s in plan(1024, [128], sweep=True, ceiling=True, gpu=False, first_ubatch=32)}
    assert "default 2048/128 first 32" in sets and "stock 2048/128" in sets
    series = {}
    for key, old in fake_series().items():
        key = f"{key} first 32" if key.startswith(PIPELINED) else key
        series[key] = measure.Series(sets[key], 1024, old.results)
    for r in series["default 2048/128 first 32"].results:
        r.logits = r.logits + 0.01                                    # rounding-sized (logits [1, 2])
    (row,) = measure.make_rows(1024, series, [128], None, first_ubatch=32)
    assert row.outputs_equal and row.first_ubatch == 32 and row.max_logit_diff == pytest.approx(0.01)
    assert "within tol. (max diff 0.01)" in table([row])
    series["forced 2048/128 first 32"].results[0].logits = np.asarray([1.0, 2.5], np.float32)   # 25% off: caught
    (row,) = measure.make_rows(1024, series, [128], None, first_ubatch=32)
    assert not row.outputs_equal and "NO (max diff 0.5)" in table([row])


def test_table_legend_and_files(tmp_path, monkeypatch):
    rows = measure.make_rows(1024, fake_series(), [128], None)
    text = table(rows)
    header, _, body = text.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == TABLE_COLUMNS
    assert "1138 (1024-1280)" in body and "1.78x (1.50-2.12)" in body and "| 2048/128 " in body
    info = {"repeat": 3, "ubatches": [128], "sweep": True, "gpu": False, "reference": "ceiling", "ceiling": True,
            "cores": 2, "ceiling_threads": 2, "ceiling_ubs": [256, 512]}
    text = legend(info)
    for word in ("stock-best", "ceiling", "efficiency", "M*S/(M+S-1)", "M = ubatches", "S = stages", "median of 3"):
        assert word in text
    doc = {"date": "d", "commit": "c", "command": "python -m pyturbo.bench", "layout": {"text": "x"},
           "machine": {"load_before": [1], "load_after": [2], "cpus": 2}, "settings": {}, "table": info,
           "results": [], "timeline": []}
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # as if matplotlib were not installed
    written, note = report.write_outputs(tmp_path / "a", doc, rows, fake_timeline())
    assert written == ["report.md", "results.json", "results.csv"] and note.startswith("no plots: install matplotlib")
    assert not list((tmp_path / "a").glob("*.png"))


def test_save_falls_back_when_out_fails(tmp_path, monkeypatch, capsys):
    calls = []

    def flaky(out, *a):
        calls.append(out)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("ok")
        return ["report.md"], ""

    monkeypatch.setattr(report, "write_outputs", flaky)
    assert bench_run.save(tmp_path / "full", {}, [], None, sys.stdout) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and (calls[1] / "report.md").read_text() == "ok"


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "f.json"
    report.atomic_write(p, "one")
    report.atomic_write(p, b"two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["f.json"]
