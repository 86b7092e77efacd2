"""charlm bench: what it measures and how it reports it (never how fast anything is)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from typer.testing import CliRunner

from charlm import native
from charlm.bench import BenchSettings, _build, generate_speed, parse_list, run_bench, score_speed
from charlm.cells import CustomRNN
from charlm.cli import app
from charlm.errors import UsageError

TINY = dict(hidden_size=8, embedding_size=4, batch_size=2, seq_len=3, vocab_size=7, seconds=0.02, rounds=3,
            warmup_seconds=0.01)
TINY_FLAGS = ["--hidden-size", "8", "--embedding-size", "4", "--batch-size", "2", "--seq-len", "3",
              "--vocab-size", "7", "--seconds", "0.02", "--rounds", "3", "-q"]


def test_bench_measures_every_cell_and_impl_against_torch():
    results = run_bench(BenchSettings(cells=("rnn", "lstm"), impls=("custom", "torch"), **TINY))
    assert [(r.cell, r.impl) for r in results] == [("rnn", "custom"), ("rnn", "torch"),
                                                    ("lstm", "custom"), ("lstm", "torch")]
    by = {(r.cell, r.impl): r for r in results}
    for r in results:
        for what in ("train", "infer", "sample"):
            rounds = getattr(r, f"{what}_rounds")
            assert len(rounds) == 3 and all(x > 0 for x in rounds)
            assert getattr(r, f"{what}_tokens_per_s") == statistics.median(rounds)
        assert r.peak_memory_bytes > 0
        assert r.parameters == by[(r.cell, "torch")].parameters  # the same model either way
    for cell in ("rnn", "lstm"):
        mine, ref = by[(cell, "custom")], by[(cell, "torch")]
        assert ref.train_ratio == 1.0
        assert mine.train_ratio == statistics.median(a / b for a, b in zip(mine.train_rounds, ref.train_rounds))


def test_bench_without_torch_has_no_ratio():
    (result,) = run_bench(BenchSettings(cells=("gru",), impls=("custom",), **TINY))
    assert result.train_ratio is None and result.sample_ratio is None


def test_bench_reference_impl_is_the_custom_model_on_its_step_functions():
    model = _build("gru", "reference", BenchSettings(**TINY), torch.device("cpu"))
    assert isinstance(model.rnn, CustomRNN) and not model.rnn.fast
    assert _build("gru", "custom", BenchSettings(**TINY), torch.device("cpu")).rnn.fast


def test_bench_refuses_unknown_names_and_sizes():
    with pytest.raises(UsageError, match="unknown 'tcn'"):
        parse_list("lstm,tcn", ("rnn", "gru", "lstm"), "--cells")
    with pytest.raises(UsageError, match="--seq-len"):
        BenchSettings(seq_len=0).check()


def test_bench_command_prints_json_lines_with_the_documented_keys():
    result = CliRunner().invoke(app, ["bench", "--cells", "gru", "--json", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["cell"], r["impl"]) for r in records] == [("gru", "custom"), ("gru", "torch")]
    for key in ("train_tokens_per_s", "infer_tokens_per_s", "sample_tokens_per_s", "train_ratio",
                "infer_ratio", "sample_ratio", "peak_memory_bytes", "memory_measure"):
        assert key in records[0]
    assert records[0]["products"] in ("onednn", "default")  # which library ran the CPU products
    assert records[0]["native"] == native.status()          # whether native.c's step kernels ran
    assert records[1]["products"] == records[1]["native"] == "-"  # torch's modules use neither


def test_bench_command_prints_a_markdown_table():
    result = CliRunner().invoke(app, ["bench", "--cells", "rnn", "--impls", "torch", "--markdown", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| cell | impl | train tok/s")
    assert rows[2].startswith("| rnn | torch |")


def test_bench_quiet_prints_nothing_on_stderr_in_a_real_process():
    """The memory measurement runs torch's profiler, whose native library writes to file descriptor 2
    itself (its start and stop, a warning): -q must still mean nothing on stderr."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "charlm", "bench", "--cells", "rnn", "--impls", "torch",
                             *TINY_FLAGS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "rnn" in result.stdout  # the table was printed


def test_bench_command_rejects_a_bad_cell_with_exit_code_2():
    result = CliRunner().invoke(app, ["bench", "--cells", "transformer", *TINY_FLAGS])
    assert result.exit_code == 2
    assert "charlm: error: --cells: unknown 'transformer'" in result.stderr


def test_generate_speed_times_the_full_length():
    g = generate_speed("lstm", "custom", BenchSettings(**TINY), tokens=40)
    assert g.tokens == 40 and len(g.rounds) == 3
    rate, took = g.tokens_per_s, g.seconds  # the rate is the count over the measured time (no timing asserted)
    assert rate * took == pytest.approx(40)


def test_score_speed_compares_batched_with_one_at_a_time():
    s = score_speed("gru", "torch", BenchSettings(**TINY), lines=12, batch_size=5)
    assert s.lines == 12 and s.tokens > 12  # every line has tokens and its closing <eos>
    assert s.speedup == pytest.approx(s.batched_lines_per_s / s.single_lines_per_s)


def test_every_ratio_is_the_median_of_the_per_round_ratios():
    """Catches: only train_ratio computed; infer_ratio and sample_ratio stayed None (the JSON keys were still there)."""
    import statistics

    from charlm.bench import BenchSettings, run_bench

    results = run_bench(BenchSettings(cells=("rnn",), impls=("custom", "torch"), hidden_size=8, embedding_size=4,
                                      batch_size=2, seq_len=3, vocab_size=7, seconds=0.02, rounds=3,
                                      warmup_seconds=0.01))
    mine, ref = results
    assert (mine.impl, ref.impl) == ("custom", "torch")
    for what in ("train", "infer", "sample"):
        assert getattr(ref, f"{what}_ratio") == 1.0
        rounds = zip(getattr(mine, f"{what}_rounds"), getattr(ref, f"{what}_rounds"))
        assert getattr(mine, f"{what}_ratio") == statistics.median(a / b for a, b in rounds)


def test_bench_markdown_right_aligns_the_number_columns():
    """Catches: the markdown separator row aligning a number column left (or a text column right)."""
    result = CliRunner().invoke(app, ["bench", "--cells", "rnn", "--impls", "torch", "--markdown", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert rows[1] == "|---|---|" + "---:|" * 8
