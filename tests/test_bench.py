"""charlm bench: what it measures and how it reports it (never how fast anything is)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from typer.testing import CliRunner

from charlm import bench, native
from charlm.bench import (BenchSettings, _build, generate_speed, parse_list, run_bench, score_speed, synthetic_codec,
                          synthetic_lines)
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
    assert records[0]["native"] == native.status(3)         # whether native.c's kernels ran, for a window of 3
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


TINY = dict(hidden_size=8, embedding_size=4, batch_size=2, seq_len=3, vocab_size=7, seconds=0.02, rounds=3,
            warmup_seconds=0.01)  # as test_bench.py's TINY


@pytest.mark.parametrize("field, value, fragment", [
    ("vocab_size", 2, "--vocab-size must be at least 3"),   # <unk> and <eos> alone: nothing to draw
    ("seconds", 0.0, "--seconds must be > 0"),
    ("threads", -1, "--threads must be >= 0"),
    ("cells", (), "at least one cell and one impl"),
])
def test_bench_settings_refuse_the_edge_values(field, value, fragment):
    """Catches: `vocab_size < 3` written `< 2`, `not seconds > 0` written `seconds < 0`, `threads < 0` written
    `< -1`, and the empty-list check removed (bench.py:80-90): each edge value was let through."""
    with pytest.raises(UsageError, match=fragment):
        BenchSettings(**{**TINY, field: value}).check()
    BenchSettings(**TINY).check()


def test_bench_rounds_alternate_which_model_goes_first(monkeypatch):
    """Catches: every round run in the same order (bench.py:268): a burst of load then always hit the same
    model first, which the per-round ratios are meant to cancel."""
    calls = []

    def timed(subject, step, seconds, min_calls=1):
        if min_calls == 1:  # the timed rounds (warm-ups ask for two calls)
            calls.append((step.__name__, subject.cell))
        return 1.0
    monkeypatch.setattr(bench, "_timed", timed)
    monkeypatch.setattr(bench, "peak_training_memory", lambda subject: 1)
    bench.run_bench(BenchSettings(**{**TINY, "cells": ("rnn", "gru"), "impls": ("torch",), "rounds": 2}))
    for what in ("train_step", "infer_step", "sample_step"):
        assert [cell for name, cell in calls if name == what] == ["rnn", "gru", "gru", "rnn"]


def test_synthetic_codec_is_character_level_up_to_96_ids():
    """Catches: `vocab_size <= 96` written `< 96` (bench.py:337): 94 printable ASCII characters (33..126) and
    the two specials fill exactly 96 ids at character level."""
    codec = synthetic_codec(96)
    assert codec.tokenizer.level == "char" and len(codec.vocab) == 96 and codec.vocab.tokens[-1] == "~"
    words = synthetic_codec(97)
    assert words.tokenizer.level == "word" and len(words.vocab) == 97


def test_score_speed_counts_every_line_s_closing_eos():
    """Catches: the token count leaving out each line's closing <eos> (bench.py:395), which score counts."""
    s = score_speed("gru", "torch", BenchSettings(**TINY), lines=12, batch_size=5)
    codec = synthetic_codec(TINY["vocab_size"])
    lines = synthetic_lines(codec, 12, seed=0)
    assert s.tokens == sum(len(codec.encode_line(line)) + 1 for line in lines)


@pytest.mark.parametrize("impl", ["custom", "torch"])
def test_peak_training_memory_is_the_peak_not_what_is_left_at_the_end(impl):
    """Catches: the running sum's last value taken for its maximum (bench.py:243): a training step that ends
    with as much memory live as it began with (after the first, which makes the optimizer state) reported 0."""
    subject = bench._Subject("lstm", impl, BenchSettings(**TINY), torch.device("cpu"))
    subject.train_step()
    subject.train_step()
    peaks = [bench.peak_training_memory(subject) for _ in range(3)]  # the first profiled step keeps a little
    # every step had at least its (B, T) float32 losses live at once, besides the activations behind them
    assert min(peaks) >= TINY["batch_size"] * TINY["seq_len"] * 4, peaks


def test_the_native_label_is_each_cells_own(monkeypatch):
    """Catches: one process-wide label, 'time loops', on an LSTM row whose layer stepped from Python (beside
    MKL's product its loop runs only split by rows), and on a window too short for any loop."""
    monkeypatch.setattr(native, "kernels", lambda: object())
    monkeypatch.setattr(native, "loops", lambda: True)
    monkeypatch.setattr(native, "gemm_is_mkl", lambda: True)
    monkeypatch.setattr(native, "lstm_loops", lambda B, H: B > 1)
    assert native.status(64) == native.status(64, (32, 64)) == "on (time loops, MKL's product)"
    assert native.status(64, (1, 64)).startswith("on (per step: an LSTM loops beside MKL's product only split")
    assert native.status(native.LOOP_MIN_STEPS - 1).startswith("on (per step: a window of fewer than")
    monkeypatch.undo()  # this host's own kernels for the rows
    result = CliRunner().invoke(app, ["bench", "--cells", "gru,lstm", "--impls", "custom", "--json",
                                      *TINY_FLAGS[:4], "--batch-size", "1", "--seq-len", "8", *TINY_FLAGS[-7:]])
    assert result.exit_code == 0, result.output
    labels = {r["cell"]: r["native"] for r in map(json.loads, result.stdout.splitlines())}
    assert labels == {"gru": native.status(8), "lstm": native.status(8, (1, 8))}
    if native.loops() and native.gemm_is_mkl():  # where the GRU's loop runs beside MKL's, one LSTM row steps
        assert labels["gru"] != labels["lstm"]
