"""`python -m pyturbo.server` driven over HTTP by the official openai client: a live server on 127.0.0.1,
its model split over two local RPC workers."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

import pyturbo
from pyturbo import synth, workers
from serverproc import ServerProcess

pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
openai = pytest.importorskip("openai", reason="the openai client is missing: pip install '.[test]'")
import httpx  # noqa: E402  (after the skip: part of the same extra)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

KEY = "test-key-123"
TEXT = "the quick brown fox jumps over the lazy dog and then the model made the first long pipeline"
NO_CACHE = {"cache_prompt": False}  # the same prompt twice computes the same logits only without the prompt cache


@pytest.fixture(scope="module")
def chat_model(model_dir):
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size()})
    return synth.write_model(model_dir / "chat.gguf", shape, seed=4, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def no_eos(chat_model) -> dict:
    """A logit bias against end-of-generation tokens (and the few without text): when a random-weight model would end
    depends on the CPU's numerics, so an answer of a known length, with text, must not be left to it."""
    with pyturbo.Model(chat_model, devices=[]) as model:
        banned = [t for t in range(model.n_vocab) if model.is_eog(t) or not model.token_bytes(t)]
        assert model.eos_id in banned
    return {"logit_bias": {str(t): -100 for t in banned}}


@pytest.fixture(scope="module")
def endless(no_eos) -> dict:
    """Sampling settings that draw from the whole vocabulary but never end before max_tokens (no EOS)."""
    return {"temperature": 1.0, "extra_body": {"top_k": 0, "min_p": 0.0} | no_eos}


def server_args(model, pool) -> list[str]:
    return ["--model", str(model), "--rpc", ",".join(pool.endpoints), "--n-ctx", "2048", "--n-batch", "1024",
            "--n-ubatch", "32", "--threads", "1", "--api-key", KEY, "--max-request-bytes", "100000"]


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    with workers.local(2, threads=1) as pool:
        with ServerProcess(server_args(chat_model, pool), tmp_path_factory.mktemp("server") / "server.log") as srv:
            yield srv
        assert "Traceback" not in srv.log_tail(10**6), "the server logged a crash:\n" + srv.log_tail()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def chat(client, content: str, **kw):
    return client.chat.completions.create(model="chat", messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["chat"]
    health = httpx.get(server.url + "/health", timeout=10).json()   # public, no key
    assert health["status"] == "ok" and len(health["devices"]) == 2
    assert health["chat_template"] == "the model's tokenizer.chat_template"
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text and 'src="//' not in page.text  # nothing fetched


def test_completion_and_chat_report_usage_and_timings(client, chat_model, no_eos):
    c = client.completions.create(model="chat", prompt=TEXT, max_tokens=8, temperature=0, extra_body=no_eos)
    with pyturbo.Model(chat_model, devices=[]) as model:
        n_prompt = len(model.tokenize(TEXT, parse_special=True))
    assert c.usage.prompt_tokens == n_prompt and c.usage.completion_tokens == 8
    assert c.choices[0].finish_reason == "length"
    r = chat(client, "hello there", max_tokens=6, temperature=0, extra_body=NO_CACHE | no_eos)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 6
    t = r.model_extra["timings"]
    assert t["prompt_n"] == r.usage.prompt_tokens and t["prompt_per_second"] > 0 and t["ttft_ms"] > 0
    assert t["prefill_path"] == "standard" and t["fallback_reason"]     # a short prompt: fewer than two ubatches


def test_streamed_chat_equals_the_unstreamed_answer(client, no_eos):
    whole = chat(client, TEXT, max_tokens=24, temperature=0, extra_body=NO_CACHE | no_eos)
    chunks = list(chat(client, TEXT, max_tokens=24, temperature=0, stream=True, extra_body=NO_CACHE | no_eos,
                       stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2 and "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings(client, no_eos):
    full = client.completions.create(model="chat", prompt=TEXT, max_tokens=30, temperature=0,
                                     extra_body=NO_CACHE | no_eos)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2, text
    cut = client.completions.create(model="chat", prompt=TEXT, max_tokens=30, temperature=0, stop=[stop, "\x01zz"],
                                    extra_body=NO_CACHE | no_eos)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client, no_eos):
    def sample(seed):
        return chat(client, "tell me", max_tokens=20, temperature=1.0, top_p=1.0, seed=seed,
                    extra_body={"top_k": 0, "min_p": 0.0} | no_eos).choices[0].message.content

    first = sample(5)
    assert sample(5) == first
    assert any(sample(s) != first for s in (6, 7, 8))


def test_bad_requests_are_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", temperature=5)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat", prompt=" ".join(["fox"] * 2100))
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="chat", prompt="hi", n=2)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers=auth, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "' + b"a" * 200_000 + b'"}', headers=auth,
                     timeout=10)
    assert big.status_code == 413 and "--max-request-bytes" in big.json()["error"]["message"]
    # a range C cannot hold is a 400 naming the field, not a 500
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat", prompt="hi", max_tokens=2, extra_body={"top_k": 2**40})
    assert e.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat", prompt="hi", logprobs=21)
    assert e.value.body["param"] == "logprobs"
    # JSON without a Content-Type is read as JSON, as llama-server reads it
    plain = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert plain.status_code == 200 and plain.json()["object"] == "text_completion", plain.text
    wrong_method = httpx.get(server.url + "/v1/chat/completions", headers=auth, timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_api_key(server):
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401


def test_prompt_cache_second_turn_prefills_only_new_tokens(client):
    system = "you are a model of the pipeline. " + " ".join([TEXT] * 8)
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "first question about the fox"}]
    r1 = client.chat.completions.create(model="chat", messages=turn1, max_tokens=10, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "and the dog"}]
    r2 = client.chat.completions.create(model="chat", messages=turn2, max_tokens=4, temperature=0)
    cached, t2 = r2.usage.prompt_tokens_details.cached_tokens, r2.model_extra["timings"]
    new_tokens = r2.usage.prompt_tokens - r1.usage.prompt_tokens  # the answer, the new message, their markup
    assert r1.usage.prompt_tokens > 150
    assert cached >= r1.usage.prompt_tokens - 2
    assert t2["prompt_n"] == r2.usage.prompt_tokens - cached <= new_tokens + 2
    r3 = client.chat.completions.create(model="chat", messages=turn2, max_tokens=4, temperature=0, extra_body=NO_CACHE)
    assert r3.usage.prompt_tokens_details.cached_tokens == 0 and r3.model_extra["timings"]["prompt_n"] == r2.usage.prompt_tokens


def test_pipeline_on_and_off_per_request(client):
    long_prompt = " ".join([TEXT] * 20)
    on = client.completions.create(model="chat", prompt=long_prompt, max_tokens=1, extra_body=NO_CACHE | {"pipeline": "on"})
    off = client.completions.create(model="chat", prompt=long_prompt, max_tokens=1, extra_body=NO_CACHE | {"pipeline": "off"})
    assert on.usage.prompt_tokens > 300
    assert (on.model_extra["timings"]["prefill_path"], off.model_extra["timings"]["prefill_path"]) == ("pipelined", "standard")


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def while_two_answer(client, url: str, endless, until) -> tuple[dict | None, bool]:
    """Answer a streams; once its first token has arrived (an observed event, not a delay: a then has ~1900 tokens
    to go on any machine), answer b is asked from another thread, and /health is polled until until(health) holds.
    Then a's stream is closed (which cancels it) and b's once it has started. Returns (the /health that held or
    None, whether b's answer started)."""
    a = chat(client, "a long answer please", max_tokens=1900, seed=1, stream=True, **endless)
    b_stream = []
    b_asked = threading.Thread(target=lambda: b_stream.append(
        chat(client, "another long answer", max_tokens=1900, seed=2, stream=True, **endless)), daemon=True)
    seen = None
    try:
        next(iter(a))
        b_asked.start()
        deadline = time.monotonic() + 60
        while seen is None and time.monotonic() < deadline:
            h = health(url)
            seen = h if until(h) else None
            time.sleep(0.01)
    finally:
        a.close()
        if b_asked.is_alive() or b_stream:
            b_asked.join(60)
        for stream in b_stream:
            next(iter(stream))
            stream.close()
        deadline = time.monotonic() + 30
        while health(url)["slots_free"] != health(url)["slots"] and time.monotonic() < deadline:
            time.sleep(0.05)
    return seen, bool(b_stream)


def test_requests_queue_in_order(server, client, endless):
    # one slot: b waits while a answers, and gets the slot when a leaves
    seen, b_started = while_two_answer(client, server.url, endless, lambda h: h["queue"] == 1)
    assert seen is not None and seen["slots_free"] == 0, "b was not seen waiting while a answered"
    assert b_started


def test_parallel_slots_serve_requests_at_once(chat_model, endless, tmp_path):
    with workers.local(2, threads=1) as pool, \
            ServerProcess(server_args(chat_model, pool) + ["--parallel", "2"], tmp_path / "server.log") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        # two slots: b answers while a does, nobody waits
        seen, b_started = while_two_answer(client, srv.url, endless,
                                           lambda h: h["slots_free"] == 0 and h["queue"] == 0)
        assert seen is not None and seen["slots"] == 2, "a and b were not seen answering at once"
        assert b_started


def test_client_disconnect_mid_stream_frees_the_slot(server, client, endless):
    before = metrics(server)[("pyturbo_generated_tokens_total", ())]
    stream = chat(client, "go on", max_tokens=1800, stream=True, **endless)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.monotonic()
    # generous (a loaded machine): what shows the cancel is that far fewer than the 1800 tokens were generated
    while httpx.get(server.url + "/health", timeout=10).json()["slots_free"] != 1:
        assert time.monotonic() - t0 < 10, "the slot was not freed within 10 s of the disconnect"
        time.sleep(0.05)
    generated = metrics(server)[("pyturbo_generated_tokens_total", ())] - before   # recorded before the slot is freed
    assert 3 <= generated < 1800


def test_metrics(server, client, no_eos):
    # a pipelined and a standard prefill whatever auto would choose on this machine ("on": forced)
    client.completions.create(model="chat", prompt=" ".join([TEXT] * 20), max_tokens=2,
                              extra_body=NO_CACHE | no_eos | {"pipeline": "on"})
    client.completions.create(model="chat", prompt="hi", max_tokens=2, extra_body=NO_CACHE | no_eos)
    m = metrics(server)
    assert m[("pyturbo_prompt_tokens_total", ())] > 300 and m[("pyturbo_generated_tokens_total", ())] > 0
    assert m[("pyturbo_prefills_total", (("path", "pipelined"), ("reason", "")))] >= 1
    assert any(k[0] == "pyturbo_prefills_total" and dict(k[1])["path"] == "standard" for k in m)
    assert m[("pyturbo_time_to_first_token_seconds_count", ())] >= 1
    assert m[("pyturbo_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert m[("pyturbo_model_up", ())] == 1


def test_worker_killed_mid_request_gives_503_then_recovers(chat_model, endless, tmp_path):
    with workers.local(2, threads=1) as pool, \
            ServerProcess(server_args(chat_model, pool), tmp_path / "server.log") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        victim = pool.endpoints[1]

        def kill_once_busy():  # once the request holds its slot (an observed event, not a delay): 1900 tokens to go
            deadline = time.monotonic() + 60
            while httpx.get(srv.url + "/health", timeout=10).json().get("slots_free") != 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            pool.kill(1)

        threading.Thread(target=kill_once_busy, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            chat(client, "go on", max_tokens=1900, **endless)
        assert e.value.status_code == 503 and victim in e.value.message and e.value.body["endpoints"] == [victim]
        assert time.monotonic() - t0 < 30
        with pytest.raises(openai.InternalServerError) as e:   # while down: at once, naming the worker
            chat(client, "hi", max_tokens=2)
        assert e.value.status_code == 503 and victim in e.value.message
        port = victim.rsplit(":", 1)[1]
        worker = subprocess.Popen([sys.executable, "-m", "pyturbo.worker", "--port", port, "--threads", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            srv.wait_healthy(30)
            assert chat(client, "hi again", max_tokens=3, **endless).usage.completion_tokens == 3
            assert metrics(srv)[("pyturbo_model_reloads_total", ())] == 1
        finally:
            worker.kill()
            worker.wait()
        with pytest.raises(openai.InternalServerError) as e:   # a worker that died while the server was idle
            chat(client, "and again", max_tokens=3, extra_body=NO_CACHE)
        assert e.value.status_code == 503 and victim in e.value.message
        assert srv.proc.poll() is None and "Traceback" not in srv.log_tail(10**6)


def test_tokenize_detokenize_and_props_as_llama_server_has_them(server, chat_model):
    """/tokenize and /detokenize round-trip the model's own tokenizer (the same ids as Model.tokenize), with pieces
    on request; /props names the slots, the context and the chat template; all three ask for the API key."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with pyturbo.Model(chat_model, devices=[]) as model:
        expected = model.tokenize(TEXT, add_special=False, parse_special=True)
    got = httpx.post(server.url + "/tokenize", json={"content": TEXT}, headers=headers, timeout=30).json()
    assert got["tokens"] == expected
    back = httpx.post(server.url + "/detokenize", json={"tokens": got["tokens"]}, headers=headers, timeout=30).json()
    assert back["content"].strip() == TEXT
    pieces = httpx.post(server.url + "/tokenize", json={"content": TEXT, "with_pieces": True}, headers=headers,
                        timeout=30).json()["tokens"]
    assert [p["id"] for p in pieces] == expected and "".join(p["piece"] for p in pieces).strip() == TEXT
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}, headers=headers, timeout=30)
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    props = httpx.get(server.url + "/props", headers=headers, timeout=30).json()
    assert props["total_slots"] >= 1 and props["default_generation_settings"]["n_ctx"] == 2048
    assert props["chat_template"] == synth.TINY_CHAT_TEMPLATE
    for path in ("/tokenize", "/props"):
        assert httpx.request("POST" if path == "/tokenize" else "GET", server.url + path, json={"content": "x"},
                             timeout=30).status_code == 401
