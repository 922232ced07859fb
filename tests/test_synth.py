"""Synthetic GGUF models: valid files, deterministic, clear errors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from pyturbo import synth


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_written_file_has_the_shape_asked_for(tmp_path, dtype):
    shape = synth.ModelShape(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_vocab=100, dtype=dtype)
    reader = gguf.GGUFReader(synth.write_model(tmp_path / "m.gguf", shape, seed=1))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * 2
    assert list(tensors["blk.1.attn_k.weight"].shape) == [64, 32]       # GGUF lists dims innermost first
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [96, 64]
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["output.weight"].tensor_type.name == synth.DTYPES[dtype][0]
    block_count = reader.fields["llama.block_count"]
    assert block_count.parts[block_count.data[0]][0] == 2


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    shape = synth.PRESETS["tiny"]
    a = synth.write_model(tmp_path / "a.gguf", shape, seed=7).read_bytes()
    b = synth.write_model(tmp_path / "b.gguf", shape, seed=7).read_bytes()
    c = synth.write_model(tmp_path / "c.gguf", shape, seed=8).read_bytes()
    assert a == b and a != c


def test_cached_model_is_reused(tmp_path):
    p1 = synth.cached_model("tiny", directory=tmp_path)
    mtime = p1.stat().st_mtime_ns
    assert synth.cached_model("tiny", directory=tmp_path) == p1 and p1.stat().st_mtime_ns == mtime
    assert synth.cached_model("tiny", seed=1, directory=tmp_path) != p1


def test_bad_shapes_say_what_to_fix():
    with pytest.raises(ValueError, match="multiple of n_head"):
        synth.ModelShape(n_layer=2, n_embd=100, n_ff=64, n_head=3, n_head_kv=1, n_vocab=10)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        synth.ModelShape(n_layer=0, n_embd=64, n_ff=64, n_head=4, n_head_kv=1, n_vocab=10)
    with pytest.raises(ValueError, match="multiples of 32"):
        synth.ModelShape(n_layer=1, n_embd=48, n_ff=64, n_head=4, n_head_kv=1, n_vocab=10, dtype="q4_0")
    with pytest.raises(ValueError, match="unknown preset"):
        synth.cached_model("gpt-5")


def test_tiny_vocab_needs_matching_size(tmp_path):
    with pytest.raises(ValueError, match="n_vocab="):
        synth.write_model(tmp_path / "v.gguf", synth.PRESETS["tiny"], vocab="tiny")
