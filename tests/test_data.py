"""From text to id streams and BPTT windows: the fast char encoder, splits, batching, errors."""

from __future__ import annotations

import codecs
import io
import os
import sys
import threading
import types

import pytest
import torch

from charlm import data
from charlm.config import DataConfig
from charlm.data import (batchify, char_count, check_text_file, check_trainable, check_vocabulary, encode, eval_streams,
                         fresh_windows, is_blank, iter_text, line_starts, prepare, read_text, split_text,
                         storage_dtype, window, windows_per_epoch)
from charlm.errors import UsageError
from charlm.tokenizer import EOS_ID, UNK_ID, TextCodec, Tokenizer, Vocabulary, count_tokens

TRICKY = [
    "",
    "\n",
    "\n\n",
    "plain\ntext\n",
    "no final newline",
    "windows\r\nline ends\r\n",
    "windows without final\r\nnewline",
    "lone\rcarriage return inside",
    "ends in carriage return\r",
    "two at the end\r\r",
    "a\r\r\n",
    "newline then cr\n\r",
    "\r",
    "unknown: Ωμέγα ✓ and ☃\n",
    "astral emoji 😀🐍🎉 and 𝔘𝔫𝔦 outside the BMP\nand 🏽 modifiers 👍🏽\n",
    "decomposed e\u0301 and composed \u00e9\n",
    "中文字符和 mixed 文本\r\n第二行",
    "   leading and trailing spaces   \n\t tab\n",
]


def char_codec_from(text: str, lowercase: bool = False) -> TextCodec:
    tokenizer = Tokenizer("char", lowercase=lowercase)
    return TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, text)))


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("lowercase", [False, True])
def test_fast_char_encoder_matches_encode_text(text, lowercase):
    # The vocabulary knows only part of the characters, so unknown ones (<unk>) appear too.
    codec = char_codec_from("plain text windows 中文 😀 é ABC\n", lowercase)
    fast = encode(codec, text)
    assert fast.dtype == torch.int64
    assert fast[0].item() == EOS_ID
    assert fast[1:].tolist() == codec.encode_text(text).ids


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-8-sig"])
def test_a_file_read_in_pieces_encodes_as_its_whole_text(tmp_path, monkeypatch, level, lowercase, encoding):
    """`eval` reads its file piece by piece (read_pieces, encode_pieces) instead of as one string: the ids, the
    characters, lines and unknown tokens it counts are those of the whole text, wherever the blocks end (here
    every few bytes: inside a CRLF, a UTF-16 unit, a combining sequence, a word)."""
    text = "".join(TRICKY) + "Σίσυφος ΣΟΦΟΣ\nHangul \u1100\u1161\u11a8 jamo\n" + "word " * 40 + "\r\n\r"
    tokenizer = Tokenizer(level, lowercase=lowercase)
    codec = TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, text[: len(text) // 2])))
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode(encoding))
    whole = encode(codec, text, compact=True)
    for block in (3, 7, 64, 1 << 20):
        monkeypatch.setattr(data, "BLOCK_BYTES", block)
        monkeypatch.setattr(data, "WORD_BLOCK_BYTES", block)
        monkeypatch.setattr(data, "HEAD_BYTES", block)
        got = data.encode_pieces(codec, data.read_pieces(path, encoding, level=level))
        assert got.ids.dtype == whole.dtype and torch.equal(got.ids, whole), block
        assert got.chars == char_count(text, lowercase)
        assert got.lines == len(tokenizer.lines(text))
        assert got.unk == int((whole == UNK_ID).sum()) > 0



@pytest.mark.parametrize("words, dtype", [(300, torch.uint16), (70_000, torch.int32)])
def test_a_file_read_in_pieces_encodes_as_its_whole_text_in_two_and_four_byte_ids(tmp_path, monkeypatch, words,
                                                                                     dtype):
    """Catches: encode_pieces growing its id array by a byte an id, not the id's size: right at character level
    (one byte an id), wrong for a word vocabulary of more than 256 words, whose ids take two or four bytes
    (`eval` of any real word-level model)."""
    tokenizer = Tokenizer("word")
    codec = TextCodec(tokenizer, Vocabulary(["<unk>", "<eos>"] + [f"w{i}" for i in range(words)]))
    text = "".join(f"w{i} w{words - 1 - i} w{i * 7919 % words} unseen\n" for i in range(0, words, max(1, words // 50)))
    path = tmp_path / "words.txt"
    path.write_text(text + "w1 no final newline", encoding="utf-8")
    whole = encode(codec, text + "w1 no final newline", compact=True)
    assert whole.dtype == dtype
    for block in (5, 1 << 20):
        monkeypatch.setattr(data, "WORD_BLOCK_BYTES", block)
        got = data.encode_pieces(codec, data.read_pieces(path, level="word"))
        assert got.ids.dtype == dtype and torch.equal(got.ids, whole), block
        assert got.lines == text.count("\n") + 1 and got.unk == int((whole == UNK_ID).sum()) > 0

def test_fast_char_encoder_matches_on_a_vocabulary_with_every_character():
    text = "".join(TRICKY)
    codec = char_codec_from(text)
    assert encode(codec, text)[1:].tolist() == codec.encode_text(text).ids
    assert UNK_ID in encode(char_codec_from("x"), text).tolist()


def test_word_level_encode_starts_with_eos_and_matches_encode_text():
    tokenizer = Tokenizer("word")
    text = "the cat sat.\n猫が座った\n"
    codec = TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, "the cat")))
    ids = encode(codec, text)
    assert ids.tolist() == [EOS_ID] + codec.encode_text(text).ids


def test_char_count_counts_each_line_end_once():
    assert char_count("ab\r\ncd") == 6  # a b \n c d + the missing final line end
    assert char_count("ab\n") == 3
    assert char_count("") == 0


def test_char_count_counts_characters_as_training_does_after_nfc():
    """A decomposed é (e + combining acute) is one character to the model, as training counts it."""
    assert char_count("cafe\u0301\n") == char_count("caf\u00e9\n") == 5


# ---------------------------------------------------------------- reading files
def test_read_text_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found") as info:
        read_text(tmp_path / "missing.txt")
    assert info.value.exit_code == 2


def test_read_text_names_the_offset_of_bad_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc caf\u00e9".encode("latin-1"))
    with pytest.raises(UsageError, match="byte offset 7"):
        read_text(path)
    assert read_text(path, errors="replace") == "abc caf\ufffd"
    assert read_text(path, encoding="latin-1") == "abc caf\u00e9"


def test_read_text_refuses_binary_files_and_folders(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"ab\x00cd")
    with pytest.raises(UsageError, match="binary"):
        read_text(path)
    with pytest.raises(UsageError, match="folder"):
        read_text(tmp_path)


# Named pipes: each read runs in a thread with a time limit, since a wrong open of a pipe waits for ever.
needs_fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


def _fifo(tmp_path, writes=None):
    """A named pipe; with `writes` (an iterable of bytes), a thread that writes them into it once a reader
    opens it, and stops when the reader closes it."""
    path = tmp_path / "pipe"
    os.mkfifo(path)

    def feed():
        try:
            with open(path, "wb") as fh:
                for chunk in writes:
                    fh.write(chunk)
        except OSError:  # the reader closed the pipe
            pass
    if writes is not None:
        threading.Thread(target=feed, daemon=True).start()
    return path


def _in_a_thread(call, timeout: float) -> list:
    """[what call() returned or raised]; an AssertionError if it had not finished after `timeout` seconds."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as exc:  # shown by the caller's assertion, not lost in the thread
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still waiting after {timeout} s"
    return outcome


@needs_fifos
def test_read_text_reads_a_pipe_whole(tmp_path):
    """`charlm score --file <(...)` and `charlm eval --file /dev/stdin` hand over a pipe: read once, so that
    nothing is lost to a first look at its head (a file of 3,000 lines once scored as 1,249)."""
    text = "".join(f"line {i} of a text longer than the 64 KiB that the binary check reads\n" for i in range(3000))
    assert len(text) > 3 * 65536
    path = _fifo(tmp_path, [text.encode()])
    assert _in_a_thread(lambda: read_text(path), 30) == [text]  # a second open would wait for a writer


@needs_fifos
def test_read_text_refuses_an_endless_binary_stream_from_its_head(tmp_path):
    """A stream of NUL bytes without end (as /dev/zero is) is refused after its first 64 KiB, not read until
    memory runs out."""
    path = _fifo(tmp_path, iter(lambda: bytes(65536), None))
    (outcome,) = _in_a_thread(lambda: read_text(path), 10)  # short: reading it whole would fill the memory
    assert isinstance(outcome, UsageError) and "binary" in outcome.message



class _Trickle(io.RawIOBase):
    """A pipe whose reads give a few bytes each, as a slow writer's pipe does."""

    def __init__(self, data: bytes, size: int):
        self.data, self.size = data, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk, self.data = self.data[:min(len(buffer), self.size)], self.data[min(len(buffer), self.size):]
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_the_binary_check_reads_a_whole_head_from_a_pipe_that_gives_a_few_bytes_a_read(monkeypatch):
    """Catches: the head that the binary check looks at taken from one read (read1) where the input is no
    terminal: a pipe whose first read held a line of text had its NUL bytes, which came in the next reads,
    scored as text. Only a terminal's first line is taken as it comes."""
    stdin = types.SimpleNamespace(buffer=io.BufferedReader(_Trickle(b"a line of text\n" + bytes(64) + b"\n", 5)))
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(UsageError, match="binary"):
        list(data.read_pieces("-"))


@pytest.mark.parametrize("level", ["char", "word"])
def test_read_pieces_drops_a_utf8_byte_order_mark_as_the_corpus_reader_does(tmp_path, monkeypatch, level):
    """Catches: the UTF-8 byte-order mark that Windows Notepad writes read as text by score and eval (read as
    utf-8, not utf-8-sig): the first line's first token would be U+FEFF, an <unk>. Training's reader drops it."""
    path = tmp_path / "marked.txt"
    text = "first line\nsecond line\n"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    for block in (2, 1 << 20):
        monkeypatch.setattr(data, "HEAD_BYTES", max(block, 3))  # the head holds the mark whole, as 64 KiB does
        monkeypatch.setattr(data, "BLOCK_BYTES", block)
        monkeypatch.setattr(data, "WORD_BLOCK_BYTES", block)
        assert "".join(data.read_pieces(path, "utf-8", level=level)) == text
        assert "".join(iter_text(path, encoding="utf-8", level=level)) == text

@needs_fifos
def test_a_corpus_must_be_a_regular_file(tmp_path):
    """Training reads its corpus more than once (hash, split, tokens): a pipe is refused with a way out."""
    path = _fifo(tmp_path)
    (outcome,) = _in_a_thread(lambda: check_text_file(path), 30)  # opening it would wait for a writer
    assert isinstance(outcome, UsageError) and "not a regular file" in outcome.message
    assert "save it to a file first" in outcome.message


# ---------------------------------------------------------------- splits
def test_split_text_cuts_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(10))
    train, val = split_text(text, 0.25)
    assert train + val == text
    assert train.endswith("\n") and val
    assert 0.15 < len(val) / len(text) < 0.35


def test_split_text_with_zero_fraction_keeps_everything():
    assert split_text("a\nb\n", 0.0) == ("a\nb\n", "")


def test_vocabulary_comes_from_the_training_split_only(write_corpus):
    corpus = write_corpus("aaaa\nbbbb\n" * 9 + "zzzz\n")
    splits = prepare(DataConfig(val_fraction=0.1), corpus)
    assert "z" not in splits.codec.vocab.tokens
    assert splits.val is not None and (splits.val == UNK_ID).sum().item() == 4


def test_separate_validation_file(write_corpus):
    corpus = write_corpus("abab\n" * 5)
    val = write_corpus("ba\n", "val.txt")
    splits = prepare(DataConfig(), corpus, val)
    assert splits.train.numel() == 1 + 5 * 5
    assert splits.val.tolist() == [EOS_ID, splits.codec.vocab.id("b"), splits.codec.vocab.id("a"), EOS_ID]
    assert splits.val_chars == 3


def test_empty_corpus_is_refused(write_corpus):
    with pytest.raises(UsageError, match="empty"):
        prepare(DataConfig(), write_corpus(" \n\n"))


# ---------------------------------------------------------------- batches and windows
def test_batchify_makes_parallel_rows_and_drops_the_tail():
    ids = torch.arange(11)
    rows = batchify(ids, 3)
    assert rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_windows_give_targets_one_step_ahead_and_cover_each_row():
    rows = batchify(torch.arange(22), 2)  # (2, 11)
    n = windows_per_epoch(rows, 4)
    assert n == 3  # targets 1..10 in windows of 4, 4, 2
    inputs, targets = zip(*(window(rows, i, 4) for i in range(n)))
    assert [x.shape[1] for x in inputs] == [4, 4, 2]
    x, y = torch.cat(inputs, dim=1), torch.cat(targets, dim=1)
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])


def test_check_trainable_refuses_a_corpus_too_short_for_one_window():
    check_trainable(torch.zeros(2 * 5), batch_size=2, seq_len=4)
    with pytest.raises(UsageError, match="too short"):
        check_trainable(torch.zeros(2 * 5 - 1), batch_size=2, seq_len=4)


@pytest.mark.parametrize("streams", [1, 2, 3, 7, 13, 20, 50])
def test_eval_streams_score_every_token_exactly_once(streams):
    ids = torch.arange(23)
    rows, mask = eval_streams(ids, streams)
    targets = []
    for s in range(rows.shape[0]):
        targets += rows[s][mask[s]].tolist()
        # the input before each target is the token before it in the text
        positions = mask[s].nonzero().flatten()
        assert torch.equal(rows[s, positions - 1], rows[s, positions] - 1)
    assert targets == list(range(1, 23))
    assert bool(mask.any(dim=1).all()), "a row with no target is work for nothing"


def test_eval_streams_of_a_single_token_is_one_row_without_targets():
    rows, mask = eval_streams(torch.tensor([1]), 4)
    assert rows.tolist() == [[1, 1]] and not mask.any()


def test_a_utf8_sig_part_after_the_start_keeps_a_leading_zero_width_space(tmp_path):
    # The mark belongs to the file's first bytes; U+FEFF at the start of a later line is text.
    path = tmp_path / "sig.txt"
    path.write_bytes(b"\xef\xbb\xbfabc\n" + "\ufeffdef\n".encode("utf-8"))
    whole = "".join(iter_text(path, encoding="utf-8-sig"))
    assert whole == "abc\n\ufeffdef\n"
    cut = len(b"\xef\xbb\xbfabc\n")
    assert "".join(iter_text(path, start=cut, encoding="utf-8-sig")) == "\ufeffdef\n"


def test_a_decoding_error_in_a_wide_files_later_part_names_the_encoding_as_given(tmp_path):
    path = tmp_path / "wide.txt"
    good = "abc\n".encode("utf-16")  # a mark, then little-endian
    path.write_bytes(good + b"\x00\xdc" + "x\n".encode("utf-16-le"))  # a lone low surrogate
    with pytest.raises(UsageError, match=r"not valid UTF16\b"):
        "".join(iter_text(path, start=len(good), encoding="UTF16"))


@pytest.mark.parametrize("text, fraction, val", [
    ("aaaa\nbbbb\ncccc\ndddd\n", 0.25, "dddd\n"),        # the cut falls at a line start: it stays there
    ("aaaa\nbbbb\ncccc\ndddd\n", 0.30, "dddd\n"),        # inside a line: after its end
    ("aa\r\nbb\r\ncc\r\n", 0.30, "cc\r\n"),              # CRLF: the \r stays with its line
    ("aaaa\nbbbb\ncccc", 0.40, "cccc"),                  # no final newline: the last line is the validation
    ("aaaa\nbbbb\ncccc", 0.20, ""),                      # ... unless the cut falls in it: no line end after it
    ("aaaa bbbb cccc", 0.50, ""),                        # no line end at all: everything trains
])
def test_split_point_cuts_at_a_line_end_as_split_text_does(tmp_path, text, fraction, val):
    """Catches: split_point cutting one line late when int(size * (1 - fraction)) is already a line start,
    cutting before the newline (the validation part then starts with it), or disagreeing with split_text."""
    from charlm.data import split_point

    path = tmp_path / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    cut = split_point(path, fraction)
    assert text.encode("utf-8")[cut:].decode("utf-8") == val
    assert split_text(text, fraction) == (text[:len(text) - len(val)], val)


@pytest.mark.parametrize("encoding", ["utf-32", "utf-32-be", "utf-16", "utf-16-be"])
def test_a_wide_file_read_as_utf8_is_told_its_own_encoding(tmp_path, encoding):
    """Catches: the byte-order-mark hint testing UTF-16's mark first, which UTF-32 LE's mark starts with: a
    UTF-32 file would be told to pass --encoding utf-16."""
    import codecs

    family = encoding[:6]
    mark = {"utf-32": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE, "utf-16": codecs.BOM_UTF16_LE,
            "utf-16-be": codecs.BOM_UTF16_BE}[encoding]
    path = tmp_path / "wide.txt"
    path.write_bytes(mark + "the cat sat.\n".encode(encoding if encoding.endswith("-be") else family + "-le"))
    with pytest.raises(UsageError, match=f"{family.upper()} byte-order mark\\): pass --encoding {family}$"):
        check_text_file(path)


def test_a_latin1_text_that_starts_like_a_byte_order_mark_is_text(tmp_path):
    """Catches: the UTF-16/32 byte-order-mark check applied to files read in another 8-bit encoding: a latin-1
    text that starts with 'ÿþ' (bytes FF FE) would be refused as UTF-16."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("ÿþ is how it starts\nand a second line\n".encode("latin-1"))
    assert check_text_file(path, "latin-1") == path
    assert read_text(path, "latin-1").startswith("ÿþ is")
    with pytest.raises(UsageError, match="UTF-16"):  # read as UTF-8 the same bytes are a UTF-16 mark
        check_text_file(path)


def test_fresh_windows_begin_at_line_starts_drawn_from_the_seed_and_step():
    """Each fresh window begins with <eos> (a line's start, as sampling and scoring begin), its targets are
    the next tokens, and the draw depends on (seed, step) only: a resume and every rank draw the same."""
    ids = torch.tensor([EOS_ID] + [5, 6, 7, EOS_ID, 8, 9, EOS_ID, 4, 4, 4, 4, EOS_ID] * 50, dtype=torch.uint8)
    starts = line_starts(ids, 5)
    assert (ids[starts.long()] == EOS_ID).all() and int(starts.max()) <= len(ids) - 6 and len(starts) == 150
    x, y = fresh_windows(ids, starts, 6, 5, seed=1, step=3)
    assert x.shape == y.shape == (6, 5) and x.dtype == y.dtype == torch.int64
    assert (x[:, 0] == EOS_ID).all()
    chosen = [next(s for s in starts.tolist() if torch.equal(ids[s:s + 5].long(), row)) for row in x]
    for s, row in zip(chosen, y):
        assert torch.equal(row, ids[s + 1:s + 6].long())
    assert torch.equal(fresh_windows(ids, starts, 6, 5, seed=1, step=3)[0], x)
    draws = {tuple(fresh_windows(ids, starts, 6, 5, seed=1, step=step)[0][:, 1].tolist()) for step in range(8)}
    assert len(draws) > 1  # another step, other lines


def test_fresh_windows_draw_every_line_alike_whatever_its_length():
    """Catches: a random position moved on to the next line start, which draws a line in proportion to the
    length of the line before it: on Shakespeare the speaker's name after a blank line started 0.5 % of the
    fresh windows where it starts 17.7 % of the lines."""
    long_line, blank, short = [7] * 40 + [EOS_ID], [EOS_ID], [5, EOS_ID]
    ids = torch.tensor([EOS_ID] + (long_line + blank + short) * 300, dtype=torch.uint8)
    starts = line_starts(ids, 4)
    firsts = torch.cat([fresh_windows(ids, starts, 50, 4, seed=0, step=step)[1][:, 0] for step in range(60)])
    shares = [float((firsts == token).float().mean()) for token in (7, EOS_ID, 5)]  # 3,000 draws
    assert all(abs(share - 1 / 3) < 0.04 for share in shares), shares


def test_fresh_windows_without_a_line_end_in_reach_start_at_random_positions_inside():
    ids = torch.arange(10, 60)  # no <eos> at all: windows at random positions, whole, with their targets
    starts = line_starts(ids, 7)
    assert len(starts) == 0
    x, y = fresh_windows(ids, starts, 20, 7, seed=0, step=0)
    assert torch.equal(y, x + 1) and int(x.min()) >= 10 and int(y.max()) <= 59
    short = torch.tensor([EOS_ID, 5, 6])  # exactly one window and its target
    x, y = fresh_windows(short, line_starts(short, 2), 3, 2, seed=0, step=0)
    assert x.tolist() == [[EOS_ID, 5]] * 3 and y.tolist() == [[5, 6]] * 3


def test_storage_dtype_changes_exactly_past_65536_ids():
    """Catches: `vocab_size <= 65536` written `< 65536` (data.py:383): a vocabulary of exactly 65,536 ids (ids
    0..65535, which uint16 holds) stored as int32, twice the token file."""
    assert storage_dtype(256) == torch.uint8 and storage_dtype(257) == torch.uint16
    assert storage_dtype(65536) == torch.uint16
    assert storage_dtype(65537) == torch.int32


def test_is_blank_reads_a_file_of_exactly_the_limit(tmp_path):
    """Catches: `st_size > limit` written `>= limit` (data.py:127): a blank file of exactly `limit` bytes was
    not looked at (reported not blank), so `--nproc` launched workers on it."""
    path = tmp_path / "blank.txt"
    path.write_bytes(b"  \n\t\n")
    assert is_blank(path, "utf-8", limit=5) is True
    assert is_blank(path, "utf-8", limit=4) is False  # larger than the limit: not read, tokenizing finds out
    path.write_bytes(b"a \n\t\n")
    assert is_blank(path, "utf-8", limit=5) is False


def test_a_file_with_many_bad_bytes_among_its_utf8_is_not_called_damaged(tmp_path):
    """Catches: `good >= 4 * bad` written `good >= bad` (data.py:163): a text where a third of the characters
    outside ASCII are bad bytes was called damaged UTF-8 instead of being sent to --encoding."""
    many_bad = tmp_path / "many.txt"
    many_bad.write_bytes(" ".join(["caf\u00e9"] * 10).encode("utf-8") + b" \xff \xfe \xff \xfe \xff\n")  # 10 good, 5 bad
    with pytest.raises(UsageError) as info:
        read_text(many_bad)
    # not damaged UTF-8, and not another encoding either: the UTF-8 letters before the bad bytes say it mixes two
    assert "damaged" not in info.value.message and "mixes encodings" in info.value.message
    few_bad = tmp_path / "few.txt"
    few_bad.write_bytes(" ".join(["caf\u00e9"] * 12).encode("utf-8") + b" \xff \xfe \xff\n")  # 12 good, 3 bad
    with pytest.raises(UsageError, match="damaged"):
        read_text(few_bad)


def test_errors_setting_gets_its_own_token_files(tmp_path):
    """Catches: data.errors left out of the token cache key (data.py:558): after a run with errors=replace, a
    run with errors=strict reused its token files and trained on the substituted text instead of refusing the
    undecodable byte."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"abc abc\nab\xe9c\n" * 5)
    cache = tmp_path / "cache"
    replaced = data.prepare(DataConfig(errors="replace", val_fraction=0.0), corpus, cache_dir=cache)
    assert "\ufffd" in replaced.codec.vocab.tokens
    with pytest.raises(UsageError, match="byte offset"):
        data.prepare(DataConfig(errors="strict", val_fraction=0.0), corpus, cache_dir=cache)


def test_check_vocabulary_compares_the_tokenizer_settings_too(tmp_path):
    """Catches: check_vocabulary comparing only the token lists (data.py:646): a run saved with lowercase on,
    resumed with lowercase off, went on with the same tokens but text tokenized another way."""
    vocab = ["<unk>", "<eos>", "a", "b"]
    saved = TextCodec(Tokenizer("char", lowercase=True), Vocabulary(vocab))
    fresh = TextCodec(Tokenizer("char", lowercase=False), Vocabulary(vocab))
    check_vocabulary(saved, TextCodec(Tokenizer("char", lowercase=True), Vocabulary(vocab)), tmp_path / "c.txt")
    with pytest.raises(UsageError, match="does not match"):
        check_vocabulary(saved, fresh, tmp_path / "c.txt")


def test_a_file_counted_and_encoded_as_it_streams_reads_the_tokens_that_score_reads(tmp_path):
    """Catches: the streaming paths (the vocabulary count and the encoder of train and eval) normalising a
    lowercased text twice while score and sample's prime normalise it once: with "T" + U+0308 the vocabulary
    held the composed small letter, score read three <unk> where eval read none."""
    text = "T\u0308est one two\nthe test of one\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    cfg = DataConfig(level="word", lowercase=True, word_split="space")
    counts = data.count_vocabulary(path, cfg, 0, path.stat().st_size)
    tokenizer = Tokenizer("word", lowercase=True, word_split="space")
    assert counts == count_tokens(tokenizer, text)
    codec = data.build_vocabulary(counts, cfg)
    streamed = encode(codec, text).tolist()
    by_line = [EOS_ID]
    for line in text.splitlines():
        by_line += codec.encode_line(line) + [EOS_ID]
    assert streamed == by_line and UNK_ID not in streamed
