"""Streaming tokenization, the token-file cache and the BPTT batching."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from charlm import data
from charlm.config import DataConfig
from charlm.errors import UsageError
from charlm.tokenizer import EOS_ID, UNK_ID, TextCodec, Tokenizer, Vocabulary
from test_tokenizer import MANY_LINES, random_texts

# decomposed Hangul (jamo L V T, as macOS writes file names): combining class 0, yet NFC composes them
# U+0F73 has class 0 but decomposes into marks; a capital sigma lowercases to a final one before a cut
TRICKY = ("Hello, world!\r\nÉté\u0301 naïve 😀 emoji\n中文也可以。\n\u1100\u1161\u11a8\u1100\u1161\u1100\u1161 "
          "jamo\na\u0f73\u0301 ΟΔΟΣΣΟΦΙΑΣΣ\n\nlast line without newline")


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("block", [2, 3, 5, 7, 1 << 20])
def test_streaming_prepare_matches_in_memory_encoding(tmp_path, monkeypatch, level, block, lowercase):
    monkeypatch.setattr(data, "BLOCK_BYTES", block)  # tiny blocks split lines and multi-byte characters
    cfg = DataConfig(level=level, val_fraction=0.0, lowercase=lowercase)
    corpus = write(tmp_path / "c.txt", TRICKY * 3)
    splits = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    text = corpus.read_bytes().decode("utf-8")
    codec = data.build_codec(cfg, text)
    assert splits.codec.vocab.tokens == codec.vocab.tokens
    assert torch.equal(splits.train.long(), data.encode(codec, text))
    assert splits.train[0] == EOS_ID and splits.train[-1] == EOS_ID
    assert splits.train_chars == data.char_count(text)


@pytest.mark.parametrize("text", ["ab\r", "ab\n\r", "ab\r\r", "x\r", "a\r\r\n", "ab\r\n", "ab", "ab\n", "a\rb\n",
                                  "caf\u00e9\r"])
def test_char_count_agrees_with_training_on_a_file_of_each_text(tmp_path, text):
    """Catches: char_count counting a file's final lone '\r' as a character and a line end, where training
    (and Tokenizer.lines) read it as the line end only: eval's bits per character then differed from
    validation's for the same text ('ab\r': 4 characters against 3)."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(text.encode("utf-8"))
    splits = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    assert splits.train_chars == data.char_count(text)


def test_validation_split_is_the_last_fraction_at_a_line_boundary(tmp_path):
    lines = [f"line number {i}" for i in range(100)]
    corpus = write(tmp_path / "c.txt", "\n".join(lines) + "\n")
    cfg = DataConfig(level="char", val_fraction=0.1)
    splits = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    train_text, val_text = data.split_text(corpus.read_text(encoding="utf-8"), 0.1)
    assert val_text and val_text.startswith("line number") and train_text.endswith("\n")
    assert torch.equal(splits.val.long(), data.encode(splits.codec, val_text))
    assert torch.equal(splits.train.long(), data.encode(splits.codec, train_text))


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    corpus = write(tmp_path / "c.txt", "aaaa\nbbbb\n" * 20 + "zzzz\n")
    splits = data.prepare(DataConfig(val_fraction=0.02), corpus, cache_dir=tmp_path / "cache")
    assert "z" not in splits.codec.vocab.tokens
    assert (splits.val == UNK_ID).sum() == 4


def test_token_files_are_reused_until_the_corpus_changes(tmp_path, monkeypatch):
    corpus = write(tmp_path / "c.txt", "some text to learn\n" * 10)
    cfg = DataConfig(val_fraction=0.1)
    first = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(data, "count_vocabulary", refuse)
    again = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    assert again.cache == first.cache and torch.equal(again.train, first.train)
    write(corpus, "other text entirely\n" * 10)
    with pytest.raises(AssertionError, match="tokenized again"):
        data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")


def test_changed_tokenizer_settings_get_their_own_token_files(tmp_path):
    corpus = write(tmp_path / "c.txt", "Some Text\n" * 10)
    a = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    b = data.prepare(DataConfig(val_fraction=0.0, lowercase=True), corpus, cache_dir=tmp_path / "cache")
    assert a.cache != b.cache
    assert "S" in a.codec.vocab.tokens and "S" not in b.codec.vocab.tokens


def test_token_files_use_the_smallest_integer_type(tmp_path):
    small = write(tmp_path / "small.txt", "abc\n")
    assert data.prepare(DataConfig(val_fraction=0.0), small, cache_dir=tmp_path / "c").train.dtype == torch.uint8
    many = write(tmp_path / "many.txt", "".join(chr(0x4E00 + i) for i in range(400)) + "\n")
    splits = data.prepare(DataConfig(val_fraction=0.0), many, cache_dir=tmp_path / "c")
    assert splits.train.dtype == torch.uint16
    assert torch.equal(splits.train.long(), data.encode(splits.codec, many.read_text(encoding="utf-8")))
    meta = json.loads((splits.cache / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and (splits.cache / "train.bin").stat().st_size == 2 * splits.train.numel()


def test_a_long_line_is_read_in_bounded_pieces_without_splitting_words(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 64)
    line = " ".join(f"word{i % 50}" for i in range(2000))
    corpus = write(tmp_path / "c.txt", line + "\n")
    pieces = list(data.iter_text(corpus, level="word"))
    assert len(pieces) > 10 and max(len(p) for p in pieces) < 200
    assert "".join(pieces) == line + "\n"
    assert all(p[-1].isspace() for p in pieces[:-1])
    cfg = DataConfig(level="word", val_fraction=0.0)
    splits = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    assert splits.train.numel() == 2000 + 2  # <eos>, the words, <eos>


def test_a_line_with_no_safe_place_to_cut_is_still_read_in_bounded_pieces(tmp_path, monkeypatch):
    """Combining marks only: the reader holds text back for a later cut, but not without bound."""
    monkeypatch.setattr(data, "BLOCK_BYTES", 7)
    monkeypatch.setattr(data, "MAX_CARRY", 20)
    text = "a" + "\u0301" * 200 + "\n"
    pieces = list(data.iter_text(write(tmp_path / "c.txt", text), level="char"))
    assert "".join(pieces) == text and len(pieces) > 5 and max(len(p) for p in pieces) <= 24


@pytest.mark.parametrize("tail, offset", [
    ("é".encode("utf-8")[:1], 79),    # a file cut off inside its last character: the decoder held the byte back
    (b"\xe4\xb8" + b"x\n", 79),       # a character that spans two blocks and is broken in the second
])
def test_a_broken_character_across_blocks_is_named_at_its_own_offset(tmp_path, monkeypatch, tail, offset):
    """Catches: the offset counted from the block being read, not from the bytes the decoder held back."""
    monkeypatch.setattr(data, "BLOCK_BYTES", 16)
    corpus = tmp_path / "cut.txt"
    corpus.write_bytes("好的文本 line\n".encode("utf-8") * 4 + b"ok abc " + tail)  # 72 + 7 bytes: the break
    # is the last byte of the fifth 16-byte block
    with pytest.raises(UsageError, match=rf"byte offset {offset} \(b'\\x(c3|e4)'\); the text about it is UTF-8"):
        data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache")


def test_invalid_utf8_reports_the_byte_offset_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 16)
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"good text line\n" * 5 + b"bad \xff byte\n")
    with pytest.raises(UsageError, match=r"byte offset 79 "):
        data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache")
    replaced = data.prepare(DataConfig(errors="replace", val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    assert "\ufffd" in replaced.codec.vocab.tokens


def test_empty_and_missing_corpora_are_refused(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        data.prepare(DataConfig(), tmp_path / "missing.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match="empty"):
        data.prepare(DataConfig(), write(tmp_path / "e.txt", " \n\t\n"), cache_dir=tmp_path / "cache")


def test_batchify_and_windows_read_each_stream_in_order():
    ids = torch.arange(2 * 10, dtype=torch.uint8)
    rows = data.batchify(ids, 2)
    assert rows.tolist() == [list(range(10)), list(range(10, 20))]
    assert data.windows_per_epoch(rows, 4) == 3
    x, y = data.window(rows, 2, 4)  # the last window is shorter
    assert x.dtype == torch.int64 and x.tolist() == [[8], [18]] and y.tolist() == [[9], [19]]
    x, y = data.window(rows, 0, 4)
    assert torch.equal(y[:, :-1], x[:, 1:])


@pytest.mark.parametrize("streams", [1, 2, 3, 7])
def test_eval_streams_cover_every_target_exactly_once(streams):
    ids = torch.arange(23)
    rows, mask = data.eval_streams(ids, streams)
    targets = rows[mask].tolist()
    assert sorted(targets) == list(range(1, 23))
    first_inputs = rows[:, 0].tolist()
    assert first_inputs[0] == 0


def test_an_unwritable_token_cache_is_a_usage_error_naming_it(tmp_path):
    corpus = write(tmp_path / "c.txt", "some text\n" * 5)
    blocker = write(tmp_path / "not-a-folder", "a file where the cache folder should be")
    with pytest.raises(UsageError, match="cannot create the token cache folder .*--cache-dir"):
        data.prepare(DataConfig(), corpus, cache_dir=blocker / "cache")


def test_a_failed_token_file_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from charlm.errors import RunFailure

    corpus = write(tmp_path / "c.txt", "some text\n" * 5)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data, "encode_to_file", full_disk)
    with pytest.raises(RunFailure, match="No space left on device"):
        data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache")
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("change", [dict(min_freq=2), dict(max_size=4), dict(val_fraction=0.5),
                                    dict(word_split="space", level="word")])
def test_every_setting_that_changes_the_ids_gets_its_own_token_files(tmp_path, change):
    """Catches: min_freq / max_size / val_fraction / word_split left out of the token cache key, so a run with
    other settings silently reused the first run's vocabulary and ids."""
    corpus = _write(tmp_path / "c.txt", "aab,c aab,c\nabd e\n" * 5 + "x,yz q\n" * 5)
    base = dict(val_fraction=0.2, level="word" if "word_split" in change else "char")
    first = data.prepare(DataConfig(**base), corpus, cache_dir=tmp_path / "cache")
    cfg = DataConfig(**{**base, **change})
    second = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    fresh = data.prepare(cfg, corpus, cache_dir=tmp_path / "fresh")  # the same settings from an empty cache
    assert second.cache != first.cache
    assert second.codec.vocab.tokens == fresh.codec.vocab.tokens
    assert torch.equal(second.train, fresh.train)
    assert (second.val is None) == (fresh.val is None)
    if second.val is not None:
        assert torch.equal(second.val, fresh.val)


def test_token_files_of_a_given_vocabulary_are_not_those_of_the_corpus_own(tmp_path):
    """Catches: the given codec's digest left out of the cache key: encoding with a run's own vocabulary (a
    resume on another corpus) reused the token files built with the corpus's vocabulary, or the reverse."""
    corpus = _write(tmp_path / "c.txt", "abcabc\nbca\n" * 10)
    own = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    other = TextCodec(Tokenizer("char"), Vocabulary(["<unk>", "<eos>", "c", "b"]))  # no 'a', another order
    given = data.prepare(DataConfig(val_fraction=0.0), corpus, codec=other, cache_dir=tmp_path / "cache")
    assert given.cache != own.cache
    assert given.codec.vocab.tokens == other.vocab.tokens
    text = corpus.read_text(encoding="utf-8")
    assert torch.equal(given.train.long(), data.encode(other, text))
    assert torch.equal(own.train.long(), data.encode(own.codec, text))


@pytest.mark.parametrize("characters,dtype", [(254, torch.uint8), (255, torch.uint16)])
def test_the_token_file_type_changes_exactly_past_256_ids(tmp_path, characters, dtype):
    """254 characters + 2 specials = 256 ids fit a byte; 257 ids do not (mutant: `<= 257` wrapped id 256 to 0)."""
    text = "".join(chr(0x4E00 + i) for i in range(characters)) + "\n"
    corpus = _write(tmp_path / "c.txt", text)
    splits = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    assert len(splits.codec.vocab) == characters + 2
    assert data.storage_dtype(len(splits.codec.vocab)) == dtype and splits.train.dtype == dtype
    assert torch.equal(splits.train.long(), data.encode(splits.codec, text))
    assert int(splits.train.long().max()) == characters + 1


def test_a_lowercased_long_line_is_cut_where_lowering_and_composing_do_not_join_across(tmp_path, monkeypatch):
    """Catches: the cut check comparing the text's plain lowering with the pieces normalised apart, which
    differ wherever lowering composes ("T" + U+0308 -> U+1E97) once normalize composes again: no place was
    safe, the held-back text grew to its bound, and the block was cut between "T" and its mark (a
    stray "t" and "\u0308" in the vocabulary)."""
    monkeypatch.setattr(data, "BLOCK_BYTES", 16)
    monkeypatch.setattr(data, "MAX_CARRY", 64)
    text = "abT\u0308" * 300 + "\n"
    corpus = write(tmp_path / "c.txt", text)
    pieces = list(data.iter_text(corpus, level="char"))
    assert "".join(pieces) == text and max(len(p) for p in pieces) < 64
    cfg = DataConfig(level="char", lowercase=True, val_fraction=0.0)
    splits = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    assert splits.codec.vocab.tokens[2:] == ["a", "b", "\u1e97"]
    assert torch.equal(splits.train.long(), data.encode(splits.codec, text))


# empty lines, CRLF (one cut between '\r' and '\n' where the blocks are small), a last line without a newline,
# a final lone '\r', lines before and after a blank one at the file's start
LINE_ENDS = ["one\n\ntwo\r\n\r\nthree\nfour", "ab\r\ncd\r\n\r\nef\r", "\n\nab cd\n\n\nef\n", TRICKY]


@pytest.mark.parametrize("text", LINE_ENDS)
@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("block", [2, 3, 5, 1 << 20])
def test_the_token_cache_records_the_line_starts_that_a_scan_of_its_token_file_finds(tmp_path, monkeypatch, text,
                                                                                    level, block):
    """Catches: line starts read from a whole memory-mapped token file at the start of every run (a 1 GB
    corpus peaked at 1.7 GB); recorded while tokenizing instead, they must be exactly what the scan finds,
    for every window length, however the blocks cut the lines (a piece that ends on or just before a line
    end, a '\\r' held back), and reused as they are with the entry."""
    monkeypatch.setattr(data, "BLOCK_BYTES", block)
    corpus = write(tmp_path / "c.txt", text * 3)
    cfg = DataConfig(level=level, val_fraction=0.0)
    splits = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    scanned = splits.train.clone()  # in memory: line_starts without `known` reads it
    assert torch.equal(splits.starts.long(), (scanned == EOS_ID).nonzero().flatten())
    again = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    for seq_len in range(scanned.numel() + 2):
        expected = data.line_starts(scanned, seq_len)
        for found in (data.line_starts(splits.train, seq_len, splits.starts),
                      data.line_starts(again.train, seq_len, again.starts)):
            assert found.dtype == expected.dtype and torch.equal(found, expected), seq_len
    for step in range(3):  # the same windows for the same seed and step
        assert torch.equal(torch.cat(data.fresh_windows(splits.train, data.line_starts(splits.train, 4, splits.starts),
                                                        5, 4, seed=1, step=step)),
                           torch.cat(data.fresh_windows(scanned, data.line_starts(scanned, 4), 5, 4, seed=1, step=step)))


def test_line_starts_past_what_int32_holds_are_kept_as_int64(tmp_path, monkeypatch):
    """The positions' type follows the length of the token file: int64 beyond 2**31 ids (faked here), where
    int32 would wrap."""
    assert data.position_dtype(2 ** 31) == torch.int32 and data.position_dtype(2 ** 31 + 1) == torch.int64
    monkeypatch.setattr(data, "position_dtype", lambda count: torch.int64)
    corpus = write(tmp_path / "c.txt", "ab\n\ncd\n" * 5)
    splits = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    again = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    expected = (splits.train.clone() == EOS_ID).nonzero().flatten()
    assert splits.starts.dtype == again.starts.dtype == torch.int64
    assert torch.equal(splits.starts, expected) and torch.equal(again.starts, expected)


@pytest.mark.parametrize("length", [126, 127])
def test_the_line_starts_type_holds_the_last_position_of_the_token_file(tmp_path, monkeypatch, length):
    """Catches: the type of starts.bin chosen for the number of tokens read (the <eos> written first left out),
    one short of the ids in train.bin: a token file of exactly one id more than the type holds wrapped its
    final <eos>'s position (2**31 in int32; faked here with int8, which holds positions up to 127)."""
    monkeypatch.setattr(data, "position_dtype", lambda count: torch.int8 if count - 1 < 128 else torch.int64)
    corpus = write(tmp_path / "c.txt", "a" * length + "\n")  # <eos>, the letters, <eos>: length + 2 ids
    splits = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    assert splits.train.numel() == length + 2
    assert splits.starts.dtype == (torch.int8 if length + 1 < 128 else torch.int64)
    assert splits.starts.tolist() == [0, length + 1]


def test_the_line_starts_of_more_lines_than_one_copy_holds_are_all_kept(tmp_path):
    """Catches: starts.bin copied from the int64 positions in blocks that are not a whole number of them, or its
    last block dropped: only a corpus of more than 2**20 lines (one block of the copy) shows it."""
    lines = (1 << 20) + 3
    corpus = write(tmp_path / "c.txt", "a\n" * lines)
    splits = data.prepare(DataConfig(val_fraction=0.0), corpus, cache_dir=tmp_path / "cache")
    assert splits.starts.numel() == lines + 1
    assert torch.equal(splits.starts.long(), torch.arange(0, 2 * lines + 1, 2))

@pytest.mark.parametrize("damage", ["changed", "missing", "unrecorded"])
def test_a_cache_entry_with_damaged_or_missing_line_starts_is_rebuilt(tmp_path, damage):
    """Catches: line starts trusted without their SHA-256 (a fresh row drawn at a position that is no line
    start), and an entry written without them (no starts.bin, no starts_sha256 in meta.json) taken as whole."""
    corpus = write(tmp_path / "c.txt", "some text\n\nto learn\n" * 10)
    cfg = DataConfig(val_fraction=0.0)
    first = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    expected, starts = first.starts.clone(), first.cache / "starts.bin"
    if damage == "changed":
        starts.write_bytes(bytes(starts.stat().st_size))  # every line at position 0
    elif damage == "missing":
        starts.unlink()
    else:
        meta = json.loads((first.cache / "meta.json").read_text(encoding="utf-8"))
        for key in ("starts_sha256", "starts_dtype", "train_lines"):
            del meta[key]
        (first.cache / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        starts.unlink()
    again = data.prepare(cfg, corpus, cache_dir=tmp_path / "cache")
    assert torch.equal(again.starts, expected) and starts.exists()


@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("word_split", ["punct", "space"])
def test_word_level_counts_and_ids_are_those_of_a_split_of_each_line(tmp_path, monkeypatch, word_split, lowercase):
    """The vocabulary pass and the ids pass tokenize a piece of many lines at once (Tokenizer.iter_split_lines):
    the counts and the ids must be those of `split` line by line over the whole text (TextCodec.encode_text),
    wherever the blocks cut the text (inside a CRLF, a character, a word's white space). Catches a line end
    dropped or doubled, or counted as a token."""
    cfg = DataConfig(level="word", word_split=word_split, lowercase=lowercase, val_fraction=0.0)
    tokenizer = Tokenizer("word", lowercase=lowercase, word_split=word_split)
    texts = [MANY_LINES, MANY_LINES * 2 + "\r", "\n\n", "a b\n\nc\n"] + random_texts(40, seed=1)
    for i, text in enumerate(texts):
        path = write(tmp_path / f"{i}.txt", text)
        counts = Counter(t for line in tokenizer.lines(text) for t in tokenizer.split(line))
        codec = TextCodec(tokenizer, Vocabulary.build(counts, min_freq=2))  # the rarest words <unk>
        expected = [EOS_ID] + codec.encode_text(text).ids
        for block in (1, 2, 3, 5, 8, 64, 1 << 20):
            monkeypatch.setattr(data, "BLOCK_BYTES", block)
            monkeypatch.setattr(data, "WORD_BLOCK_BYTES", block)
            size = path.stat().st_size
            assert data.count_vocabulary(path, cfg, 0, size) == counts, (block, text)
            out = io.BytesIO()
            enc = data.encode_to_file(path, cfg, codec, 0, size, out)
            ids = torch.frombuffer(bytearray(out.getvalue()), dtype=enc.dtype).tolist()
            assert ids == expected, (block, text)
            assert enc.unk == expected.count(UNK_ID) and enc.tokens == len(expected) - 1
        assert data.encode(codec, text).tolist() == expected  # the whole text as one piece
