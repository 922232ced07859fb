"""GPT-OSS-shaped synthetic models (issue 24, items 1 and 2): they load in this llama.cpp build, their presets have
the released models' shapes, and prefill over several devices gives the same logits and decode on both paths.

gpt-oss-tiny's sliding window (64) is shorter than the prompts here (300 tokens, ten ubatches of 32), so the
windowed layers mask tokens that the full-attention layers still see.
"""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

import pyturbo
from conftest import prompt
from pyturbo import synth

TINY = synth.GPT_OSS_PRESETS["gpt-oss-tiny"]
N_TOKENS = 300
CTX = dict(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1)


@pytest.fixture(scope="module")
def gpt_oss_tiny(model_dir):
    return synth.write_model(model_dir / "gpt-oss-tiny.gguf", TINY, seed=0)


def test_presets_have_the_released_models_shapes():
    # OpenAI's config.json of gpt-oss-20b / gpt-oss-120b (num_hidden_layers, num_local_experts, num_experts_per_tok,
    # hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, sliding_window, vocab_size,
    # rope_theta, rope_scaling yarn factor / original_max_position_embeddings, max_position_embeddings), which
    # llama.cpp's convert_hf_to_gguf.py (GptOssModel) writes into the GGUF keys; llama.cpp's loader
    # (src/models/openai-moe.cpp) names 24 layers "20B" and 36 "120B".
    common = dict(n_embd=2880, n_ff_exp=2880, n_head=64, n_head_kv=8, head_dim=64, n_expert_used=4, n_swa=128,
                  n_vocab=201088, n_ctx_train=131072, yarn_orig_ctx=4096, yarn_factor=32.0, rope_freq_base=150000.0)
    for name, n_layer, n_expert in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        shape = synth.GPT_OSS_PRESETS[name]
        for field, value in dict(common, n_layer=n_layer, n_expert=n_expert).items():
            assert getattr(shape, field) == value, (name, field)
    # OpenAI's model card gives the totals, 20.91B and 116.83B parameters: every tensor is counted once
    assert round(synth.GPT_OSS_PRESETS["gpt-oss-20b"].n_params / 1e9, 2) == 20.91
    assert round(synth.GPT_OSS_PRESETS["gpt-oss-120b"].n_params / 1e9, 2) == 116.83


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_big_presets_are_accepted_by_the_writer(tmp_path, name):
    """Metadata and tensor infos only (no file is written: the 120B one would be 65 GB): what write_model would
    write, tensor by tensor, in the types llama.cpp's gpt-oss loader takes."""
    shape = synth.GPT_OSS_PRESETS[name]
    w, plan = synth._start_gpt_oss_writer(tmp_path / "never-written.gguf", shape, 0, "none")
    infos = w.tensors[0]
    assert len(plan) == len(infos) == 2 + 1 + 19 * shape.n_layer
    assert not (tmp_path / "never-written.gguf").exists()
    exps = {n: ti for n, ti in infos.items() if "_exps.weight" in n}
    assert len(exps) == 3 * shape.n_layer
    assert {ti.dtype for ti in exps.values()} == {gguf.GGMLQuantizationType.MXFP4}
    # ggml's order: the expert index is the outermost dimension; gate/up map n_embd -> n_ff_exp, down back
    assert infos["blk.0.ffn_gate_exps.weight"].shape == (shape.n_expert, shape.n_ff_exp, shape.n_embd)
    assert infos["blk.0.ffn_down_exps.weight"].shape == (shape.n_expert, shape.n_embd, shape.n_ff_exp)
    assert infos["blk.0.attn_sinks.weight"].shape == (shape.n_head,)
    assert infos["blk.0.attn_q.weight"].shape == (shape.n_head * shape.head_dim, shape.n_embd)
    # MXFP4 is 17 bytes per 32 values, the other matrices 2 or 4 bytes per value
    expert_values = 3 * shape.n_layer * shape.n_expert * shape.n_embd * shape.n_ff_exp
    assert sum(ti.nbytes for ti in exps.values()) == expert_values * 17 // 32
    assert sum(math.prod(ti.shape) for ti in infos.values()) == shape.n_params


def test_tiny_file_has_the_gpt_oss_keys_and_mxfp4_experts(gpt_oss_tiny):
    r = gguf.GGUFReader(gpt_oss_tiny)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == "gpt-oss"
    assert kv["gpt-oss.attention.sliding_window"] == TINY.n_swa < N_TOKENS
    assert kv["gpt-oss.expert_count"] == TINY.n_expert and kv["gpt-oss.expert_used_count"] == TINY.n_expert_used
    assert kv["gpt-oss.expert_feed_forward_length"] == TINY.n_ff_exp
    assert kv["gpt-oss.attention.key_length"] == kv["gpt-oss.attention.value_length"] == TINY.head_dim
    assert kv["gpt-oss.rope.scaling.type"] == "yarn"
    tensors = {t.name: t for t in r.tensors}
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.MXFP4
    # the random codes decode to the E2M1 grid times one power of two, with a std near 1/sqrt(fan_in)
    w = gguf.quants.dequantize(down.data, down.tensor_type)
    assert w.shape == (TINY.n_expert, TINY.n_embd, TINY.n_ff_exp)
    target = 1 / math.sqrt(TINY.n_ff_exp)
    assert target / 2 < w.std() < target * 2
    scale = np.abs(w[w != 0]).min()   # the grid's smallest non-zero magnitude (kvalue 1)
    assert set(np.unique(np.abs(w) / scale)) <= {0, 1, 2, 3, 4, 6, 8, 12}
    assert tensors["blk.0.attn_sinks.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_tiny_is_deterministic_by_seed(tmp_path, gpt_oss_tiny):
    again = synth.write_model(tmp_path / "a.gguf", TINY, seed=0)
    other = synth.write_model(tmp_path / "b.gguf", TINY, seed=1)
    assert again.read_bytes() == gpt_oss_tiny.read_bytes()
    assert other.read_bytes() != gpt_oss_tiny.read_bytes()
    assert synth.cached_model("gpt-oss-tiny", cache_dir=tmp_path).name.startswith("gpt-oss-")


def test_tiny_loads_and_prefills_past_the_window(gpt_oss_tiny):
    with pyturbo.Model(gpt_oss_tiny) as model:
        assert (model.n_layer, model.n_vocab, model.n_embd) == (TINY.n_layer, TINY.n_vocab, TINY.n_embd)
        with model.context(**CTX) as ctx:
            res = ctx.prefill(prompt(N_TOKENS, TINY.n_vocab))
            logits = ctx.logits()
            assert res.n_ubatches == -(-N_TOKENS // CTX["n_ubatch"])
            assert ctx.n_past == N_TOKENS
    assert logits.shape == (TINY.n_vocab,)
    assert np.isfinite(logits).all()
    assert logits.std() > 0


def test_pipelined_equals_standard_over_rpc(gpt_oss_tiny, rpc3):
    """Logits, KV cache and four greedy decode steps, bit for bit; then that the forced path did pipeline."""
    tokens = prompt(N_TOKENS, TINY.n_vocab)
    runs = {}
    with pyturbo.Model(gpt_oss_tiny, rpc_servers=rpc3.endpoints, tensor_split="even") as model:
        assert len(model.devices) == 3
        for mode in ("off", "force"):
            with model.context(**CTX) as ctx:
                res = ctx.prefill(tokens, pipeline=mode)
                kv = ctx.kv_state()
                generated = list(ctx.generate(4))
                runs[mode] = (res, kv, generated, ctx.logits())
    (std, kv_std, gen_std, last_std), (pipe, kv_pipe, gen_pipe, last_pipe) = runs["off"], runs["force"]
    assert std.path == "standard"
    assert np.isfinite(std.logits).all()
    np.testing.assert_array_equal(pipe.logits, std.logits)
    assert kv_pipe == kv_std, "KV cache differs between the two paths"
    assert gen_pipe == gen_std
    np.testing.assert_array_equal(last_pipe, last_std)
    assert pipe.path == "pipelined", pipe.fallback_reason
    assert pipe.n_stages == 3
