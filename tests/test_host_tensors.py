"""Weights kept in host memory (Model(host_tensors=) / experts_in_host_memory=True, llama.cpp's --override-tensor
PATTERN=CPU and --cpu-moe): the option's checks, the memory plan's numbers, and the pipelined prefill over devices
whose layers hand their experts to this process's CPU and back (worker -> CPU -> worker within every layer), bit for bit
against the standard path; the bench's --preset gpt-oss-* and --experts-in-host-memory; the GPU script's CPU smoke run.

gpt-oss-tiny's sliding window (64) is shorter than the prompts here, so the windowed layers mask tokens that the
full-attention layers still see.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import pyturbo
from conftest import prompt
from pyturbo import synth
from pyturbo.model import EXPERT_TENSORS

TINY = synth.GPT_OSS_PRESETS["gpt-oss-tiny"]
CTX = dict(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt_oss_tiny(model_dir):
    return synth.write_model(model_dir / "gpt-oss-tiny.gguf", TINY, seed=0)


def expert_bytes_per_layer(path: Path) -> int:
    """Bytes of layer 0's tensors that EXPERT_TENSORS names (every layer has the same), read from the file."""
    tensors = gguf.GGUFReader(path).tensors
    hits = [t for t in tensors if t.name.startswith("blk.0.") and re.search(EXPERT_TENSORS, t.name)]
    assert sorted(t.name for t in hits) == sorted(f"blk.0.ffn_{p}_exps.{k}" for p in ("gate", "up", "down")
                                                  for k in ("weight", "bias"))
    return sum(int(t.n_bytes) for t in hits)


def run_modes(model, tokens, ctx_args=CTX, modes=("off", "force")) -> dict:
    """{mode: (PrefillResult, KV state, 4 greedy tokens, logits after them)} in a fresh context each."""
    runs = {}
    for mode in modes:
        with model.context(**ctx_args) as ctx:
            res = ctx.prefill(tokens, pipeline=mode)
            kv = ctx.kv_state()
            generated = list(ctx.generate(4))
            runs[mode] = (res, kv, generated, ctx.logits())
    return runs


def assert_same_outputs(a, b) -> None:
    np.testing.assert_array_equal(b[0].logits, a[0].logits)
    assert b[1] == a[1], "KV cache differs"
    assert b[2] == a[2]
    np.testing.assert_array_equal(b[3], a[3])


# ---- the option -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(host_tensors="ffn_(up"), "host_tensors 'ffn_(up' is not a regular expression"),
    (dict(host_tensors="*exps"), "host_tensors '*exps' is not a regular expression"),
    (dict(host_tensors=""), "host_tensors must be a non-empty regular expression"),
    (dict(host_tensors=b"exps"), "host_tensors must be a regular expression (str)"),
    (dict(host_tensors="exps", experts_in_host_memory=True), "give host_tensors or experts_in_host_memory"),
    (dict(experts_in_host_memory="yes"), "experts_in_host_memory must be True or False"),
])
def test_bad_option_is_a_value_error_before_any_worker(tiny_model, kwargs, message):
    # the worker address is unreachable: the option is checked before anything connects
    with pytest.raises(ValueError, match=re.escape(message)):
        pyturbo.Model(tiny_model, rpc_servers=["127.0.0.1:9"], **kwargs)


def test_pattern_only_python_takes_is_a_value_error(gpt_oss_tiny):
    """llama.cpp matches with std::regex (ECMAScript), which has no named groups: its refusal is a ValueError too."""
    with pytest.raises(ValueError, match=r"host_tensors '\(\?P<x>exps\)' is not a regular expression"):
        pyturbo.Model(gpt_oss_tiny, host_tensors="(?P<x>exps)")


def test_experts_in_host_memory_is_the_expert_pattern(gpt_oss_tiny):
    with pyturbo.Model(gpt_oss_tiny, experts_in_host_memory=True) as model:
        assert model.host_tensors == EXPERT_TENSORS
        assert f"host_tensors={EXPERT_TENSORS!r}" in repr(model)
        assert model.identity.endswith(f"|host:{EXPERT_TENSORS}")   # auto's measurements are kept apart
    with pyturbo.Model(gpt_oss_tiny) as model:
        assert model.host_tensors is None and "host_tensors" not in repr(model) and "|host:" not in model.identity
    assert re.search(EXPERT_TENSORS, "blk.7.ffn_gate_up_exps.weight")
    assert not re.search(EXPERT_TENSORS, "blk.7.ffn_gate_inp.weight")       # the router stays with its layer
    assert not re.search(EXPERT_TENSORS, "blk.7.ffn_down_shexp.weight")     # and a shared expert


# ---- memory plan ----------------------------------------------------------------------------------------------------

def test_host_weights_are_not_mapped_where_a_gpu_would_pin_them():
    """With the file mapped llama.cpp keeps host weights in the mapping (pageable) instead of the GPU's pinned host
    memory: use_mmap=None maps the file unless host weights meet a local GPU; a given value is kept."""
    from pyturbo.devices import CPU, GPU, Device
    from pyturbo.model import resolve_use_mmap
    cpu, gpu, rpc = Device("CPU", "", CPU), Device("CUDA0", "", GPU), Device("RPC0", "127.0.0.1:1", GPU)
    assert resolve_use_mmap(None, EXPERT_TENSORS, [cpu, gpu]) is False
    assert resolve_use_mmap(None, None, [cpu, gpu]) is True
    assert resolve_use_mmap(None, EXPERT_TENSORS, [cpu, rpc]) is True
    assert resolve_use_mmap(None, EXPERT_TENSORS, [cpu]) is True
    assert resolve_use_mmap(True, EXPERT_TENSORS, [cpu, gpu]) is True
    assert resolve_use_mmap(False, None, [cpu]) is False
    with pytest.raises(ValueError, match="use_mmap"):
        resolve_use_mmap(1, None, [cpu])


def test_model_says_whether_it_mapped_the_file(gpt_oss_tiny):
    with pyturbo.Model(gpt_oss_tiny, devices=["CPU"], experts_in_host_memory=True) as m:
        assert m.use_mmap is True          # no GPU here: nothing to pin
    with pyturbo.Model(gpt_oss_tiny, devices=["CPU"], use_mmap=False) as m:
        assert m.use_mmap is False


def test_plan_counts_host_weights_as_host_memory(gpt_oss_tiny, rpc3):
    per_layer = expert_bytes_per_layer(gpt_oss_tiny)
    needs, stages = {}, {}
    for pattern in (None, EXPERT_TENSORS, "no_such_weight"):
        # the embeddings in one place for all three (without host weights "auto" would put them on the first worker)
        with pyturbo.Model(gpt_oss_tiny, rpc_servers=rpc3.endpoints, tensor_split="even",
                           host_tensors=pattern, input_layer="cpu") as model:
            needs[pattern] = model.memory_plan.needs(**{k: CTX[k] for k in ("n_ctx", "n_batch", "n_ubatch")},
                                                     flash_attn=-1)
            stages[pattern] = dict(zip(model.devices, model.layers_per_stage))
    # the CPU, holding the experts of every layer, is a stage after the first layer's device; it holds no whole layer
    assert stages[EXPERT_TENSORS] == {"RPC0": 1, "CPU": 0, "RPC1": 2, "RPC2": 1}
    assert stages[None] == stages["no_such_weight"] == {"RPC0": 1, "RPC1": 2, "RPC2": 1}
    plain, host, nothing = needs[None], needs[EXPERT_TENSORS], needs["no_such_weight"]
    for dev, n in stages[None].items():
        assert plain[dev]["model"] - host[dev]["model"] == n * per_layer, dev
        assert host[dev]["context"] == plain[dev]["context"]                  # the KV cache stays on the devices
    assert host["CPU"]["model"] - plain["CPU"]["model"] == TINY.n_layer * per_layer
    # a pattern that matches nothing moves no weight (llama.cpp turns its own pipeline parallelism off whenever a
    # tensor override is given, which changes stock's compute buffers: those are not compared)
    assert {d: n["model"] for d, n in nothing.items()} == {d: n["model"] for d, n in plain.items()}


def test_auto_split_is_refused_with_host_weights(gpt_oss_tiny, rpc3):
    with pytest.raises(ValueError, match="tensor_split='auto' does not balance layers around weights kept in host"):
        pyturbo.Model(gpt_oss_tiny, rpc_servers=rpc3.endpoints, tensor_split="auto", experts_in_host_memory=True)


# ---- pipelined over the worker -> CPU -> worker alternation ---------------------------------------------------------

@pytest.mark.parametrize("n_workers,n_tokens,ctx_args", [
    (3, 300, CTX),
    (2, 200, dict(CTX, n_ubatch=16, max_in_flight=6)),   # 13 ubatches of 16, 6 in flight, against a window of 64
])
def test_pipelined_equals_standard_with_experts_in_host_memory(gpt_oss_tiny, rpc3, n_workers, n_tokens, ctx_args):
    """Logits, KV cache and four greedy decode steps, bit for bit; the forced path pipelined, with every layer's
    experts run by this process's CPU between its device's splits."""
    tokens = prompt(n_tokens, TINY.n_vocab)
    with pyturbo.Model(gpt_oss_tiny, rpc_servers=rpc3.endpoints[:n_workers], tensor_split="even",
                       experts_in_host_memory=True) as model:
        # the CPU is a stage of its own after the first worker: worker -> CPU -> worker within every layer
        assert model.devices == ["RPC0", "CPU"] + [f"RPC{i}" for i in range(1, n_workers)]
        runs = run_modes(model, tokens, ctx_args)
    std, pipe = runs["off"], runs["force"]
    assert std[0].path == "standard" and np.isfinite(std[0].logits).all()
    assert_same_outputs(std, pipe)
    res = pipe[0]
    assert res.path == "pipelined", res.fallback_reason
    assert res.n_stages == n_workers + 1
    n_ubatches = -(-n_tokens // ctx_args["n_ubatch"])
    cpu = [r for r in res.timeline if r.device == "CPU"]
    # per ubatch: the embedding lookup and each layer's experts
    for u in range(n_ubatches):
        assert sum(r.ubatch == u for r in cpu) == TINY.n_layer + 1, u


def test_host_experts_give_the_same_outputs_as_experts_on_the_devices(gpt_oss_tiny, rpc3):
    """The same CPU kernels, one thread each, wherever the experts are: moving them changes no bit here."""
    tokens = prompt(300, TINY.n_vocab)
    runs = {}
    for kwargs in ({}, dict(experts_in_host_memory=True), dict(host_tensors="no_such_weight")):
        with pyturbo.Model(gpt_oss_tiny, rpc_servers=rpc3.endpoints, tensor_split="even", **kwargs) as model:
            runs[str(kwargs)] = run_modes(model, tokens, modes=("force",))["force"]
    first, *others = runs.values()
    for other in others:
        assert other[0].path == "pipelined", other[0].fallback_reason
        assert_same_outputs(first, other)


# ---- bench ----------------------------------------------------------------------------------------------------------

def test_bench_gpt_oss_preset_with_experts_in_host_memory(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "pyturbo.bench", "--quick", "--preset", "gpt-oss-tiny",
                           "--experts-in-host-memory", "--workers", "3", "--lengths", "300", "--ubatch", "32",
                           "--no-ceiling", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "in host memory" in proc.stdout.splitlines()[0]
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["preset"] == "gpt-oss-tiny" and doc["settings"]["host_tensors"] == EXPERT_TENSORS
    [row] = doc["results"]
    assert row["prompt_tokens"] == 300 and row["outputs_equal"]
    assert row["modes"]["forced"]["paths"] == ["pipelined"]


@pytest.mark.parametrize("argv,message", [
    (["--host-tensors", "exps("], "--host-tensors / --experts-in-host-memory: host_tensors 'exps(' is not a regular"),
    (["--host-tensors", "exps", "--experts-in-host-memory"], "give host_tensors or experts_in_host_memory"),
    (["--preset", "gpt-oss-nano"], "invalid choice: 'gpt-oss-nano'"),
])
def test_bench_bad_host_options_are_argparse_errors(tmp_path, capsys, argv, message):
    from pyturbo.tools.bench import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_sizes_gpt_oss_presets():
    from pyturbo.tools.bench import layout
    # the released gpt-oss-20b file is 13.8 GB (MXFP4 experts, the rest BF16); ours has F16 where it has BF16
    assert 13.0e9 < layout.preset_bytes("gpt-oss-20b") < 14.5e9
    assert 60e9 < layout.preset_bytes("gpt-oss-120b") < 68e9
    assert synth.cached_path("gpt-oss-tiny").name.startswith("gpt-oss-L4-")
# ---- the GPU script, on the CPU -------------------------------------------------------------------------------------

def test_gpu_script_cpu_smoke(tmp_path):
    """bench/gpu/gpt_oss_host_experts.py end to end on gpt-oss-tiny with RPC workers in place of the stream devices,
    so that the GPU run does not fail on a typo: every mode measured, outputs compared, the markdown written."""
    out = tmp_path / "host-experts.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu/gpt_oss_host_experts.py"), "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    md = out.read_text()
    assert md == proc.stdout
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2, md
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "0 / 0", row        # logits max diff vs stock: default / forced
        assert cells[-2] == "pipelined", row    # the forced mode pipelined
    assert "Forced pipeline, 600 tokens, ubatch 32" in md and "busy CPU" in md


def test_gpu_script_stops_at_its_budget(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu/gpt_oss_host_experts.py"), "--cpu-smoke",
                           "--budget", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1: not started, the budget of 0 s is spent" in proc.stderr
    assert "| 300 | 32 | - | - | - |" in proc.stdout


# ---- server ---------------------------------------------------------------------------------------------------------

def test_server_options():
    pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
    from pyturbo.server.settings import parse_args
    assert parse_args(["--model", "m.gguf"]).host_tensors is None
    assert parse_args(["--model", "m.gguf", "--experts-in-host-memory"]).host_tensors == EXPERT_TENSORS
    assert parse_args(["--model", "m.gguf", "--cpu-moe"]).host_tensors == EXPERT_TENSORS
    assert parse_args(["--model", "m.gguf", "--host-tensors", "attn_.*"]).host_tensors == "attn_.*"


@pytest.mark.parametrize("argv", [["--host-tensors", "exps("], ["--host-tensors", "x", "--cpu-moe"]])
def test_server_bad_host_options_are_argparse_errors(argv, capsys):
    pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
    from pyturbo.server.settings import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--model", "m.gguf", *argv])
    assert "--host-tensors / --experts-in-host-memory: " in capsys.readouterr().err
