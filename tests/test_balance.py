"""Stage balance (pyturbo.balance): layer counts from measured stage times, stored per model and devices, and
Model(tensor_split="auto") measuring once and then loading the stored split."""
from __future__ import annotations

import numpy as np
import pytest

import pyturbo
from pyturbo import balance, policy
from pyturbo.balance import Balance, balance_layers, propose

from conftest import prompt


def test_balance_moves_layers_off_the_slow_stage():
    # a first stage much slower than the last with 8 layers each: it should give up layers, the total stays
    counts = balance_layers([8, 8, 8, 8], [6.62, 6.0, 6.0, 4.95])
    assert sum(counts) == 32 and counts[0] < 8 and counts[3] > 8
    per_layer = [6.62 / 8, 6.0 / 8, 6.0 / 8, 4.95 / 8]
    assert max(c * p for c, p in zip(counts, per_layer)) < 6.62 * 0.95
    assert balance_layers([4, 4], [1.0, 1.0]) == [4, 4]  # balanced stays balanced
    assert min(balance_layers([1, 15], [100.0, 1.0])) >= 1  # every stage keeps a layer
    with pytest.raises(ValueError):
        balance_layers([4, 4], [1.0])


def test_a_proposal_replaces_the_measured_split_only_when_it_gains_enough():
    slow_first = propose([8, 8, 8, 8], [6.62e-3, 6.0e-3, 6.0e-3, 4.95e-3], 8192, 512)
    assert slow_first.layers != [8, 8, 8, 8] and slow_first.gain > balance.MIN_GAIN
    assert "balanced from stage times 6.6, 6.0, 6.0, 5.0 ms measured with layers [8, 8, 8, 8]" in slow_first.describe()
    nearly_even = propose([8, 8], [1.0e-3, 1.01e-3], 2048, 128)
    assert nearly_even.layers == [8, 8] and "kept" in nearly_even.describe()


def test_balances_are_stored_per_key_and_forgotten_by_clear(tmp_path):
    path = tmp_path / "calibration.json"
    b = propose([3, 3], [2.0, 1.0], 1024, 128)
    policy.Calibration(path).store_split("model|CPU,RPC@127.0.0.1", b.to_json())
    again = policy.Calibration(path)      # a new process reads the file
    assert Balance.from_json(again.stored_split("model|CPU,RPC@127.0.0.1")) == b
    assert again.stored_split("model|other devices") is None
    again.clear()
    assert policy.Calibration(path).stored_split("model|CPU,RPC@127.0.0.1") is None


@pytest.fixture
def fresh_calibration(monkeypatch):
    """An empty in-memory Calibration for this test alone (stored splits included)."""
    cal = policy.Calibration(None)
    monkeypatch.setattr(policy, "_calibration", cal)
    return cal


def test_auto_split_measures_once_then_loads_the_stored_balance(tiny_f16_model, rpc3, fresh_calibration):
    with pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split="auto") as model:
        assert model.split_choice.startswith("measured: layers"), model.split_choice
        first = model.layers_per_stage
        assert sum(first) == model.n_layer and min(first) >= 1
        assert len(fresh_calibration.splits) == 1
        stored = Balance.from_json(next(iter(fresh_calibration.splits.values())))
        assert stored.layers == first and stored.measured_layers == [2, 2, 2]
        assert len(stored.stage_seconds) == 3 and min(stored.stage_seconds) > 0
        # whatever the split, the pipeline leaves the logits equal to the standard path's
        toks = prompt(600)
        with model.context(n_ctx=1024, n_batch=512, n_ubatch=64, n_threads=1) as ctx:
            standard = ctx.prefill(toks, pipeline="off").logits
            ctx.reset()
            pipelined = ctx.prefill(toks, pipeline="force")
            assert pipelined.path == "pipelined"
            np.testing.assert_array_equal(pipelined.logits, standard)
    with pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split="auto") as again:
        assert again.split_choice.startswith("stored: ")
        assert again.layers_per_stage == first


def test_auto_split_falls_back_to_even_when_the_stages_cannot_be_timed(tiny_f16_model, rpc3, fresh_calibration,
                                                                        monkeypatch):
    def cannot(*args, **kwargs):
        raise balance.NotMeasurable("the stages cannot be measured: the pipeline did not run (reason)")
    monkeypatch.setattr(balance, "measure_stage_seconds", cannot)
    with pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split="auto") as model:
        assert model.split_choice.startswith("even (the stages cannot be measured")
        assert model.layers_per_stage == [2, 2, 2]
    assert not fresh_calibration.splits   # nothing stored: the next load tries again


def test_auto_split_refuses_what_it_cannot_balance(tiny_f16_model, rpc3):
    with pytest.raises(ValueError, match="at least two devices"):
        pyturbo.Model(tiny_f16_model, devices=["CPU"], tensor_split="auto")
    with pytest.raises(ValueError, match="n_gpu_layers='all'"):
        pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split="auto", n_gpu_layers=3)
    with pytest.raises(ValueError, match="'even' or 'auto'"):
        pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split="balanced")
