"""Timeline on synthetic records: no native library, no workers (issue: timeline)."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from pyturbo.timeline import Timeline, UbatchRecord


def schedule(M: int, S: int, slot, d: float = 0.01, names=None) -> Timeline:
    """M ubatches on S stages, each (ubatch, stage) taking d seconds and starting at slot(u, s) * d."""
    names = names or [f"RPC{s}" for s in range(S)]
    recs = [UbatchRecord(u, u * 32, 32, s, names[s], slot(u, s) * d, (slot(u, s) + 1) * d)
            for u in range(M) for s in range(S)]
    return Timeline(recs, names)


def test_perfect_pipeline_reaches_the_ideal():
    M, S = 8, 4
    tl = schedule(M, S, lambda u, s: u + s)
    assert len(tl) == M * S and tl.n_ubatches == M and tl.stages == ("RPC0", "RPC1", "RPC2", "RPC3")
    assert tl.wall == pytest.approx((M + S - 1) * 0.01)   # None: max(end) - min(start)
    assert tl.ideal_efficiency() == pytest.approx(M / (M + S - 1))
    assert tl.ideal_speedup() == pytest.approx(M * S / (M + S - 1))
    assert tl.efficiency() == pytest.approx(tl.ideal_efficiency())
    assert tl.busy_seconds() == pytest.approx({f"RPC{s}": M * 0.01 for s in range(S)})


def test_sequential_schedule_gives_one_over_s():
    M, S = 8, 4
    tl = schedule(M, S, lambda u, s: u * S + s)
    assert tl.efficiency() == pytest.approx(1 / S)


def test_ascii_shows_the_staircase():
    # 3 ubatches on 3 stages over 5 units of 0.1 s; 10 columns: 2 per unit
    tl = schedule(3, 3, lambda u, s: u + s, d=0.1)
    lines = tl.ascii(width=10).splitlines()
    assert lines[0].startswith("time") and "0.00s" in lines[0] and lines[0].endswith("0.50s")
    assert lines[1:] == ["RPC0      ######....",
                         "RPC1      ..######..",
                         "RPC2      ....######"]


def test_non_layer_work_is_an_extra_row_and_not_counted():
    recs = [UbatchRecord(0, 0, 32, -1, "CPU", 0.0, 1.0),
            UbatchRecord(0, 0, 32, 0, "CUDA0", 1.0, 2.0),
            UbatchRecord(0, 0, 32, 1, "CUDA1", 2.0, 4.0)]
    tl = Timeline(recs, ["CUDA0", "CUDA1"], wall=4.0)
    assert tl.busy_seconds() == {"CUDA0": 1.0, "CUDA1": 2.0}
    assert tl.efficiency() == pytest.approx(3.0 / (2 * 4.0))
    rows = tl.ascii(width=4).splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["CUDA0", "CUDA1", "CPU"]
    assert rows[-1].startswith("CPU (other)") and rows[-1].endswith("#...")
    assert rows[0].endswith(".#..") and rows[1].endswith("..##")


def test_stage_names_from_records_when_not_given():
    tl = schedule(2, 2, lambda u, s: u + s)
    assert Timeline(tl).stages == ("RPC0", "RPC1")


def test_empty_timeline():
    tl = Timeline()
    assert not tl and len(tl) == 0 and list(tl) == [] and tl.wall == 0.0 and tl.n_ubatches == 0
    assert math.isnan(tl.efficiency()) and math.isnan(tl.ideal_speedup())
    text = Timeline(stages=["CPU"], wall=0.5).ascii()
    assert "\n" not in text and "no" in text
    assert math.isnan(Timeline(stages=["CPU"], wall=0.5).efficiency())


def test_from_raw_sorts_converts_and_round_trips():
    t0 = 1_000_000_000
    raw = [(1, 32, 32, 0, "RPC0", t0 + 3000, t0 + 5000, "host"),
           (0, 0, 32, 0, "RPC0", t0 + 1000, t0 + 3000, "host"),
           (0, 0, 32, 1, "CUDA0", t0 + 3000, t0 + 6000, "cuda-event")]
    tl = Timeline.from_raw(raw, ["RPC0", "CUDA0"], t0, 0.007)
    assert tl.array.dtype.names == ("ubatch", "pos0", "n_tokens", "stage", "device", "start", "end", "clock")
    assert np.all(np.diff(tl.array["start"]) >= 0)
    first = next(iter(tl))
    assert first == UbatchRecord(0, 0, 32, 0, "RPC0", 0.001, 0.003, "host")
    assert [r.clock for r in tl if r.device == "CUDA0"] == ["cuda-event"]
    assert tl.clocks() == {"CUDA0": "cuda-event", "RPC0": "host"}
    assert type(first.ubatch) is int and type(first.device) is str and type(first.start) is float
    assert tl.wall == 0.007 and tl.n_ubatches == 2
    dicts = json.loads(json.dumps(tl.to_records()))
    assert Timeline([UbatchRecord(**d) for d in dicts], tl.stages, tl.wall).to_records() == dicts


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    tl = schedule(8, 4, lambda u, s: u + s)
    tl = Timeline([*tl, UbatchRecord(0, 0, 32, -1, "CPU", 0.0, 0.001)], tl.stages)
    out = tl.plot(tmp_path / "gantt.png", title="synthetic")
    assert out == tmp_path / "gantt.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Timeline().plot(tmp_path / "empty.png").stat().st_size > 0


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` raise ImportError
    # from the checkout: the public index's "pyturbo" is another project
    with pytest.raises(ImportError, match=r"pip install '\.\[plot\]' in the pyturbo checkout"):
        schedule(2, 2, lambda u, s: u + s).plot(tmp_path / "x.png")
