"""What a learner's walkthrough and a second review found (2026-12-07): each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import stat

import pytest

from charlm.runs import summarize

from conftest import PROJECT_ROOT, TINY_TEXT
from test_cli import assert_usage_error as one_error_line, cli  # noqa: F401 (cli is a fixture)

TINY_CONFIG = PROJECT_ROOT / "configs" / "tiny.yaml"


def test_a_new_run_into_a_folder_of_the_users_own_files_is_refused_and_replaces_none(cli, write_corpus, tmp_path):
    """Catches: `--out .` where the user keeps a config.yaml (the one passed to -c, say) and other files: the
    run replaced config.yaml with its resolved config and metrics.jsonl with its log, exit 0."""
    corpus = write_corpus(TINY_TEXT)
    folder = tmp_path / "project"
    folder.mkdir()
    mine = "# my own config, with comments\nmodel:\n  hidden_size: 16\n"
    (folder / "config.yaml").write_text(mine, encoding="utf-8")
    (folder / "metrics.jsonl").write_text("my notes\n", encoding="utf-8")
    line = one_error_line(cli("train", "-c", folder / "config.yaml", "--corpus", corpus, "--out", folder,
                              "--max-steps", 2, "--quiet"), "already holds config.yaml, metrics.jsonl")
    assert "choose another --out" in line
    assert (folder / "config.yaml").read_text(encoding="utf-8") == mine
    assert (folder / "metrics.jsonl").read_text(encoding="utf-8") == "my notes\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_new_run_into_a_folder_of_other_files_trains(cli, write_corpus, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n", encoding="utf-8")
    result = cli("train", "-c", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", folder, "--max-steps", 2,
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine\n" and (folder / "best").is_dir()


def test_a_mistyped_corpus_is_not_found_even_where_its_default_run_folder_holds_a_run(cli, write_corpus, tmp_path,
                                                                                       monkeypatch):
    """Catches: the default --out (runs/<the corpus's name>) checked before the corpus: a typo in the corpus's
    suffix was answered 'run folder runs/zh already holds a run: continue it with --resume'."""
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(TINY_TEXT, "zh.txt")
    assert cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--max-steps", 2, "--quiet").exit_code == 0
    assert (tmp_path / "runs" / "zh" / "best").is_dir()
    one_error_line(cli("train", "-c", TINY_CONFIG, "--corpus", tmp_path / "zh.tx", "--max-steps", 2, "--quiet"),
                   "file not found")


def test_corpus_dash_is_told_that_a_corpus_must_be_a_file(cli, tmp_path):
    """Catches: `--corpus -` answered 'file not found: -', where /dev/stdin is told why a pipe will not do."""
    line = one_error_line(cli("train", "-c", TINY_CONFIG, "--corpus", "-", "--out", tmp_path / "run", input="a\n"),
                          "standard input")
    assert "save it to a file" in line


def test_eval_reads_standard_input_as_a_file(cli, tiny_run):
    """`eval --file -` reads standard input as it reads a file (it said 'file not found: -')."""
    piped = cli("eval", tiny_run["run_dir"], "--file", "-", "--json", input=TINY_TEXT)
    assert piped.exit_code == 0, piped.output
    from_file = cli("eval", tiny_run["run_dir"], "--file", tiny_run["corpus"], "--json")
    a, b = json.loads(piped.stdout), json.loads(from_file.stdout)
    assert a["file"] == "-" and a["loss"] == b["loss"] and a["tokens"] == b["tokens"] == len(TINY_TEXT)
    assert "(standard input)" in cli("eval", tiny_run["run_dir"], "--file", "-", input=TINY_TEXT).stdout
    one_error_line(cli("eval", tiny_run["run_dir"], "--file", "-", input=""), "standard input holds no text")


def test_the_weights_are_as_readable_as_the_other_files_of_a_run(write_corpus, tmp_path):
    """Catches: model.safetensors written owner-only (safetensors' own file creation) while config.yaml,
    vocab.json and manifest.json follow the umask: others could read a run's config but not its model."""
    from charlm.train import train

    from conftest import tiny_config

    old = os.umask(0o022)
    try:
        train(tiny_config(train__max_steps=2), write_corpus(TINY_TEXT), out=tmp_path / "run", show_progress=False)
    finally:
        os.umask(old)
    for name in ("best", "last"):
        folder = tmp_path / "run" / name
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
        assert modes["model.safetensors"] == modes["config.yaml"] == 0o644, modes


def test_runs_lists_a_run_whose_checkpoint_lost_its_weights_as_broken(tiny_run, tmp_path):
    """Catches: `charlm runs` showing 'done' for a run whose best/model.safetensors is gone, which every
    command that loads it refuses."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], copy)
    assert summarize(copy).status == "done"
    (copy / "best" / "model.safetensors").unlink()
    s = summarize(copy)
    assert s.status == "broken" and s.problem == "no best/model.safetensors"


def test_an_adaptive_softmax_without_a_cluster_is_noted(cli, write_corpus, tmp_path):
    """Catches: model.softmax adaptive over a vocabulary below every cutoff (the defaults 2000,10000 on a
    small Chinese corpus, as the README suggests it) trained a full softmax without a word."""
    corpus = write_corpus(TINY_TEXT)
    result = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "a", "--max-steps", 2,
                 "--set", "model.softmax=adaptive", "--quiet")
    assert result.exit_code == 0, result.output
    assert "model.softmax adaptive has no cluster at a vocabulary of" in result.stderr
    assert "full softmax" in result.stderr
    split = cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", tmp_path / "b", "--max-steps", 2,
                "--set", "model.softmax=adaptive", "--set", "model.adaptive_cutoffs=5", "--quiet")
    assert split.exit_code == 0, split.output
    assert "no cluster" not in split.stderr


def _slice_run(cli, corpus, out, steps, lr):
    return cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--out", out, "--max-steps", steps, "--quiet",
               "--set", "train.eval_tokens=50", "--set", "train.eval_interval=5", "--set", f"train.lr={lr}",
               "--set", "train.schedule=constant")


def test_train_says_when_best_holds_the_final_model_and_info_gives_the_runs_own_steps(cli, write_corpus, tmp_path):
    """Catches: train's 'val loss 4.58 (best/ chosen at 4.54 on the first 200 validation tokens)' where best/
    is the final model, read as 'best/ is another, worse model'; and info showing best/'s step and time as
    if they were the run's (step 100, 0.7 s for a run of 1,349 steps and 15 s)."""
    corpus = write_corpus(TINY_TEXT)
    final = _slice_run(cli, corpus, tmp_path / "final", 5, 0.01)
    assert final.exit_code == 0, final.output
    assert "(best/ holds this model, chosen at" in final.stdout
    record = json.loads(cli("info", tmp_path / "final", "--json").stdout)
    assert record["step"] == record["run_steps"] == 5
    assert "the run went on" not in cli("info", tmp_path / "final").stdout
    # a rate far too high: the loss on the slice rises after the first checks, so best/ stays behind
    behind = _slice_run(cli, corpus, tmp_path / "behind", 40, 5.0)
    assert behind.exit_code == 0, behind.output
    record = json.loads(cli("info", tmp_path / "behind", "--json").stdout)
    assert record["run_steps"] == 40 and record["step"] < 40
    assert f"(best/ (step {record['step']:,}) chosen at" in behind.stdout
    head = cli("info", tmp_path / "behind").stdout.split("\nconfig:")[0]  # the lines above the config
    table = dict(line.split(None, 1) for line in head.splitlines())
    assert table["step"] == f"{record['step']:,} (this checkpoint's; the run went on to step 40)"
    assert table["elapsed"].endswith(f"(the run trained {record['run_elapsed']:.1f} s)")


def test_a_validation_file_in_another_encoding_than_the_corpus_is_told_to_match_it(cli, tmp_path):
    """Catches: --val in UTF-8 beside a GBK corpus (--encoding gbk) answered 'it reads as utf-8: pass
    --encoding utf-8', which moves the error onto the corpus: --encoding is the encoding of both."""
    text = "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n" * 40
    corpus, val = tmp_path / "zh_gbk.txt", tmp_path / "zh_utf8.txt"
    corpus.write_bytes(text.encode("gbk"))
    val.write_bytes(text.encode("utf-8"))
    line = one_error_line(cli("train", "-c", TINY_CONFIG, "--corpus", corpus, "--encoding", "gbk", "--val", val,
                              "--out", tmp_path / "run", "--max-steps", 2, "--quiet"), f"{val} is not valid gbk")
    assert "it reads as utf-8, but --encoding (gbk) is the encoding of the corpus and of --val alike" in line
    assert f"save {val} in gbk, as {corpus} is, or pass --encoding utf-8 if {corpus} reads so too" in line


@pytest.mark.parametrize("item, hint", [("train.lr＝0.1", "with the ASCII '=', not the full-width '＝'"),
                                        ("train．lr＝0.1", "with the ASCII '=' and '.', not the full-width '＝' and '．'"),
                                        ("model。hidden_size=16", "with the ASCII '.', not the full-width '。'")])
def test_a_set_written_with_full_width_forms_is_told_so(item, hint):
    """Catches: `--set train.lr＝0.1` (an input method's full-width '=') answered only 'expects
    section.field=value', which the user believes to have written."""
    from charlm.config import parse_override
    from charlm.errors import UsageError

    with pytest.raises(UsageError, match=hint):
        parse_override(item)


@pytest.mark.parametrize("name, problem", [
    ("x" * 300, "no best/xxxx"),                      # too long for the file system: is_file() raised
    ("../../../etc/passwd", "names an unexpected file"),  # outside the checkpoint: probed, and found, before
    ("trainer.pt", "no best/trainer.pt"),
])
def test_runs_lists_a_forged_manifest_as_broken_without_failing_or_looking_outside(tiny_run, tmp_path, name,
                                                                                   problem):
    """Catches: `charlm runs` failing as a whole (OSError, exit 1) on one manifest that lists a name too long
    for the file system, and counting a name outside the checkpoint folder as present."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], copy)
    manifest = json.loads((copy / "best" / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"][name] = "0" * 64
    (copy / "best" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    s = summarize(copy)
    assert s.status == "broken" and problem in s.problem


def test_a_run_stopped_before_its_start_record_does_not_block_the_same_command(write_corpus, tmp_path, monkeypatch):
    """Catches: a run interrupted after writing config.yaml and vocab.json but before its first metrics line
    left a folder that the same command then refused as the user's own files."""
    from charlm import data as data_module
    from charlm.train import train

    from conftest import tiny_config

    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(data_module, "line_starts", interrupted)
        m.setattr("charlm.train.line_starts", interrupted, raising=False)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(train__max_steps=2), corpus, out=run, show_progress=False)
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").read_text(encoding="utf-8") == ""
    result = train(tiny_config(train__max_steps=2), corpus, out=run, show_progress=False)
    assert result.steps == 2 and summarize(run).status == "done"


def test_a_signal_while_torch_is_imported_is_held_back_and_raised_after():
    """Catches: the raising handler firing inside `import torch`, where the import machinery and numpy
    swallowed the exception (a run trained to its end and exited 0) or turned it into another (RecursionError,
    'cannot load module more than once'): a signal in the block is held and raised once the block is done."""
    import signal as signals

    from charlm import cli as cli_module

    from charlm.errors import StopSignal

    with pytest.raises(StopSignal) as held:
        with cli_module._holding_signals():
            cli_module._on_signal(signals.SIGTERM, None)  # as a signal arriving mid-import: no exception here
            cli_module._on_signal(signals.SIGINT, None)
            reached = True
    assert reached and not cli_module._held["on"] and held.value.signum == signals.SIGTERM  # the first that came
    with pytest.raises(StopSignal) as at_once:
        cli_module._on_signal(signals.SIGINT, None)  # outside the block, raised at once as before
    assert at_once.value.signum == signals.SIGINT


def _python(code: str):
    """`code` run by a Python process of its own (signal handlers are the process's)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_after_the_first_signal_charlms_own_process_lets_a_second_one_end_it(tmp_path):
    """Catches: the raising handler left in place after 'interrupted ... saved', so that a second SIGINT in the
    interpreter's teardown printed a traceback from an atexit callback, or a second error line."""
    out = _python("import signal; from charlm import cli; signal.signal(signal.SIGTERM, cli._on_signal); "
                  "signal.signal(signal.SIGINT, cli._on_signal); cli._signals_end_the_process(); "
                  "a = signal.getsignal(signal.SIGTERM); cli._console['on'] = True; cli._signals_end_the_process(); "
                  "print(a is signal.SIG_DFL, signal.getsignal(signal.SIGINT) is signal.SIG_DFL, "
                  "signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    assert out.stdout.split() == ["False", "True", "True"], out.stderr


# ---------------------------------------------------------------- what a fault-injection audit found
def test_a_checkpoint_file_that_is_a_fifo_is_refused_not_waited_on(cli, tiny_run, tmp_path):
    """Catches: verify() hashing whatever the path opens: a FIFO (or a link to /dev/zero) in place of a
    checkpoint file held every command for ever; runs read a FIFO manifest the same way."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], copy)
    (copy / "best" / "vocab.json").unlink()
    os.mkfifo(copy / "best" / "vocab.json")
    one_error_line(cli("info", copy), "vocab.json is not a regular file")
    (copy / "last" / "manifest.json").unlink()
    os.mkfifo(copy / "last" / "manifest.json")
    s = summarize(copy)
    assert s.status == "broken" and "unreadable last/manifest.json" in s.problem
    one_error_line(cli("info", copy / "last"), "manifest.json is not a regular file")


def test_a_config_whose_aliases_nest_a_huge_list_is_refused_in_one_short_line(cli, write_corpus, tmp_path):
    """Catches: the refused value spelled out in full: YAML aliases nest a file of a few hundred bytes into
    a list of 10^10 items, which the message's repr wrote out (522 MB of 'one line', or out of memory)."""
    nested = '&a0 ["x","x","x","x","x","x","x","x","x","x"]'
    for k in range(1, 10):
        nested = f"&a{k} [{nested}" + f",*a{k - 1}" * 9 + "]"
    config = tmp_path / "bomb.yaml"
    config.write_text(f"model:\n  cell: {nested}\n", encoding="utf-8")
    line = one_error_line(cli("train", "-c", config, "--corpus", write_corpus(TINY_TEXT), "--out", tmp_path / "r"),
                          "model.cell must be a string, got [[")
    assert len(line) < 300


def test_a_token_cache_folder_left_by_a_killed_process_is_cleared_and_one_being_written_is_not(write_corpus,
                                                                                                 tmp_path):
    """Catches: `.tmp-*` folders that kill -9 left in the token cache staying there for good; and (a second
    review) a PID-based check that removed a live writer's folder from another PID namespace (a container
    with the host's name): what decides is the writer's lock on its folder."""
    import fcntl

    from charlm import data
    from charlm.config import DataConfig

    corpus = write_corpus(TINY_TEXT)
    entry = data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache").cache
    dead, alive = entry / ".tmp-somehost-1", entry / ".tmp-somehost-2"
    for stray in (dead, alive):
        stray.mkdir()
        (stray / "train.bin").write_bytes(b"partial")
    held = os.open(alive, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the process writing it holds it
    try:
        (entry / "meta.json").unlink()  # the entry is built again
        data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache")
    finally:
        os.close(held)
    assert not dead.exists() and (alive / "train.bin").exists() and (entry / "meta.json").exists()
    assert data._BUILDS == {}  # this process let go of its own lock


def test_a_disk_that_fills_while_a_token_cache_entry_is_finished_leaves_nothing_half_written(write_corpus, tmp_path,
                                                                                              monkeypatch):
    """Catches: the last writes of a cache entry (vocab.json, meta.json, the renames) outside the handling of
    a full disk: an OSError line that named neither the folder nor --cache-dir, and a .tmp folder left."""
    import errno

    from charlm import data
    from charlm.config import DataConfig
    from charlm.errors import RunFailure

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.os, "replace", full)
    with pytest.raises(RunFailure, match="could not write token files in .*No space left on device.*--cache-dir"):
        data.prepare(DataConfig(), write_corpus(TINY_TEXT), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/.tmp-*"))


def test_a_last_checkpoint_that_is_a_link_to_another_disk_does_not_stop_the_saves(write_corpus, tmp_path):
    """Catches: rmtree refusing the link that last/ had become (`Cannot call rmtree on a symbolic link`):
    every later save failed, and the advice to resume led back to the same failure."""
    from charlm.train import train

    from conftest import tiny_config

    corpus, run, elsewhere = write_corpus(TINY_TEXT), tmp_path / "run", tmp_path / "other-disk"
    elsewhere.mkdir()
    train(tiny_config(train__max_steps=4), corpus, out=run, show_progress=False)
    (run / "last").rename(elsewhere / "last")
    (run / "last").symlink_to(elsewhere / "last")
    result = train(tiny_config(train__max_steps=8), None, resume=run, show_progress=False)
    assert result.steps == 8 and summarize(run).status == "done"
    assert not (run / "last.old").exists() and not (run / "last.old").is_symlink()


def test_a_token_file_changed_in_the_cache_is_rebuilt_not_trained_on(write_corpus, tmp_path):
    """Catches: a cache entry trusted by its length alone: bytes of train.bin overwritten in place trained on
    other text in silence (and a resume passed its corpus check), or an id past the vocabulary failed with
    IndexError."""
    import torch

    from charlm import data
    from charlm.config import DataConfig

    corpus = write_corpus(TINY_TEXT)
    first = data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache")
    expected = first.train.clone()
    tokens = first.cache / "train.bin"
    damaged = bytearray(tokens.read_bytes())
    damaged[1:40] = bytes([250]) * 39
    tokens.write_bytes(bytes(damaged))
    again = data.prepare(DataConfig(), corpus, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train, expected) and tokens.read_bytes() != bytes(damaged)


def test_a_run_folder_removed_while_the_run_trains_stops_it_with_exit_1(write_corpus, tmp_path, monkeypatch):
    """Catches: `rm -rf RUN` while it trained ended in exit 0 without a word, the next save making the folder
    again with best/ and last/ alone (no config.yaml, vocab.json or metrics), which runs then called broken."""
    import shutil

    from charlm import train as train_module
    from charlm.errors import RunFailure

    from conftest import tiny_config

    run = tmp_path / "run"
    evaluate = train_module.evaluate

    def removing(*args, **kwargs):  # the first periodic check: the folder goes just before its save
        shutil.rmtree(run)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", removing)
    with pytest.raises(RunFailure, match="was removed while the run trained"):
        train_module.train(tiny_config(train__max_steps=20), write_corpus(TINY_TEXT), out=run, show_progress=False)
    assert not run.exists()


def test_an_empty_metrics_file_beside_the_users_own_config_is_still_the_users_folder(cli, write_corpus, tmp_path):
    """Catches (a second review): an empty metrics.jsonl taken alone as a run's, so that a folder holding the
    user's config.yaml and an empty metrics.jsonl was trained into and the config replaced."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own notes\n", encoding="utf-8")
    (folder / "metrics.jsonl").write_text("", encoding="utf-8")
    one_error_line(cli("train", "-c", TINY_CONFIG, "--corpus", write_corpus(TINY_TEXT), "--out", folder,
                       "--max-steps", 2, "--quiet"), "already holds config.yaml, metrics.jsonl")
    assert (folder / "config.yaml").read_text(encoding="utf-8") == "my: own notes\n"


def test_a_checkpoint_link_to_an_unmounted_disk_is_moved_aside_by_the_next_save(write_corpus, tmp_path):
    """Catches (a second review): a dangling link in place of best/ or last/ (its disk unmounted) made every
    save fail with 'Not a directory', since exists() is false for it and it was never moved aside."""
    import shutil

    from charlm.train import train

    from conftest import tiny_config

    corpus, run = write_corpus(TINY_TEXT), tmp_path / "run"
    train(tiny_config(train__max_steps=4), corpus, out=run, show_progress=False)
    shutil.rmtree(run / "best")
    (run / "best").symlink_to(tmp_path / "gone" / "best")
    result = train(tiny_config(train__max_steps=8), None, resume=run, show_progress=False)
    assert result.steps == 8 and (run / "best").is_dir() and not (run / "best").is_symlink()
    assert summarize(run).status == "done"


def test_a_second_signal_while_the_import_is_held_ends_the_process_at_once():
    """Catches (a second review): every signal held while torch is imported, so that Ctrl-C did nothing until
    an import on a stalled disk finished: the second one ends charlm's own process, as killed by it."""
    import signal as signals

    out = _python("import os, signal, time; from charlm import cli; cli._console['on'] = True; "
                  "signal.signal(signal.SIGTERM, cli._on_signal)\n"
                  "with cli._holding_signals():\n"
                  "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); print('held', flush=True)\n"
                  "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('not ended')\n")
    assert out.returncode == -signals.SIGTERM and out.stdout == "held\n", (out.returncode, out.stdout, out.stderr)
