"""The runs: which settings are measured for one prompt length, in which order, and the row they make.

Every setting (stock at some n_batch/n_ubatch, the one-process ceiling, each pipeline mode) has its own context,
opened and warmed up before the first timed run; then the settings run round by round, alternating stock and
non-stock settings and rotating the order each round, so that a noisy neighbour on the machine hits every setting
alike. Each setting is summarised by the median of its runs and their spread.
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np

from ... import policy
from ...results import within_first_ubatch_tolerance

STOCK_BATCH, STOCK_UBATCH = 2048, 512            # llama-server's defaults
CPU_PIPELINE_UBATCH = 128                        # measured (bench/results/): pipelines best on CPU/RPC stages
CPU_SWEEP_UBATCHES = (128, 256, 512)             # stock's sweep on CPU/RPC stages (plus n_batch = prompt)
GPU_SWEEP_UBATCHES = (256, 512, 1024)            # and on GPUs
CEILING_UBATCHES = (256, 512)                    # one process on a CPU: its best ubatches (bench/results/)

# The pipelined columns: (column name, the value passed as prefill(..., pipeline=)). Every entry is measured by the
# same code and gets its own columns; the first is the headline: what a user gets by default (auto, calibrated
# before the timed runs as it is once per machine), then the pipeline forced wherever it is safe.
PIPELINE_MODES: list[tuple[str, object]] = [("default", "auto"), ("forced", "force")]


@dataclass(frozen=True)
class Setting:
    role: str                 # "stock", "ceiling" or a PIPELINE_MODES name
    n_batch: int
    n_ubatch: int
    pipeline: object = False  # prefill's pipeline= value
    on: str = "split"         # which model runs it: "split" (the layout measured) or "ceiling" (one process/device)
    first_ubatch: int = 0     # Context(first_ubatch=) of a pipelined setting (--first-ubatch); 0: uniform ubatches

    @property
    def key(self) -> str:
        return f"{self.role} {self.n_batch}/{self.n_ubatch}" + (f" first {self.first_ubatch}" if self.first_ubatch else "")


@dataclass
class Series:
    """One setting, run several times on one prompt."""
    setting: Setting
    n_tokens: int
    results: list = field(default_factory=list)   # the PrefillResult of every run, in order
    link_bytes: list = field(default_factory=list)  # behind links (--link-rate): (sent, received) by the coordinator

    @property
    def seconds(self) -> list[float]:
        return [r.seconds for r in self.results]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tps(self) -> float:
        return self.n_tokens / self.median_seconds

    @property
    def tps_range(self) -> tuple[float, float]:
        return self.n_tokens / max(self.seconds), self.n_tokens / min(self.seconds)

    def median_result(self):
        """The run closest to the median (its timeline is the one reported)."""
        med = self.median_seconds
        return min(self.results, key=lambda r: abs(r.seconds - med))

    def summary(self) -> dict:
        lo, hi = self.tps_range
        last = self.results[-1]
        return {"role": self.setting.role, "n_batch": self.setting.n_batch, "n_ubatch": self.setting.n_ubatch,
                "pipeline": self.setting.pipeline, "on": self.setting.on, "seconds": self.seconds,
                "median_seconds": self.median_seconds, "tps": self.tps, "tps_min": lo, "tps_max": hi,
                "paths": [r.path for r in self.results], "n_ubatches": last.n_ubatches,
                "fallback_reason": last.fallback_reason, "decision": str(getattr(last, "decision", "") or ""),
                "transfers": str(getattr(last, "transfers", "") or "")} | self.link_summary()

    def link_summary(self) -> dict:
        """Bytes through the coordinator's link per ubatch, medians over the runs (behind links only)."""
        if not self.link_bytes:
            return {}
        per_ubatch = [(s / r.n_ubatches, v / r.n_ubatches) for (s, v), r in zip(self.link_bytes, self.results)]
        return {"coordinator_bytes": [list(b) for b in self.link_bytes],
                "coordinator_sent_per_ubatch": statistics.median(s for s, _ in per_ubatch),
                "coordinator_received_per_ubatch": statistics.median(v for _, v in per_ubatch)}


def bench_tokens(n_vocab: int, n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, min(n_vocab, 32000), n).astype(np.int32)


def plan(n: int, ubatches: list[int], *, sweep: bool, ceiling: bool, gpu: bool, first_ubatch: int = 0) -> list[Setting]:
    """The settings measured for an n-token prompt, in the order of the first round; first_ubatch applies to the
    pipelined modes only (stock keeps its best uniform settings)."""
    stock_ubs = {STOCK_UBATCH, *ubatches} | (set(GPU_SWEEP_UBATCHES if gpu else CPU_SWEEP_UBATCHES) if sweep else set())
    stock = [Setting("stock", max(STOCK_BATCH, ub), ub) for ub in sorted(stock_ubs)]
    if sweep and n > STOCK_BATCH:
        stock.append(Setting("stock", n, STOCK_UBATCH))       # the whole prompt in one llama_decode call
    other = [Setting("ceiling", STOCK_BATCH, ub, on="ceiling") for ub in CEILING_UBATCHES] if ceiling else []
    other += [Setting(name, max(STOCK_BATCH, ub), ub, value, first_ubatch=first_ubatch)
              for ub in ubatches for name, value in PIPELINE_MODES]
    # stock, other, stock, other, ...: every pipelined run has a stock run next to it
    return [s for pair in zip_longest(stock, other) for s in pair if s is not None]


def round_order(settings: list[Setting], r: int) -> list[Setting]:
    """Round r runs the settings rotated by r, so that no setting always follows the same one."""
    k = r % len(settings)
    return settings[k:] + settings[:k]


# On GPUs the first timed runs after the warm-ups ran slower than the rest, in every mode and by more than a median
# of 3 absorbs (bench/results/2026-11-26-gpu-host-time.md): there, one round of every setting runs untimed first (in
# the schedule as round -1).
GPU_SETTLING_ROUNDS = 1


def settling_rounds(gpu: bool) -> int:
    return GPU_SETTLING_ROUNDS if gpu else 0


def warmup_tokens(n: int, s: Setting, n_stages: int, gpu: bool) -> int:
    """Tokens of the untimed first prefill of a context: first-use allocations on every device, every in-flight
    slot of the pipeline; on GPUs the whole prompt (cheap there, and a GPU's first prefill is slow)."""
    return n if gpu else min(n, max(256, (n_stages + 2) * s.n_ubatch))


def measure_length(models: dict, n: int, settings: list[Setting], opts, progress, schedule: list) -> dict[str, Series]:
    """Run every setting opts.repeat times on an n-token prompt, interleaved; Series by Setting.key.

    models: {"split": Model, "ceiling": Model or None}; opts: client_threads, ceiling_threads, flash_attn,
    in_flight, repeat, on_gpu, and link_counter (behind links: the coordinator's byte counters, read around each
    run of the split model). Each run is appended to schedule as (n, round, key, seconds, path).
    """
    counter = getattr(opts, "link_counter", None)
    tokens = bench_tokens(models["split"].n_vocab, n)
    n_stages = len(models["split"].devices)
    contexts = {}
    try:
        for s in settings:
            threads = opts.ceiling_threads if s.on == "ceiling" else opts.client_threads
            ctx = models[s.on].context(n_ctx=n + 64, n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=threads,
                                       flash_attn=opts.flash_attn, max_in_flight=opts.in_flight if s.pipeline else 0,
                                       first_ubatch=s.first_ubatch or None)
            contexts[s.key] = ctx
            prepare(ctx, s, tokens, warmup_tokens(n, s, n_stages, opts.on_gpu))
        series = {s.key: Series(s, n) for s in settings}
        for r in range(-settling_rounds(opts.on_gpu), opts.repeat):
            for s in round_order(settings, r):
                count = counter is not None and s.on == "split"
                before = counter() if count else None
                res = run_once(contexts[s.key], tokens, s.pipeline)
                moved = tuple(a - b for a, b in zip(counter(), before)) if count else None
                schedule.append({"prompt_tokens": n, "round": r, "setting": s.key, "seconds": res.seconds,
                                 "path": res.path} | ({"coordinator_bytes": list(moved)} if count else {}))
                if r >= 0:
                    series[s.key].results.append(res)
                    if count:
                        series[s.key].link_bytes.append(moved)
                    progress.update(1)
        return series
    finally:
        for ctx in contexts.values():
            ctx.close()


def recorded_for(pipeline):
    """Where a setting's runs are recorded: auto's runs in the run's calibration (policy.calibration_scope in
    run.py), every other mode's in a throwaway one, so that the default decides from its own runs only, as it would
    for a user (the forced and stock runs of the same ubatch would otherwise count as its measurements)."""
    if pipeline in (True, "auto"):
        return contextlib.nullcontext()
    return policy.calibration_scope(policy.Calibration(None))


def prepare(ctx, s: Setting, tokens: np.ndarray, n_warmup: int) -> None:
    """The untimed start of a context: a warm-up prefill; where the setting leaves the path to pipeline="auto",
    its calibration on this prompt (what auto does once per setting, measured afresh in every bench run), so that
    the timed runs see the decision and not the measuring."""
    with recorded_for(s.pipeline):
        ctx.prefill(tokens[:n_warmup], pipeline=s.pipeline)
        ctx.reset()
        if s.pipeline in (True, "auto"):
            ctx.calibrate(tokens)
            ctx.reset()


def run_once(ctx, tokens: np.ndarray, pipeline):
    """One timed prefill from an empty cache; pipeline is prefill's pipeline= value (every mode goes through here)."""
    with recorded_for(pipeline):
        ctx.reset()
        res = ctx.prefill(tokens, pipeline=pipeline)
        ctx.reset()
    return res


def one_device_series(model, lengths: list[int], opts, progress) -> dict[int, Series]:
    """Stock (llama-server's defaults) with every layer on one device, per prompt length; measured on its own
    before the split model is loaded, so that the two are never in memory together (not interleaved)."""
    s = Setting("1 device", STOCK_BATCH, STOCK_UBATCH, on="ceiling")
    out = {}
    for n in lengths:
        tokens = bench_tokens(model.n_vocab, n)
        # the library's default threads, as the split model's contexts get them (client_threads 0)
        with model.context(n_ctx=n + 64, n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=opts.client_threads or None,
                           flash_attn=opts.flash_attn) as ctx:
            ctx.prefill(tokens[:warmup_tokens(n, s, 1, opts.on_gpu)])
            for _ in range(settling_rounds(opts.on_gpu)):
                run_once(ctx, tokens, False)
            out[n] = Series(s, n)
            for _ in range(opts.repeat):
                out[n].results.append(run_once(ctx, tokens, False))
                progress.update(1)
    return out


@dataclass
class Row:
    """One prompt length and pipelined ubatch. tok/s are medians over the interleaved runs; speedups are ratios of
    median seconds, measured in this process on the same model (ranges: the same ratio round by round)."""
    prompt_tokens: int
    ubatch: int
    stock_tps: float                 # llama-server's defaults
    stock_same_ub_tps: float         # n_ubatch = ubatch
    stock_best_tps: float
    stock_best_setting: str          # "n_batch/n_ubatch" of stock-best
    ceiling_tps: float               # one process (CPU) or one device (GPU); nan: not measured
    ceiling_setting: str
    pipelined_tps: float             # the headline mode (PIPELINE_MODES[0])
    speedup: float                   # headline mode vs stock-best
    speedup_low: float
    speedup_high: float
    speedup_vs_stock: float          # vs llama-server's defaults
    speedup_same_ub: float
    vs_ceiling: float
    efficiency: float                # Σ stage busy ÷ (S × wall), the headline run closest to the median
    ideal_efficiency: float          # M/(M+S−1)
    ideal_speedup: float             # M·S/(M+S−1)
    n_ubatches: int                  # M
    n_stages: int                    # S
    outputs_equal: bool              # every run of every mode, bit for bit vs stock same-ub (with a first_ubatch:
                                     # within pyturbo.results.FIRST_UBATCH_TOLERANCE)
    path: str
    fallback_reason: str = ""
    stock_best_run: str = ""         # the Series keys the speedup is computed from
    pipelined_run: str = ""
    ceiling_run: str = ""
    first_ubatch: int = 0            # of the pipelined modes (0: uniform ubatches)
    max_logit_diff: float = 0.0      # largest |logit difference| of a pipelined run to stock same-ub
    modes: dict = field(default_factory=dict)   # every PIPELINE_MODES entry
    runs: dict = field(default_factory=dict)    # every setting measured at this length


def why_standard(result) -> str:
    """Why a run took the standard path: auto's decision when it chose it, else the executor's reason ("" if not)."""
    if result.path != "standard":
        return ""
    return result.decision if result.fallback_reason == "pipeline not requested" else result.fallback_reason


def paired_ratios(a: Series, b: Series) -> list[float]:
    """a's seconds ÷ b's seconds, round by round (both ran once per round, close together)."""
    return [x / y for x, y in zip(a.seconds, b.seconds)]


def outputs_agree(logits: np.ndarray, reference: np.ndarray, first_ubatch: int) -> bool:
    """Bit for bit with the same ubatches; with a first_ubatch (other kernel shapes) within the stated tolerance."""
    return within_first_ubatch_tolerance(logits, reference) if first_ubatch else np.array_equal(logits, reference)


def make_rows(n: int, series: dict[str, Series], ubatches: list[int], ceiling: Series | None,
              first_ubatch: int = 0) -> list[Row]:
    """One Row per pipelined ubatch. ceiling: the 1-device Series (GPU), else the best 'ceiling' setting if any."""
    stock = series[Setting("stock", STOCK_BATCH, STOCK_UBATCH).key]
    external = {ceiling.setting.key: ceiling.summary()} if ceiling is not None else {}
    best = min((s for s in series.values() if s.setting.role == "stock"), key=lambda s: s.median_seconds)
    ceilings = [s for s in series.values() if s.setting.role == "ceiling"]
    if ceiling is None and ceilings:
        ceiling = min(ceilings, key=lambda s: s.median_seconds)
    rows = []
    for ub in ubatches:
        same = series[Setting("stock", max(STOCK_BATCH, ub), ub).key]
        reference = same.results[-1].logits
        modes = {}
        for name, _ in PIPELINE_MODES:
            m = series[Setting(name, max(STOCK_BATCH, ub), ub, first_ubatch=first_ubatch).key]
            ratios = paired_ratios(best, m)
            modes[name] = {"run": m.setting.key, "tps": m.tps, "tps_min": m.tps_range[0], "tps_max": m.tps_range[1],
                           "speedup": best.median_seconds / m.median_seconds,
                           "speedup_low": min(ratios), "speedup_high": max(ratios),
                           "outputs_equal": all(outputs_agree(r.logits, reference, first_ubatch) for r in m.results),
                           "max_logit_diff": max(float(np.max(np.abs(r.logits - reference))) for r in m.results),
                           "paths": sorted({r.path for r in m.results}),
                           "fallback_reason": "; ".join(sorted({why_standard(r) for r in m.results} - {""}))}
        head_name = PIPELINE_MODES[0][0]
        head, h = series[modes[head_name]["run"]], modes[head_name]
        tl = head.median_result().timeline
        rows.append(Row(
            prompt_tokens=n, ubatch=ub, stock_tps=stock.tps, stock_same_ub_tps=same.tps, stock_best_tps=best.tps,
            stock_best_setting=f"{best.setting.n_batch}/{best.setting.n_ubatch}",
            ceiling_tps=ceiling.tps if ceiling else float("nan"),
            ceiling_setting=f"{ceiling.setting.n_batch}/{ceiling.setting.n_ubatch}" if ceiling else "",
            pipelined_tps=head.tps, speedup=h["speedup"], speedup_low=h["speedup_low"],
            speedup_high=h["speedup_high"], speedup_vs_stock=stock.median_seconds / head.median_seconds,
            speedup_same_ub=same.median_seconds / head.median_seconds,
            vs_ceiling=head.tps / ceiling.tps if ceiling else float("nan"),
            efficiency=tl.efficiency() if len(tl) else float("nan"),
            ideal_efficiency=tl.ideal_efficiency() if len(tl) else float("nan"),
            ideal_speedup=tl.ideal_speedup() if len(tl) else float("nan"),
            n_ubatches=tl.n_ubatches if len(tl) else head.results[-1].n_ubatches, n_stages=len(tl.stages),
            outputs_equal=all(m["outputs_equal"] for m in modes.values()), first_ubatch=first_ubatch,
            max_logit_diff=max(m["max_logit_diff"] for m in modes.values()),
            path="/".join(h["paths"]), fallback_reason=h["fallback_reason"],
            stock_best_run=best.setting.key, pipelined_run=head.setting.key,
            ceiling_run=ceiling.setting.key if ceiling else "", modes=modes,
            runs={k: s.summary() for k, s in series.items()} | external))
    return rows
