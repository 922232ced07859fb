"""Which prefill path to take: the one place that decides whether pipelining is *useful* (the executor in
src/llama-turbo/ checks whether it is *safe*, and falls back to the standard path with its reason when it is not).

`decide()` is a pure function of what the caller asked, the layout and what has been measured on it, so it is tested
without devices (tests/test_policy.py).
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "force", "off")


def normalize_mode(pipeline) -> str:
    """prefill(pipeline=...) -> "auto" | "force" | "off". True means auto: pipelined where that is faster."""
    if pipeline is True or pipeline == "auto":
        return "auto"
    if pipeline is False or pipeline == "off":
        return "off"
    if pipeline == "force":
        return "force"
    raise ValueError(f"pipeline must be 'auto' (or True), 'force' or 'off' (or False), not {pipeline!r}")


def env_override(env: dict) -> str | None:
    """PYTURBO_PIPELINE=force|off replaces the auto decision (both directions); unset or 'auto': no override."""
    value = env.get("PYTURBO_PIPELINE", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("force", "off"):
        raise ValueError(f"PYTURBO_PIPELINE must be 'auto', 'force' or 'off', not {value!r}")
    return value


@dataclass(frozen=True)
class Layout:
    """What the decision needs to know about a context's devices."""
    stages: tuple[str, ...]   # the layer devices in chain order ("CUDA0", "RPC1", "CPU", ...)
    stock_overlaps: bool      # llama.cpp's own pipeline parallelism is on (every device has events, async copies)

    @property
    def local_gpus_only(self) -> bool:
        return all(s.startswith("CUDA") for s in self.stages)


def decide(mode: str, layout: Layout, override: str | None = None) -> tuple[bool, str]:
    """(ask the executor for the pipeline?, why). mode is normalize_mode()'s; override is env_override()'s."""
    if mode == "auto" and override is not None:
        mode = override
        why = f"PYTURBO_PIPELINE={override}"
    else:
        why = ""
    if mode == "off":
        return False, why or "pipeline not requested"
    if mode == "force":
        return True, why or "pipeline forced"
    if layout.local_gpus_only and layout.stock_overlaps:
        # llama.cpp overlaps GPUs of this process itself when they have events and async copies; on two GPUs and on
        # stream devices of one GPU the pipeline was not faster (bench/results/*h100*)
        return False, ("all stages are GPUs of this process and llama.cpp's pipeline parallelism already overlaps "
                       "them (pipeline='force' pipelines anyway)")
    return True, "pipelined: stages that stock llama.cpp serializes or overlaps poorly"
