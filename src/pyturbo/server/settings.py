"""The server's settings: the command line of `python -m pyturbo.server`, parsed once into `ServerSettings`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ..batch_planning import DEFAULT_MAX_GAP_MS
from ..model import EXPERT_TENSORS, check_host_tensors, parse_endpoints

# The library's pipeline modes (Context.prefill(pipeline=...)): "auto" pipelines where pyturbo measured it faster
# (pyturbo.policy), "force" wherever it is safe, "off" never; where it is unsafe or impossible the standard path runs
# and its fallback_reason says why. "on" was the server's name for "force" and is still accepted.
PIPELINE_MODES = ("auto", "force", "off")
PIPELINE_ALIASES = {"on": "force"}
DEFAULTS = {"n_ctx": 32768, "n_batch": 8192, "n_ubatch": 512, "threads": None, "max_tokens": None}
# --demo: small enough for a 2-core box (one thread here, the workers take the rest; answers of a few hundred tokens)
DEMO_DEFAULTS = {"n_ctx": 8192, "n_batch": 2048, "n_ubatch": 128, "threads": 1, "max_tokens": 200}


def pipeline_mode(mode: str) -> str:
    """A --pipeline / request "pipeline" value as the library's mode (the old alias "on" is "force")."""
    mode = PIPELINE_ALIASES.get(mode, mode)
    if mode not in PIPELINE_MODES:
        raise ValueError(f"pipeline must be one of {PIPELINE_MODES}, not {mode!r}")
    return mode


@dataclass
class ServerSettings:
    model: Path | None = None
    rpc: list[str] = field(default_factory=list)
    devices: list[str] | None = None
    tensor_split: list[float] | str | None = None
    host_tensors: str | None = None     # weights kept in host memory (Model(host_tensors=)), a regular expression
    n_ctx: int = 32768
    n_batch: int = 8192
    n_ubatch: int = 512
    threads: int | None = None          # CPU threads of this process (None: all cores)
    pipeline: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    chat_template: Path | None = None
    parallel: int = 1
    max_tokens: int | None = None       # default max_tokens of a request that gives none (None: until the context ends)
    max_request_bytes: int = 8 << 20
    model_alias: str | None = None      # the id /v1/models lists (default: the file name without .gguf)
    max_gap_ms: float = DEFAULT_MAX_GAP_MS   # bound on a generating request's wait for a token during a prefill
    calibration_s: float = 60.0         # start-up calibration of the prefill paths, at most this long (0: none)
    strict_model_name: bool = False     # a request naming another model id: 404 (default: served, as llama-server)
    demo: bool = False
    demo_workers: int = 2

    @property
    def model_id(self) -> str:
        if self.model_alias:
            return self.model_alias
        name = self.model.name if self.model else "pyturbo-demo"
        return name[:-5] if name.endswith(".gguf") else name


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, not {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, not {value}")
        return value
    return parse


def _positive_float(name, minimum_exclusive: bool = True):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, not {text!r}") from None
        if not (value > 0 if minimum_exclusive else value >= 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if minimum_exclusive else '>='} 0, not {text}")
        return value
    return parse


def _non_negative_float(name):
    return _positive_float(name, minimum_exclusive=False)


def _split(text: str):
    if text == "even":
        return "even"
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tensor-split must be proportions like 1,1 or 'even', not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pyturbo.server",
        description="An OpenAI-compatible server (completions, chat, a chat page at /) whose long prompts prefill "
                    "pipelined over the model's layer devices.")
    ap.add_argument("--model", type=Path, help="the GGUF model file")
    ap.add_argument("--rpc", default="", help="llama.cpp RPC workers host:port,... to split the model over")
    ap.add_argument("--devices", default=None, help="devices to split over, e.g. CUDA0,CUDA1 (default: the RPC "
                                                    "workers if given, else the local GPUs)")
    ap.add_argument("--tensor-split", type=_split, default=None, help="proportions per device, e.g. 1,1, or 'even'")
    ap.add_argument("--host-tensors", metavar="PATTERN", default=None,
                    help="keep the weights whose names match this regular expression in host memory, computed by "
                         "the CPU (llama.cpp's --override-tensor PATTERN=CPU)")
    ap.add_argument("--experts-in-host-memory", "--cpu-moe", action="store_true",
                    help=f"the routed experts of a mixture-of-experts model in host memory (--host-tensors "
                         f"'{EXPERT_TENSORS}', llama-server's --cpu-moe)")
    ap.add_argument("--n-ctx", type=_positive("--n-ctx"),
                    help="context size per slot: each of the --parallel slots may hold this many tokens, in one KV "
                         "cache of parallel x n-ctx cells (default 32768; demo 8192)")
    ap.add_argument("--n-batch", type=_positive("--n-batch"), help="tokens per llama_decode call (default 8192)")
    ap.add_argument("--n-ubatch", type=_positive("--n-ubatch"), help="tokens per ubatch (default 512; demo 128)")
    ap.add_argument("--threads", type=_positive("--threads"), help="CPU threads here (default: all cores; demo 1)")
    ap.add_argument("--pipeline", type=lambda text: PIPELINE_ALIASES.get(text, text), choices=PIPELINE_MODES,
                    default="auto", help="prefill through the pipeline: auto (where it was measured faster), force "
                                         "(wherever it is safe; 'on' is accepted for it), off")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    ap.add_argument("--chat-template", type=Path, default=None,
                    help="a Jinja2 chat template file, instead of the model's tokenizer.chat_template")
    ap.add_argument("--parallel", type=_positive("--parallel"), default=1,
                    help="slots: sequences of one context whose decode steps are batched together; further requests "
                         "queue in arrival order")
    ap.add_argument("--max-gap-ms", type=_positive_float("--max-gap-ms"), default=DEFAULT_MAX_GAP_MS,
                    help="while a prompt prefills, the slots that are generating wait at most about this long for "
                         "their next token: the prompt prefills in chunks of this duration (never below (stages + "
                         f"1) ubatches) between their steps (default {DEFAULT_MAX_GAP_MS:.0f})")
    ap.add_argument("--calibration-s", type=_non_negative_float("--calibration-s"), default=60.0,
                    help="at start-up, measure the pipelined and standard prefill on synthetic prompts for at most "
                         "this many seconds (results are kept for later starts; 0: none, prompts calibrate as they "
                         "come) (default 60)")
    ap.add_argument("--max-tokens", type=_positive("--max-tokens"),
                    help="max_tokens of a request that gives none (default: until the context is full; demo 200)")
    ap.add_argument("--max-request-bytes", type=_positive("--max-request-bytes"), default=8 << 20,
                    help="largest request body accepted (default 8 MiB)")
    ap.add_argument("--alias", dest="model_alias", default=None, help="the model id clients use (default: file name)")
    ap.add_argument("--strict-model-name", action="store_true",
                    help="answer 404 to a request naming another model id than --alias / the file name (default: "
                         "this model serves it, as llama-server does)")
    ap.add_argument("--demo", action="store_true",
                    help="no model needed: a small synthetic model with a real vocabulary and chat template, split "
                         "over local RPC workers")
    return ap


def parse_args(argv: list[str] | None = None) -> ServerSettings:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.demo == (a.model is not None):
        ap.error("give either --model PATH.gguf or --demo")
    if a.demo and a.rpc:
        ap.error("--demo starts its own local workers; leave out --rpc")
    if not 0 < a.port < 65536:
        ap.error(f"--port must be in 1..65535, not {a.port}")
    try:
        rpc = parse_endpoints(a.rpc or None)
    except ValueError as e:
        ap.error(f"--rpc: {e}")
    if a.chat_template is not None and not a.chat_template.is_file():
        ap.error(f"--chat-template: no such file: {a.chat_template}")
    try:
        host_tensors = check_host_tensors(a.host_tensors, a.experts_in_host_memory)
    except ValueError as e:
        ap.error(f"--host-tensors / --experts-in-host-memory: {e}")
    sized = {k: getattr(a, k) if getattr(a, k) is not None else v
             for k, v in (DEMO_DEFAULTS if a.demo else DEFAULTS).items()}
    if sized["n_ubatch"] > sized["n_batch"]:
        ap.error(f"--n-ubatch ({sized['n_ubatch']}) must not exceed --n-batch ({sized['n_batch']})")
    return ServerSettings(
        model=a.model, rpc=rpc, devices=a.devices.split(",") if a.devices else None, tensor_split=a.tensor_split,
        host_tensors=host_tensors, pipeline=a.pipeline, host=a.host, port=a.port, api_key=a.api_key,
        chat_template=a.chat_template,
        parallel=a.parallel, max_request_bytes=a.max_request_bytes, model_alias=a.model_alias,
        max_gap_ms=a.max_gap_ms, calibration_s=a.calibration_s,
        strict_model_name=a.strict_model_name, demo=a.demo, **sized)
