"""Stage balance: how many layers each device of a layer split gets, from measured stage times.

A pipeline runs at the pace of its slowest stage, and an even layer split is not an even time split: a stage also
carries its device's transfers, the first one the embeddings and the input copies, the last one the output layer
(measured imbalances: bench/results/2026-11-26-gpu-balance.md).

`Model(path, tensor_split="auto")` uses this module: with no stored balance for (model file + build, devices) it loads
the model split evenly, measures the stages with a few pipelined prefills (`measure_stage_seconds`), proposes layer
counts (`balance_layers`), stores them next to auto's path measurements (policy.Calibration) and loads the model with
them; later loads take the stored counts at once. `Calibration.clear()` (or deleting the file) forgets them.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A proposal must make the slowest stage at least this much faster (by the model below) to replace the split it was
# measured on: smaller differences are within the noise of one measurement.
MIN_GAIN = 0.03
MEASURED_RUNS = 2          # timed pipelined prefills (after one warm-up), the median busy time per stage is used
UBATCHES_PER_STAGE = 4     # the measuring prompt: this many ubatches per stage, so that every stage is busy long


def balance_layers(layers: Sequence[int], stage_seconds: Sequence[float]) -> list[int]:
    """Layer counts per stage that equalize the stages' time, from a run with `layers` per stage that took
    `stage_seconds` each (busy time over the same ubatches). Each stage's time is modelled as its layer count times
    its measured cost per layer; layers are handed out one at a time to the stage that stays fastest with one more,
    which minimizes the slowest stage for that model. Every stage keeps at least one layer."""
    if len(layers) != len(stage_seconds) or not layers or min(layers) < 1:
        raise ValueError("need a positive layer count and a time for every stage")
    per_layer = [max(t, 1e-12) / n for t, n in zip(stage_seconds, layers)]
    counts = [1] * len(layers)
    for _ in range(sum(layers) - len(layers)):
        best = min(range(len(counts)), key=lambda s: (counts[s] + 1) * per_layer[s])
        counts[best] += 1
    return counts


def predicted_slowest(layers: Sequence[int], measured_layers: Sequence[int], stage_seconds: Sequence[float]) -> float:
    """The slowest stage's time with `layers`, by the per-layer cost of the run that measured `stage_seconds`."""
    return max(n * t / m for n, m, t in zip(layers, measured_layers, stage_seconds))


@dataclass(frozen=True)
class Balance:
    """A layer split chosen from a measurement of another one (both in repeating layers per stage)."""
    layers: list[int]              # what the model is loaded with
    measured_layers: list[int]     # the split the stages were measured on
    stage_seconds: list[float]     # busy seconds per stage, measured on measured_layers
    n_tokens: int                  # the measuring prompt and ubatch
    n_ubatch: int

    @property
    def gain(self) -> float:
        """How much faster the slowest stage should be with `layers` than with `measured_layers` (0.1: 10%)."""
        before = max(self.stage_seconds)
        return before / predicted_slowest(self.layers, self.measured_layers, self.stage_seconds) - 1

    def describe(self) -> str:
        times = ", ".join(f"{t * 1e3:.1f}" for t in self.stage_seconds)
        if self.layers == self.measured_layers:
            return (f"layers {self.measured_layers} kept: stage times {times} ms ({self.n_tokens} tokens, ubatch "
                    f"{self.n_ubatch}) leave less than {MIN_GAIN:.0%} to gain")
        return (f"layers {self.layers} (balanced from stage times {times} ms measured with layers "
                f"{self.measured_layers}, {self.n_tokens} tokens, ubatch {self.n_ubatch}: slowest stage "
                f"{self.gain:.0%} faster)")

    def to_json(self) -> dict:
        return {"layers": self.layers, "measured_layers": self.measured_layers, "stage_seconds": self.stage_seconds,
                "n_tokens": self.n_tokens, "n_ubatch": self.n_ubatch}

    @classmethod
    def from_json(cls, d) -> "Balance":
        """The inverse of to_json(). What it reads comes from a file (policy.Calibration): anything of another shape
        (a missing field, a count that is not a positive int, lists of unequal lengths) raises ValueError saying
        what."""
        if not isinstance(d, dict):
            raise ValueError(f"a stored split is an object, not {type(d).__name__}")
        missing = [name for name in ("layers", "measured_layers", "stage_seconds", "n_tokens", "n_ubatch")
                   if name not in d]
        if missing:
            raise ValueError(f"a stored split lacks {', '.join(missing)}")
        layers, measured = _counts(d["layers"], "layers"), _counts(d["measured_layers"], "measured_layers")
        seconds = d["stage_seconds"]
        if (not isinstance(seconds, list) or not all(_number(t) and math.isfinite(t) and t >= 0 for t in seconds)):
            raise ValueError("a stored split's stage_seconds must be a list of times >= 0")
        if not len(layers) == len(measured) == len(seconds):
            raise ValueError("a stored split's layers, measured_layers and stage_seconds differ in length")
        n_tokens, n_ubatch = d["n_tokens"], d["n_ubatch"]
        if not all(_number(n) and isinstance(n, int) and n > 0 for n in (n_tokens, n_ubatch)):
            raise ValueError("a stored split's n_tokens and n_ubatch must be positive ints")
        return cls(layers, measured, [float(t) for t in seconds], n_tokens, n_ubatch)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)   # JSON true/false are not counts


def _counts(values, name: str) -> list[int]:
    """Layer counts per stage: a non-empty list of ints >= 1 (a stage without layers is not a stage)."""
    if not isinstance(values, list) or not values or not all(_number(n) and isinstance(n, int) and n >= 1
                                                              for n in values):
        raise ValueError(f"a stored split's {name} must be a non-empty list of layer counts >= 1")
    return list(values)


def propose(measured_layers: Sequence[int], stage_seconds: Sequence[float], n_tokens: int, n_ubatch: int) -> Balance:
    """The balanced split, or the measured one where balancing would gain less than MIN_GAIN."""
    measured_layers, stage_seconds = list(measured_layers), list(stage_seconds)
    layers = balance_layers(measured_layers, stage_seconds)
    proposal = Balance(layers, measured_layers, stage_seconds, n_tokens, n_ubatch)
    if proposal.gain < MIN_GAIN:
        proposal = Balance(measured_layers, measured_layers, stage_seconds, n_tokens, n_ubatch)
    return proposal


def balance_key(model_identity: str, layout: Sequence[str]) -> str:
    """What a balance is valid for: the model file as loaded by this build, and the devices in chain order (kinds,
    RPC hosts and device descriptions: another GPU model or another host needs its own)."""
    return f"{model_identity}|{','.join(layout)}"


def measuring_shape(model, on_gpu: bool) -> tuple[int, int]:
    """(prompt tokens, n_ubatch) of the measuring prefills: llama.cpp's default ubatch on GPUs, the bench's 128 on
    CPU and RPC stages (where pipelining is measured best with it), UBATCHES_PER_STAGE ubatches per stage."""
    n_ubatch = 512 if on_gpu else 128
    n_tokens = UBATCHES_PER_STAGE * len(model.devices) * n_ubatch
    return min(n_tokens, max(model.n_ctx_train - 64, 2 * n_ubatch)), n_ubatch


class NotMeasurable(Exception):
    """The pipeline did not run on the model, so its stages could not be timed (the message says why)."""


def measure_stage_seconds(model, n_tokens: int, n_ubatch: int, runs: int = MEASURED_RUNS) -> list[float]:
    """Busy seconds of each stage in a pipelined prefill of n_tokens random tokens (the median of `runs`, after an
    untimed warm-up that fills every in-flight slot once). NotMeasurable if the pipeline does not run on this model
    (the reason is the executor's)."""
    tokens = np.random.default_rng(0).integers(0, min(model.n_vocab, 32000), n_tokens).astype(np.int32)
    samples: list[list[float]] = []
    with model.context(n_ctx=n_tokens + 64, n_batch=n_tokens, n_ubatch=n_ubatch) as ctx:
        warmup = min(n_tokens, (len(model.devices) + 2) * n_ubatch)
        for run in range(runs + 1):
            ctx.reset()
            result = ctx.prefill(tokens if run > 0 else tokens[:warmup], pipeline="force")
            if result.path != "pipelined":
                raise NotMeasurable(f"the stages cannot be measured: the pipeline did not run ({result.fallback_reason})")
            if run > 0:   # the warm-up allocates (compute buffers, every slot): not representative
                busy = result.timeline.busy_seconds()
                samples.append([busy[name] for name in model.devices])
    return [statistics.median(stage) for stage in zip(*samples)]
