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
    for tps in (1.0, 2.0, 3.0):
        cal.record(key, "pipelined", tps)
    # what a decision needs is written at once; a sample beyond it waits for the interval or the flush at exit
    assert Calibration(path).measured(key) == {"pipelined": [1.0, 2.0]}
    cal.flush()
    assert Calibration(path).measured(key) == {"pipelined": [1.0, 2.0, 3.0]}
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
