"""Shared fixtures: small synthetic models (written once per session) and local RPC workers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pyturbo import synth, workers

# auto's measurements stay in memory (this process's, and those of the interpreters tests start): a test must not
# depend on what earlier runs measured on this machine, nor write to its cache
os.environ["PYTURBO_CALIBRATION"] = "off"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir):
    """4 layers, 128 wide, F32, no tokenizer: fast enough for many prefills."""
    return synth.write_model(model_dir / "tiny.gguf", synth.PRESETS["tiny"], seed=0)


@pytest.fixture(scope="session")
def tiny_f16_model(model_dir):
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "dtype": "f16", "n_layer": 6})
    return synth.write_model(model_dir / "tiny-f16.gguf", shape, seed=1)


@pytest.fixture(scope="session")
def vocab_model(model_dir):
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size()})
    return synth.write_model(model_dir / "tiny-vocab.gguf", shape, seed=2, vocab="tiny")


@pytest.fixture(scope="session")
def rpc3():
    """Three CPU workers on loopback, one thread each, shared by the session's tests."""
    with workers.local(3, threads=1) as pool:
        yield pool


def prompt(n: int, n_vocab: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, n).astype(np.int32)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: an abort in C there fails the test instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def recomputed_logprobs(ctx, prompt_tokens, tokens) -> list[np.ndarray]:
    """log-softmax of the raw logits before each of tokens, from a fresh prefill and one decode per token."""
    from pyturbo.generation import log_softmax
    ctx.reset()
    logits = ctx.prefill(prompt_tokens, pipeline="off").logits
    out = []
    for token in tokens:
        out.append(log_softmax(logits))
        logits = ctx.decode(token)
    return out
