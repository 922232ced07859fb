"""CUDA paths (issue: GPU). Skipped, with the reason, where pyturbo was built without CUDA or no GPU answers.

ggml-cuda's GGML_CUDA_DEVICES=N maps N virtual devices onto the physical GPU(s), each with its own stream, so the
multi-device paths run on one GPU. The variable is read when the CUDA backend starts, hence a fresh interpreter per
layout. Between CUDA stages the pipeline copies device to device; PYTURBO_PIPELINE_HOST_STAGING=1 makes it stage
through host memory instead, the path of GPUs that cannot copy to each other (consumer rigs without P2P).
"""
from __future__ import annotations

import json

import pytest

import pyturbo
from conftest import run_python

INFO = pyturbo.build_info()
pytestmark = pytest.mark.skipif(
    not INFO["cuda"] or not any(d["name"].startswith("CUDA") for d in INFO["devices"]),
    reason="pyturbo was built without CUDA or no GPU is present" if not INFO["cuda"] else "no CUDA device answers")

LAYOUT = """
import json, os, numpy as np, pyturbo
from pyturbo import synth, workers
path = synth.cached_model(synth.ModelShape(n_layer=8, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=1000, dtype="f16"))
toks = np.random.default_rng(0).integers(0, 1000, 700)
out = {}
def both(model, **kw):
    with model.context(n_ctx=1024, n_batch=256, n_ubatch=64, flash_attn=True, **kw) as ctx:
        std = ctx.prefill(toks, pipeline=False); kv_std = ctx.kv_state(); ctx.reset()
        std2 = ctx.prefill(toks, pipeline=False); kv_std2 = ctx.kv_state(); ctx.reset()
        pipe = ctx.prefill(toks, pipeline=True); kv_pipe = ctx.kv_state()
    return {"path": pipe.path, "reason": pipe.fallback_reason, "decision": pipe.decision, "logits_equal": bool(np.array_equal(std.logits, pipe.logits)),
            "max_diff": float(np.abs(std.logits - pipe.logits).max()), "kv_equal": kv_std == kv_pipe,
            "std_repeat_equal": bool(np.array_equal(std.logits, std2.logits)) and kv_std == kv_std2,
            "argmax_equal": int(np.argmax(std.logits)) == int(np.argmax(pipe.logits)),
            "devices": sorted({r.device for r in pipe.timeline}), "stages": pipe.n_stages,
            "records": pipe.timeline.to_records(), "seconds": pipe.seconds}
"""


def run_layout(code: str, n_devices: int | None, force_local_gpus: bool = True, **env_vars: str) -> dict:
    """Run LAYOUT + code in a fresh interpreter on the first GPU; n_devices None: pyturbo's default layout."""
    env = "import os; os.environ['CUDA_VISIBLE_DEVICES'] = '0'\n"
    if n_devices is not None:
        env += f"os.environ['GGML_CUDA_DEVICES'] = '{n_devices}'\n"
    else:
        env += "os.environ.pop('GGML_CUDA_DEVICES', None); os.environ.pop('PYTURBO_GPU_STREAMS', None)\n"
    if force_local_gpus:  # the dispatcher leaves all-local-GPU layouts to the standard path unless told otherwise
        env += "os.environ['PYTURBO_PIPELINE'] = 'force'\n"
    for k, v in env_vars.items():
        env += f"os.environ[{k!r}] = {v!r}\n"
    proc = run_python(env + LAYOUT + code + "\nprint('RESULT', json.dumps(out))", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("n_devices,host_staging", [(2, "0"), (4, "0"), (2, "1")])
def test_virtual_cuda_devices_pipelined_equals_standard(n_devices, host_staging):
    out = run_layout(f"""
devs = [f"CUDA{{i}}" for i in range({n_devices})]
with pyturbo.Model(path, devices=devs, tensor_split="even") as model:
    out["r"] = both(model)
""", n_devices, PYTURBO_PIPELINE_HOST_STAGING=host_staging)["r"]
    assert out["path"] == "pipelined", out["reason"]
    assert out["stages"] == n_devices
    assert_close_to_standard(out)
    assert_gpu_timing_records(out)


def assert_close_to_standard(out: dict) -> None:
    """Bit-identical where the standard path itself is (CPU, RPC). On CUDA the pipelined logits may differ from the
    standard path's by a few F16 ulps (logits of O(1); the largest seen is in bench/results/2026-11-24-h100-cuda.md);
    whether the standard path repeats itself bit for bit there is recorded in std_repeat_equal. The bound 1e-2 is
    well above such rounding and far below what a wrong position, mask or KV slot causes (differences of order 1)."""
    if out["logits_equal"] and out["kv_equal"]:
        return
    assert out["max_diff"] <= 1e-2 and out["argmax_equal"], out


def test_gpu_stage_and_rpc_cpu_stage():
    out = run_layout("""
with workers.local(1, threads=4) as pool:
    with pyturbo.Model(path, rpc_servers=pool.endpoints, devices=["CUDA0", "RPC0"], tensor_split="even") as model:
        out["r"] = both(model)
""", 1)["r"]
    assert out["path"] == "pipelined", out["reason"]
    assert any(d.startswith("CUDA") for d in out["devices"]) and any(d.startswith("RPC") for d in out["devices"])
    assert_close_to_standard(out)
    assert_gpu_timing_records(out)


def assert_gpu_timing_records(out: dict) -> None:
    """GPU stages are timed by CUDA events (patches/0005), other devices by the host clock; both on one time scale.
    Event times are mapped onto the host clock through a reference event synchronized at the replay's start, so they
    may read late by that synchronize's wake-up latency: 1 ms of slack covers it (a ubatch here takes several)."""
    recs = out["records"]
    assert {r["clock"] for r in recs if r["device"].startswith("CUDA")} == {"cuda-event"}, recs[:4]
    assert {r["clock"] for r in recs if not r["device"].startswith("CUDA")} <= {"host"}
    slack = 1e-3
    for r in recs:
        assert -slack <= r["start"] <= r["end"] <= out["seconds"] + slack, r
    # a stage starts a ubatch only after the previous stage finished it, whichever clocks timed the two
    by_key = {(r["ubatch"], r["stage"]): r for r in recs if r["stage"] >= 0}
    for (u, st), r in by_key.items():
        if (u, st - 1) in by_key:
            assert r["start"] >= by_key[(u, st - 1)]["end"] - slack, (by_key[(u, st - 1)], r)


# llama.cpp overlaps GPUs of one process itself when they have events (a build with GGML_CUDA_NO_PEER_COPY has none)
CUDA_EVENTS = all(d["events"] for d in INFO["devices"] if d["name"].startswith("CUDA"))


def test_local_gpus_auto_decides_from_measurements():
    """Unforced, on GPUs of this process: where llama.cpp's own pipeline parallelism is on (events), auto measures both
    paths before it trusts either (the first auto run of a fresh calibration is pipelined); without events stock
    would serialize the stages and auto pipelines."""
    out = run_layout("""
with pyturbo.Model(path, devices=["CUDA0", "CUDA1"], tensor_split="even") as model:
    out["r"] = both(model)
""", 2, force_local_gpus=False)["r"]
    assert out["path"] == "pipelined", out["reason"]
    assert out["decision"].startswith("calibrating" if CUDA_EVENTS else "llama.cpp's own pipeline parallelism is off"), out
    assert_close_to_standard(out)


def test_single_gpu_falls_back_with_reason():
    out = run_layout("""
with pyturbo.Model(path, devices=["CUDA0"]) as model:
    out["r"] = both(model)
""", 1)["r"]
    assert out["path"] == "standard" and "single device" in out["reason"]
    assert out["logits_equal"] and out["kv_equal"]  # both runs took the standard path


def test_one_gpu_becomes_stream_devices_by_default():
    """PYTURBO_GPU_STREAMS (default auto: 4 on a single GPU) splits the GPU into stream devices; the default model
    then spans them, and pipeline="force" keeps that layout on the standard path (their async copies overlap) unless
    the devices lack events, when llama.cpp does not overlap them and the pipeline does."""
    code = """
info = pyturbo.build_info()
out["streams"] = info["gpu_streams"]
out["cuda_devices"] = sum(d["name"].startswith("CUDA") for d in info["devices"])
with pyturbo.Model(path) as model:
    out["model_devices"] = model.devices
    out["r"] = both(model)
"""
    auto = run_layout(code, None, force_local_gpus=False)
    assert auto["streams"]["streams_per_gpu"] == auto["cuda_devices"] == 4, auto["streams"]
    assert len(auto["model_devices"]) == 4
    assert auto["r"]["path"] == "pipelined", auto["r"]["reason"]
    assert_close_to_standard(auto["r"])
    one = run_layout(code, None, force_local_gpus=False, PYTURBO_GPU_STREAMS="1")
    assert one["cuda_devices"] == 1 and one["model_devices"] == ["CUDA0"], one



def test_first_ubatch_schedule_on_cuda():
    """first_ubatch (opt-in): pipelined against standard with the same schedule as for uniform ubatches
    (assert_close_to_standard); against uniform ubatches cuBLAS and the attention kernels see other shapes, so the
    logits differ by rounding: within pyturbo.results.FIRST_UBATCH_TOLERANCE."""
    out = run_layout("""
from pyturbo.results import within_first_ubatch_tolerance
with pyturbo.Model(path) as model:
    with model.context(n_ctx=1024, n_batch=256, n_ubatch=64, flash_attn=True) as ctx:
        uniform = ctx.prefill(toks, pipeline=False).logits
    out = both(model, first_ubatch=16)
    with model.context(n_ctx=1024, n_batch=256, n_ubatch=64, flash_attn=True, first_ubatch=16) as ctx:
        first = ctx.prefill(toks, pipeline=True)
    out["sizes"] = sorted({(r.ubatch, r.n_tokens) for r in first.timeline})[:2]
    out["vs_uniform"] = float(np.abs(first.logits - uniform).max())
    out["within_tolerance"] = within_first_ubatch_tolerance(first.logits, uniform)
""", 2)
    assert out["path"] == "pipelined", out["reason"]
    assert_close_to_standard(out)
    assert out["sizes"] == [[0, 16], [1, 64]], out["sizes"]
    assert out["within_tolerance"], out
    print(f"first_ubatch vs uniform on CUDA: max |d logit| {out['vs_uniform']:.3g}")
