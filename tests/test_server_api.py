"""What llama-server's users expect from the API, on a live `python -m pyturbo.server` (127.0.0.1, CPU): its own
/completion route, ignore_eos and min_tokens, logprobs on both OpenAI routes (their shapes) and n_probs, and any
model id served unless --strict-model-name. Driven by the openai client where it applies and by plain HTTP.

Nothing here depends on what random weights sample: greedy answers are compared with the library's on the same
model and settings, the end of generation is forced by a logit bias on EOS, and logprobs are checked against the
log-softmax of the logits recomputed in the library."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pyturbo
from pyturbo import synth
from conftest import recomputed_logprobs
from serverproc import ServerProcess

pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
openai = pytest.importorskip("openai", reason="the openai client is missing: pip install '.[test]'")
import httpx  # noqa: E402  (after the skip: part of the same extra)

KEY = "api-key-456"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = "the quick brown fox jumps over the lazy dog and then the model made the first long pipeline"
SIZES = {"n_ctx": 1024, "n_batch": 512, "n_ubatch": 64}
EXACT = 1e-9  # logprobs of the same logits: the server's equal the library's but for JSON's float printing


@pytest.fixture(scope="module")
def api_model(model_dir):
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size()})
    return synth.write_model(model_dir / "api.gguf", shape, seed=4, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def server(api_model, tmp_path_factory):
    args = ["--model", str(api_model), "--n-ctx", SIZES["n_ctx"], "--n-batch", SIZES["n_batch"], "--n-ubatch",
            SIZES["n_ubatch"], "--threads", "1", "--api-key", KEY, "--alias", "api"]
    with ServerProcess(args, tmp_path_factory.mktemp("server-api") / "server.log") as srv:
        yield srv
    assert "Traceback" not in srv.log_tail(10**6), "the server logged a crash:\n" + srv.log_tail()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def library(api_model):
    """A context on the same model with the server's sizes and threads: the same logits, bit for bit."""
    with pyturbo.Model(api_model, devices=[]) as model, model.context(**SIZES, n_threads=1) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def eos(library) -> int:
    assert library.model.eog_tokens == (library.model.eos_id,)
    return library.model.eos_id


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)


def events(server, path: str, body: dict) -> list[str]:
    """The data of each server-sent event of a streamed answer."""
    with httpx.stream("POST", server.url + path, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [line[len("data:"):].strip() for line in r.iter_lines() if line.startswith("data:")]


def greedy(ctx, prompt, n: int, **kw):
    """The library's greedy answer that runs to n tokens."""
    return ctx.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True, cache_prompt=False, **kw)


def check_entries(entries: list[dict], expected: list[np.ndarray], tokens: list[int], n_top: int) -> None:
    """llama-server's / OpenAI's chat logprobs entries against the recomputed ones: the drawn token's logprob and
    the n_top most likely, sorted, all <= 0."""
    assert [e["id"] for e in entries] == tokens
    for e, lp in zip(entries, expected):
        assert e["logprob"] <= 0 and abs(e["logprob"] - lp[e["id"]]) < EXACT
        top = e["top_logprobs"]
        assert len(top) == n_top and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert [t["id"] for t in top] == [int(i) for i in np.argsort(-lp, kind="stable")[:n_top]]
        assert all(abs(t["logprob"] - lp[t["id"]]) < EXACT for t in top)
        assert bytes(e["bytes"]).decode(errors="replace") == e["token"]


# ---- /completion ----------------------------------------------------------------------------------------------------

def test_completion_route_answers_as_llama_server(server, library):
    """POST /completion (text or token ids) gives the library's greedy answer with llama-server's fields."""
    want = greedy(library, TEXT, 12)
    body = {"prompt": TEXT, "n_predict": 12, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
            "return_tokens": True}
    got = post(server, "/completion", body).json()
    assert (got["content"], got["tokens"]) == (want.text, want.tokens)
    assert got["stop"] is True and got["tokens_predicted"] == 12 and got["tokens_evaluated"] == want.n_prompt
    assert (got["stop_type"], got["stopping_word"], got["stopped_limit"], got["stopped_eos"]) == ("limit", "", True, False)
    assert got["model"] == "api" and got["truncated"] is False and "completion_probabilities" not in got
    assert got["generation_settings"]["n_predict"] == 12 and got["generation_settings"]["ignore_eos"] is True
    assert got["generation_settings"]["n_ctx"] == SIZES["n_ctx"] and got["timings"]["predicted_n"] == 12
    by_ids = post(server, "/completions", body | {"prompt": library.model.tokenize(TEXT, parse_special=True)}).json()
    assert by_ids["content"] == want.text


def test_completion_stream_sends_each_token_then_the_totals(server, library):
    want = greedy(library, TEXT, 10)
    body = {"prompt": TEXT, "n_predict": 10, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
            "stream": True, "n_probs": 3}
    data = events(server, "/completion", body)
    assert "[DONE]" not in data   # llama-server's own stream has none
    chunks = [json.loads(d) for d in data]
    *tokens, final = chunks
    assert all(c["stop"] is False for c in tokens) and final["stop"] is True
    assert "".join(c["content"] for c in tokens) == want.text
    assert [t for c in tokens for t in c["tokens"]] == want.tokens
    assert [c["tokens_predicted"] for c in tokens if c["tokens"]] == list(range(1, 11))
    assert final["tokens_predicted"] == 10 and final["stop_type"] == "limit" and final["content"] == ""
    entries = [c["completion_probabilities"][0] for c in tokens if c["tokens"]]
    check_entries(entries, recomputed_logprobs(library, library.model.tokenize(TEXT, parse_special=True), want.tokens),
                  want.tokens, 3)


def test_completion_stop_word_and_eos(server, library, eos):
    text = greedy(library, TEXT, 30).text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    body = {"prompt": TEXT, "n_predict": 30, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    word = post(server, "/completion", body | {"stop": [stop]}).json()
    assert (word["content"], word["stop_type"], word["stopping_word"]) == (text[:text.index(stop)], "word", stop)
    assert word["stopped_word"] is True and word["stopped_eos"] is False
    ended = post(server, "/completion", {"prompt": TEXT, "n_predict": 30, "logit_bias": {str(eos): 100}}).json()
    assert (ended["stop_type"], ended["stopped_eos"], ended["tokens_predicted"], ended["content"]) == ("eos", True, 0, "")


def test_completion_rejects_what_it_cannot_do_naming_the_field(server):
    for body, param in (({"prompt": [1, "a"]}, "prompt"), ({"prompt": "a", "n_predict": 0}, "n_predict"),
                        ({"prompt": "a", "n_probs": 99}, "n_probs"), ({"prompt": "a", "temperature": -1}, "temperature"),
                        ({"prompt": "a", "min_tokens": -2}, "min_tokens"), ({"n_predict": 3}, "prompt")):
        r = post(server, "/completion", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.post(server.url + "/completion", json={"prompt": "a"}, timeout=30).status_code == 401


# ---- ignore_eos and min_tokens ----------------------------------------------------------------------------------------

def test_min_tokens_and_ignore_eos_on_the_openai_routes(client, eos):
    """EOS made certain by a logit bias: min_tokens holds it off for that many tokens, ignore_eos for good."""
    certain_end = {"logit_bias": {str(eos): 100}, "cache_prompt": False}
    ended = client.completions.create(model="api", prompt=TEXT, max_tokens=12, temperature=0, extra_body=certain_end)
    assert ended.usage.completion_tokens == 0 and ended.choices[0].finish_reason == "stop"
    later = client.completions.create(model="api", prompt=TEXT, max_tokens=12, temperature=0,
                                      extra_body=certain_end | {"min_tokens": 4})
    assert later.usage.completion_tokens == 4 and later.choices[0].finish_reason == "stop"
    never = client.completions.create(model="api", prompt=TEXT, max_tokens=12, temperature=0,
                                      extra_body=certain_end | {"ignore_eos": True})
    assert never.usage.completion_tokens == 12 and never.choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="api", messages=messages, max_tokens=12, temperature=0,
                                          extra_body=certain_end | {"min_tokens": 5})
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="api", messages=messages, max_tokens=7, temperature=0,
                                          extra_body=certain_end | {"ignore_eos": True})
    assert chat.usage.completion_tokens == 7 and chat.choices[0].finish_reason == "length"


def test_min_tokens_on_the_completion_route(server, eos):
    got = post(server, "/completion", {"prompt": TEXT, "n_predict": 9, "min_tokens": 3,
                                       "logit_bias": {str(eos): 100}, "cache_prompt": False}).json()
    assert (got["tokens_predicted"], got["stop_type"]) == (3, "eos")


# ---- logprobs ---------------------------------------------------------------------------------------------------------

def test_chat_logprobs_are_openais_shape_and_the_logits_log_softmax(client, library, eos):
    messages = [{"role": "user", "content": "tell me about the fox"}]
    kw = {"model": "api", "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
          "extra_body": {"ignore_eos": True, "cache_prompt": False}}
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == r.choices[0].message.content or any("\ufffd" in e.token for e in content)
    for e in content:   # greedy: the drawn token is the most likely but EOS (ignore_eos; the logprobs are the raw logits')
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        first = next(t for t in e.top_logprobs if t.model_extra["id"] != eos)
        assert (first.token, first.logprob) == (e.token, e.logprob)
    prompt = library.model.chat_template.prompt_tokens(library.model, messages)
    tokens = [e.model_extra["id"] for e in content]
    check_entries([e.model_dump() for e in content], recomputed_logprobs(library, prompt, tokens), tokens, 3)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [e for lp in streamed for e in lp.content] == content
    plain = client.chat.completions.create(**kw | {"logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_without_top_logprobs_and_with_sampling(client):
    r = client.chat.completions.create(model="api", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=1.0, seed=3, logprobs=True,
                                       extra_body={"ignore_eos": True, "top_k": 0, "min_p": 0.0})
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and all(e.top_logprobs == [] and e.logprob <= 0 for e in content)


def test_completions_logprobs_are_the_legacy_shape(client, library):
    want = greedy(library, TEXT, 8)
    r = client.completions.create(model="api", prompt=TEXT, max_tokens=8, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True, "cache_prompt": False})
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert text == want.text and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    expected = recomputed_logprobs(library, library.model.tokenize(TEXT, parse_special=True), want.tokens)

    def token_text(tok_id) -> str:
        return library.model.token_bytes(int(tok_id)).decode(errors="replace")

    for token, logprob, top, lsm, tok_id in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, expected, want.tokens):
        assert token == token_text(tok_id) and logprob <= 0 and abs(logprob - lsm[tok_id]) < EXACT
        most_likely = {token_text(i): lsm[i] for i in np.argsort(-lsm, kind="stable")[:2]} | {token: lsm[tok_id]}
        assert top.keys() == most_likely.keys() and all(abs(top[k] - v) < EXACT for k, v in most_likely.items())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)
    stream = client.completions.create(model="api", prompt=TEXT, max_tokens=8, temperature=0, logprobs=2, stream=True,
                                       extra_body={"ignore_eos": True, "cache_prompt": False})
    pieces = [c.choices[0].logprobs for c in stream if c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset


def test_n_probs_is_accepted_on_the_openai_routes_too(client):
    r = client.completions.create(model="api", prompt=TEXT, max_tokens=3, temperature=0,
                                  extra_body={"n_probs": 2, "ignore_eos": True})
    assert len(r.choices[0].logprobs.tokens) == 3
    r = client.chat.completions.create(model="api", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, extra_body={"n_probs": 2, "ignore_eos": True})
    assert [len(e.top_logprobs) for e in r.choices[0].logprobs.content] == [2, 2, 2]


# ---- model names ------------------------------------------------------------------------------------------------------

def test_any_model_id_is_served_by_the_one_model(client, server):
    r = client.completions.create(model="gpt-4o-mini", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.model == "api" and r.usage.completion_tokens == 2
    r = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"ignore_eos": True})
    assert r.model == "api"
    assert httpx.get(server.url + "/props", headers=AUTH, timeout=30).json()["pyturbo"]["strict_model_name"] is False


@pytest.mark.parametrize("strict", [False, True])
def test_strict_model_name_refuses_other_ids(strict):
    """With --strict-model-name another id is a 404 before the request reaches the model (here: one that never
    loads, whose answer would be 503); the server's own id passes in both modes."""
    from fastapi.testclient import TestClient

    from pyturbo.server.app import create_app
    from pyturbo.server.settings import parse_args
    settings = parse_args(["--model", "m.gguf"] + (["--strict-model-name"] if strict else []))
    assert settings.strict_model_name is strict
    app = TestClient(create_app(settings), raise_server_exceptions=False)
    for path, body in (("/v1/completions", {"prompt": "a"}), ("/completion", {"prompt": "a"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
        other = app.post(path, json=body | {"model": "gpt-nope"})
        assert other.status_code == (404 if strict else 503), other.text
        if strict:
            assert other.json()["error"]["code"] == "model_not_found" and "'m'" in other.json()["error"]["message"]
        assert app.post(path, json=body | {"model": "m"}).status_code == 503
