"""What the audits of 2026-12-07 left open, mended the session after: each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_ROOT, TINY_TEXT
from helpers_reliability import child_env
from test_cli import cli, json_lines  # noqa: F401 (cli is a fixture)

TINY_CONFIG = PROJECT_ROOT / "configs" / "tiny.yaml"


def test_a_file_named_dash_is_reached_as_dot_slash_dash(cli, tiny_run, tmp_path, monkeypatch):
    """Catches: Typer's Path turns `./-` into `-`, so `score -f ./-` and `eval -f ./-` read standard input
    (and waited on a terminal) instead of the file named '-', and `train --corpus ./-` was refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_text("the cat sat\na dog\n", encoding="utf-8")
    scored = cli("score", tiny_run["run_dir"], "-f", "./-", "--json", input="something else\n")
    assert scored.exit_code == 0, scored.output
    assert [r["text"] for r in json_lines(scored.stdout)] == ["the cat sat", "a dog"]
    evaluated = cli("eval", tiny_run["run_dir"], "-f", "./-", "--json", input="something else\n")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["tokens"] == len("the cat sat\na dog\n")
    (tmp_path / "-").write_text(TINY_TEXT, encoding="utf-8")
    trained = cli("train", "-c", TINY_CONFIG, "--corpus", "./-", "--out", tmp_path / "run", "--max-steps", 2,
                  "--quiet")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "best").is_dir()
    # `-` alone is still standard input
    piped = cli("score", tiny_run["run_dir"], "-f", "-", "--json", input="a dog\n")
    assert [r["text"] for r in json_lines(piped.stdout)] == ["a dog"]


def _val_lines(run_dir):
    records = json_lines((run_dir / "metrics.jsonl").read_text(encoding="utf-8"))
    return [r for r in records if "val_loss" in r and "event" not in r]


def test_a_run_stopped_after_its_last_check_resumes_without_a_second_validation_line(cli, write_corpus, tmp_path):
    """Catches: a run killed after the periodic check at its last step, before the end record, measured and
    logged the same whole-split validation again when resumed (the check was kept in memory only)."""
    corpus, run_dir = write_corpus(TINY_TEXT), tmp_path / "run"
    args = ("-c", TINY_CONFIG, "--max-steps", 4, "--set", "train.eval_interval=2")
    assert cli("train", *args, "--corpus", corpus, "--out", run_dir, "--quiet").exit_code == 0
    before = _val_lines(run_dir)
    assert [r["step"] for r in before] == [2, 4] and not before[-1]["val_slice"]
    # what a kill -9 between that check and the end record leaves: no end record
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert json.loads(lines[-1])["event"] == "end"
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    resumed = cli("train", "--resume", run_dir, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert _val_lines(run_dir) == before
    assert json.loads(resumed.stdout)["val_loss"] == before[-1]["val_loss"]
    records = json_lines((run_dir / "metrics.jsonl").read_text(encoding="utf-8"))
    assert [r.get("event") for r in records[-2:]] == ["resume", "end"]


def test_a_resume_that_reads_another_validation_text_measures_it(cli, write_corpus, tmp_path):
    """The saved check stands only for the text it read: a resume with another --val validates afresh."""
    corpus, run_dir = write_corpus(TINY_TEXT), tmp_path / "run"
    val = write_corpus("the dog sat on the cat.\n" * 4, "val.txt")
    other = write_corpus("a dog and a cat.\n" * 4, "other.txt")
    args = ("-c", TINY_CONFIG, "--max-steps", 4, "--set", "train.eval_interval=2")
    assert cli("train", *args, "--corpus", corpus, "--val", val, "--out", run_dir, "--quiet").exit_code == 0
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    before = _val_lines(run_dir)
    resumed = cli("train", "--resume", run_dir, "--val", other, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    after = _val_lines(run_dir)
    assert after[:-1] == before and after[-1]["step"] == 4 and after[-1]["val_loss"] != before[-1]["val_loss"]
    assert json.loads(resumed.stdout)["val_loss"] == after[-1]["val_loss"]


def test_a_signal_during_the_final_save_lets_the_save_finish_and_the_run_end_as_done(tmp_path, monkeypatch):
    """The audit's question, answered as designed: a signal that comes while the end of a run saves its
    checkpoints neither cuts a checkpoint short nor turns a finished run into an interrupted one: the run has
    done its budget, both checkpoints hold its last step, and the command ends at once, with exit 0."""
    import signal

    import yaml

    from charlm import checkpoint as ckpt
    from charlm import train as train_mod
    from charlm.checkpoint import load_checkpoint
    from charlm.config import load_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["train"].update(max_steps=6, eval_interval=0)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    original, saved = ckpt.save_checkpoint, []

    def interrupted_save(run_dir, name, *args, **kwargs):
        if not saved:
            signal.raise_signal(signal.SIGINT)  # caught by the trainer's handler: the save goes on
        saved.append(name)
        return original(run_dir, name, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", interrupted_save)
    handler = signal.getsignal(signal.SIGINT)
    result = train_mod.train(load_config(config), corpus, tmp_path / "run", show_progress=False)
    assert result.stopped_by == "max_steps" and result.steps == 6 and saved == ["best", "last"]
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handler is gone with the run
    for name in saved:
        assert load_checkpoint(tmp_path / "run", name).manifest["step"] == 6


def test_runs_of_a_checkpoint_folder_lists_the_run_that_holds_it(cli, tiny_run):
    """Catches: `charlm runs runs/x/best` answered 'no runs under runs/x/best' with exit 0, where every other
    command reads that folder as its run."""
    whole = json_lines(cli("runs", tiny_run["run_dir"], "--json").stdout)
    assert len(whole) == 1
    for name in ("best", "last"):
        listed = cli("runs", tiny_run["run_dir"] / name, "--json")
        assert listed.exit_code == 0, listed.output
        assert json_lines(listed.stdout) == whole


def test_a_resume_of_a_run_still_training_before_its_first_checkpoint_says_so(cli, write_corpus, tmp_path):
    """Catches: `--resume RUN` while RUN trains but has saved nothing yet was told 'RUN holds no checkpoint yet
    ... a run saves one at each validation check', as if the run had died: the lock is checked first now."""
    pytest.importorskip("fcntl")  # no run folder locks without flock (Windows)
    from charlm.train import lock_run_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")  # what a run writes first
    held: list[int] = []
    lock_run_folder(run_dir, held)  # as the training process holds it
    try:
        assert held
        result = cli("train", "--resume", run_dir, "--max-steps", 2)
    finally:
        for fd in held:
            os.close(fd)
    assert result.exit_code == 2 and "is being trained by another charlm process right now" in result.stderr
    assert "no checkpoint yet" in cli("train", "--resume", run_dir, "--max-steps", 2).stderr  # once it is free


def test_a_diverged_models_score_table_stays_readable(cli, tiny_run, monkeypatch):
    """Catches: `ln P -1566670577542003381980257140604928.0000` in the score table of a run whose loss blew up
    (its perplexity column already went to exponent form)."""
    import math

    from charlm import score as score_mod

    real = score_mod.score_sentences

    def blown_up(*args, **kwargs):
        out = []
        for r in real(*args, **kwargs):
            lps = [lp * 1e32 for lp in r.token_logprobs]
            total = math.fsum(lps)
            out.append(score_mod.SentenceScore(r.text, r.tokens, lps, total, total / math.log(10), r.oov,
                                               math.inf, math.inf, -total / len(lps) / math.log(2)))
        return out

    monkeypatch.setattr(score_mod, "score_sentences", blown_up)
    result = cli("score", tiny_run["run_dir"], "the cat sat.", "--per-token")
    assert result.exit_code == 0, result.output
    assert max(len(word) for word in result.stdout.split()) < 16, result.stdout
    assert "e+3" in result.stdout.splitlines()[0] and "e+3" in result.stdout.splitlines()[1]


def test_a_resume_with_no_step_left_shows_no_speed(cli, tiny_run, tmp_path):
    """Catches: `tokens/second   0` after a resume that had nothing left to train."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run)
    result = cli("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert "tokens/second   - (no step run)" in result.stdout.splitlines()


@pytest.mark.parametrize("text", ["train:\n", "::\n", "model: 5\n", "data:\n  level: char\n"])
def test_runs_lists_a_run_whose_config_lost_its_sections_as_broken(cli, tiny_run, tmp_path, text):
    """Catches: a config.yaml cut short after `train:` (or one that parses to some other mapping) listed as
    `done`, with '-' in its columns and no word of why."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run)
    (run / "config.yaml").write_text(text, encoding="utf-8")
    (record,) = json_lines(cli("runs", run, "--json").stdout)
    assert record["status"] == "broken" and "config.yaml" in record["problem"]


def test_an_empty_sample_of_a_vocabulary_of_specials_says_why(cli, write_corpus, tmp_path):
    """Catches: a run whose data.min_freq left only <unk> and <eos> sampling '' with the note that a corpus
    with blank lines may end a line at once, where <eos> was the only token it could draw."""
    run = tmp_path / "run"
    trained = cli("train", "-c", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", run, "--max-steps", 2,
                  "--set", "data.min_freq=100000", "--quiet")
    assert trained.exit_code == 0, trained.output
    result = cli("sample", run, "--seed", 1)
    assert result.exit_code == 0 and result.stdout == "\n"
    assert "vocabulary holds only <eos> and <unk>" in result.stderr and "blank lines" not in result.stderr


@pytest.mark.parametrize("settings, steps", [
    (("--set", "train.eval_tokens=50"), 4),  # checks on a slice: the final one reads the whole split
    ((), 5),                                 # a last step that is no check step
])
def test_a_run_stopped_after_its_final_validation_resumes_without_logging_it_again(cli, write_corpus, tmp_path,
                                                                                   settings, steps):
    """Catches (second review): only the periodic check was kept, so a run with train.eval_tokens (both shipped
    configs) or a last step off the interval logged its whole-split final validation twice after the resume."""
    corpus, run_dir = write_corpus(TINY_TEXT * 3), tmp_path / "run"
    args = ("-c", TINY_CONFIG, "--max-steps", steps, "--set", "train.eval_interval=2", *settings)
    assert cli("train", *args, "--corpus", corpus, "--out", run_dir, "--quiet").exit_code == 0
    before = _val_lines(run_dir)
    assert before[-1]["step"] == steps and before[-1]["val_slice"] is False
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")  # the end record lost
    resumed = cli("train", "--resume", run_dir, "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert _val_lines(run_dir) == before
    assert json.loads(resumed.stdout)["val_loss"] == before[-1]["val_loss"]


def test_a_worker_of_nproc_leaves_the_lock_check_to_rank_0(cli, tmp_path, monkeypatch):
    """Catches (second review): every torchrun worker checked the lock before resuming, so a worker that lagged
    behind rank 0's lock (NCCL's start does not wait) refused the job as 'being trained by another process'."""
    pytest.importorskip("fcntl")
    from charlm.train import lock_run_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    held: list[int] = []
    lock_run_folder(run_dir, held)  # rank 0's lock
    monkeypatch.setenv("RANK", "1")
    try:
        result = cli("train", "--resume", run_dir, "--max-steps", 2)
    finally:
        for fd in held:
            os.close(fd)
    assert result.exit_code == 2 and "being trained" not in result.stderr and "no checkpoint yet" in result.stderr


def test_runs_of_a_checkpoint_folder_named_as_dot_or_through_a_link(cli, tiny_run, tmp_path, monkeypatch):
    """`runs .` inside best/ and `runs LINK` for a link to a run's best/ list that run, under its own name."""
    expected = json_lines(cli("runs", tiny_run["run_dir"], "--json").stdout)[0]["name"]
    monkeypatch.chdir(tiny_run["run_dir"] / "best")
    assert [r["name"] for r in json_lines(cli("runs", ".", "--json").stdout)] == [expected]
    link = tmp_path / "scratch" / "best"
    link.parent.mkdir()
    link.symlink_to(tiny_run["run_dir"] / "best")
    (record,) = json_lines(cli("runs", link, "--json").stdout)
    assert record["name"] == expected and record["status"] == "done"


def test_per_token_written_forms_follow_each_token_not_only_the_count():
    """Catches (second review): lowering that grows one token and shrinks another kept the counts equal, and
    the typed tokens were shown against the wrong ones."""
    from charlm.cli import _written
    from charlm.tokenizer import Tokenizer

    tokenizer = Tokenizer("char", lowercase=True)
    text = "İT\u0308"  # İ lowers to two characters, T + U+0308 lowers and composes to one
    tokens = tokenizer.split(text) + ["<eos>"]
    assert len(tokens) == 4
    assert _written(tokenizer, text, tokens) == tokens  # no typed token lowers to the one at its place
    word = Tokenizer("word", lowercase=True)
    assert _written(word, "The Cat", ["the", "cat", "<eos>"]) == ["The", "Cat", "<eos>"]


def test_once_a_command_is_done_a_signal_ends_the_process_without_a_traceback(tmp_path, monkeypatch):
    """Catches (distributed audit): a rank that failed got torchrun's SIGTERM while its atexit functions ran,
    with charlm's raising handler still in place: 'Exception ignored in atexit callback' and a traceback. A
    late Ctrl-C after a run's end record did the same in one process."""
    import signal
    import sys

    from charlm import cli as cli_mod

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["charlm", "runs", str(tmp_path)])
    try:
        with pytest.raises(SystemExit) as done:
            cli_mod.main()
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
        cli_mod._console["on"] = False
    assert done.value.code == 0 and after == (signal.SIG_DFL, signal.SIG_DFL)


def test_the_score_table_escapes_control_characters_and_cuts_a_long_line(cli, tiny_run):
    """Catches: the table echoed each sentence raw and whole, so a scored file's terminal escape sequence
    reached the terminal, a tab token split the tab-separated --per-token line, and a line of a megabyte
    was printed whole on its row; --json keeps the text as it is."""
    run = tiny_run["run_dir"]
    table = cli("score", run, "a \x1b[31mred\x1b[0m\tcat", "--per-token")
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.stdout
    per_token, row = table.stdout.splitlines()[:2]
    assert row.endswith("| a \\x1b[31mred\\x1b[0m\\tcat")
    assert len(per_token.split("\t")) == len("a \x1b[31mred\x1b[0m\tcat") + 1  # one cell a token, <eos> too
    reordered = cli("score", run, "abc \u202edcba")  # a right-to-left override, which reorders what follows
    assert reordered.stdout.splitlines()[0].endswith("| abc \\u202edcba") and "\u202e" not in reordered.stdout
    long = "the cat sat " * 1000
    cut = cli("score", run, long).stdout.splitlines()[0]
    assert cut.endswith(f"| {long[:300]}... ({len(long):,} characters in all)")
    whole = cli("score", run, long, "a \x1b", "--json")
    assert [r["text"] for r in json_lines(whole.stdout)] == [long, "a \x1b"]


@pytest.mark.parametrize("command, usage", [
    ("sample", "sample [OPTIONS] RUN_DIR"), ("score", "score [OPTIONS] RUN_DIR [TEXT]..."),
    ("eval", "eval [OPTIONS] RUN_DIR"), ("runs", "runs [OPTIONS] [FOLDER]"),
    ("plot", "plot [OPTIONS] RUN_DIR..."), ("train", "train [OPTIONS]")])
def test_usage_lines_name_the_arguments_as_the_readme_does(command, usage):
    """Catches: Typer 0.2x wrote a required argument as `{run_dir}` (a set to pick from, or braces to type)
    and the sentences as `[text]...`, where the READMEs write `charlm score RUN_DIR [TEXT ...]`."""
    shown = subprocess.run([sys.executable, "-m", "charlm", command, "-h"], capture_output=True, text=True,
                           env=child_env(), cwd=PROJECT_ROOT, timeout=120)
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[0] == f"Usage: python -m charlm {usage}"  # the console script says charlm
    if command not in ("train", "runs"):  # the missing argument named as the usage line names it
        missing = subprocess.run([sys.executable, "-m", "charlm", command], capture_output=True, text=True,
                                 env=child_env(), cwd=PROJECT_ROOT, timeout=120)
        name = usage.split("] ")[1].split(" ")[0].strip("[].")
        assert (missing.returncode, missing.stderr) == (2, f"charlm: error: Missing argument {name}. "
                                                           f"(see python -m charlm {command} -h)\n")


def test_no_install_hint_asks_pip_for_the_package_named_charlm_on_pypi():
    """Catches: `plot` without matplotlib, `export --format onnx` without onnx and the READMEs said
    `pip install 'charlm[plot]'`, which fetches PyPI's package named charlm, another project, in place of
    this one; the hints name what is missing, and the READMEs install the extras from charlm's folder."""
    from charlm import export, plot

    assert plot.INSTALL_HINT == "pip install 'matplotlib>=3.7'"
    assert export.INSTALL_HINT == "pip install 'onnx>=1.15' 'onnxruntime>=1.17'"
    for path in [*(PROJECT_ROOT / "charlm").glob("*.py"), *PROJECT_ROOT.glob("README*.md"),
                 *(PROJECT_ROOT / "docs").glob("*.md")]:
        text = path.read_text(encoding="utf-8")
        assert "install 'charlm[" not in text and 'install "charlm[' not in text, path.name


@pytest.mark.parametrize("settings", [("model.cell=lstm", "model.impl=torch"), ("model.cell=rnn", "model.impl=custom"),
                                      ("model.cell=gru", "model.impl=custom", "model.gru_form=torch"),
                                      ("model.cell=gru", "model.impl=torch")])
def test_a_trained_run_reads_the_same_on_custom_and_torch_cells(cli, write_corpus, tmp_path, settings):
    """Catches: a learner could not check a trained model's hand-written cells against torch.nn's without
    writing Python (the config of a run is sealed by its checksum): eval, score and sample take --impl."""
    import torch.nn as nn

    from charlm.checkpoint import load_run

    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"
    sets = [a for s in settings for a in ("--set", s)]
    assert cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", run, "--max-steps", 5, "--quiet",
               *sets).exit_code == 0
    torch_classes = (nn.RNN, nn.GRU, nn.LSTM)
    for impl in ("custom", "torch"):  # each built on the cells asked for, whichever the run trained on
        model = load_run(run, impl=impl)[0]
        assert isinstance(model.rnn, torch_classes) == (impl == "torch") and model.cfg.impl == impl
    losses = {impl: json.loads(cli("eval", run, "-f", corpus, "--json", "--impl", impl).stdout)["loss"]
              for impl in ("custom", "torch")}
    assert losses["custom"] == pytest.approx(losses["torch"], abs=1e-5)
    scores = {impl: json_lines(cli("score", run, "the cat sat", "--json", "--impl", impl).stdout)[0]["logprob"]
              for impl in ("custom", "torch")}
    assert scores["custom"] == pytest.approx(scores["torch"], abs=1e-5)
    sampled = cli("sample", run, "--impl", "torch" if "model.impl=custom" in settings else "custom", "--seed", 1,
                  "--max-length", 20)
    assert sampled.exit_code == 0, sampled.output


def test_impl_refuses_what_the_other_cells_cannot_compute(cli, write_corpus, tmp_path):
    """The classic-form GRU (the custom default) has no nn.GRU counterpart: --impl torch is refused in one
    line, not answered with another model's probabilities; a misspelt impl too."""
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"
    assert cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", run, "--max-steps", 2, "--quiet",
               "--set", "model.cell=gru", "--set", "model.impl=custom").exit_code == 0
    for impl, fragment in (("torch", "the classic form (gru_form: classic), which nn.GRU does not compute"),
                           ("tf", "--impl must be custom or torch, got 'tf'")):
        refused = cli("eval", run, "-f", corpus, "--impl", impl)
        assert refused.exit_code == 2 and fragment in refused.stderr and not refused.stdout
        assert len(refused.stderr.splitlines()) == 1
    assert cli("eval", run, "-f", corpus, "--impl", "custom").exit_code == 0  # its own: nothing to refuse


@pytest.mark.parametrize("args, name", [
    (("train", "--corpus", "CORPUS", "--out", ""), "'--out'"), (("train", "--corpus", ""), "'--corpus'"),
    (("train", "--resume", ""), "'--resume'"), (("sample", ""), "'RUN_DIR'"), (("score", "", "a cat"), "'RUN_DIR'"),
    (("eval", "RUN", "-f", ""), "'--file' / '-f'"), (("runs", ""), "'FOLDER'"), (("info", ""), "'RUN_DIR'")])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(cli, tiny_run, write_corpus, tmp_path,
                                                                 monkeypatch, args, name):
    """Catches: Path("") is ".", so `--out "$RUN"` with RUN unset trained into the current folder, and
    `charlm sample "$RUN"` said that '.' held no checkpoint."""
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(TINY_TEXT)
    args = [corpus if a == "CORPUS" else tiny_run["run_dir"] if a == "RUN" else a for a in args]
    refused = cli(*args)
    assert refused.exit_code == 2 and not refused.stdout
    assert f"Invalid value for {name}: an empty path (is a shell variable unset?)" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [corpus] if p.parent == tmp_path)


def test_a_validation_text_mostly_outside_the_vocabulary_gets_a_note(cli, write_corpus, tmp_path):
    """Catches: --val of English text on a Chinese corpus trained and reported a validation loss of mostly
    <unk> tokens without a word, though eval and score count them."""
    corpus = write_corpus("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n" * 40, name="zh.txt")
    english = write_corpus("the cat sat on the mat\n" * 10, name="en.txt")
    trained = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--val", english, "--out", tmp_path / "a",
                  "--max-steps", 2, "--quiet")
    assert trained.exit_code == 0, trained.output
    assert (f"charlm: note: 96% of the validation text's tokens are not in the training text's vocabulary and are "
            f"read as <unk>: its loss says little about the model; is --val {english} text of the same kind as "
            f"{corpus}?") in trained.stderr  # 220 of the 230 tokens: the 10 line ends are known
    same_kind = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--val", corpus, "--out", tmp_path / "b",
                    "--max-steps", 2, "--quiet")
    assert same_kind.exit_code == 0 and "<unk>" not in same_kind.stderr
    # a vocabulary cut short makes <unk> of most of any text: its own note names the setting, not the --val file
    capped = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--val", english, "--out", tmp_path / "c",
                 "--max-steps", 2, "--quiet", "--set", "data.min_freq=100000")
    assert capped.exit_code == 0 and "validation text's tokens" not in capped.stderr
    assert "the vocabulary holds only <eos> and <unk> (data.min_freq 100000: lower it)" in capped.stderr


def test_a_progress_pipe_that_closes_does_not_end_the_run(write_corpus, tmp_path):
    """Catches: `charlm train ... 2>&1 | head -2` ended the run with exit 1 once head had its lines: the next
    progress line's EPIPE was an error, and nothing was saved (no last/, no best/, no end record)."""
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "train", "-c", str(TINY_CONFIG), "--corpus", str(corpus),
                             "--out", str(run), "--max-steps", "300", "--set", "train.log_interval=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(), cwd=PROJECT_ROOT)
    assert proc.stderr.readline().startswith(b"step 1 ")
    proc.stderr.close()  # the reader goes away, as head does
    assert proc.wait(timeout=120) == 0
    records = json_lines((run / "metrics.jsonl").read_text(encoding="utf-8"))
    assert records[-1]["event"] == "end" and records[-1]["steps"] == 300
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "model.safetensors").is_file()


@pytest.mark.parametrize("resume", [False, True])
def test_a_signal_before_the_first_step_says_that_nothing_was_saved(cli, write_corpus, tmp_path, monkeypatch,
                                                                    resume):
    """Catches: a Ctrl-C while a new run read its corpus said only 'interrupted', though the README promises
    that a stopped run saves last/ for --resume, and the folder was gone; a resume keeps the plain word (its
    last/ is as it was)."""
    import signal

    from charlm import train as train_mod
    from charlm.errors import StopSignal

    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"
    if resume:
        assert cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", run, "--max-steps", 2,
                   "--quiet").exit_code == 0

    def stopped(*args, **kwargs):  # what the command line's handler raises for a Ctrl-C there
        raise StopSignal(signal.SIGINT)

    monkeypatch.setattr(train_mod, "prepare", stopped)
    args = ("--resume", run, "--max-steps", 4) if resume else ("-c", TINY_CONFIG, "--corpus", corpus, "--out", run)
    result = cli("train", *args, "--quiet")
    assert result.exit_code == 130
    if resume:
        assert "before the run's first step" not in result.stderr and (run / "last").is_dir()
    else:
        assert result.stderr == ("charlm: error: interrupted by SIGINT before the run's first step: nothing was "
                                 "saved (run the command again)\n")
        assert not run.exists()


def test_a_huge_vocabulary_and_a_long_final_validation_are_announced(cli, write_corpus, tmp_path, monkeypatch):
    """Catches (the scale audit): a corpus of a million distinct words trained a model of 246M parameters
    without a word, and a final validation of 25M tokens ran for ten minutes after --max-time 30 in silence.
    The thresholds are lowered here so that a small corpus shows both notes."""
    from charlm import train as train_mod

    monkeypatch.setattr(train_mod, "BIG_VOCABULARY", 50)
    monkeypatch.setattr(train_mod, "FINAL_NOTE_TOKENS", 10)
    corpus = write_corpus(" ".join(f"w{i}" for i in range(80)) + "\n" + TINY_TEXT)
    trained = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "run", "--max-steps", 2,
                  "--set", "data.level=word")
    assert trained.exit_code == 0, trained.output
    vocab = len(json.loads((tmp_path / "run" / "vocab.json").read_text(encoding="utf-8"))["tokens"])
    assert (f"charlm: note: the vocabulary holds {vocab:,} tokens: its embedding and output layer take "
            f"{vocab * (16 + 1 + 32) / 1e6:,.1f}M parameters or so") in trained.stderr  # tiny: E 16, H 32
    assert "charlm: note: the final validation reads the whole split, " in trained.stderr
    quiet = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "q", "--max-steps", 2,
                "--set", "data.level=word", "--set", "data.max_size=60", "--quiet")
    assert "vocabulary holds" not in quiet.stderr and "final validation" not in quiet.stderr


def test_the_word_level_reader_searches_only_the_new_text_for_a_cut():
    """Catches (the scale audit): at word level a word without white space was searched again, character by
    character in Python, with every new block read: a 40 MB word took 56 s to tokenize, four times as long
    as one of 20 MB. The text kept back from the last block has no cut in it, so it is not searched."""
    from charlm.data import _safe_cut

    looked = []

    class Counted(str):
        def __getitem__(self, i):
            looked.append(i)
            return super().__getitem__(i)

    kept = "x" * 5000  # the last call's text after its cut: neither a line end nor white space
    assert _safe_cut(Counted(kept + "yyyy zz"), "word", len(kept)) == len(kept) + 5
    assert looked and min(looked) >= len(kept)
    looked.clear()
    assert _safe_cut(Counted(kept + "y" * 10), "word", len(kept)) == 0 and len(looked) == 10


def test_a_resume_without_cache_dir_reads_the_run_s_own_token_cache(cli, write_corpus, tmp_path, monkeypatch):
    """Catches (the scale audit): a run trained with --cache-dir and resumed without it tokenized its corpus
    again into ./.charlm-cache, a second full copy (480 MB and 8 s on a 500 MB corpus), without a word."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHARLM_CACHE_DIR", raising=False)
    corpus, run, cache = write_corpus(TINY_TEXT), tmp_path / "run", tmp_path / "elsewhere"
    assert cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", run, "--max-steps", 2, "--quiet",
               "--cache-dir", cache).exit_code == 0
    entries = sorted(p.name for p in cache.iterdir())
    resumed = cli("train", "--resume", run, "--max-steps", 4, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert not (tmp_path / ".charlm-cache").exists() and sorted(p.name for p in cache.iterdir()) == entries
    shutil.rmtree(cache)  # a cache folder that is gone: the default one, as before
    again = cli("train", "--resume", run, "--max-steps", 6, "--quiet")
    assert again.exit_code == 0, again.output
    assert (tmp_path / ".charlm-cache").is_dir()


def test_eval_holds_its_file_as_compact_ids_read_in_place():
    """Catches (the scale audit): `eval` of a 200 MB file held 5.9 GB, about 29 bytes a character: the ids in
    int64, then copied into the one row of the stream. Now one byte a character at character level, no copy."""
    from charlm.data import encode, eval_streams
    from charlm.tokenizer import TextCodec, Tokenizer, Vocabulary

    codec = TextCodec(Tokenizer("char"), Vocabulary.build({c: 1 for c in "abc "}, 1, None))
    ids = encode(codec, "abc cab\nba\n", compact=True)
    assert ids.dtype == torch.uint8 and torch.equal(ids.long(), encode(codec, "abc cab\nba\n"))
    rows, mask = eval_streams(ids, 1)
    assert rows.data_ptr() == ids.data_ptr() and rows.shape == (1, ids.numel())
    assert mask.tolist() == [[False] + [True] * (ids.numel() - 1)]
    many, _ = eval_streams(ids, 3)  # several streams: the rows as before
    assert many.shape[0] == 3 and many.dtype == torch.uint8


def test_a_utf8_file_with_one_latin1_line_is_not_told_to_read_as_cp1252(cli, tmp_path):
    """Catches (the scale audit): a large UTF-8 file with one Latin-1 line far from its other letters was told
    'it reads as cp1252: pass --encoding cp1252', which would misread every UTF-8 letter before it."""
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(("café crème\n" + "plain ascii line\n" * 10000).encode("utf-8") + "naïve\n".encode("latin-1"))
    refused = cli("train", "-c", TINY_CONFIG, "--corpus", mixed, "--out", tmp_path / "run", "--max-steps", 1)
    assert refused.exit_code == 2 and "cp1252" not in refused.stderr
    assert "the text before it has letters in UTF-8, so the file mixes encodings: --errors replace" in refused.stderr
    latin = tmp_path / "latin.txt"  # a Latin-1 file, ASCII up to its first accented letter: the hint stays
    latin.write_bytes(("plain\n" * 100).encode() + "naïve café\n".encode("latin-1"))
    told = cli("train", "-c", TINY_CONFIG, "--corpus", latin, "--out", tmp_path / "run2", "--max-steps", 1)
    assert told.exit_code == 2 and "pass --encoding cp1252" in told.stderr
    latin.write_bytes(b"\xef\xbb\xbf" + latin.read_bytes())  # a byte-order mark is no letter read before
    marked = cli("train", "-c", TINY_CONFIG, "--corpus", latin, "--out", tmp_path / "run3", "--max-steps", 1)
    assert marked.exit_code == 2 and "the text before it has letters" not in marked.stderr
