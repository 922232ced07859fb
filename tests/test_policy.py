"""The path decision (pyturbo.policy) as a pure function: what was asked, the layout, the environment override."""
from __future__ import annotations

import pytest


from pyturbo.policy import (SAMPLES_PER_PATH, Calibration, Layout, calibration_key, decide, env_override,
                            normalize_mode)

# what the decision reads of a layout: whether llama.cpp's own pipeline parallelism is on there
RPC4 = Layout(stock_overlaps=True)
GPUS_WITH_EVENTS = Layout(stock_overlaps=True)
GPUS_NO_PEER_COPY = Layout(stock_overlaps=False)
GPU_AND_CPU = Layout(stock_overlaps=False)


@pytest.mark.parametrize("given,expected", [(True, "auto"), ("auto", "auto"), (False, "off"), ("off", "off"),
                                            ("force", "force")])
def test_modes(given, expected):
    assert normalize_mode(given) == expected


@pytest.mark.parametrize("bad", ["on", "yes", 1, 0, None, "FORCE"])
def test_unknown_modes_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="'auto'.*'force'.*'off'"):
        normalize_mode(bad)


def test_off_and_force_are_obeyed_on_every_layout():
    for layout in (RPC4, GPUS_WITH_EVENTS, GPUS_NO_PEER_COPY, GPU_AND_CPU):
        assert decide("off", layout) == (False, "pipeline not requested")
        assert decide("force", layout)[0] is True


def test_auto_pipelines_where_stock_cannot_overlap_until_measured_otherwise():
    for layout in (GPUS_NO_PEER_COPY, GPU_AND_CPU):
        on, why = decide("auto", layout, measured={})
        assert on and "pipeline parallelism is off" in why
        slower = {"pipelined": [90.0, 95.0], "standard": [100.0, 101.0]}
        assert decide("auto", layout, measured=slower)[0] is False


def test_auto_calibrates_where_stock_overlaps_by_alternating_paths():
    measured = {"pipelined": [], "standard": []}
    taken = []
    for _ in range(2 * SAMPLES_PER_PATH):
        on, why = decide("auto", RPC4, measured=measured)
        assert why.startswith("calibrating")
        taken.append(on)
        measured["pipelined" if on else "standard"].append(100.0)
    assert taken.count(True) == taken.count(False) == SAMPLES_PER_PATH
    assert decide("auto", RPC4, measured=measured)[1].startswith("calibrated")


@pytest.mark.parametrize("pipelined,standard,expect", [([120, 130], [100, 101], True), ([90, 95], [100, 101], False)])
def test_auto_takes_the_faster_median_and_says_from_which_numbers(pipelined, standard, expect):
    on, why = decide("auto", GPUS_WITH_EVENTS, measured={"pipelined": pipelined, "standard": standard})
    assert on is expect
    assert f"pipelined {sorted(pipelined)[0] / 2 + sorted(pipelined)[1] / 2:.0f}" in why and "standard 100" in why


def test_calibration_persists_forgets_and_survives_a_corrupt_file(tmp_path):
    path = tmp_path / "cal.json"
    key = calibration_key("m:1:2:3", [("RPC", "10.0.0.1"), ("RPC", "10.0.0.2")], 2048, 128, "auto", 4000, 0)
    cal = Calibration(path)
    for tps in (100.0, 104.0, 102.0):
        cal.record(key, "pipelined", tps)
    # what a decision needs is written at once; a sample beyond it waits for the interval or the flush at exit
    assert Calibration(path).measured(key) == {"pipelined": [100.0, 104.0]}
    cal.flush()
    assert Calibration(path).measured(key) == {"pipelined": [100.0, 104.0, 102.0]}
    # the same setting at another length bucket or another host is another key
    assert key != calibration_key("m:1:2:3", [("RPC", "10.0.0.1"), ("RPC", "10.0.0.2")], 2048, 128, "auto", 9000, 0)
    assert key != calibration_key("m:1:2:3", [("RPC", "10.0.0.1"), ("RPC", "10.0.0.3")], 2048, 128, "auto", 4000, 0)
    cal.clear()
    assert not path.exists() and Calibration(path).measured(key) == {}
    path.write_text("{not json")
    assert Calibration(path).measured(key) == {}
    assert Calibration(None).measured(key) == {}  # PYTURBO_CALIBRATION=off: memory only


def test_environment_override_applies_to_auto_only():
    assert env_override({}) is None and env_override({"PYTURBO_PIPELINE": "auto"}) is None
    assert decide("auto", GPUS_WITH_EVENTS, env_override({"PYTURBO_PIPELINE": "force"})) == (True, "PYTURBO_PIPELINE=force")
    assert decide("auto", RPC4, env_override({"PYTURBO_PIPELINE": "off"})) == (False, "PYTURBO_PIPELINE=off")
    assert decide("off", RPC4, "force")[0] is False  # an explicit request wins over the environment
    with pytest.raises(ValueError, match="PYTURBO_PIPELINE must be"):
        env_override({"PYTURBO_PIPELINE": "sometimes"})


def test_layer_split_puts_exactly_the_asked_layers_on_each_device():
    from pyturbo.model import layer_split, layers_from_split
    for layers in ([8, 8, 8, 8], [7, 9, 9, 7], [1, 2, 5]):
        props = layer_split(layers)
        n = sum(layers)
        # llama.cpp's rule: slot i (of n+1, the output last) goes to the first device whose cumulative share exceeds
        # i/(n+1)
        assert layers_from_split(props, n) == layers


def test_measurements_handed_out_are_a_snapshot():
    cal = Calibration(None)
    cal.record("k", "pipelined", 1.0)
    seen = cal.measured("k")
    cal.record("k", "pipelined", 2.0)
    assert seen == {"pipelined": [1.0]} and cal.measured("k") == {"pipelined": [1.0, 2.0]}


# ---- the decision heals itself: recorded timings fed to the pure decision, no real prefill, no clock ----------------

import threading  # noqa: E402
import time  # noqa: E402

from pyturbo import policy  # noqa: E402
from pyturbo.policy import (CLEAR_MARGIN, DRIFT, EXPLORE_EVERY, KEEP_SAMPLES, MAX_AGE_S, current,  # noqa: E402
                            departing_tail)

# run-to-run noise of ±7%, the same every time (a test must not depend on randomness)
NOISE = [1.0, 0.93, 1.06, 0.97, 1.04, 0.95, 1.02, 0.99, 1.07, 0.94]
T0 = float(int(time.time()))   # runs are times (a file's merge judges their age by the clock)
IDLE = {"pipelined": 1460.0, "standard": 1000.0}    # the 2-core box's shape: the pipeline 1.46x faster...
LOADED = {"pipelined": 400.0, "standard": 460.0}    # ...and under a competing load stock ahead


def simulate(speed, runs: range, cal: Calibration | None = None, layout: Layout = RPC4, dt: float = 5.0,
             key: str = "k", why: list | None = None) -> list[str]:
    """auto as a prefill runs it: decide from the calibration at the run's time, run the path (its tok/s from
    speed(i), a dict per path, times the fixed noise), record it. Returns the path of each run (and appends the
    reasons to why)."""
    cal = cal if cal is not None else Calibration(None)
    taken = []
    for i in runs:
        now = T0 + i * dt
        on, reason = decide("auto", layout, measured=cal.runs(key, now), now=now)
        if why is not None:
            why.append(reason)
        path = "pipelined" if on else "standard"
        cal.record(key, path, speed(i)[path] * NOISE[i % len(NOISE)], now=now)
        taken.append(path)
    return taken


def test_the_decision_follows_a_load_that_comes_and_goes():
    """Idle, then a load under which stock is ahead, then idle again: auto takes the pipeline, moves to what is
    faster under the load, and is back on the pipeline after one stock run once the load has gone (that run's
    departure from stock's earlier runs makes it measure the pipeline again, under the new conditions)."""
    speed = lambda i: LOADED if 40 <= i < 80 else IDLE  # noqa: E731
    taken = simulate(speed, range(160))
    assert taken[:2] == ["pipelined", "standard"]          # one run each: 46% apart is beyond any noise here
    assert set(taken[2:40]) == {"pipelined"}
    # under the load: the old comparison is dropped within a few runs and stock taken (the pipeline explored now
    # and then: they are within CLEAR_MARGIN)
    assert "standard" in taken[41:45] and taken[50:80].count("pipelined") <= 30 // EXPLORE_EVERY + 1
    # after it: at most one run of the slower path, then the pipeline throughout
    after = taken[80:]
    assert after[:2].count("standard") <= 1 and set(after[2:]) == {"pipelined"}, after[:6]


def test_a_decision_stored_under_load_heals_in_a_later_process(tmp_path):
    """The issue's case: the stored decision (stock, measured under a load) is read by a later process on the idle
    machine; its first run departs from what was stored, so the pipeline is measured again and taken."""
    path = tmp_path / "cal.json"
    taken = simulate(lambda i: LOADED, range(30), Calibration(path))
    assert taken[-10:].count("standard") >= 8
    later = simulate(lambda i: IDLE, range(30, 60), Calibration(path))   # another process, the load gone
    assert later[0] == "standard" and later[1] == "pipelined" and set(later[2:]) == {"pipelined"}, later[:6]
    assert Calibration(path).measured("k")["pipelined"][-1] > LOADED["pipelined"] * 2   # and the file says so


def test_without_the_recheck_the_stored_decision_would_stay_wrong():
    """What heals is the re-check: the same idle runs judged by the medians alone (the old rule) keep stock."""
    cal = Calibration(None)
    simulate(lambda i: LOADED, range(30), cal)
    runs = cal.runs("k", T0 + 30 * 5.0)
    stale = {"pipelined": [tps for tps, _ in runs["pipelined"]],
             "standard": [tps for tps, _ in runs["standard"]] + [IDLE["standard"]]}   # no times: no re-check
    assert decide("auto", RPC4, measured=stale)[0] is False


def test_where_the_pipeline_is_slower_auto_keeps_stock_also_where_stock_cannot_overlap():
    """Partial offload (a CPU stage, so no llama.cpp pipeline parallelism): the pipeline goes first, but stock is
    measured too, and kept where it is faster."""
    slower_pipeline = {"pipelined": 830.0, "standard": 1000.0}
    taken = simulate(lambda i: slower_pipeline, range(100), layout=GPU_AND_CPU)
    assert taken[0] == "pipelined" and "standard" in taken[1:4]
    # within CLEAR_MARGIN of each other: the pipeline is re-explored now and then, never more
    assert taken[4:].count("pipelined") <= len(taken[4:]) // EXPLORE_EVERY + 2


def test_exploring_is_bounded_and_only_where_the_paths_are_close():
    close = {"pipelined": 1150.0, "standard": 1000.0}   # apart by more than the noise, less than CLEAR_MARGIN
    why: list[str] = []
    taken = simulate(lambda i: close, range(200), why=why)
    explored = [i for i, w in enumerate(why) if "exploring: standard" in w]
    # every stock run after the calibration is an exploring one, one per EXPLORE_EVERY + 1 runs
    assert [i for i, path in enumerate(taken) if path == "standard" and i > 2 * SAMPLES_PER_PATH] == explored
    assert all(b - a == EXPLORE_EVERY + 1 for a, b in zip(explored, explored[1:])) and len(explored) >= 10
    apart = {"pipelined": 1000.0 * (1 + CLEAR_MARGIN) * 1.2, "standard": 1000.0}
    assert simulate(lambda i: apart, range(200))[2:].count("standard") == 0


def test_a_single_outlier_is_rechecked_not_believed():
    """One run of the chosen path far off its earlier ones: the other path is measured once (re-checking); when
    the next run is normal again, nothing is forgotten and the decision stands."""
    cal = Calibration(None)
    simulate(lambda i: IDLE, range(20), cal)
    blip = lambda i: {"pipelined": 300.0, "standard": 1000.0} if i == 20 else IDLE  # noqa: E731
    taken = simulate(blip, range(20, 30), cal)
    assert taken[:2] == ["pipelined", "standard"] and set(taken[2:]) == {"pipelined"}
    assert len(cal.runs("k", T0 + 30 * 5.0)["pipelined"]) == KEEP_SAMPLES   # nothing was voided


def test_old_runs_are_forgotten_by_age_and_count():
    cal = Calibration(None)
    simulate(lambda i: IDLE, range(40), cal)
    now = T0 + 40 * 5.0
    assert len(cal.runs("k", now)["pipelined"]) == KEEP_SAMPLES
    much_later = now + MAX_AGE_S + 1
    assert cal.runs("k", much_later) == {"pipelined": [], "standard": []}
    on, why = decide("auto", RPC4, measured=cal.runs("k", much_later), now=much_later)
    assert why.startswith("calibrating")


def test_runs_departing_together_void_what_came_before():
    """Two runs that depart the same way from their path's earlier ones (one of each path here) mark a change of
    conditions: every earlier run, of either path, is forgotten; one departing run alone is not enough."""
    before = {"pipelined": [(1400.0, 1.0), (1450.0, 2.0), (1420.0, 3.0)], "standard": [(1000.0, 1.5), (990.0, 2.5)]}
    assert current(before) == before
    one = {**before, "pipelined": before["pipelined"] + [(500.0, 4.0)]}
    assert current(one) == one and departing_tail(one["pipelined"]) == [(500.0, 4.0)]
    both = {**one, "standard": before["standard"] + [(400.0, 5.0)]}
    assert current(both) == {"pipelined": [(500.0, 4.0)], "standard": [(400.0, 5.0)]}
    # within DRIFT of the earlier runs: not a departure
    near = {**before, "pipelined": before["pipelined"] + [(1420.0 * (1 + DRIFT) * 0.99, 4.0)]}
    assert departing_tail(near["pipelined"]) == []


def test_current_is_idempotent_on_recorded_histories():
    cal = Calibration(None)
    speed = lambda i: LOADED if (i // 25) % 2 else IDLE  # noqa: E731
    for n in range(0, 150, 7):
        simulate(speed, range(n, n + 7), cal)
        runs = cal.runs("k", T0 + (n + 7) * 5.0)
        assert current(runs, T0 + (n + 7) * 5.0) == runs


def test_first_runs_are_a_setting_of_their_own():
    """A context's first runs are measured apart from warm runs (they allocate): a pattern of one prompt per context
    calibrates on its own runs, and is decided after at most four, also where the paths are close."""
    key = calibration_key("m", [("RPC", "h")], 2048, 128, "auto", 4000, 0)
    first = policy.first_run_key(key)
    assert first != key
    cal = Calibration(None)
    why: list[str] = []
    simulate(lambda i: {"pipelined": 1100.0, "standard": 1000.0}, range(15), cal, key=first, why=why)
    assert cal.measured(key) == {}
    assert all(w.startswith("calibrating") for w in why[:2]) and not any(w.startswith("calibrating") for w in why[4:])


def test_a_recheck_needs_two_earlier_runs_to_judge_by():
    """Right after a change a path has one run: the next one differing from it by more than DRIFT is as likely the
    noise of either, so it is not re-checked (two such runs still are a change)."""
    runs = {"pipelined": [(1500.0, 1.0), (1100.0, 3.0)], "standard": [(1000.0, 2.0), (1010.0, 2.5)]}
    assert departing_tail(runs["pipelined"]) == [(1100.0, 3.0)]
    on, why = decide("auto", RPC4, measured=runs)
    assert on and why.startswith("calibrated") and "re-checking" not in why
    runs["pipelined"].insert(0, (1450.0, 0.5))   # a second earlier run: now it is
    on, why = decide("auto", RPC4, measured=runs)
    assert not on and "re-checking: pipelined's last run (1100 tok/s)" in why


# ---- where the evidence is clear, the decision costs no user a slow prefill ----------------------------------------

def test_a_slower_run_still_clearly_ahead_is_not_rechecked():
    """The chosen path's last run departs slower (a cold start, a blip): where it still beats the other path by
    CLEAR_MARGIN, the other path cannot have won (it would have had to become faster under the same change), so it
    is not measured again; where the lead is gone, it is (as before)."""
    pipelined = [(1450.0, 1.0), (1500.0, 2.0), (1420.0, 3.0), (1100.0, 4.0)]   # 1100: over 25% below the others
    on, why = decide("auto", RPC4, measured={"pipelined": pipelined, "standard": [(800.0, 1.5), (810.0, 2.5)]})
    assert on and "not re-checked" in why and "re-checking" not in why
    on, why = decide("auto", RPC4, measured={"pipelined": pipelined, "standard": [(900.0, 1.5), (910.0, 2.5)]})
    assert not on and "re-checking: pipelined's last run (1100 tok/s)" in why


def test_a_faster_departing_run_is_still_rechecked():
    """A run that departs faster (a load went away) may have sped up the other path too: that one is measured."""
    runs = {"pipelined": [(1000.0, 1.0), (1010.0, 2.0), (990.0, 3.0), (1400.0, 4.0)],
            "standard": [(700.0, 1.5), (710.0, 2.5)]}
    on, why = decide("auto", RPC4, measured=runs)
    assert not on and "re-checking: pipelined's last run (1400 tok/s)" in why


def test_a_blip_of_a_clearly_faster_pipeline_costs_no_stock_run():
    clear = {"pipelined": 2000.0, "standard": 1000.0}
    cal = Calibration(None)
    simulate(lambda i: clear, range(20), cal)
    blip = lambda i: {"pipelined": 1400.0, "standard": 1000.0} if i == 20 else clear  # noqa: E731
    why: list[str] = []
    taken = simulate(blip, range(20, 30), cal, why=why)
    assert set(taken) == {"pipelined"} and "not re-checked" in why[1]


# ---- prefills that share the devices with other work (a server's decode steps between chunks) ---------------------

def test_runs_while_the_devices_are_shared_are_not_recorded():
    cal = Calibration(None)
    other_thread: list[dict] = []
    with policy.shared_devices():
        assert policy.devices_shared()
        cal.record("k", "pipelined", 100.0)
        # another thread (another context's prefill) is not inside: its run is recorded
        t = threading.Thread(target=lambda: (cal.record("k", "standard", 90.0), other_thread.append(cal.measured("k"))))
        t.start()
        t.join()
    assert other_thread == [{"standard": [90.0]}]
    assert not policy.devices_shared()
    cal.record("k", "pipelined", 110.0)
    assert cal.measured("k") == {"pipelined": [110.0], "standard": [90.0]}


def test_while_the_devices_are_shared_auto_measures_nothing():
    """No calibrating, re-checking or exploring (those runs would not be recorded): the path the runs alone favour,
    the pipeline where a path has none."""
    for measured in ({}, {"pipelined": [100.0, 101.0]}, {"standard": [100.0, 101.0]}):
        on, why = decide("auto", RPC4, measured=measured, measuring=False)
        assert on and "not measured alone yet" in why
    assert decide("auto", RPC4, measured={"pipelined": [100.0, 101.0]})[0] is False   # measuring: stock's turn
    recheck = {"pipelined": [(1450.0, 0.5), (1500.0, 1.0), (1100.0, 3.0)], "standard": [(1000.0, 2.0), (1010.0, 2.5)]}
    assert decide("auto", RPC4, measured=recheck)[0] is False
    on, why = decide("auto", RPC4, measured=recheck, measuring=False)
    assert on and "measured alone: pipelined 1450 vs standard 1005" in why
    close = {"pipelined": [(1100.0, float(t)) for t in range(1, EXPLORE_EVERY + 3)], "standard": [(1000.0, 0.0)] * 2}
    assert "exploring" in decide("auto", RPC4, measured=close)[1]
    assert decide("auto", RPC4, measured=close, measuring=False)[0] is True
    with policy.shared_devices():   # measuring=None: the thread's state
        assert decide("auto", RPC4, measured=recheck)[0] is True
    assert decide("off", RPC4, measuring=False)[0] is False and decide("force", RPC4, measuring=False)[0] is True


def test_a_load_under_shared_devices_leaves_the_decision_alone():
    """Prefills under load while the devices are shared (chunks between decode steps) neither change what auto
    measured alone nor make it measure stock: after them, the pipeline at once."""
    cal = Calibration(None)
    simulate(lambda i: IDLE, range(20), cal)
    before = cal.runs("k", T0 + 20 * 5.0)
    with policy.shared_devices():
        under_load = simulate(lambda i: LOADED, range(20, 40), cal)
    assert set(under_load) == {"pipelined"} and cal.runs("k", T0 + 40 * 5.0) == before
    assert set(simulate(lambda i: IDLE, range(40, 60), cal)) == {"pipelined"}
