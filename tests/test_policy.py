"""The path decision (pyturbo.policy) as a pure function: what was asked, the layout, the environment override."""
from __future__ import annotations

import pytest

from pyturbo.policy import Layout, decide, env_override, normalize_mode

RPC4 = Layout(stages=("RPC0", "RPC1", "RPC2", "RPC3"), stock_overlaps=True)
GPUS_WITH_EVENTS = Layout(stages=("CUDA0", "CUDA1"), stock_overlaps=True)
GPUS_NO_PEER_COPY = Layout(stages=("CUDA0", "CUDA1"), stock_overlaps=False)
GPU_AND_CPU = Layout(stages=("CPU", "CUDA0"), stock_overlaps=False)


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


def test_auto_pipelines_rpc_and_mixed_layouts_and_gpus_without_events():
    for layout in (RPC4, GPUS_NO_PEER_COPY, GPU_AND_CPU):
        assert decide("auto", layout)[0] is True


def test_auto_leaves_gpus_that_stock_overlaps_to_stock_and_says_how_to_force():
    on, why = decide("auto", GPUS_WITH_EVENTS)
    assert not on and "pipeline='force'" in why


def test_environment_override_applies_to_auto_only():
    assert env_override({}) is None and env_override({"PYTURBO_PIPELINE": "auto"}) is None
    assert decide("auto", GPUS_WITH_EVENTS, env_override({"PYTURBO_PIPELINE": "force"})) == (True, "PYTURBO_PIPELINE=force")
    assert decide("auto", RPC4, env_override({"PYTURBO_PIPELINE": "off"})) == (False, "PYTURBO_PIPELINE=off")
    assert decide("off", RPC4, "force")[0] is False  # an explicit request wins over the environment
    with pytest.raises(ValueError, match="PYTURBO_PIPELINE must be"):
        env_override({"PYTURBO_PIPELINE": "sometimes"})
