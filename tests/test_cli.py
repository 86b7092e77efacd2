"""The command-line tool through Typer's test runner, and once for real in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from charlm.checkpoint import load_run
from charlm.cli import _figure, app
from charlm.score import evaluate_file, score_sentences
from conftest import PROJECT_ROOT, TINY_TEXT

TINY_CONFIG = str(PROJECT_ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_usage_error(result, fragment: str) -> str:
    """Exit 2, stdout empty, and exactly one line on stderr: `charlm: error: ...`; returns the line."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("charlm: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------- the commands
def test_train_json_reports_the_run(cli, write_corpus, tmp_path):
    corpus = write_corpus(TINY_TEXT)
    out = tmp_path / "run"
    result = cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", out, "--max-steps", 8,
                 "--seed", 3, "--set", "train.eval_interval=4", "--set", "model.cell=gru", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["steps"] == 8 and record["stopped_by"] == "max_steps"
    assert record["run_dir"] == str(out)
    assert math.isfinite(record["val_loss"]) and record["parameters"] > 0
    saved = (out / "config.yaml").read_text()
    assert "cell: gru" in saved and "seed: 3" in saved and "max_steps: 8" in saved


def test_train_human_output_names_the_run_folder(cli, write_corpus, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", out,
                 "--max-steps", 3, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"run folder      {out}" in result.stdout
    assert "tokens/second" in result.stdout


def test_sample_json_gives_reproducible_samples_with_logprobs(cli, tiny_run):
    args = ("sample", tiny_run["run_dir"], "--num-samples", 3, "--seed", 7, "--max-length", 30, "--json")
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    records = json_lines(first.stdout)
    assert len(records) == 3
    for r in records:
        assert r["stopped_at"] in ("eos", "max_length") and r["logprob"] <= 0
        assert 1 <= r["tokens"] <= 30 and "<unk>" not in r["text"]
    assert second.stdout == first.stdout


def test_sample_with_prime_and_greedy(cli, tiny_run):
    result = cli("sample", tiny_run["run_dir"], "--prime", "the ", "--temperature", 0, "--max-length", 10)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the ")


def test_sample_notes_once_on_stderr_a_prime_outside_the_vocabulary(cli, tiny_run):
    unknown = cli("sample", tiny_run["run_dir"], "--prime", "\u4f60\u597d", "--num-samples", "3", "--seed", "1",
                  "--max-length", "5")
    assert unknown.exit_code == 0 and len(unknown.stdout.splitlines()) == 3
    assert unknown.stderr.splitlines() == [
        "charlm: note: 2 tokens of --prime are not in the run's vocabulary: the model reads them as <unk>"]
    known = cli("sample", tiny_run["run_dir"], "--prime", TINY_TEXT[:3], "--seed", "1", "--max-length", "5")
    assert known.exit_code == 0 and known.stderr == ""


def test_score_json_matches_the_library(cli, tiny_run):
    sentences = ["the cat sat on the mat.", "zebra ☃"]
    result = cli("score", tiny_run["run_dir"], *sentences, "--json", "--per-token")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    model, codec, _ = load_run(tiny_run["run_dir"])
    expected = score_sentences(model, codec, sentences)
    assert [r["text"] for r in records] == sentences
    for r, e in zip(records, expected):
        assert r["logprob"] == pytest.approx(e.logprob, abs=1e-9)
        assert r["tokens"] == len(e.tokens) and r["oov"] == e.oov
        assert r["log10prob"] == pytest.approx(r["logprob"] / math.log(10))
        assert [t for t, _ in r["token_logprobs"]] == e.tokens
        assert math.fsum(lp for _, lp in r["token_logprobs"]) == pytest.approx(r["logprob"], abs=1e-9)
    assert records[1]["oov"] >= 2  # 'z' and '☃' are not in the tiny corpus


def test_score_reads_a_file_or_stdin(cli, tiny_run, write_corpus):
    path = write_corpus("the cat.\na dog.\n", "sentences.txt")
    from_file = cli("score", tiny_run["run_dir"], "--file", path, "--json")
    from_stdin = cli("score", tiny_run["run_dir"], "--json", input="the cat.\na dog.\n")
    assert from_file.exit_code == 0 and from_stdin.exit_code == 0
    assert len(json_lines(from_file.stdout)) == 2
    assert from_file.stdout == from_stdin.stdout


def test_score_reads_standard_input_in_the_terminals_encoding_not_the_corpus_and_takes_file_dash(cli, tmp_path):
    """Catches: a run trained on a cp1252 corpus reading a piped UTF-8 'thé' as 'thÃ©' (two <unk> and another
    probability than the same sentence given as an argument); and `--file -` taken for a file named '-'."""
    corpus = tmp_path / "latin.txt"
    corpus.write_bytes(("thé king said the queen.\n" * 60).encode("cp1252"))
    run = tmp_path / "run"
    assert cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--encoding", "cp1252", "--out", run, "-q",
               "--max-steps", 3).exit_code == 0
    argument = json_lines(cli("score", run, "thé king", "--json").stdout)
    piped = cli("score", run, "--json", input="thé king\n".encode("utf-8"))
    assert piped.exit_code == 0, piped.output
    assert json_lines(piped.stdout) == argument and argument[0]["oov"] == 0
    dash = cli("score", run, "--file", "-", "--json", input="thé king\n".encode("utf-8"))
    assert dash.exit_code == 0 and json_lines(dash.stdout) == argument
    named = cli("score", run, "--json", "--encoding", "cp1252", input="thé king\n".encode("cp1252"))
    assert json_lines(named.stdout) == argument


def test_score_of_an_argument_that_names_a_file_scores_it_as_a_sentence_and_says_so(cli, tiny_run, write_corpus):
    """Catches: `charlm score RUN sentences.txt` (the -f forgotten) scoring the file's name in silence."""
    path = write_corpus("the cat.\na dog.\n", "sentences.txt")
    result = cli("score", tiny_run["run_dir"], str(path), "a sentence", "x" * 300, "--json")
    assert result.exit_code == 0, result.output
    assert [r["text"] for r in json_lines(result.stdout)] == [str(path), "a sentence", "x" * 300]
    assert f"note: '{path}' is scored as a sentence; to score the lines of the file {path}, use --file {path}" \
        in result.stderr
    plain = cli("score", tiny_run["run_dir"], "the cat.", "x" * 300)  # no file by that name, a name too long
    assert plain.exit_code == 0 and "note" not in plain.stderr


def test_score_refuses_sentences_and_a_file_together(cli, tiny_run, write_corpus):
    path = write_corpus("the cat.\n", "sentences.txt")
    assert_usage_error(cli("score", tiny_run["run_dir"], "a dog.", "--file", path), "not both")


def test_score_of_an_empty_file_or_stdin_is_exit_2_as_eval_is(cli, tiny_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert_usage_error(cli("score", tiny_run["run_dir"], "--file", empty), "holds no lines to score")
    assert_usage_error(cli("score", tiny_run["run_dir"], input=""), "standard input holds no lines")
    assert_usage_error(cli("eval", tiny_run["run_dir"], "--file", empty), "holds no text")


def test_score_table_has_totals_and_perplexities(cli, tiny_run):
    result = cli("score", tiny_run["run_dir"], "the cat.", "a dog.", "--per-token")
    assert result.exit_code == 0, result.output
    assert "Total: ln P" in result.stdout
    assert "Perplexity including OOVs" in result.stdout and "Perplexity excluding OOVs" in result.stdout
    assert "<eos>=" in result.stdout


def test_score_per_token_shows_an_unknown_token_as_the_text_has_it(cli, tiny_run):
    """Catches: the per-token table printing `<unk>=-6.5` where the sentence said `你`: which word was
    unknown could not be read from it. The JSON keeps the token scored (<unk>)."""
    table = cli("score", tiny_run["run_dir"], "the 你.", "--per-token")
    assert table.exit_code == 0, table.output
    cells = table.stdout.splitlines()[0].split("\t")
    assert [c.split("=")[0] for c in cells] == ["t", "h", "e", " ", "你(<unk>)", ".", "<eos>"]
    record = json_lines(cli("score", tiny_run["run_dir"], "the 你.", "--per-token", "--json").stdout)[0]
    assert [t for t, _ in record["token_logprobs"]][4] == "<unk>"
    assert record["written"] == ["t", "h", "e", " ", "你", ".", "<eos>"]  # and, since 2026-12-07, as written


def test_score_per_token_shows_a_lowercased_word_as_the_text_has_it(cli, write_corpus, tmp_path):
    """Catches: a data.lowercase run's per-token table showing `the` for `The`, and its JSON losing the word
    that became <unk> (only `<unk>` was there)."""
    run = tmp_path / "run"
    trained = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", run,
                  "--max-steps", 2, "--set", "data.level=word", "--set", "data.lowercase=true",
                  "--set", "train.seq_len=4", "--quiet")
    assert trained.exit_code == 0, trained.output
    table = cli("score", run, "The Cat sat zebra", "--per-token").stdout.splitlines()[0].split("\t")
    assert [c.split("=")[0] for c in table] == ["The(the)", "Cat(cat)", "sat", "zebra(<unk>)", "<eos>"]
    record = json_lines(cli("score", run, "The Cat sat zebra", "--per-token", "--json").stdout)[0]
    assert [t for t, _ in record["token_logprobs"]] == ["the", "cat", "sat", "<unk>", "<eos>"]
    assert record["written"] == ["The", "Cat", "sat", "zebra", "<eos>"]


def test_eval_json_matches_the_library(cli, tiny_run):
    result = cli("eval", tiny_run["run_dir"], "--file", tiny_run["corpus"], "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    model, codec, _ = load_run(tiny_run["run_dir"])
    expected = evaluate_file(model, codec, tiny_run["corpus"])
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-12)
    assert record["tokens"] == expected.tokens == len(TINY_TEXT)
    assert record["bits_per_char"] == pytest.approx(record["loss"] / math.log(2))


def test_info_json_describes_the_run(cli, tiny_run):
    result = cli("info", tiny_run["run_dir"], "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    vocab = json.loads((tiny_run["run_dir"] / "vocab.json").read_text())["tokens"]
    assert record["vocab_size"] == len(vocab)
    assert record["vocab_first"] == vocab[:20]  # the specials, then the most frequent (all 16 here)
    assert record["parameters"] == tiny_run["result"].parameters
    assert record["level"] == "char" and record["config"]["model"]["hidden_size"] == 32
    assert record["val_loss"] == pytest.approx(tiny_run["result"].best_val_loss)


# `charlm info`'s table: (key, value in the run's record, what the table shows)
INFO_TABLE_SAMPLES = [("epoch", 0.23809523809523808, "0.24"), ("elapsed", 7.395505962000016, "7.4 s"),
                      ("val_loss", 1.23456789, "1.2346 nats/token"), ("val_loss", None, "- (no validation)"),
                      # a loss that blew up: in exponent form, as train and runs print it, not 32 digits
                      ("val_loss", 1.5673885660545843e31, "1.567e+31 nats/token"),
                      ("parameters", 268482, "268,482")]


def test_info_table_rounds_its_numbers(cli, tiny_run):
    from charlm.cli import _info_value

    for key, value, shown in INFO_TABLE_SAMPLES:  # fixed values: a formatting check, not a measurement
        assert _info_value(key, value) == shown, key
    head = cli("info", tiny_run["run_dir"]).stdout.split("\nconfig:")[0]  # the lines above the config
    lines = dict(line.split(None, 1) for line in head.splitlines())
    record = json.loads(cli("info", tiny_run["run_dir"], "--json").stdout)
    assert record["vocab_size"] <= 20 and lines["vocabulary"] == json.dumps(record["vocab_first"])
    assert lines["epoch"] == f"{record['epoch']:.2f}" and lines["val_loss"] == _info_value("val_loss",
                                                                                          record["val_loss"])


def test_checkpoint_option_must_agree_with_a_checkpoint_folder(cli, tiny_run):
    run = tiny_run["run_dir"]
    assert_usage_error(cli("score", run / "best", "the cat.", "--checkpoint", "last"), "asks for the other")
    for args in ((run / "best", "--checkpoint", "best"), (run / "last",), (run, "--checkpoint", "last")):
        assert cli("score", *args[:1], "the cat.", *args[1:]).exit_code == 0


def test_checkpoint_best_is_not_answered_with_the_last_one(cli, tiny_run, tmp_path):
    """A run with only last/ (not validated yet): the default falls back to it, saying so on stderr;
    --checkpoint best refuses."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run)
    shutil.rmtree(run / "best")
    for args in (("score", run, "the cat."), ("sample", run, "--max-length", "5", "--seed", "1"),  # a seeded
                 ("eval", run, "--file", tiny_run["corpus"])):  # sample: an empty one would add its own note
        fell_back = cli(*args)
        assert fell_back.exit_code == 0, fell_back.stderr
        assert fell_back.stderr.splitlines() == [
            f"charlm: note: {run}: no best/ checkpoint yet (the run has not been validated so far); reading last/"]
    for args in ((run, "--checkpoint", "last"), (run / "last",), (tiny_run["run_dir"],)):
        assert cli("score", *args[:1], "the cat.", *args[1:]).stderr == ""  # asked for, or best/ there
    assert_usage_error(cli("score", run, "the cat.", "--checkpoint", "best"), "not been validated")
    (run / "best").mkdir()  # a best/ without its manifest: damaged, not missing
    assert_usage_error(cli("score", run, "the cat.", "--checkpoint", "best"), "damaged")
    damaged = cli("score", run, "the cat.")
    assert damaged.exit_code == 0
    assert damaged.stderr == f"charlm: note: {run}: its best/ folder has no manifest.json (damaged); reading last/\n"
    # named itself, the damaged folder says so and points at the run (not 'no checkpoint yet')
    shutil.copy(run / "last" / "config.yaml", run / "best" / "config.yaml")
    assert_usage_error(cli("sample", run / "best"), f"{run / 'best'} is a damaged checkpoint folder (no "
                                                    f"manifest.json): pass the run folder {run}")


def test_bench_with_nothing_to_measure_is_exit_2(cli):
    assert_usage_error(cli("bench", "--no-grid"), "nothing to measure")


def test_bench_refuses_two_output_forms(cli):
    assert_usage_error(cli("bench", "--json", "--markdown", "--cells", "rnn", "--seconds", "0.1"), "choose one")


def test_version_and_help(cli):
    version = cli("--version")
    assert version.exit_code == 0 and version.stdout.startswith("charlm ")
    helped = cli("--help")
    assert helped.exit_code == 0
    for command in ("train", "sample", "score", "eval", "info"):
        assert command in helped.stdout


# ---------------------------------------------------------------- bad input: exit 2, one line
def test_missing_corpus_is_exit_2(cli, tmp_path):
    result = cli("train", "--config", TINY_CONFIG, "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "r")
    assert_usage_error(result, "not found")


def test_no_corpus_at_all_is_exit_2(cli, tmp_path):
    assert_usage_error(cli("train", "--config", TINY_CONFIG, "--out", tmp_path / "r"), "no corpus")


def test_unknown_config_key_is_exit_2(cli, write_corpus, tmp_path):
    result = cli("train", "--corpus", write_corpus(TINY_TEXT), "--out", tmp_path / "r", "--set", "model.cells=gru")
    assert_usage_error(result, "unknown key model.cells")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("item,fragment", [("train.lr=-1", "train.lr must be > 0"),
                                           ("model.dropout=1.5", "model.dropout must be < 1"),
                                           ("model.layers=0", "model.layers must be >= 1")])
def test_out_of_range_value_is_exit_2(cli, write_corpus, tmp_path, item, fragment):
    result = cli("train", "--corpus", write_corpus(TINY_TEXT), "--out", tmp_path / "r", "--set", item)
    assert_usage_error(result, fragment)


def test_non_utf8_corpus_is_exit_2(cli, tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\u00e9\n".encode("latin-1") * 100)
    result = cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "r")
    assert_usage_error(result, "not valid utf-8")


def test_a_run_that_has_not_saved_yet_and_a_folder_of_runs_are_told_apart(cli, tiny_run, tmp_path):
    """A run folder without a checkpoint yet (training, not validated) is not told to 'train into it'; a folder
    of runs names them."""
    import shutil

    started = tmp_path / "runs" / "started"
    started.mkdir(parents=True)
    shutil.copy(tiny_run["run_dir"] / "config.yaml", started / "config.yaml")
    for args in (("sample", started), ("score", started, "x"), ("info", started)):
        line = assert_usage_error(cli(*args), "holds no checkpoint yet")
        assert "train.eval_interval" in line and "train into it" not in line
    shutil.copytree(tiny_run["run_dir"], tmp_path / "runs" / "done")
    line = assert_usage_error(cli("sample", tmp_path / "runs"), "not a run folder but holds runs (done, started)")
    assert line.endswith(f"e.g. {tmp_path / 'runs' / 'started'}")


def _trained_on(cli, tmp_path, text: str):
    """A tiny run trained to learn `text` by heart (300 steps): its run folder."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    trained = cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", run, "-q", "--max-steps", "300",
                  "--set", "train.lr=0.01")
    assert trained.exit_code == 0, trained.stderr
    return run


def test_empty_samples_without_a_prime_get_a_note(cli, tmp_path):
    """Catches: a blank line printed for a sample the model ended at once, without a word. With fresh streams
    the model learns how often a line of its corpus is empty (here three lines in four), and greedy decoding
    from the start of a line then ends it at once."""
    run = _trained_on(cli, tmp_path, "\n\n\nA line of verse, spoken.\n" * 200)
    empty = cli("sample", run, "--temperature", "0", "--num-samples", "2")
    assert empty.exit_code == 0 and empty.stdout == "\n\n"
    assert empty.stderr.splitlines() == ["charlm: note: 2 of 2 samples are empty: the model ended them at once (in a "
                                         "corpus with blank lines, a line may be empty); --prime gives each sample "
                                         "a start"]
    one = cli("sample", run, "--temperature", "0")
    assert one.stderr.startswith("charlm: note: the sample is empty: the model ended it at once")
    primed = cli("sample", run, "--prime", "A line", "--temperature", "0")
    assert primed.stdout.startswith("A line of") and primed.stderr == ""


def test_a_primed_sample_that_ends_at_once_gets_a_note(cli, tmp_path):
    """A prime the corpus only ever ends a line with: greedy decoding closes the line at once, and the user
    is told why nothing follows the prime."""
    run = _trained_on(cli, tmp_path, "ROMEO.\nA line of verse, spoken.\n" * 200)
    ended = cli("sample", run, "--prime", "ROMEO.", "--temperature", "0", "--num-samples", "2", "--json")
    assert ended.exit_code == 0, ended.stderr
    assert [s["generated"] for s in json_lines(ended.stdout)] == ["", ""]
    assert ended.stderr.splitlines() == ["charlm: note: 2 of 2 samples ended right after --prime: the model closed "
                                         "the line there (a prime that starts a line the model would go on with, "
                                         "such as the first words of a sentence, gives more)"]
    goes_on = cli("sample", run, "--prime", "A line", "--temperature", "0")
    assert goes_on.exit_code == 0 and goes_on.stdout.startswith("A line of") and goes_on.stderr == ""


def test_commands_on_a_folder_without_checkpoint_are_exit_2(cli, tmp_path):
    for args in (("sample", tmp_path), ("score", tmp_path, "x"), ("eval", tmp_path, "--file", tmp_path),
                 ("info", tmp_path), ("export", tmp_path, "--out", tmp_path / "m.pt")):
        assert_usage_error(cli(*args), "no checkpoint (no best/manifest.json or last/manifest.json)")
    assert_usage_error(cli("sample", tmp_path, "--checkpoint", "last"), "no checkpoint (no last/manifest.json)")


def test_a_diverged_models_perplexity_is_printed_as_a_number_not_hundreds_of_digits(cli, tiny_run, monkeypatch):
    from charlm import cli as cli_module
    from charlm import score as score_module

    assert cli_module._figure(196.24, ".2f") == "196.24" and cli_module._figure(3.5, "9.3f") == "    3.500"
    assert cli_module._figure(1e37, ".4f") == "1e+37" and cli_module._figure(2e303, "9.3f") == "   2e+303"
    # e ** 700 is where perplexity stops: a bound, not the figure
    from charlm.model import MAX_LOG_PERPLEXITY
    assert cli_module.PERPLEXITY_CAP == math.exp(MAX_LOG_PERPLEXITY)
    assert cli_module._figure(math.exp(700), ".3f") == ">1e+304" == cli_module._figure(score_module.perplexity(800), "")
    assert cli_module._figure(math.exp(700), "9.3f") == "  >1e+304"
    real = score_module.evaluate_file

    def diverged(*args, **kwargs):
        result = real(*args, **kwargs)
        result.loss, result.perplexity = 3.3e11, score_module.perplexity(3.3e11)
        return result
    monkeypatch.setattr(score_module, "evaluate_file", diverged)
    result = cli("eval", tiny_run["run_dir"], "--file", tiny_run["corpus"])
    assert result.exit_code == 0 and "perplexity      >1e+304\n" in result.stdout, result.stdout


def test_a_run_that_diverged_gets_a_note_and_its_figures_stay_short(cli, write_corpus, tmp_path):
    """Catches: a run whose loss blew up (lr 5 for 5e-3) ending with exit 0 and no word, and its losses
    printed with dozens of digits in the report and in `runs`."""
    out = tmp_path / "runs" / "blown"
    result = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", out,
                 "--max-steps", 40, "--set", "train.lr=5", "--set", "train.fresh_streams=0", "--quiet")
    assert result.exit_code == 0, result.stderr  # (a blown-up run's path is chaotic: the one of these settings)
    end = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    vocab = len(json.loads((out / "vocab.json").read_text(encoding="utf-8"))["tokens"])
    assert end["val_loss"] > math.log(vocab) + 1
    assert result.stderr.splitlines() == [
        f"charlm: note: the validation loss {end['val_loss']:.4g} is more than a nat above {math.log(vocab):.4f} "
        f"(ln {vocab}), the loss of giving every token the same probability: the model has diverged; try a lower "
        f"train.lr (or train.clip)"]
    calm = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", tmp_path / "calm",
               "--max-steps", 2, "--quiet")
    assert calm.exit_code == 0 and calm.stderr == ""  # an untrained model scores about ln V: no note
    # validation text unlike the corpus (all <unk>) scores far above ln V while training goes well: no note of
    # divergence, only the one on the <unk> tokens
    unlike = tmp_path / "unlike.txt"
    unlike.write_text("今天天气很好，我们去公园散步。\n" * 20, encoding="utf-8")
    apart = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--val", unlike,
                "--out", tmp_path / "apart", "--max-steps", 60, "--quiet", "--json")
    assert apart.exit_code == 0 and "the model has diverged" not in apart.stderr, apart.stderr
    assert apart.stderr.startswith("charlm: note: 94% of the validation text's tokens are not in the training "
                                   "text's vocabulary") and len(apart.stderr.splitlines()) == 1
    assert json.loads(apart.stdout)["val_loss"] > math.log(vocab) + 1
    # a loss of 1e37 (as a run of SGD at lr 1e6 gives) is printed in exponent form in `runs`
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    blown = [r | {"val_loss": 1e37, "val_bpc": 1.4e37} if "val_loss" in r else r for r in records]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in blown), encoding="utf-8")
    manifest = out / "best" / "manifest.json"  # where `runs` reads the loss of the model best/ holds
    manifest.write_text(json.dumps(json.loads(manifest.read_text(encoding="utf-8")) | {"val_loss": 1e37}),
                        encoding="utf-8")
    listed = cli("runs", tmp_path / "runs")
    assert listed.exit_code == 0 and " 1e+37 " in listed.stdout and "0000000" not in listed.stdout, listed.stdout


def test_a_field_given_by_a_shortcut_option_and_by_set_is_refused_unless_they_agree(cli, write_corpus, tmp_path):
    """Catches: `--max-steps 5 --set train.max_steps=3` training 5 steps in silence, whatever the order."""
    corpus = write_corpus(TINY_TEXT)
    for args in (("--max-steps", 5, "--set", "train.max_steps=3"), ("--set", "train.max_steps=3", "--max-steps", 5)):
        assert_usage_error(cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "x", *args),
                           "train.max_steps is given twice, as --max-steps 5 and as --set train.max_steps=3: give it "
                           "once")
    assert_usage_error(cli("train", "--corpus", corpus, "--seed", 1, "--set", "train.seed=2"), "as --seed 1")
    agreed = cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "run", "-q", "--json",
                 "--max-steps", 2, "--set", "train.max_steps=2", "--max-time", 100, "--set", "train.max_time=1e2")
    assert agreed.exit_code == 0 and json.loads(agreed.stdout)["steps"] == 2  # 1e2 is 100 as the config reads it


def test_settings_the_run_never_reads_get_a_note_when_it_starts(cli, write_corpus, tmp_path):
    """Catches: `--set model.gru_form=torch` on nn.LSTM, or a plateau's patience on a cosine schedule, taken
    without a word."""
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"
    first = cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", run, "-q", "--max-steps", 2,
                "--set", "model.gru_form=torch", "--set", "train.plateau_patience=3")
    assert first.exit_code == 0, first.output
    assert first.stderr.splitlines() == [
        "charlm: note: these settings have no effect on this run: model.gru_form (for model.cell gru, "
        "model.impl custom); train.plateau_patience (for train.schedule plateau)"]
    again = cli("train", "--resume", run, "-q", "--max-steps", 4)  # said once, when the run starts
    assert again.exit_code == 0 and "no effect" not in again.stderr, again.output
    one = cli("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "one", "-q", "--max-steps",
              2, "--set", "train.momentum=0.9")
    assert one.stderr.splitlines() == ["charlm: note: this setting has no effect on this run: train.momentum "
                                       "(for train.optimizer sgd)"]


def test_a_resume_with_no_step_left_is_told_the_limit_that_stopped_it_and_a_way_on():
    from charlm.cli import _limit_advice
    from charlm.config import TrainConfig

    # the only limit: raising it is the way on (lifting it would fall back to one epoch)
    only = _limit_advice("max_steps", TrainConfig(max_steps=20))
    assert "train.max_steps is already reached; raise it with --max-steps" in only and "=null" not in only
    both = _limit_advice("max_steps", TrainConfig(max_steps=20, max_time=600))
    assert "--set train.max_steps=null to let train.max_time decide" in both
    # no limit at all: one epoch, and lifting max_epochs (already null) would change nothing
    none = _limit_advice("max_epochs", TrainConfig())
    assert "with no limit set a run trains one epoch" in none and "=null" not in none
    assert _limit_advice("done", TrainConfig()) == "the run had already ended"


def test_an_unexpected_error_is_one_line_and_offers_debug_only_without_it(cli, tiny_run, monkeypatch):
    from charlm import score as score_module

    def broken(*args, **kwargs):
        raise ValueError("something unforeseen")
    monkeypatch.setattr(score_module, "score_sentences", broken)
    plain = cli("score", tiny_run["run_dir"], "x")
    assert plain.exit_code == 1 and plain.stderr.splitlines() == [
        "charlm: error: ValueError: something unforeseen (run with --debug for the traceback)"]
    debug = cli("--debug", "score", tiny_run["run_dir"], "x")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == "charlm: error: ValueError: something unforeseen"


@pytest.mark.parametrize("args,fragment", [
    (("--temperature", "-1"), "--temperature"),
    (("--temperature", "inf"), "--temperature"),
    (("--temperature", "1e-40", "--top-k", "2"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--max-length", "0"), "--max-length"),
    (("--checkpoint", "newest"), "--checkpoint"),
])
def test_bad_sample_options_are_exit_2(cli, tiny_run, args, fragment):
    assert_usage_error(cli("sample", tiny_run["run_dir"], *args), fragment)


def test_eval_of_a_missing_file_is_exit_2(cli, tiny_run, tmp_path):
    assert_usage_error(cli("eval", tiny_run["run_dir"], "--file", tmp_path / "missing.txt"), "not found")


# ---------------------------------------------------------------- a real process
def test_train_sample_score_eval_in_a_real_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}

    def charlm(*args):
        done = subprocess.run([sys.executable, "-m", "charlm", *map(str, args)], capture_output=True, text=True,
                              encoding="utf-8", env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    trained = json.loads(charlm("train", "--config", TINY_CONFIG, "--corpus", corpus, "--out", run,
                                "--max-steps", 10, "--quiet", "--json"))
    assert trained["steps"] == 10 and (run / "best" / "manifest.json").is_file()
    samples = json_lines(charlm("sample", run, "--num-samples", 2, "--seed", 1, "--max-length", 20, "--json"))
    assert len(samples) == 2
    scores = json_lines(charlm("score", run, "the cat sat.", "--json"))
    assert len(scores) == 1 and scores[0]["logprob"] < 0 and scores[0]["tokens"] == len("the cat sat.") + 1
    evaluated = json.loads(charlm("eval", run, "--file", corpus, "--json"))
    assert evaluated["tokens"] == len(TINY_TEXT) and math.isfinite(evaluated["loss"])


@pytest.mark.parametrize("world, code", [(None, 0), ("1", 0), ("2", 0), ("2", 3)])
def test_a_torchrun_rank_that_succeeded_leaves_without_the_interpreters_teardown(world, code, monkeypatch):
    """Under torchrun a rank that succeeded runs the atexit functions, flushes and leaves through os._exit (a
    rank that finished could abort in C++ teardown); one that failed, or charlm alone, exits as usual."""
    import charlm.cli as cli

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    events = []

    class Left(Exception):
        pass

    def os_exit(code):
        events.append(("os._exit", code))
        raise Left

    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: events.append(("atexit",)))
    monkeypatch.setattr(cli.os, "_exit", os_exit)
    with pytest.raises((SystemExit, Left)) as left:
        cli._exit(code)
    if world == "2" and code == 0:
        assert left.type is Left and events == [("atexit",), ("os._exit", 0)]
    else:
        assert left.type is SystemExit and left.value.code == code and events == []


def test_train_human_output_states_the_figures_of_the_runs_end_record(cli, write_corpus, tmp_path):
    """Catches: the human train report printing the wrong field, e.g. the final val loss as '(best ...)' or the
    step count as the epochs (only the run folder and 'tokens/second' were checked)."""
    out = tmp_path / "run"
    # the periodic checks read a 30-token slice, the final one the whole split: best (on the slice) and the
    # final validation loss differ, so a line that prints one for the other is seen
    result = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", out,
                 "--max-steps", 8, "--set", "train.eval_interval=4", "--set", "train.eval_tokens=30", "--quiet")
    assert result.exit_code == 0, result.output
    end = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert end["event"] == "end" and end["best_val_loss"] != end["val_loss"]
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"steps           8 ({end['epochs']:.2f} epochs, ")
    assert lines[1].endswith(", stopped by max_steps)")
    assert lines[2] == f"train loss      {end['train_loss']:.4f}"
    step = json.loads((out / "best" / "manifest.json").read_text(encoding="utf-8"))["step"]
    which = "best/ holds this model, chosen" if step == 8 else f"best/ (step {step}) chosen"
    assert lines[3] == (f"val loss        {end['val_loss']:.4f} nats/token, perplexity {end['val_perplexity']:.2f}, "
                        f"{end['val_bits_per_char']:.4f} bits/char ({which} at {end['best_val_loss']:.4f} on the first "
                        f"30 validation tokens)")
    assert end["best_val_tokens"] == 30
    assert lines[5] == f"parameters      {end['parameters']:,}"


def test_only_rank_0_of_a_torchrun_job_prints_the_train_result(cli, write_corpus, tmp_path, monkeypatch):
    """Catches: every rank of `train --nproc N` printing its result (N copies of the report on stdout)."""
    monkeypatch.setenv("RANK", "1")  # WORLD_SIZE stays unset: this process trains alone, but reports as rank 1
    for n, form in enumerate(((), ("--json",))):
        result = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out",
                     tmp_path / f"run{n}", "--max-steps", 2, "--quiet", *form)
        assert result.exit_code == 0, result.output
        assert result.stdout == ""


def test_train_refuses_nproc_below_one(cli, write_corpus, tmp_path):
    """Catches: --nproc 0 (or a negative count) accepted and silently trained on one process."""
    result = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", tmp_path / "r",
                 "--nproc", 0)
    assert_usage_error(result, "--nproc must be at least 1, got 0")
    assert not (tmp_path / "r").exists()


def test_an_interrupt_or_termination_inside_a_command_is_130_or_143_in_one_line(cli, tiny_run, monkeypatch):
    """Catches: _errors() mapping Ctrl-C (KeyboardInterrupt, or the StopSignal its handler raises), SIGTERM or
    SIGHUP inside a running command to the wrong exit code or message (only the parse-time path in main() was
    tested)."""
    import signal

    from charlm import score as score_module
    from charlm.errors import StopSignal

    for raised, code, word in ((KeyboardInterrupt, 130, "interrupted"),
                               (lambda: StopSignal(signal.SIGINT), 130, "interrupted"),
                               (lambda: StopSignal(signal.SIGTERM), 143, "terminated"),
                               (lambda: StopSignal(signal.SIGHUP), 129, "hung up")):
        def stop(*args, raised=raised, **kwargs):
            raise raised()
        monkeypatch.setattr(score_module, "score_sentences", stop)
        result = cli("score", tiny_run["run_dir"], "the cat.")
        assert result.exit_code == code, (raised, result.output)
        assert result.stderr.splitlines() == [f"charlm: error: {word}"] and result.stdout == ""


def test_score_of_an_empty_argument_is_the_empty_sentence(cli, tiny_run):
    """Catches: an empty sentence given as an argument dropped (and then 'holds no lines to score', exit 2)
    instead of scored as P(<eos> | <eos>), as the library and an empty line of --file do."""
    result = cli("score", tiny_run["run_dir"], "", "the cat.", "--json")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [r["text"] for r in records] == ["", "the cat."] and records[0]["tokens"] == 1
    model, codec, _ = load_run(tiny_run["run_dir"])
    (empty,) = score_sentences(model, codec, [""])
    assert records[0]["logprob"] == pytest.approx(empty.logprob, abs=1e-9)


def test_score_table_and_json_give_the_same_figures(cli, tiny_run):
    """Catches: the score table's per-token values not in log10 as documented, its totals or perplexities
    computed over the wrong count, and the JSON's perplexity / bits_per_token not those of the library."""
    from charlm.score import perplexity

    run, sentences = tiny_run["run_dir"], ["the cat sat.", "zebra dog"]  # z, b are outside the vocabulary
    records = json_lines(cli("score", run, *sentences, "--json", "--per-token").stdout)
    model, codec, _ = load_run(run)
    for r, e in zip(records, score_sentences(model, codec, sentences)):
        assert r["perplexity"] == pytest.approx(e.perplexity, rel=1e-12)
        assert r["bits_per_token"] == pytest.approx(-e.logprob / len(e.tokens) / math.log(2), rel=1e-9)
        known_here = [lp for t, lp in r["token_logprobs"] if t != "<unk>"]
        assert r["perplexity_no_oov"] == pytest.approx(perplexity(-math.fsum(known_here) / len(known_here)))
    table = cli("score", run, *sentences, "--per-token")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    for k, r in enumerate(records):
        words = codec.tokenizer.split(r["text"]) + ["<eos>"]  # an unknown one shown as written, then <unk>
        assert lines[2 * k] == "\t".join(f"{t if w == t else f'{w}({t})'}={lp / math.log(10):.4f}"
                                         for w, (t, lp) in zip(words, r["token_logprobs"]))
        assert f"ppl {r['perplexity']:9.3f}  bits/token {r['bits_per_token']:6.3f}  | {r['text']}" in lines[2 * k + 1]
    total = math.fsum(r["logprob"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    known = [lp for r in records for t, lp in r["token_logprobs"] if t != "<unk>"]
    assert sum(r["oov"] for r in records) > 0 and len(known) < tokens  # the two perplexities differ
    assert lines[-3] == (f"Total: ln P {total:.4f}  log10 P {total / math.log(10):.4f}  tokens {tokens}  "
                         f"OOV {sum(r['oov'] for r in records)}")
    assert lines[-2] == f"Perplexity including OOVs: {perplexity(-total / tokens):.4f}"
    assert lines[-1] == f"Perplexity excluding OOVs: {perplexity(-math.fsum(known) / len(known)):.4f}"


def test_eval_table_gives_the_figures_of_its_json(cli, write_corpus, tmp_path):
    """Catches: a line of the eval table printing another field, e.g. bits per token as bits per char (equal at
    char level, so a word-level run is used); only --json was checked against the library."""
    out = tmp_path / "words"
    trained = cli("train", "--config", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", out,
                  "--max-steps", 2, "--set", "data.level=word", "--set", "train.seq_len=4", "--quiet")
    assert trained.exit_code == 0, trained.output
    corpus = tmp_path / "corpus.txt"
    record = json.loads(cli("eval", out, "--file", corpus, "--json").stdout)
    assert record["bits_per_char"] != pytest.approx(record["bits_per_token"], rel=1e-3)
    assert record["lines"] > 1
    assert cli("eval", out, "--file", corpus).stdout.splitlines() == [
        f"file            {record['file']}",
        f"tokens          {record['tokens']:,} ({record['characters']:,} characters, {record['lines']:,} lines, "
        f"{record['oov']:,} OOV)",
        f"loss            {record['loss']:.4f} nats/token",
        f"perplexity      {record['perplexity']:.3f}",
        f"bits per token  {record['bits_per_token']:.4f}",
        f"bits per char   {record['bits_per_char']:.4f}",
    ]
    assert (record["streams"], record["exact"]) == (1, True)
    streams = cli("eval", out, "--file", corpus, "--streams", 3).stdout.splitlines()
    assert streams[-1] == ("streams         3, read side by side, each after the first from a fresh "
                           "state: not the exact likelihood of the file")
    side_by_side = json.loads(cli("eval", out, "--file", corpus, "--streams", 3, "--json").stdout)
    assert (side_by_side["streams"], side_by_side["exact"]) == (3, False)  # --json says so too
    # more streams asked than the file can fill: the figure is what was read
    many = json.loads(cli("eval", out, "--file", corpus, "--streams", 10 ** 6, "--json").stdout)
    assert 1 < many["streams"] <= record["tokens"] < 10 ** 6 and not many["exact"]


def test_figure_keeps_the_column_width_in_exponent_form():
    """Catches: _figure dropping the width of `spec` in exponent form, so a huge perplexity (1e20) breaks the
    score table's fixed-width 'ppl' column."""
    from charlm.cli import _figure

    assert _figure(1e20, "9.3f") == "    1e+20"
    assert _figure(1e20, ".2f") == "1e+20"
    assert _figure(-1e20, "9.3f") == "   -1e+20"


@pytest.mark.parametrize("command", ["score", "eval"])
def test_score_and_eval_refuse_an_errors_value_they_do_not_know(cli, tiny_run, command, tmp_path):
    """Catches: _check_errors letting 'ignore' through (cli.py:273): score / eval silently dropped bad bytes,
    which train refuses as a config error."""
    text = tmp_path / "t.txt"
    text.write_text("the cat.\n", encoding="utf-8")
    args = ("score", tiny_run["run_dir"], "--file", text) if command == "score" else (
        "eval", tiny_run["run_dir"], "--file", text)
    assert_usage_error(cli(*args, "--errors", "ignore"), "--errors must be strict or replace, got 'ignore'")


def test_score_batch_size_and_eval_streams_below_one_are_exit_2(cli, tiny_run, tmp_path):
    """Catches: `batch_size < 1` and `streams < 1` written `< 0` (cli.py:321, :399): 0 reached the library and
    failed as an unexpected error (exit 1, 'ValueError: range() arg 3 must not be zero') or ran anyway."""
    text = tmp_path / "t.txt"
    text.write_text("the cat.\n", encoding="utf-8")
    assert_usage_error(cli("score", tiny_run["run_dir"], "the cat.", "--batch-size", 0),
                          "--batch-size must be at least 1, got 0")
    assert_usage_error(cli("eval", tiny_run["run_dir"], "--file", text, "--streams", 0),
                          "--streams must be at least 1, got 0")


def test_eval_of_a_one_line_file_says_line_not_lines(cli, tiny_run, tmp_path):
    """Catches: the plural always printed (cli.py:410): '1 lines'."""
    text = tmp_path / "one.txt"
    text.write_text("the cat.\n", encoding="utf-8")
    result = cli("eval", tiny_run["run_dir"], "--file", text)
    assert result.exit_code == 0, result.output
    assert "(9 characters, 1 line, 0 OOV)" in result.stdout.splitlines()[1]


def test_a_prime_with_one_unknown_token_gets_a_singular_note(cli, tiny_run):
    """Catches: the note's 'are' chosen for one token too (cli.py:255): '1 token of --prime are not ...'."""
    result = cli("sample", tiny_run["run_dir"], "--prime", "the \u4f60", "--seed", 1, "--max-length", 5)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "charlm: note: 1 token of --prime is not in the run's vocabulary: the model reads it as <unk>"]


def test_figure_prints_an_infinite_value_as_inf_not_as_the_perplexity_bound():
    """Catches: the infinity branch of _figure removed (cli.py:144): an infinite train loss was printed as
    '>1e+304', the bound of a capped perplexity, which it is not."""
    assert _figure(float("inf"), ".4f") == "inf"
    assert _figure(float("inf"), "9.3f") == "      inf"
    assert _figure(float("-inf"), ".4f") == "-inf"


def test_info_notes_a_validation_slice_only_where_the_check_was_on_a_slice(cli, tmp_path):
    """Catches: the '(on the first N validation tokens)' note shown whenever train.eval_tokens is set
    (cli.py:460), also where eval_tokens covers the whole validation split and the check was on all of it."""
    from charlm.train import train
    from conftest import TINY_TEXT, tiny_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    train(tiny_config(train__max_steps=2, train__eval_interval=2, train__eval_tokens=100000), corpus, out=run,
          show_progress=False)
    lines = cli("info", run).stdout.splitlines()
    (val_line,) = [line for line in lines if line.startswith("val_loss")]
    assert "nats/token" in val_line and "validation tokens" not in val_line
