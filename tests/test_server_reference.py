"""bench/server_reference.py: its arguments, statistics and table, and a small end-to-end run against pyturbo's own
server (and against stock llama-server where bench/reference_build.py has built it)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import reference_build  # noqa: E402
import server_reference as sr  # noqa: E402

pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def test_arguments_full_quick_and_overrides():
    full = sr.parse_args([])
    assert (full.users, full.lengths, full.repeat) == ([1, 4, 8], [1500, 6000], 3)
    assert full.servers == ["llama-server", "pyturbo"] and full.parallel == 4 and full.streams == 3
    quick = sr.parse_args(["--quick"])
    assert (quick.users, quick.repeat) == ([1, 4], 1) and max(quick.lengths) < 1500 and quick.ctx < full.ctx
    mine = sr.parse_args(["--quick", "--users", "2,3", "--lengths", "100", "--repeat", "2", "--parallel", "6",
                          "--ctx", "512", "--servers", "pyturbo"])
    assert (mine.users, mine.lengths, mine.repeat, mine.parallel, mine.ctx, mine.servers) == \
        ([2, 3], [100], 2, 6, 512, ["pyturbo"])


@pytest.mark.parametrize("argv", [["--parallel", "3"],                   # no slot left for the long prompt
                                  ["--ctx", "1000"],                     # the 1500-token prompt does not fit
                                  ["--servers", "vllm"], ["--users", "0"], ["--lengths", "a"],
                                  ["--n-ubatch", "1024", "--n-batch", "512"]])
def test_arguments_refused(argv, capsys):
    with pytest.raises(SystemExit):
        sr.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_statistics_and_table():
    assert sr.spread([3.0, 1.0, 2.0], "s") == "2.000 (1.000-3.000)"
    assert sr.spread([100.0], "tok/s") == "100.0" and sr.spread([], "s") == "-"
    # pyturbo / llama-server of the medians, with the spread of the per-round ratios
    assert sr.ratio_cell([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == "1.00x (0.50-1.50)"
    assert sr.ratio_cell([1.0], []) == "-"
    rows = sr.row_specs([1, 4], [300], 3)
    assert [r.key for r in rows] == ["decode/1", "decode/4", "ttft/300", "load/300/ttft", "load/300/gap",
                                     "load/300/gap_before"]
    results = {"llama-server": [{"decode/1": 100.0, "decode/4": 130.0, "ttft/300": 2.0, "load/300/gap": None}],
               "pyturbo": [{"decode/1": 50.0, "decode/4": 140.0, "ttft/300": 1.0, "load/300/gap": 0.5}]}
    text = sr.table(rows, results).splitlines()
    assert len(text) == 2 + len(rows)
    assert text[2] == "| 1 user decoding at once, aggregate | tok/s (higher is better) | 100.0 | 50.0 | 0.50x |"
    assert "| 140.0 | 1.08x |" in text[3] and "| 2.000 | 1.000 | 0.50x |" in text[4]
    assert text[6].endswith("| - | 0.500 | - |")                 # a missing measurement is a dash, not an error


def test_decode_rate_and_gaps():
    # two users of 3 tokens over 2.5 s: 5 tokens after the first one
    assert sr.aggregate_tps([[0.0, 1.0, 2.0], [0.5, 1.5, 2.5]]) == pytest.approx(2.0)
    assert math.isnan(sr.aggregate_tps([[1.0]]))
    tokens = [0.0, 1.0, 2.0, 5.0, 6.0]
    # sent at 1.5, first token at 4.5: the gap 1-2 (running when it was sent) and 2-5 (its prefill)
    assert sr.gaps_in_flight(tokens, 1.5, 4.5) == [1.0, 3.0]
    assert sr.gaps_before(tokens, 1.5) == [1.0]
    assert sr.gaps_in_flight(tokens, 6.5, 7.0) == []


def test_requests_ignore_eos_or_bias_it(vocab_model):
    vocab = sr.Vocab.of(vocab_model)
    assert vocab.eos == 2 and vocab.n_layer == 4 and vocab.eos not in vocab.non_text
    assert set(vocab.text_tokens).isdisjoint(vocab.non_text) and 0 in vocab.non_text   # <unk>
    assert vocab.prompt(20, "a", 1) == vocab.prompt(20, "a", 1) != vocab.prompt(20, "a", 2)
    assert set(vocab.prompt(50, "b")) <= set(vocab.text_tokens)
    honoured = sr.Client(None, "", vocab, ignore_eos=True).body([5, 6], 3)
    assert honoured["ignore_eos"] is True and str(vocab.eos) not in honoured["logit_bias"]
    biased = sr.Client(None, "", vocab, ignore_eos=False).body([5, 6], 3)
    assert "ignore_eos" not in biased and biased["logit_bias"][str(vocab.eos)] == -100
    assert biased["stream"] is True and biased["temperature"] == 0 and biased["max_tokens"] == 3


def _small_run(model, out: Path, servers: str) -> list[str]:
    """Every row once on the tiny vocabulary model over 2 workers, small enough for a few seconds per server."""
    return ["--servers", servers, "--model", str(model), "--out", str(out), "--log-dir", str(out.parent / "logs"),
            "--workers", "2", "--users", "1,2", "--lengths", "96", "--streams", "2", "--parallel", "3",
            "--max-tokens", "12", "--ctx", "512", "--n-batch", "256", "--n-ubatch", "32", "--repeat", "1"]


def _check_report(out: Path, servers: list[str]) -> str:
    text = out.read_text()
    assert "Command: `python bench/server_reference.py --servers" in text
    assert "pyturbo commit: " in text and "cores" in text
    for name in servers:
        for key in ("decode/1", "decode/2", "ttft/96", "load/96"):
            assert f"{name} round 1 {key}: " in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 + 1 + 3          # header, 2 decode rows, 1 TTFT row, 3 under-load rows
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name, cell in zip(("llama-server", "pyturbo"), cells[2:4]):
            if name in servers:
                assert cell != "-", line     # every row measured
    return text


def test_end_to_end_against_pyturbo_server(vocab_model, tmp_path):
    """The client side for real, against pyturbo's server: equal token counts, a TTFT, gaps while a prompt is in
    flight, the report written."""
    out = tmp_path / "report.md"
    assert sr.main(_small_run(vocab_model, out, "pyturbo")) == 0
    text = _check_report(out, ["pyturbo"])
    assert '"tokens": [12]' in text and '"tokens": [12, 12]' in text      # max_tokens each: EOS never ended one
    assert "--tensor-split" in text and "--parallel 3" in text


@pytest.mark.skipif(reference_build.binaries() is None,
                    reason="stock llama-server/rpc-server not built (python bench/reference_build.py builds them)")
def test_end_to_end_both_servers(vocab_model, tmp_path):
    out = tmp_path / "report.md"
    assert sr.main(_small_run(vocab_model, out, "llama-server,pyturbo")) == 0
    text = _check_report(out, ["llama-server", "pyturbo"])
    assert "--no-kv-unified" in text and "--no-webui" in text and "-ngl 99" in text
    assert "llama-server round 1: ignore_eos honoured: True" in text
