"""The server's pieces without a server: the command line, chat templates, request schemas."""
from __future__ import annotations

import pytest

import pyturbo
from pyturbo import synth

pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
from pyturbo.chat import CHATML_STOP, ChatTemplate, ChatTemplateError  # noqa: E402
from pyturbo.server.schemas import ChatRequest, CompletionRequest  # noqa: E402
from pyturbo.server.settings import DEFAULTS, DEMO_DEFAULTS, parse_args, pipeline_mode  # noqa: E402


def test_command_line_names_of_the_contract(tmp_path):
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{{ messages[0]['content'] }}")
    s = parse_args(["--model", "m.gguf", "--rpc", "10.0.0.2:50052,10.0.0.3:50052", "--devices", "CUDA0,CUDA1",
                    "--tensor-split", "1,1", "--n-ctx", "32768", "--n-batch", "8192", "--n-ubatch", "512",
                    "--pipeline", "off", "--host", "127.0.0.1", "--port", "8080", "--api-key", "k",
                    "--chat-template", str(tmpl), "--parallel", "2"])
    assert (s.rpc, s.devices, s.tensor_split, s.parallel, s.api_key) == (
        ["10.0.0.2:50052", "10.0.0.3:50052"], ["CUDA0", "CUDA1"], [1.0, 1.0], 2, "k")
    assert (s.n_ctx, s.n_batch, s.n_ubatch, s.pipeline, s.model_id) == (32768, 8192, 512, "off", "m")
    plain = parse_args(["--model", "m.gguf"])
    assert plain.host == "127.0.0.1" and {k: getattr(plain, k) for k in DEFAULTS} == DEFAULTS
    demo = parse_args(["--demo"])
    assert {k: getattr(demo, k) for k in DEMO_DEFAULTS} == DEMO_DEFAULTS and demo.model_id == "pyturbo-demo"
    assert parse_args(["--demo", "--n-ctx", "1024"]).n_ctx == 1024


@pytest.mark.parametrize("argv,message", [
    ([], "either --model"), (["--demo", "--model", "m.gguf"], "either --model"),
    (["--model", "m", "--rpc", "nohost"], "host:port"), (["--model", "m", "--n-ubatch", "9000"], "must not exceed"),
    (["--model", "m", "--pipeline", "maybe"], "invalid choice"), (["--model", "m", "--n-ctx", "0"], ">= 1"),
])
def test_bad_command_lines_say_what_to_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_pipeline_modes_are_the_librarys():
    """The server's modes are the library's; "on" (the old name of "force") is still accepted, and emitted as force."""
    assert [pipeline_mode(m) for m in ("auto", "force", "on", "off")] == ["auto", "force", "force", "off"]
    assert parse_args(["--model", "m", "--pipeline", "on"]).pipeline == "force"
    assert CompletionRequest(prompt="x", pipeline="on").pipeline == "force"
    with pytest.raises(ValueError):
        pipeline_mode("sometimes")


def test_chat_templates_model_override_and_fallback(vocab_model, model_dir):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pyturbo.Model(vocab_model, devices=[]) as model:       # no template in the GGUF: ChatML
        t = ChatTemplate.for_model(model)
        assert "fallback" in t.source and t.stop == CHATML_STOP
        assert t.render(msgs).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        own = ChatTemplate.for_model(model, "{{ bos_token }}[{{ messages|length }}]{{ eos_token }}", "my.jinja")
        assert own.render(msgs) == "<s>[2]</s>" and own.source == "my.jinja" and own.stop == []
        # the tokenizer adds BOS itself: a template's own BOS is not doubled
        assert own.prompt_tokens(model, msgs).count(model.bos_id) == 1
        strict = ChatTemplate.for_model(model, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user "
                                               "first') }}{% endif %}")
        with pytest.raises(ChatTemplateError, match="user first"):
            strict.render(msgs)
        with pytest.raises(ChatTemplateError, match="does not compile"):
            ChatTemplate.for_model(model, "{% for %}")
        sandboxed = ChatTemplate.for_model(model, "{{ messages.__class__.__mro__ }}")
        with pytest.raises(ChatTemplateError):
            sandboxed.render(msgs)
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size(), "n_layer": 1})
    path = synth.write_model(model_dir / "templated-units.gguf", shape, vocab="tiny",
                             chat_template=synth.TINY_CHAT_TEMPLATE)
    with pyturbo.Model(path, devices=[]) as model:
        t = ChatTemplate.for_model(model)
        assert t.source == "the model's tokenizer.chat_template"
        assert t.render(msgs[1:]) == "<s>user: hi</s>\nassistant:"


def test_request_schemas():
    r = ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                    max_completion_tokens=5, stop="x", logit_bias={"7": -100}, seed=3)
    assert r.messages[0].for_template() == {"role": "user", "content": "ab"} and r.max_tokens == 5 and r.stop == ["x"]
    s = r.sampler_settings()
    assert s.logit_bias == {7: -100} and s.seed == 3 and s.temperature == pyturbo.SamplerSettings().temperature
    assert CompletionRequest(prompt=["only one"]).prompt == "only one"
    for bad in ({"prompt": ["a", "b"]}, {"prompt": "a", "echo": True}, {"prompt": "a", "logit_bias": {"x": 1}},
                {"prompt": "a", "top_p": 2}, {"prompt": "a", "stop": ["s"] * 17}):
        with pytest.raises(ValueError):
            CompletionRequest(**bad)
    with pytest.raises(ValueError):
        ChatRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_sampler_settings_check_every_range_before_c():
    for bad in ({"top_k": 2**40}, {"top_k": -2**40}, {"top_k": True}, {"penalty_last_n": 2**31},
                {"temperature": float("nan")}, {"temperature": 10**400}, {"top_p": True}, {"seed": 2**32},
                {"logit_bias": {2**40: 1.0}}, {"logit_bias": {-1: 1.0}}, {"logit_bias": {1: 10**400}},
                {"logit_bias": {1: float("nan")}}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pyturbo.SamplerSettings(**bad)
    ok = pyturbo.SamplerSettings(top_k=2**31 - 1, logit_bias={5: float("-inf")}, penalty_last_n=0)
    assert ok.top_k == 2**31 - 1


@pytest.fixture
def app_client():
    """The app with its routes and error handlers but no model (the engine never loads): what is refused before a
    request reaches the engine."""
    from fastapi.testclient import TestClient

    from pyturbo.server.app import create_app
    return TestClient(create_app(parse_args(["--model", "m.gguf"])), raise_server_exceptions=False)


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path,body,param,code,message", [
    ("/v1/completions", {"prompt": "a", "top_k": 2**40}, "top_k", "invalid_value", "less than or equal to 2147483647"),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens", "invalid_value", "not true"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs", "invalid_value", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "a", "echo": True}, "echo", "unsupported_parameter", "not supported"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of", "unsupported_parameter", "not supported"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "unsupported_parameter", "only one prompt"),
    ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, "top_logprobs", "invalid_value", "needs logprobs"),
    ("/v1/chat/completions", CHAT | {"temperature": 5}, "temperature", "invalid_value", "temperature"),
])
def test_bad_fields_are_named_in_400s(app_client, path, body, param, code, message):
    r = app_client.post(path, json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["code"] == code, err
    assert message in err["message"] and param in err["message"]


def test_bad_bodies_say_what_is_wrong(app_client):
    def error(**kw):
        r = app_client.post("/v1/completions", **kw)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert error(json=["a"]) == {"message": "the request body must be a JSON object", "type": "invalid_request_error",
                                 "param": None, "code": "invalid_json"}
    assert "not valid JSON" in error(content=b'{"prompt": ')["message"]
    assert "empty" in error(content=b"")["message"]
    assert "Content-Type is 'text/plain'" in error(content=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"})[
        "message"]


def test_json_without_content_type_is_read_as_json(app_client):
    # llama-server accepts it; a field's range is checked after the body was parsed, so a 400 naming it shows it was
    r = app_client.post("/v1/completions", content=b'{"prompt": "a", "top_k": 1099511627776}')
    assert "content-type" not in r.request.headers
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_routing_errors_are_openai_shaped(app_client):
    r = app_client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed" and "POST" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = app_client.post("/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "/v1/nothing" in r.json()["error"]["message"]
