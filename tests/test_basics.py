"""The foundation: build info, loading, standard prefill, decode, tokenizer, RPC split, errors (issue: package)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pyturbo
from pyturbo import workers
from conftest import prompt, run_python


def test_build_info_lists_cpu():
    info = pyturbo.build_info()
    assert isinstance(info["cuda"], bool)
    assert any(d["name"] == "CPU" for d in info["devices"])
    assert all(isinstance(d["events"], bool) for d in info["devices"])


def test_bad_gpu_streams_setting_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-c", "import pyturbo; pyturbo.build_info()"], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "GGML_CUDA_DEVICES"}
                          | {"PYTURBO_GPU_STREAMS": "many"})
    assert proc.returncode == 1 and "PYTURBO_GPU_STREAMS must be 'auto' or a count >= 1, not 'many'" in proc.stderr


def test_load_tiny_model(tiny_model):
    with pyturbo.Model(tiny_model, devices=[]) as model:  # devices=[]: the CPU only, even where a GPU is present
        assert (model.n_layer, model.n_vocab, model.n_embd) == (4, 512, 128)
        assert model.devices == ["CPU"]
        assert not model.has_vocab
    assert model.closed


def test_prefill_is_deterministic_across_fresh_contexts(tiny_model):
    toks = prompt(100)
    with pyturbo.Model(tiny_model) as model:
        runs = []
        for _ in range(2):
            with model.context(n_ctx=256, n_ubatch=32, n_threads=2) as ctx:
                res = ctx.prefill(toks)
                runs.append((res.logits, ctx.kv_state()))
                assert res.n_tokens == 100 and res.seconds > 0 and res.tokens_per_second > 0
                assert res.logits.dtype == np.float32 and res.logits.shape == (512,)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_prefill_agrees_with_token_by_token_decode(tiny_model):
    """Same math, different kernels: the KV cache is stored in F16 (relative precision ~5e-4) and one query vs a
    batch of queries runs attention and matmuls with other tilings and summation orders. Logits of this model are
    O(1), so differences of a few F16 ulps (~1e-3) are expected; 1e-2 absolute allows for them and is still far
    below what a wrong position, mask or KV slot would cause (differences of order 1)."""
    toks = prompt(40)
    with pyturbo.Model(tiny_model, devices=[]) as model:
        with model.context(n_ctx=128, n_ubatch=32, n_threads=1) as ctx:
            batched = ctx.prefill(toks).logits
            ctx.reset()
            for t in toks:
                single = ctx.decode(int(t))
    np.testing.assert_allclose(single, batched, atol=1e-2, rtol=0)
    assert np.mean(np.abs(single - batched)) < 1e-3
    assert int(np.argmax(single)) == int(np.argmax(batched))


def test_layer_split_over_two_rpc_workers_matches_one_process(tiny_model, rpc3):
    """The RPC workers run the same CPU kernels as the local CPU backend, on the same shapes: identical results."""
    toks = prompt(150)
    with pyturbo.Model(tiny_model, devices=[]) as local, local.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
        ref = ctx.prefill(toks).logits
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as split:
        assert split.devices == ["RPC0", "RPC1"] or all(d.startswith("RPC") for d in split.devices)
        assert len(split.devices) == 2
        with split.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
            got = ctx.prefill(toks).logits
    np.testing.assert_array_equal(got, ref)


def test_generate_and_tokenizer(vocab_model):
    with pyturbo.Model(vocab_model) as model:
        assert model.has_vocab
        with model.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
            text = "hello world, the quick brown fox (ünïcödé)"
            toks = model.tokenize(text)
            assert len(toks) > 3
            assert model.detokenize(toks).strip() == text
            ctx.prefill(toks)
            out = ctx.generate(4)
            ctx.reset()
            assert ctx.prefill(text).n_tokens == len(toks)  # text is tokenized as model.tokenize does
            assert len(out) == 4 and all(0 <= t < model.n_vocab for t in out)


def test_tokenize_without_vocab_is_a_clear_error(tiny_model):
    with pyturbo.Model(tiny_model) as model, model.context(n_ctx=64) as ctx:
        with pytest.raises(ValueError, match="no tokenizer"):
            model.tokenize("hi")


# ---- errors: each raises a Python exception that names the problem ---------------------------------------------------

def test_missing_model_path(tmp_path):
    with pytest.raises(pyturbo.ModelLoadError, match="not found"):
        pyturbo.Model(tmp_path / "nope.gguf")


def test_directory_instead_of_model(tmp_path):
    with pytest.raises(pyturbo.ModelLoadError, match="not a file"):
        pyturbo.Model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(pyturbo.ModelLoadError, match="not a GGUF file"):
        pyturbo.Model(bad)


def test_truncated_gguf_is_refused_in_a_subprocess(tiny_model, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_model.read_bytes()[:5000])
    proc = run_python(f"""
        import pyturbo
        try:
            pyturbo.Model({str(bad)!r})
        except pyturbo.ModelLoadError as e:
            print("REFUSED", e)
    """)
    assert proc.returncode == 0 and "REFUSED" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_model(tiny_model, tmp_path):
    p = tmp_path / "locked.gguf"
    p.write_bytes(tiny_model.read_bytes())
    p.chmod(0)
    with pytest.raises(pyturbo.ModelLoadError, match="cannot read"):
        pyturbo.Model(p)


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="split_mode"):
        pyturbo.Model(tiny_model, split_mode="diagonal")
    with pytest.raises(ValueError, match="no device named"):
        pyturbo.Model(tiny_model, devices=["GPU42"])
    with pytest.raises(ValueError, match="host:port"):
        pyturbo.Model(tiny_model, rpc_servers="localhost")
    with pyturbo.Model(tiny_model) as model:
        with pytest.raises(ValueError, match="n_ubatch"):
            model.context(n_batch=64, n_ubatch=128)


@pytest.mark.parametrize("kwargs,name", [
    ({"n_ctx": True}, "n_ctx"), ({"n_batch": True, "n_ubatch": True}, "n_batch"), ({"n_ubatch": False}, "n_ubatch"),
    ({"n_ubatch": 32, "first_ubatch": True}, "first_ubatch"), ({"n_threads": -100}, "n_threads"),
    ({"n_threads": True}, "n_threads"), ({"n_threads": 1.0}, "n_threads"), ({"n_threads": 100_000}, "n_threads"),
    ({"max_in_flight": True}, "max_in_flight"), ({"n_batch": 2**40}, "n_batch"),
])
def test_context_arguments_are_checked(tiny_model, kwargs, name):
    """bool is an int subclass: True must not pass as a count; counts C would take wrongly are refused too."""
    with pyturbo.Model(tiny_model, devices=[]) as model:
        with pytest.raises(ValueError, match=name):
            model.context(**kwargs)
        with model.context(n_ctx=64, n_threads=0) as ctx:  # 0 and None: the default thread count
            assert ctx.n_threads >= 1


def test_generate_past_n_ctx_returns_what_it_generated(tiny_model):
    with pyturbo.Model(tiny_model, devices=[]) as model, model.context(n_ctx=64, n_ubatch=32, n_threads=1) as ctx:
        ctx.prefill(prompt(60))
        room = ctx.generate(4)                       # exactly fills the context
        assert room.finish_reason == "length" and len(room) == 4 and ctx.n_past == 64
        ctx.reset()
        ctx.prefill(prompt(60))
        full = ctx.generate(10)
        # the four that fit, plus the one drawn from the last logits, which has no room in the KV cache
        assert full.finish_reason == "context" and len(full) == 5 and full[:4] == room and ctx.n_past == 64
        assert ctx.generate(3) == [full[4]] and ctx.n_past == 64    # nothing left: still no exception
        with pytest.raises(ValueError, match="n must be"):
            ctx.generate(True)


def test_bad_tokens(tiny_model):
    with pyturbo.Model(tiny_model) as model, model.context(n_ctx=64, n_ubatch=32) as ctx:
        with pytest.raises(ValueError, match="empty"):
            ctx.prefill([])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ctx.prefill([1, 2, 512])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ctx.prefill([-1])
        with pytest.raises(ValueError, match="integers"):
            ctx.prefill([1.5, 2.0])
        with pytest.raises(ValueError, match="do not fit"):
            ctx.prefill(prompt(65))
        ctx.prefill(prompt(60))
        with pytest.raises(ValueError, match="do not fit.*reset"):
            ctx.prefill(prompt(5), pipeline=True)
        assert ctx.n_past == 60


def test_unreachable_rpc_server_in_a_subprocess(tiny_model):
    port = workers.free_port()  # nothing listens there
    proc = run_python(f"""
        import pyturbo
        try:
            pyturbo.Model({str(tiny_model)!r}, rpc_servers=["127.0.0.1:{port}"])
        except pyturbo.WorkerError as e:
            print("UNREACHABLE", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNREACHABLE" in proc.stdout and f"127.0.0.1:{port}" in proc.stdout and "pyturbo.worker" in proc.stdout


# ---- workers ---------------------------------------------------------------------------------------------------------

def test_workers_leave_no_process_behind():
    with workers.local(2, threads=1) as pool:
        pids = [p.pid for p in pool.procs]
        for port in pool.ports:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_workers_stop_even_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with workers.local(1) as pool:
            proc = pool.procs[0]
            raise RuntimeError("boom")
    assert proc.poll() is not None


def test_worker_refuses_a_bad_port():
    # (a non-loopback address without a secret is refused too: tests/test_rpc_auth.py)
    bad = subprocess.run([sys.executable, "-m", "pyturbo.worker", "--port", "70000"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "--port" in bad.stderr
    many = subprocess.run([sys.executable, "-m", "pyturbo.worker", "--port", "0", "--threads", "100000"],
                          capture_output=True, text=True, timeout=60)
    assert many.returncode == 2 and "--threads must be from 1 to 512" in many.stderr


def test_gpu_streams_decision():
    """The stream-device default: only a single GPU is split, the user's GGML_CUDA_DEVICES wins, a bad value is
    refused with what to write instead."""
    from pyturbo.devices import AUTO_STREAMS_PER_GPU, decide_gpu_streams

    def no_gpu_query():
        raise AssertionError("the GPUs must not be counted here")

    assert decide_gpu_streams({}, True, lambda: 1)["streams_per_gpu"] == AUTO_STREAMS_PER_GPU
    assert decide_gpu_streams({"PYTURBO_GPU_STREAMS": "2"}, True, lambda: 1)["streams_per_gpu"] == 2
    assert decide_gpu_streams({"PYTURBO_GPU_STREAMS": "1"}, True, lambda: 1)["streams_per_gpu"] == 1
    assert decide_gpu_streams({}, True, lambda: 2)["streams_per_gpu"] == 1
    assert decide_gpu_streams({}, True, lambda: 0)["streams_per_gpu"] == 1
    assert decide_gpu_streams({}, False, no_gpu_query)["streams_per_gpu"] == 1
    user = decide_gpu_streams({"GGML_CUDA_DEVICES": "3", "PYTURBO_GPU_STREAMS": "bad"}, True, no_gpu_query)
    assert user["streams_per_gpu"] is None and "GGML_CUDA_DEVICES=3" in user["source"]
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="PYTURBO_GPU_STREAMS must be 'auto' or a count >= 1"):
            decide_gpu_streams({"PYTURBO_GPU_STREAMS": bad}, True, lambda: 1)


def test_default_threads_follow_where_the_layers_are(monkeypatch):
    """Every usable core where the CPU holds layers; a few where it only looks up the token embeddings."""
    from pyturbo import devices
    monkeypatch.setattr(devices, "usable_cpu_cores", lambda: 64)
    assert devices.default_threads(["CPU"]) == 64
    assert devices.default_threads(["CPU", "CUDA0"]) == 64
    assert devices.default_threads(["CUDA0", "CUDA1"]) == devices.EMBEDDINGS_ONLY_THREADS
    assert devices.default_threads(["RPC0[127.0.0.1:50052]", "RPC1[127.0.0.1:50053]"]) == devices.EMBEDDINGS_ONLY_THREADS
    monkeypatch.setattr(devices, "usable_cpu_cores", lambda: 2)
    assert devices.default_threads(["CUDA0", "CUDA1"]) == 2
    monkeypatch.setattr(devices, "usable_cpu_cores", lambda: 1024)
    assert devices.default_threads(["CPU"]) == devices.MAX_THREADS


# ---- the package as a user meets it ----------------------------------------------------------------------------------

def test_tools_import_under_every_name():
    # a fresh interpreter: this one imported them already (conftest)
    proc = run_python("""
        import pyturbo.workers, pyturbo.synth
        import pyturbo.tools.workers, pyturbo.tools.synth
        from pyturbo import workers, synth
        from pyturbo.workers import local
        assert pyturbo.workers is workers is pyturbo.tools.workers and workers.local is local
        assert pyturbo.synth is synth is pyturbo.tools.synth
        import pyturbo.worker, pyturbo.bench   # the commands' modules
        assert callable(pyturbo.worker.main) and callable(pyturbo.bench.main)
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_python_m_pyturbo_lists_the_commands_and_starts_nothing():
    proc = run_python("""
        import runpy, sys
        sys.argv = ["pyturbo"]
        try:
            runpy.run_module("pyturbo", run_name="__main__")
        except SystemExit as e:
            print("EXIT", e.code)
        print("BENCH IMPORTED" if "pyturbo.tools.bench" in sys.modules else "NOTHING STARTED")
    """)
    assert "EXIT 0" in proc.stdout and "NOTHING STARTED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    for command in ("python -m pyturbo.bench", "python -m pyturbo.bench --quick", "python -m pyturbo.server",
                    "python -m pyturbo.worker", "python -m pytest tests"):
        assert command in proc.stdout
    refused = subprocess.run([sys.executable, "-m", "pyturbo", "--quick"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "takes no arguments" in refused.stderr


def test_install_hints_install_from_the_checkout():
    """An unrelated package named pyturbo is on the public index: a hint to install the extras by that name would
    install it. Every hint and doc installs them from the checkout instead (".[server]")."""
    root = Path(__file__).resolve().parent.parent
    risky = ("pyturbo" + "[", "pyturbo" + "\\[")   # split, so that this file does not find itself; and as a regex
    files = [root / "README.md", *(p for d in ("src", "tests", "bench", ".ci") for p in (root / d).rglob("*")
                                   if p.suffix in (".py", ".md", ".sh", ".toml", ".txt", "") and p.is_file())]
    found = [f"{p.relative_to(root)}:{n}" for p in files if "_lib" not in p.parts
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if any(r in line for r in risky)]
    assert not found, f"install hints naming the index's pyturbo: {found}"
    assert len(files) > 20
