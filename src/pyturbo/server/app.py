"""The HTTP routes, kept thin: parse and check a request, hand it to the engine, shape the answer the OpenAI way
(or llama-server's, on its own routes: answers.py).

A generation's response starts when its first token exists: until then every failure (a bad parameter, a prompt
too long, a dead worker) is an HTTP status with an OpenAI-shaped error body, not an error inside a 200 stream.
A client that leaves (while queued, in the prefill or mid-stream) cancels its generation.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .answers import DONE, LlamaAnswer, OpenAIAnswer, generation_settings
from .engine import Engine, Job, Outcome, PromptTooLong, Unavailable
from .limits import RequestLimits
from .metrics import Metrics
from .schemas import (ChatRequest, CompletionRequest, DetokenizeRequest, LlamaCompletionRequest, TokenizeRequest,
                      error_body, model_list)
from .settings import ServerSettings

log = logging.getLogger("pyturbo.server")
PAGE = Path(__file__).parent / "static" / "index.html"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, **extra):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, code, param, **extra)


class ClientGone(Exception):
    pass


def _unavailable(e: Unavailable) -> ApiError:
    return ApiError(503, str(e), type="server_error", code="model_unavailable", endpoints=e.endpoints)


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The app: its engine and settings live in app.state, where the module-level routes find them (_engine,
    _settings)."""
    engine = engine or Engine(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app):
        engine.attach(asyncio.get_running_loop())
        await asyncio.to_thread(engine.load)
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="pyturbo server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    app.add_middleware(RequestLimits, max_bytes=settings.max_request_bytes, metrics=engine.metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _crashed)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.include_router(router)
    return app


# ---- errors -----------------------------------------------------------------------------------------------------

async def _api_error(_request, e: ApiError):
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body, status_code=e.status, headers=headers)


async def _crashed(_request, e: Exception):  # a bug or an unexpected native failure (Starlette logs the traceback)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"), status_code=500)


async def _http_error(request: Request, e: StarletteHTTPException):  # routing's own: 404, 405
    where = f"{request.method} {request.url.path}"
    message, code = {
        404: (f"no such endpoint: {where}", "not_found"),
        405: (f"{where}: method not allowed (allowed: {(e.headers or {}).get('Allow', '-')})", "method_not_allowed"),
    }.get(e.status_code, (f"{where}: {e.detail}", None))
    return JSONResponse(error_body(message, code=code), status_code=e.status_code, headers=e.headers)


async def _invalid(request: Request, e: RequestValidationError):
    errors = e.errors()
    body_error = _body_error(errors, request.headers.get("content-type", ""))
    if body_error:
        return JSONResponse(error_body(body_error, code="invalid_json"), status_code=400)
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: "
                    f"{str(err.get('msg', '')).removeprefix('Value error, ')}" for err in errors)
    unsupported = errors and all(err.get("type") == "unsupported" for err in errors)
    return JSONResponse(error_body(msg, code="unsupported_parameter" if unsupported else "invalid_value",
                                   param=param), status_code=400)


# ---- what the routes depend on ----------------------------------------------------------------------------------

def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(_engine)]
SettingsDep = Annotated[ServerSettings, Depends(_settings)]


def require_key(settings: SettingsDep, request: Request) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
        raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY' with the server's "
                            "--api-key", code="invalid_api_key")


def check_model(settings: ServerSettings, name: str | None) -> None:
    """Any model id is served by the one model, as llama-server does; with --strict-model-name only its own."""
    if settings.strict_model_name and name is not None and name not in (settings.model_id, settings.model_id + ".gguf"):
        raise ApiError(404, f"the model {name!r} does not exist here; this server serves {settings.model_id!r} "
                            f"(GET /v1/models)", code="model_not_found", param="model")


router = APIRouter()
keyed = [Depends(require_key)]


# ---- pages and status -------------------------------------------------------------------------------------------

@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(PAGE, media_type="text/html")


@router.get("/health")
async def health(engine: EngineDep, settings: SettingsDep):
    body = {"status": {"up": "ok"}.get(engine.state, engine.state), "model": settings.model_id,
            "devices": engine.model.devices if engine.model else [], "rpc": engine.endpoints,
            "slots": engine.n_slots, "slots_free": engine.n_free, "queue": engine.n_waiting,
            "pipeline": settings.pipeline, "n_ctx": settings.n_ctx,
            "chat_template": engine.template.source if engine.template else None}
    if engine.state != "up":
        body |= {"reason": engine.reason, "endpoints": engine.failed_endpoints}
    return JSONResponse(body, status_code=200 if engine.state == "up" else 503)


@router.get("/metrics", dependencies=keyed)
async def prometheus(engine: EngineDep):
    data, content_type = engine.metrics.render()
    return Response(data, media_type=content_type)


@router.get("/v1/models", dependencies=keyed)
async def models(engine: EngineDep, settings: SettingsDep):
    meta = {"n_ctx": settings.n_ctx}
    if engine.model is not None:
        meta |= {"n_vocab": engine.model.n_vocab, "n_layer": engine.model.n_layer,
                 "n_ctx_train": engine.model.n_ctx_train, "devices": engine.model.devices}
    return model_list(settings.model_id, engine.created, meta)


# ---- llama-server's utility routes ---------------------------------------------------------------------------------

@router.post("/tokenize", dependencies=keyed)
async def tokenize(req: TokenizeRequest, engine: EngineDep):
    tokens = _checked(lambda: engine.tokenize(req.content, req.add_special, req.parse_special))
    if req.with_pieces:
        pieces = _checked(lambda: engine.pieces(tokens))
        return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces)]}
    return {"tokens": tokens}


@router.post("/detokenize", dependencies=keyed)
async def detokenize(req: DetokenizeRequest, engine: EngineDep):
    return {"content": _checked(lambda: engine.detokenize(req.tokens))}


@router.get("/props", dependencies=keyed)
async def props(engine: EngineDep, settings: SettingsDep):
    """What llama-server's /props says that applies here, and pyturbo's own settings beside it."""
    return {"default_generation_settings": {"n_ctx": settings.n_ctx, "model": settings.model_id},
            "total_slots": engine.n_slots, "model_path": str(settings.model) if settings.model else None,
            "chat_template": engine.template.text if engine.template else None,
            "pyturbo": {"pipeline": settings.pipeline, "n_batch": settings.n_batch, "n_ubatch": settings.n_ubatch,
                        "devices": engine.model.devices if engine.model else [], "rpc": engine.endpoints,
                        "host_tensors": settings.host_tensors, "strict_model_name": settings.strict_model_name,
                        # n_ctx above is per slot: one KV cache of slots x n_ctx cells, each slot up to n_ctx
                        "n_ctx_per_slot": settings.n_ctx, "kv_cells": settings.n_ctx * settings.parallel,
                        "max_gap_ms": settings.max_gap_ms}}


# ---- generation -------------------------------------------------------------------------------------------------

@router.post("/v1/completions", dependencies=keyed)
async def completions(request: Request, req: CompletionRequest, engine: EngineDep, settings: SettingsDep):
    check_model(settings, req.model)
    tokens = _checked(lambda: engine.tokens_for(req.prompt))
    answer = OpenAIAnswer(settings.model_id, chat=False, include_usage=_include_usage(req))
    return await _generate(request, engine, req, tokens, [], answer)


@router.post("/v1/chat/completions", dependencies=keyed)
async def chat_completions(request: Request, req: ChatRequest, engine: EngineDep, settings: SettingsDep):
    check_model(settings, req.model)
    tokens, stops = _checked(lambda: engine.chat_tokens([m.for_template() for m in req.messages]))
    answer = OpenAIAnswer(settings.model_id, chat=True, include_usage=_include_usage(req))
    return await _generate(request, engine, req, tokens, stops, answer)


@router.post("/completion", dependencies=keyed)
@router.post("/completions", dependencies=keyed)  # llama-server's second name of it
async def llama_completion(request: Request, req: LlamaCompletionRequest, engine: EngineDep, settings: SettingsDep):
    """llama-server's own completion route (not OpenAI's): its field names and its answer (answers.LlamaAnswer)."""
    check_model(settings, req.model)
    tokens = _checked(lambda: engine.tokens_for(req.prompt))
    prompt_text = _checked(lambda: engine.detokenize(tokens)) if engine.model and engine.model.has_vocab else ""
    used = generation_settings(req, _checked(req.sampler_settings), settings.n_ctx, settings.model_id)
    answer = LlamaAnswer(settings.model_id, len(tokens), prompt_text, used, req.return_tokens)
    return await _generate(request, engine, req, tokens, [], answer)


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def _generate(request: Request, engine: Engine, req, tokens: list[int], extra_stop: list[str], answer):
    job = Job(tokens=tokens, max_tokens=req.max_tokens, stop=req.stop + extra_stop,
              sampling=_checked(req.sampler_settings), cache_prompt=req.cache_prompt, pipeline=req.pipeline,
              ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=req.top_logprobs_asked())
    t_arrival = request.scope.get("state", {}).get("t_arrival", time.perf_counter())
    gone = asyncio.ensure_future(_until_disconnected(request))
    run = None
    try:
        run = await _unless_gone(_checked_async(engine.submit(job, t_arrival)), gone)
        first = await _unless_gone(_checked_async(run.next()), gone)
        if not req.stream:
            item = first
            while not isinstance(item, Outcome):
                item = await _unless_gone(_checked_async(run.next()), gone)
            return answer.whole(item)
    except ClientGone:
        if run is not None:
            run.cancel()
        return Response(status_code=499)  # nobody reads it: the client has left
    except BaseException:
        if run is not None and not run.finished:
            run.cancel()
        raise
    finally:
        gone.cancel()
    return EventSourceResponse(_stream(run, first, answer), ping=10)


async def _stream(run, first, answer):
    def event(obj) -> dict:
        return {"data": obj if obj == DONE else json.dumps(obj)}

    try:
        for obj in answer.opening():
            yield event(obj)
        item = first
        while not isinstance(item, Outcome):
            yield event(answer.piece(item))
            item = await run.next()
        for obj in answer.closing(item):
            yield event(obj)
    except Unavailable as e:
        yield event(_unavailable(e).body)
    except ValueError as e:
        yield event(error_body(str(e)))
    except Exception as e:  # the response has started: the error goes into the stream
        log.exception("generation failed mid-stream")
        yield event(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"))
    finally:  # also when the client left (sse-starlette cancels this generator)
        if not run.finished:
            run.cancel()


def _body_error(errors: list[dict], content_type: str) -> str | None:
    """The message when the body as a whole is wrong (not JSON, not an object, missing); None when a field is."""
    for err in errors:
        loc, kind = tuple(err.get("loc", ())), err.get("type")
        if kind == "json_invalid":
            return f"the request body is not valid JSON: {(err.get('ctx') or {}).get('error', err.get('msg'))}"
        if loc != ("body",):
            continue
        if kind == "missing":
            return "the request body is empty: send a JSON object"
        if kind in ("model_attributes_type", "model_type", "dict_type"):
            # a body that was not parsed as JSON (another Content-Type) arrives here as bytes
            hint = "" if "json" in content_type.lower() else \
                f" (this request's Content-Type is {content_type!r}: send application/json, or none)"
            return "the request body must be a JSON object" + hint
    return None


@contextmanager
def _api_errors():
    """The engine's refusals as API errors."""
    try:
        yield
    except Unavailable as e:
        raise _unavailable(e) from None
    except PromptTooLong as e:
        raise ApiError(400, str(e), code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


def _checked(fn):
    with _api_errors():
        return fn()


async def _checked_async(awaitable):
    with _api_errors():
        return await awaitable


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


async def _unless_gone(awaitable, gone: asyncio.Future):
    """The awaitable's result, or ClientGone as soon as the client disconnects (the awaitable is then cancelled)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone
