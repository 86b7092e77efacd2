"""`score` and `eval` read their input piece by piece: memory bounded by a batch of lines (score) or by the ids
(eval), never the whole text, and `score` prints a batch's results before it reads on."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from charlm import data, score
from charlm.checkpoint import load_run
from charlm.cli import app
from charlm.errors import UsageError
from charlm.tokenizer import Tokenizer
from conftest import PROJECT_ROOT

TEXTS = [
    "one\ntwo\r\nthree",
    "a\n\r",
    "\r",
    "\n\n\n",
    "ends in cr\r",
    "no line end at all",
    "lone\rcarriage return\r\n\r\nafter a blank line\n",
    "中文\r\n第二行\n😀\n",
]


def _cut_everywhere(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_line_chunks_split_lines_as_the_whole_text_splits_them(monkeypatch, text, size):
    """Whatever the pieces (a piece may end inside a CRLF, or hold no line end at all), the chunks hold the lines
    that Tokenizer.lines finds in the whole text, in order, none longer than the limits allow."""
    monkeypatch.setattr(score, "SCORE_CHUNK_LINES", 2)
    chunks = list(score.line_chunks(_cut_everywhere(text, size)))
    assert [line for chunk in chunks for line in chunk] == Tokenizer("char").lines(text)
    assert all(0 < len(chunk) <= 2 for chunk in chunks)


def test_line_chunks_end_at_the_character_limit_and_at_each_piece_when_asked(monkeypatch):
    monkeypatch.setattr(score, "SCORE_CHUNK_CHARS", 10)
    text = "".join(f"line {i:02d}\n" for i in range(6))  # 8 characters a line
    assert [len(c) for c in score.line_chunks([text])] == [2, 2, 2]
    monkeypatch.setattr(score, "SCORE_CHUNK_CHARS", 1 << 20)
    assert [len(c) for c in score.line_chunks([text[:20], text[20:]])] == [6]
    assert [len(c) for c in score.line_chunks([text[:20], text[20:]], each_piece=True)] == [2, 4]


def test_a_file_scored_in_many_batches_prints_what_one_batch_prints(monkeypatch, tiny_run, tmp_path):
    """The table's lines, its totals and both perplexities do not depend on how many lines `score` reads at a time;
    the totals are those of score_totals over every sentence at once."""
    lines = ["the cat sat.", "a dog.", "zebra \u2603 on the log.", "", "the mat", "q"] * 4
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    runner = CliRunner()
    whole = runner.invoke(app, ["score", str(tiny_run["run_dir"]), "--file", str(path), "--per-token"])
    monkeypatch.setattr(score, "SCORE_CHUNK_LINES", 5)
    batched = runner.invoke(app, ["score", str(tiny_run["run_dir"]), "--file", str(path), "--per-token"])
    assert whole.exit_code == batched.exit_code == 0, batched.output
    assert batched.stdout == whole.stdout
    model, codec, _ = load_run(tiny_run["run_dir"])
    t = score.score_totals(score.score_sentences(model, codec, lines))
    assert t.oov > 0 and f"Total: ln P {t.logprob:.4f}" in batched.stdout
    assert f"Perplexity excluding OOVs: {t.perplexity_no_oov:.4f}" in batched.stdout


def _charlm(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)], cwd=PROJECT_ROOT, **popen)


def _read_until(fd: int, wanted: bytes, seconds: float) -> bytes:
    """What `fd` gives until `wanted` appears in it; what it gave so far when `seconds` pass first."""
    got, deadline = b"", time.monotonic() + seconds
    while wanted not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                more = os.read(fd, 65536)
            except OSError:  # a pty whose other end has closed
                break
            if not more:
                break
            got += more
    return got


def test_score_prints_a_batch_of_lines_before_the_input_ends(tiny_run):
    """Catches: score reading its whole input before scoring a line (a million lines held 2.6 GB of results and
    printed the first after 47 s). The pipe stays open after one batch of lines: their scores must come out."""
    proc = _charlm("score", tiny_run["run_dir"], "--json", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"the cat sat on the mat.\n" * (score.SCORE_CHUNK_LINES + 1))
        proc.stdin.flush()
        first = _read_until(proc.stdout.fileno(), b"\n", 120)
        assert first.startswith(b'{"text": "the cat sat on the mat."'), first[:200]
        proc.stdin.write(b"a dog.\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (first + rest).count(b"\n") == score.SCORE_CHUNK_LINES + 2


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="a pty")
def test_score_scores_each_line_typed_in_a_terminal_as_it_comes(tiny_run):
    """Catches: in a terminal, score waiting for Ctrl-D before scoring the first line typed."""
    master, terminal = os.openpty()
    proc = _charlm("score", tiny_run["run_dir"], stdin=terminal, stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        os.write(master, b"the cat sat.\n")
        first = _read_until(master, b"| the cat sat.", 120)
        assert b"ln P" in first and b"| the cat sat." in first, first
        os.write(master, b"a dog.\n\x04")  # Ctrl-D at a line's start: the end of the input
        rest = _read_until(master, b"Perplexity excluding OOVs", 120)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert b"| a dog." in rest and b"Total: ln P" in rest


@pytest.mark.parametrize("encoding, prefix", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("latin-1", b"")])
def test_a_bad_byte_is_named_at_its_offset_in_the_file_whatever_the_blocks(tmp_path, monkeypatch, encoding, prefix):
    """read_pieces' offsets count from the file's start, a byte-order mark included, across blocks and a
    character cut between two of them."""
    body = ("caf\u00e9 " * 20).encode("utf-8") if encoding == "utf-8" else b"plain ascii " * 10
    path = tmp_path / "bad.txt"
    bad = b"\x81" if encoding == "utf-8" else b""
    path.write_bytes(prefix + body + bad + b" and more\n")
    for block in (2, 3, 5, 1 << 20):
        monkeypatch.setattr(data, "BLOCK_BYTES", block)
        monkeypatch.setattr(data, "HEAD_BYTES", block)
        if not bad:
            assert data.read_text(path, encoding).endswith(" and more\n")
            continue
        with pytest.raises(UsageError) as info:
            data.read_text(path, encoding)
        assert f"byte offset {len(prefix) + len(body)} (b'\\x81')" in info.value.message, (block, info.value.message)
        assert "UTF-8" in info.value.message


@pytest.mark.parametrize("block", [3, 5, 7, 1 << 20])
def test_a_bad_byte_gets_the_same_message_wherever_the_blocks_end(tmp_path, monkeypatch, block):
    """Catches: the bytes of a character cut between two blocks counted as text read before the bad byte. A
    cp1252 file whose first accented letter (a UTF-8 lead byte) ended a block was said to hold UTF-8 letters
    before it and to mix encodings, though all before it was ASCII; the corpus reader said what it reads as."""
    monkeypatch.setattr(data, "HEAD_BYTES", 8)
    monkeypatch.setattr(data, "BLOCK_BYTES", block)
    ascii_part = b"x" * (8 + 2 * min(block, 100) - 1)  # the first letter outside ASCII ends the second block
    path = tmp_path / "cp1252.txt"
    path.write_bytes(ascii_part + "\u00e9 na\u00efve, d\u00e9j\u00e0 vu, r\u00e9sum\u00e9\n".encode("cp1252") * 50)
    with pytest.raises(UsageError) as info:
        data.read_text(path)
    with pytest.raises(UsageError) as training:  # the corpus reader, which looks at the file again
        list(data.iter_text(path))
    assert f"byte offset {len(ascii_part)} (b'\\xe9')" in info.value.message
    assert info.value.message == training.value.message
    assert "mixes encodings" not in info.value.message


def test_running_totals_keep_a_bounded_state_and_the_exact_sums():
    """Catches: score keeping sixteen bytes for every line it scored (a file of 100 million lines: 1.6 GB),
    though its memory is said not to grow with the input. The totals stay math.fsum of every sentence's."""
    import math
    import random
    import tracemalloc

    rng = random.Random(0)
    values = [rng.choice([-1e16, 1e-3, -7.25, 1e16]) * rng.random() for _ in range(5000)]
    results = [score.SentenceScore("x", ["x", "<eos>"], [v / 2, v / 2], v, 0.0, 0, 1.0, 1.0, 0.0)
               for v in values]
    running = score.RunningTotals().add(results[:2500]).add(results[2500:])
    assert running.totals().logprob == math.fsum(values)
    assert running.sentences == 5000

    one = score.SentenceScore("a", ["a", "<eos>"], [-1.5, -0.25], -1.75, 0.0, 0, 1.0, 1.0, 0.0)
    running = score.RunningTotals()
    running.add([one] * 1000)
    many = [one] * 200_000
    tracemalloc.start()
    try:
        running.add(many)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 100_000, held  # 3.2 MB where every sentence left two floats behind
    assert running.totals().logprob == -1.75 * 201_000


LETTERS = "d\u00e9j\u00e0 vu caf\u00e9 na\u00efve ".encode("utf-8") * 20  # a hundred UTF-8 letters


@pytest.mark.parametrize("raw", [b"x" * 20 + b"\xff" + LETTERS + b"\n", LETTERS + b"\xff" + b"x" * 40 + b"\n"],
                         ids=["letters after", "letters before"])
@pytest.mark.parametrize("block", [16, 64, 1 << 20])
def test_a_bad_byte_among_utf8_letters_is_told_the_file_is_damaged_whatever_the_blocks(tmp_path, monkeypatch, raw, block):
    """Catches: the bytes about a bad byte, which tell whether the text around it is UTF-8, taken from the block
    that holds it alone: the letters of the next 32 KiB (read on when the block ends soon after the bad byte)
    or of the blocks before it (a pipe's reads may be short) left out. The message then advised --encoding
    cp1252, or said the file mixes encodings, where the corpus reader says it is damaged."""
    monkeypatch.setattr(data, "HEAD_BYTES", min(block, 8))
    monkeypatch.setattr(data, "BLOCK_BYTES", block)
    path = tmp_path / "damaged.txt"
    path.write_bytes(raw)
    with pytest.raises(UsageError) as info:
        data.read_text(path)
    with pytest.raises(UsageError) as training:  # the corpus reader, which reads the bytes about it again
        list(data.iter_text(path))
    at = raw.index(b"\xff")
    assert f"byte offset {at} (b'\\xff')" in info.value.message
    assert "the text about it is UTF-8, so the file is damaged" in info.value.message
    assert info.value.message == training.value.message


@pytest.mark.parametrize("values", [
    [1e16, 1.0, 1e-16],  # a tie that only the last partial breaks: a plain sum of the partials rounds it down
    [-5.5, float("-inf"), 2.0],
    [float("nan"), -1.0, float("-inf")],
    [float("-inf"), -1.0, float("nan")],
    [float("inf"), 3.0],
])
def test_exact_sum_is_math_fsum_of_the_values_added(values):
    """Catches: ExactSum adding its partials up with a plain sum (wrong in the last bit), or losing a value
    that is not finite: a sentence of ln P -inf or NaN (a diverged model) must make the total -inf or NaN, as
    fsum over every sentence did, not leave it out or keep only the last such value."""
    import math

    total = score.ExactSum()
    for v in values:
        total.add(v)
    expected = math.fsum(values)
    assert total.value() == expected or (math.isnan(expected) and math.isnan(total.value()))


def test_exact_sum_of_both_infinities_fails_as_math_fsum_does():
    """Catches: ExactSum keeping one infinity for both (the later one), which turned -inf + inf, which has no
    value and makes fsum raise, into a total."""
    import math

    for values in ([float("inf"), 1.0, float("-inf")], [float("-inf"), float("inf")]):
        total = score.ExactSum()
        for v in values:
            total.add(v)
        with pytest.raises(ValueError):
            math.fsum(values)
        with pytest.raises(ValueError):
            total.value()
