"""Every bad input gets one clear line on stderr and exit 2 (or a clean run where the input is usable).

Corpora, configs, options and run folders that a user can get wrong; the
checkpoint files themselves are in test_checkpoint_safety.py.
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys

import pytest
import torch

from helpers_reliability import (ROOT, assert_one_line_error, child_env, cli, corpus_text, one_thread,  # noqa: F401
                                 peak_memory, train_run, write_config, write_corpus)


def train_args(tmp_path, corpus, *extra):
    return ("train", "--config", write_config(tmp_path), "--corpus", corpus, "--out", tmp_path / "run", "-q",
            "--max-steps", "2", *extra)


# ---------------------------------------------------------------- corpora
@pytest.mark.parametrize("encoding, raw", [
    ("utf-16", lambda text: text.encode("utf-16")),                          # a mark, little-endian here
    ("utf16", lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be")),  # a mark saying big-endian
    ("utf-16-be", lambda text: text.encode("utf-16-be")),                    # no mark, the order named
    ("utf-32", lambda text: text.encode("utf-32")),
    ("utf-16", lambda text: text.encode("utf-16-le")),                       # no mark: little-endian
    ("utf-16-le", lambda text: text.encode("utf-16")),                       # the order named, and a mark
])
def test_a_wide_encoding_trains_and_holds_out_the_same_lines_as_utf8(tmp_path, encoding, raw):
    """UTF-16 and UTF-32 hold NUL bytes, which are fine when the encoding says so; the validation part
    is cut at a line end counted in whole code units, and read with the file's byte order. (The cut is
    the last fraction of the file's bytes: on this ASCII text it falls on the same line as in UTF-8.)"""
    text = corpus_text(200)
    plain, wide = tmp_path / "plain.txt", tmp_path / "wide.txt"
    plain.write_text(text, encoding="utf-8")
    wide.write_bytes(raw(text))
    runs = []
    for corpus, extra in ((plain, ()), (wide, ("--encoding", encoding))):
        result = cli(*train_args(tmp_path, corpus, *extra, "--json", "--out", tmp_path / corpus.stem))
        assert result.exit_code == 0, result.stderr
        runs.append(json.loads(result.stdout))
    assert runs[0]["val_loss"] is not None and runs[1]["val_loss"] == runs[0]["val_loss"]
    assert (tmp_path / "wide" / "vocab.json").read_text() == (tmp_path / "plain" / "vocab.json").read_text()


@pytest.mark.parametrize("content", ["", " \n\n"])
def test_an_empty_validation_file_is_exit_2(tmp_path, content):
    val = tmp_path / "val.txt"
    val.write_text(content, encoding="utf-8")
    result = cli(*train_args(tmp_path, write_corpus(tmp_path), "--val", val))
    assert_one_line_error(result, 2, "validation file", "empty", "val.txt")


def test_a_corpus_without_a_line_end_to_cut_at_trains_with_a_note(tmp_path):
    corpus = tmp_path / "one-line.txt"
    corpus.write_text(corpus_text(60).replace("\n", " ").strip(), encoding="utf-8")
    result = cli(*train_args(tmp_path, corpus, "--json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["val_loss"] is None
    assert "no line end in its last 10% to cut a validation part at" in result.stderr and "--val" in result.stderr


@pytest.mark.parametrize("problem", ["missing validation file", "corpus too short"])
def test_a_run_that_fails_before_training_leaves_no_empty_folder(tmp_path, problem):
    if problem == "missing validation file":
        args = train_args(tmp_path, write_corpus(tmp_path), "--val", tmp_path / "nope.txt")
    else:
        corpus = tmp_path / "short.txt"
        corpus.write_text("a cat.\n", encoding="utf-8")
        args = train_args(tmp_path, corpus)
    assert cli(*args).exit_code == 2
    assert not (tmp_path / "run").exists()


def test_missing_corpus_is_exit_2_naming_the_file(tmp_path):
    result = cli(*train_args(tmp_path, tmp_path / "nowhere.txt"))
    assert_one_line_error(result, 2, "not found", "nowhere.txt")
    assert not (tmp_path / "run" / "last").exists()


@pytest.mark.parametrize("content", ["", "   \n\t\n  \r\n"])
def test_empty_or_white_space_corpus_is_exit_2(tmp_path, content):
    corpus = tmp_path / "blank.txt"
    corpus.write_text(content, encoding="utf-8")
    cache = tmp_path / "cache"
    assert_one_line_error(cli(*train_args(tmp_path, corpus, "--cache-dir", cache)), 2, "empty", "blank.txt")
    assert not cache.exists() or not list(cache.iterdir())  # no empty cache entry left behind


def test_corpus_shorter_than_one_window_is_exit_2(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("a cat.\n", encoding="utf-8")
    line = assert_one_line_error(cli(*train_args(tmp_path, corpus)), 2, "too short", "seq_len")
    assert "batch_size" in line


def test_non_utf8_corpus_reports_the_byte_offset_and_encoding_or_errors_let_it_through(tmp_path):
    text = corpus_text(200)
    offset = len(text.encode("utf-8")) // 2
    raw = text.encode("utf-8")
    raw = raw[:offset] + "é".encode("latin-1") + raw[offset:]  # one byte that is not UTF-8
    corpus = tmp_path / "latin.txt"
    corpus.write_bytes(raw)

    line = assert_one_line_error(cli(*train_args(tmp_path, corpus)), 2, "latin.txt", "--encoding", "--errors")
    assert f"byte offset {offset}" in line

    as_latin = cli(*train_args(tmp_path, corpus, "--encoding", "latin-1", "--out", tmp_path / "latin"))
    assert as_latin.exit_code == 0, as_latin.stderr
    vocab = json.loads((tmp_path / "latin" / "vocab.json").read_text(encoding="utf-8"))["tokens"]
    assert "é" in vocab

    replaced = cli(*train_args(tmp_path, corpus, "--errors", "replace", "--out", tmp_path / "replaced"))
    assert replaced.exit_code == 0, replaced.stderr
    vocab = json.loads((tmp_path / "replaced" / "vocab.json").read_text(encoding="utf-8"))["tokens"]
    assert "\ufffd" in vocab and "é" not in vocab
    assert "charlm: note: 1 token of " in replaced.stderr and "holds U+FFFD" in replaced.stderr
    assert "U+FFFD" not in as_latin.stderr


# Lines of each script for the encodings a file in the wrong one is likely to be in.
CHINESE = "今天天气很好，我们去公园散步。他说：“明天见！”\n" * 40
JAPANESE = "今日はいい天気ですね。散歩に行きましょう。\n" * 40
FRENCH = "Le café crème, déjà vu : une façade naïve.\n" * 40


@pytest.mark.parametrize("text, encoding, given, named", [
    (CHINESE, "gb18030", "utf-8", "it reads as gb18030: pass --encoding gb18030"),
    (JAPANESE, "shift_jis", "utf-8", "it reads as shift_jis: pass --encoding shift_jis"),
    (FRENCH, "cp1252", "utf-8", "it reads as cp1252: pass --encoding cp1252"),
    (CHINESE, "utf-8", "gb18030", "it reads as utf-8: pass --encoding utf-8"),
    ("안녕하세요. 오늘 날씨가 좋네요.\n" * 40, "euc_kr", "utf-8", "it reads as euc_kr: pass --encoding euc_kr"),
    (JAPANESE, "euc_jp", "utf-8", "it reads as euc_jp: pass --encoding euc_jp"),
    ("Größe und Übung machen den Meister.\n" * 40, "latin-1", "utf-8", "it reads as cp1252"),
    # Big5 shows none of the traits checked: the message lists the usual encodings instead of guessing
    ("今天天氣很好，我們去公園散步。\n" * 40, "big5", "utf-8", "gb18030 for simplified Chinese, big5 for traditional"),
])
def test_a_file_in_another_encoding_is_named_in_the_error(tmp_path, text, encoding, given, named):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(text.encode(encoding))
    line = assert_one_line_error(cli(*train_args(tmp_path, corpus, "--encoding", given)), 2, "not valid", named)
    # in a multi-byte encoding replacing the bad bytes would lose most of the text: not offered when it is named
    assert line.endswith("or --errors replace to substitute bad bytes") == (encoding in ("big5", "cp1252", "latin-1"))


@pytest.mark.parametrize("text, encoding", [
    ("今天天气很好我们去公园", "gb18030"), ("你好世界", "gb18030"), ("我爱北京天安门", "gb18030"),
    ("春眠不觉晓，处处闻啼鸟。", "gb18030"), ("人工智能改变世界", "gb18030"),
    ("감사합니다", "euc_kr"), ("대한민국", "euc_kr"), ("봄이 오면 꽃이 핀다", "euc_kr"),
    ("안녕하세요 저는 학생입니다", "euc_kr"),
])
def test_a_short_chinese_or_korean_text_is_named_apart(text, encoding):
    """Catches: GB2312's common characters are byte pairs that EUC-KR decodes as Hangul too, so a line of ten
    Chinese characters saved in GBK was told to read as euc_kr (longer texts hold a pair that EUC-KR refuses)."""
    from charlm.data import _reads_as

    assert _reads_as((text + "\n").encode(encoding), "utf-8") == encoding


def test_a_utf8_file_with_a_stray_byte_is_called_damaged_not_another_encoding(tmp_path):
    """Catches: UTF-8 accented letters (C3 A9...) are GB2312 characters too, so a UTF-8 file with one Latin-1
    byte was told to read as gb18030, which decodes it without an error into Chinese."""
    raw = ("El niño está en la región; él también comió jamón.\n" * 40).encode("utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(raw[:700] + "ñ".encode("latin-1") + raw[700:])
    line = assert_one_line_error(cli(*train_args(tmp_path, corpus)), 2, "byte offset 700")
    assert line.endswith("the text about it is UTF-8, so the file is damaged, cut off mid-character or mixes "
                         "encodings there: --errors replace substitutes the bad bytes")
    assert "gb18030" not in line


def test_chinese_read_as_utf8_with_errors_replace_gets_a_note(tmp_path):
    """GB18030's byte pairs are often valid UTF-8 too, so --errors replace gives letters of other scripts besides
    U+FFFD: the note counts the U+FFFD tokens and names --encoding."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(CHINESE.encode("gb18030"))
    result = cli(*train_args(tmp_path, corpus, "--errors", "replace"))
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "U+FFFD" in line]
    assert len(notes) == 1 and notes[0].startswith("charlm: note: ") and "--encoding" in notes[0]
    assert int(notes[0].split()[2].replace(",", "")) > 100


def test_unknown_encoding_and_errors_value_are_exit_2(tmp_path):
    corpus = write_corpus(tmp_path)
    assert_one_line_error(cli(*train_args(tmp_path, corpus, "--encoding", "klingon")), 2, "klingon")
    assert_one_line_error(cli(*train_args(tmp_path, corpus, "--errors", "ignore")), 2, "data.errors")


def test_score_and_eval_take_encoding_and_errors_for_their_files(tmp_path):
    run = train_run(tmp_path, corpus=write_corpus(tmp_path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the cat sat on the mat caf\u00e9.\n".encode("latin-1"))
    for command in ("score", "eval"):
        refused = cli(command, run, "--file", latin)
        assert_one_line_error(refused, 2, "byte offset 26", "--encoding")
        for option in (("--encoding", "latin-1"), ("--errors", "replace")):
            ok = cli(command, run, "--file", latin, "--json", *option)
            assert ok.exit_code == 0, ok.stderr
            record = json.loads(ok.stdout.splitlines()[0])
            assert record.get("oov", 0) >= 1 and record.get("tokens", 0) > 20  # é / U+FFFD unseen: <unk>


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    """Windows Notepad starts a UTF-8 file with EF BB BF: the same run and scores as without it."""
    text = corpus_text(200)
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    runs = []
    for corpus in (plain, marked):
        result = cli(*train_args(tmp_path, corpus, "--json", "--out", tmp_path / corpus.stem))
        assert result.exit_code == 0, result.stderr
        runs.append(json.loads(result.stdout))
    assert runs[1]["val_loss"] == runs[0]["val_loss"]
    assert (tmp_path / "marked" / "vocab.json").read_text() == (tmp_path / "plain" / "vocab.json").read_text()
    line = text.splitlines()[0]
    sentence = tmp_path / "sentence.txt"
    sentence.write_bytes(b"\xef\xbb\xbf" + (line + "\n").encode("utf-8"))
    scored = json.loads(cli("score", tmp_path / "plain", "--file", sentence, "--json").stdout)
    assert scored["oov"] == 0 and scored["text"] == line
    assert scored == json.loads(cli("score", tmp_path / "plain", line, "--json").stdout)


@pytest.mark.parametrize("text", ["The cat sat.\n" * 40, "中文的句子。\n" * 40])
def test_utf16_read_as_utf8_says_to_pass_its_encoding(tmp_path, text):
    corpus = tmp_path / "windows.txt"
    corpus.write_bytes(text.encode("utf-16"))  # with a byte-order mark, as PowerShell's > writes
    assert_one_line_error(cli(*train_args(tmp_path, corpus)), 2, "windows.txt", "UTF-16", "--encoding utf-16")


def test_binary_file_is_refused(tmp_path):
    corpus = tmp_path / "image.png"
    corpus.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    assert_one_line_error(cli(*train_args(tmp_path, corpus)), 2, "binary", "image.png")
    # --errors replace does not turn a binary file into a corpus
    assert_one_line_error(cli(*train_args(tmp_path, corpus, "--errors", "replace")), 2, "binary")


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory):
    """Peak memory of the same command on a small corpus: the cost of Python, torch and a tiny model."""
    tmp = tmp_path_factory.mktemp("baseline")
    corpus = tmp / "small.txt"
    corpus.write_bytes(b"the cat sat on the mat " * 2000 + b"\n")
    code, rss, err = peak_memory("train", "--config", write_config(tmp), "--corpus", corpus, "--out", tmp / "run",
                                 "-q", "--max-steps", "1", "--set", "train.eval_interval=0", cwd=tmp)
    assert code == 0, err
    return rss


@pytest.mark.parametrize("level,megabytes,bytes_per_byte", [("char", 50, 16), ("word", 8, 4)])
def test_one_huge_line_keeps_memory_bounded(tmp_path, baseline_rss, level, megabytes, bytes_per_byte):
    """A corpus that is one line of `megabytes` MB: peak memory grows by at most a few bytes per byte.

    Measured (docs/reliability.md): the character path needs 8.0 bytes per corpus
    byte (the int64 id stream), the word path 2.1; the encoders before this test
    needed 40 (char, 50 MB) and 8.0 (word, 8 MB; 21 at 50 MB).
    """
    size = megabytes * 1_000_000
    corpus = tmp_path / "one_line.txt"
    corpus.write_bytes((b"the cat sat on the mat " * (size // 23 + 1))[:size] + b"\n")
    code, rss, err = peak_memory("train", "--config", write_config(tmp_path, data__level=level), "--corpus",
                                 corpus, "--out", tmp_path / "run", "-q", "--max-steps", "1",
                                 "--set", "train.eval_interval=0", cwd=tmp_path)
    assert code == 0, err
    grown = (rss - baseline_rss) * 2**20
    assert grown < bytes_per_byte * size, f"peak {rss:.0f} MiB vs baseline {baseline_rss:.0f} MiB"


# ---------------------------------------------------------------- configs and options
@pytest.mark.parametrize("option,fragment", [
    (("--set", "model.hidden_size=0"), "model.hidden_size"),
    (("--set", "model.embedding_size=-3"), "model.embedding_size"),
    (("--set", "model.layers=0"), "model.layers"),
    (("--set", "train.batch_size=0"), "train.batch_size"),
    (("--set", "train.seq_len=-1"), "train.seq_len"),
    (("--max-steps", "0"), "train.max_steps"),
    (("--max-steps", "-5"), "train.max_steps"),
    (("--set", "train.lr=0"), "train.lr"),
    (("--set", "train.lr=-0.1"), "train.lr"),
    (("--set", "train.lr=.nan"), "train.lr"),
    (("--set", "train.lr=nan"), "train.lr"),
    (("--set", "train.lr=.inf"), "train.lr"),
    (("--max-time", "nan"), "train.max_time"),
    (("--set", "model.dropout=1.0"), "model.dropout"),
    (("--set", "model.dropout=-0.1"), "model.dropout"),
    (("--set", "model.dropout=1.5"), "model.dropout"),
    (("--set", "train.clip=-1"), "train.clip"),
    (("--seed", "-1"), "train.seed"),
    (("--seed", "99999999999999999999"), "train.seed must be <= 9223372036854775807"),
])
def test_invalid_hyperparameter_is_exit_2_naming_it(tmp_path, option, fragment):
    corpus = write_corpus(tmp_path)
    assert_one_line_error(cli(*train_args(tmp_path, corpus, *option)), 2, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text,fragment", [
    ("model:\n  hiden_size: 32\n", "model.hiden_size"),
    ("modle:\n  hidden_size: 32\n", "modle"),
    ("train:\n  lr: 0.01\n  learning_rate: 0.1\n", "train.learning_rate"),
])
def test_unknown_config_key_is_exit_2_naming_it(tmp_path, yaml_text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    result = cli("train", "--config", config, "--corpus", write_corpus(tmp_path), "--out", tmp_path / "run")
    assert_one_line_error(result, 2, fragment)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_bf16_training_off_cuda_is_exit_2_not_a_silent_fp32_run(tmp_path, device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto resolves to CUDA here")
    result = cli(*train_args(tmp_path, write_corpus(tmp_path), "--set", "train.precision=bf16",
                             "--set", f"model.device={device}"))
    assert_one_line_error(result, 2, "bf16", "CUDA", "fp32")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_unknown_set_key_is_exit_2_naming_it(tmp_path):
    result = cli(*train_args(tmp_path, write_corpus(tmp_path), "--set", "model.bogus=3"))
    assert_one_line_error(result, 2, "model.bogus")


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system"])
def test_yaml_with_a_python_tag_is_refused_and_never_run(tmp_path, tag):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: {tag} [\"touch {marker}\"]\n", encoding="utf-8")
    result = cli("train", "--config", config, "--corpus", write_corpus(tmp_path), "--out", tmp_path / "run")
    assert_one_line_error(result, 2, "evil.yaml", "python tags are never loaded")
    assert not marker.exists()


def test_yaml_python_object_tag_on_a_whole_document_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"!!python/object/apply:subprocess.call [[\"touch\", \"{marker}\"]]\n", encoding="utf-8")
    result = cli("train", "--config", config, "--corpus", write_corpus(tmp_path), "--out", tmp_path / "run")
    assert_one_line_error(result, 2, "not plain YAML")
    assert not marker.exists()


# ---------------------------------------------------------------- run folders
@pytest.mark.parametrize("seed", ["-1", "9223372036854775808", "18446744073709551616"])
def test_a_sample_seed_out_of_range_is_exit_2(tmp_path, seed):
    run = train_run(tmp_path)
    assert_one_line_error(cli("sample", run, "--seed", seed), 2, "--seed must be from 0 to 9223372036854775807")


def test_commands_on_a_run_folder_without_checkpoint_are_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    text = write_corpus(tmp_path)
    for args in (("sample", empty), ("score", empty, "a cat"), ("eval", empty, "--file", text),
                 ("info", empty), ("train", "--resume", empty)):
        assert_one_line_error(cli(*args), 2, "no checkpoint", str(empty))


def test_resume_of_a_missing_folder_is_exit_2(tmp_path):
    assert_one_line_error(cli("train", "--resume", tmp_path / "gone"), 2, "not found", "gone")
    result = cli("train", "--resume", tmp_path / "gone", "--config", write_config(tmp_path))
    assert_one_line_error(result, 2, "--resume", "not found")


def test_out_folder_that_already_holds_a_run_is_exit_2(tmp_path):
    run = train_run(tmp_path)
    result = cli(*train_args(tmp_path, write_corpus(tmp_path), "--out", run))
    assert_one_line_error(result, 2, "already holds a run", "--resume")


def test_validation_on_the_training_corpus_itself_gets_a_note(tmp_path):
    corpus = write_corpus(tmp_path)
    result = cli(*train_args(tmp_path, corpus, "--val", corpus))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [f"charlm: note: --val {corpus} is the corpus itself: validation then "
                                          f"measures text the model trains on, not how it does on new text"]
    other = tmp_path / "val.txt"
    other.write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")  # the same text, another file: no note
    plain = cli(*train_args(tmp_path, corpus, "--val", other, "--out", tmp_path / "plain"))
    assert plain.exit_code == 0 and plain.stderr == ""


def test_a_vocabulary_of_only_eos_and_unk_gets_a_note(tmp_path):
    result = cli(*train_args(tmp_path, write_corpus(tmp_path), "--set", "data.min_freq=1000000"))
    assert result.exit_code == 0, result.stderr
    assert "charlm: note: the vocabulary holds only <eos> and <unk> (data.min_freq 1000000: lower it)" \
        in result.stderr
    plain = cli(*train_args(tmp_path, write_corpus(tmp_path), "--out", tmp_path / "plain"))
    assert plain.exit_code == 0 and "vocabulary holds only" not in plain.stderr


def test_out_that_names_a_file_is_exit_2_and_says_so(tmp_path):
    corpus = write_corpus(tmp_path)
    before = corpus.read_bytes()
    result = cli(*train_args(tmp_path, corpus, "--out", corpus))
    assert_one_line_error(result, 2, "is a file, not a folder")
    assert corpus.read_bytes() == before


@pytest.mark.parametrize("inside", ["best", "last", "best/new"])
def test_out_folder_inside_a_checkpoint_is_exit_2_and_the_run_stays_whole(tmp_path, inside):
    """A new run in runs/x/best would rewrite that checkpoint's config and vocabulary (which its manifest
    then refuses), and a run under it would be deleted when the checkpoint is next replaced."""
    run = train_run(tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = cli(*train_args(tmp_path, write_corpus(tmp_path), "--out", run / inside))
    assert_one_line_error(result, 2, "checkpoint folder", "--out")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert cli("sample", run, "--max-length", "5", "--seed", "1").exit_code == 0


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    plain = cli(*train_args(tmp_path, tmp_path / "nowhere.txt"))
    debug = cli("--debug", *train_args(tmp_path, tmp_path / "nowhere.txt"))
    assert "Traceback" not in plain.stderr
    assert debug.exit_code == plain.exit_code == 2
    assert "Traceback (most recent call last)" in debug.stderr and "UsageError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


# ---------------------------------------------------------------- unseen text, pipes, terminals
@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("char_run")
    return train_run(tmp, corpus=write_corpus(tmp))


def test_scoring_text_of_unseen_characters_counts_them_as_unk(char_run):
    text = "ZQX☃☃ 日本"  # none of these was in the training text
    result = cli("score", char_run, text, "--json", "--per-token")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["oov"] == len(text.replace(" ", "")) and record["tokens"] == len(text) + 1
    assert [t for t, _ in record["token_logprobs"]].count("<unk>") == record["oov"]
    assert record["logprob"] < 0 and record["perplexity"] > 1


def test_sampling_from_a_prime_of_unseen_characters_works(char_run):
    result = cli("sample", char_run, "--prime", "☃☃☃ ZQX", "--json", "--max-length", "20", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["prime_unk"] == 6 and record["tokens"] >= 1
    assert "<unk>" not in record["generated"]


def test_output_to_a_closed_pipe_exits_0_without_traceback(char_run, tmp_path):
    """`charlm sample ... | head -1` (and score): the reader leaves early; charlm stops quietly with 0."""
    lines = tmp_path / "lines.txt"
    lines.write_text(corpus_text(3000, seed=5), encoding="utf-8")
    script = (f'"{sys.executable}" -m charlm sample "{char_run}" --json --num-samples 1000 --max-length 200 '
              f'--seed 1 2> sample.err | head -1 > sample.out; echo "${{PIPESTATUS[0]}}" > sample.status\n'
              f'"{sys.executable}" -m charlm score "{char_run}" --file "{lines}" 2> score.err | head -1 > score.out; '
              f'echo "${{PIPESTATUS[0]}}" > score.status\n')
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env=child_env(), check=True, timeout=120)
    for name in ("sample", "score"):
        assert (tmp_path / f"{name}.status").read_text().strip() == "0", (tmp_path / f"{name}.err").read_text()
        assert (tmp_path / f"{name}.err").read_text() == ""
        assert len((tmp_path / f"{name}.out").read_text().splitlines()) == 1
    assert json.loads((tmp_path / "sample.out").read_text())["tokens"] >= 1


def test_ascii_terminal_gets_escapes_not_a_crash(tmp_path):
    corpus = tmp_path / "unicode.txt"
    corpus.write_text(("café crème ☃ 日本語 naïve\n" + corpus_text(60)) * 3, encoding="utf-8")
    run = train_run(tmp_path, corpus=corpus)
    env = {"PYTHONIOENCODING": "ascii"}
    sample = subprocess.run([sys.executable, "-m", "charlm", "sample", str(run), "--prime", "café ☃",
                             "--max-length", "30", "--seed", "2"], capture_output=True, env=child_env(env),
                            cwd=ROOT, timeout=120)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.isascii() and b"caf\\xe9 \\u2603" in sample.stdout
    score = subprocess.run([sys.executable, "-m", "charlm", "score", str(run), "日本語 ☃", "--per-token"],
                           capture_output=True, env=child_env(env), cwd=ROOT, timeout=120)
    assert score.returncode == 0, score.stderr
    assert score.stdout.isascii() and b"\\u65e5" in score.stdout
    missing = subprocess.run([sys.executable, "-m", "charlm", "train", "--corpus", str(tmp_path / "nö☃.txt")],
                             capture_output=True, env=child_env(env), cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and b"Traceback" not in missing.stderr
    assert missing.stderr.startswith(b"charlm: error: file not found") and missing.stderr.isascii()


@pytest.mark.parametrize("args,fragment,help", [
    (("train", "--max-steps", "abc"), "--max-steps", "charlm train -h"),
    (("train", "--bogus", "1"), "--bogus", "charlm train -h"),
    (("sample",), "Missing argument RUN_DIR.", "charlm sample -h"),  # the name the help shows
    (("bogus",), "bogus", "charlm -h"),
    (("sample", "--debug", "runs/x"), "--debug goes before the command: charlm --debug sample ...", "charlm sample -h"),
    # Click raises this one without a context: the help named is still the command's, not charlm's
    (("train", "--corpus"), "Option '--corpus' requires an argument", "charlm train -h"),
    (("--debug", "score", "runs/x", "--file"), "Option '--file' requires an argument", "charlm score -h"),
    # a sentence that begins with '-' read as an option: where it goes instead (2026-12-07)
    (("score", "runs/x", "-5 degrees"), "a sentence that begins with '-' goes after --: charlm score RUN -- "
                                        "'-5 degrees'", "charlm score -h"),
    (("score", "runs/x", "-hot day"), "No such option: -o; a sentence that begins with '-' goes after --: charlm "
                                      "score RUN -- '-hot day'", "charlm score -h"),  # -h read, then -o refused
    (("score", "runs/x", "-it's"), "charlm score RUN -- '-it'\"'\"'s'", "charlm score -h"),  # quoted for a shell
    (("score", "runs/x", "--per-tokn"), "No such option: --per-tokn (Possible options: --per-token) (see",
     "charlm score -h"),  # a mistyped option is not told so
])
def test_bad_command_line_is_one_line_and_exit_2(args, fragment, help):
    """Click's own usage errors too: one line naming the option, exit 2 (through the real entry point)."""
    result = subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True,
                            env=child_env(), cwd=ROOT, timeout=60)
    line = assert_one_line_error(result, 2, fragment)
    assert line.endswith(f"(see python -m {help})")  # Click names the program as it was run


def test_a_run_folder_given_where_a_file_or_a_run_is_expected_says_what_to_pass(tmp_path):
    """Catches: `--corpus RUN` saying only that it is a folder, and `sample FILE` telling the user to train
    into a file."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    assert cli(*train_args(tmp_path, corpus, "--out", run)).exit_code == 0
    assert_one_line_error(cli(*train_args(tmp_path, run, "--out", tmp_path / "other")), 2,
                          "is a folder, not a text file: it holds a run, which --resume")
    assert_one_line_error(cli("sample", corpus), 2, "is a file, not a run folder")


def test_unsegmented_chinese_split_at_spaces_gets_a_note(tmp_path):
    """Catches: `data.word_split: space` on Chinese written without spaces training in silence on whole
    clauses as words; segmented text, or the punct split, gets no note."""
    clauses = ["今天天气很好我们去公园散步", "明天下雨了大家都在家里看书", "山上的树叶慢慢变红了"]
    for name, text, split, noted in [("whole", "\n".join(clauses), "space", True),
                                     ("spaced", "\n".join(" ".join(c) for c in clauses), "space", False),
                                     ("punct", "\n".join(clauses), "punct", False)]:
        corpus = tmp_path / f"{name}.txt"
        corpus.write_text((text + "\n") * 60, encoding="utf-8")
        result = cli(*train_args(tmp_path, corpus, "--out", tmp_path / name, "--set", "data.level=word",
                                 "--set", f"data.word_split={split}"))
        assert result.exit_code == 0, result.stderr
        assert ("runs of Chinese (or Japanese) characters" in result.stderr) == noted, (name, result.stderr)
