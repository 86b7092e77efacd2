"""charlm runs: finding run folders and summarising them from their text files alone."""

import io
import json
import math
import shutil
from pathlib import Path

import pytest

from typer.testing import CliRunner

from charlm import checkpoint
from charlm import runs as runs_mod
from charlm.cli import app
from charlm.config import load_config
from charlm.errors import UsageError
from charlm.runs import find_runs, list_runs, read_metrics, summarize
from charlm.train import train


def make_corpus(path, lines=120):
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
    text = "\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6)) for i in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def make_run(tmp_path, out, *settings, steps=6):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        make_corpus(corpus)
    overrides = ["model.hidden_size=16", "model.embedding_size=8", "train.batch_size=2", "train.seq_len=8",
                 "train.eval_interval=3", "train.log_interval=2", "model.device=cpu", *settings]
    cfg = load_config(overrides=overrides, extra={"train.max_steps": steps})
    return train(cfg, corpus, out=out, show_progress=False)


def test_file_names_agree_with_checkpoint_module():
    assert runs_mod.CONFIG_FILE == checkpoint.CONFIG_FILE
    assert runs_mod.MANIFEST_FILE == checkpoint.MANIFEST_FILE
    assert set(runs_mod.CHECKPOINTS) == set(checkpoint.NAMES)


def test_summary_reads_config_metrics_and_manifest(tmp_path):
    result = make_run(tmp_path, tmp_path / "runs" / "a", "model.cell=gru", "model.layers=2")
    s = summarize(tmp_path / "runs" / "a")
    assert (s.status, s.cell, s.impl, s.layers, s.hidden_size, s.level) == ("done", "gru", "torch", 2, 16, "char")
    assert s.parameters == result.parameters
    assert s.steps == result.steps == 6
    assert s.best_val_loss == result.best_val_loss
    vals = read_metrics(tmp_path / "runs" / "a").val
    assert s.best_val_bpc == min(vals, key=lambda r: r["val_loss"])["val_bpc"]
    recorded = s.elapsed  # read from the run's metrics, not measured here
    assert recorded is not None and recorded > 0


def test_runs_are_found_below_a_folder_and_sorted_by_a_column(tmp_path):
    make_run(tmp_path, tmp_path / "runs" / "short", steps=2)
    make_run(tmp_path, tmp_path / "runs" / "group" / "long", steps=8)
    found = find_runs(tmp_path / "runs")
    assert sorted(p.name for p in found) == ["long", "short"]
    by_steps = list_runs(tmp_path / "runs", "steps")
    assert [r.name for r in by_steps] == ["short", "group/long"]
    assert [r.name for r in list_runs(tmp_path / "runs", "-steps")] == ["group/long", "short"]
    # a run folder given directly lists itself
    assert [r.name for r in list_runs(tmp_path / "runs" / "short")] == ["short"]


def test_broken_and_unfinished_runs_are_listed_not_fatal(tmp_path):
    make_run(tmp_path, tmp_path / "runs" / "good")
    bad = tmp_path / "runs" / "bad"
    (bad / "last").mkdir(parents=True)
    (bad / "config.yaml").write_text("model: [unclosed\n", encoding="utf-8")
    (bad / "metrics.jsonl").write_text('{"step": 2, "elapsed": 1.0, "train_loss": 3.0}\n{"step": 4, "ela', encoding="utf-8")
    unfinished = tmp_path / "runs" / "unfinished"
    make_run(tmp_path, unfinished)
    lines = (unfinished / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (unfinished / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # drop the end record

    by_name = {r.name: r for r in list_runs(tmp_path / "runs")}
    assert by_name["good"].status == "done"
    assert by_name["unfinished"].status == "unfinished"
    assert by_name["bad"].status == "broken"
    # unfinished too (its metrics have no end record), but broken: an unreadable config, an empty last/
    assert "config.yaml" in by_name["bad"].problem and "no last/manifest.json" in by_name["bad"].problem
    assert by_name["bad"].steps == 2  # what could be read is still shown
    assert read_metrics(bad).bad_lines == 1


def test_a_run_stopped_before_its_first_checkpoint_is_unfinished_not_broken(tmp_path):
    """A run still training, or killed, before its first save: metrics without an end record and no
    checkpoint folder. A finished run without a checkpoint is still broken."""
    run = tmp_path / "runs" / "early"
    make_run(tmp_path, run)
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # no end record
    for name in ("best", "last"):
        shutil.rmtree(run / name)
    (summary,) = list_runs(tmp_path / "runs")
    assert (summary.status, summary.problem) == ("unfinished", None)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")  # the end record back
    (summary,) = list_runs(tmp_path / "runs")
    assert summary.status == "broken" and summary.problem == "no checkpoint"


def test_a_new_run_neither_holds_other_runs_nor_lies_inside_one(tmp_path):
    """`charlm runs` does not look inside a run folder: a run trained into `runs` itself, or into a folder
    under another run, would hide runs from its table; both are refused before anything is written."""
    make_run(tmp_path, tmp_path / "runs" / "a")
    make_run(tmp_path, tmp_path / "runs" / "group" / "c")
    with pytest.raises(UsageError, match=r"holds other runs \(a, group/c\)"):
        make_run(tmp_path, tmp_path / "runs")
    with pytest.raises(UsageError, match="would lie inside the run folder"):
        make_run(tmp_path, tmp_path / "runs" / "a" / "sub" / "deeper")
    assert not (tmp_path / "runs" / "a" / "sub").exists() and not (tmp_path / "runs" / "config.yaml").exists()
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["a", "group/c"]
    make_run(tmp_path, tmp_path / "runs" / "a" / ".." / "b")  # beside it is fine, however it is spelt
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["a", "b", "group/c"]


def test_a_stray_metrics_file_far_above_does_not_stop_a_new_run(tmp_path, monkeypatch):
    """Only the folders between the current one and the run are looked at above it."""
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    make_run(project, Path("runs") / "x")
    assert [r.name for r in list_runs(project / "runs")] == ["x"]


def test_train_with_nproc_refuses_what_every_worker_would_refuse_before_starting_them(tmp_path):
    """Found by the workers, such a mistake reached the user as several lines (a peer's gloo error first)
    and, one time in four, exit 1."""
    from charlm.launch import check_before_launch

    make_run(tmp_path, tmp_path / "runs" / "a")
    cfg = load_config(overrides=["train.batch_size=4"])
    corpus = tmp_path / "corpus.txt"
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    for out, match in ((tmp_path / "runs", "holds other runs"), (tmp_path / "runs" / "a", "already holds a run"),
                       (corpus, "is a file, not a folder")):
        with pytest.raises(UsageError, match=match):
            check_before_launch(cfg, corpus, None, 2, out=out)
    with pytest.raises(UsageError, match="is empty"):
        check_before_launch(cfg, tmp_path / "blank.txt", None, 2, out=tmp_path / "runs" / "b")
    check_before_launch(cfg, corpus, None, 2, out=tmp_path / "runs" / "b")


@pytest.mark.parametrize("encoding, data", [("utf-16-le", " \n \n".encode("utf-16-le")),
                                            ("utf-16-le", "\ufeff \n".encode("utf-16-le")),
                                            ("utf-32-be", "\ufeff \n".encode("utf-32-be")),
                                            ("utf-8", "\ufeff\n  \n".encode("utf-8"))])
def test_nproc_sees_a_blank_corpus_as_the_workers_decode_it(tmp_path, encoding, data):
    # UTF-16 without a byte-order mark: its spaces are not blank bytes; UTF-8's mark is not text.
    from charlm.launch import check_before_launch

    blank = tmp_path / "blank.txt"
    blank.write_bytes(data)
    cfg = load_config(overrides=["train.batch_size=4", f"data.encoding={encoding}"])
    with pytest.raises(UsageError, match="is empty"):
        check_before_launch(cfg, blank, None, 2, out=tmp_path / "runs" / "b")
    with pytest.raises(UsageError, match="is empty"):  # what one process says of it
        train(cfg, blank, out=tmp_path / "runs" / "c", show_progress=False, cache_dir=tmp_path / "cache")
    text = tmp_path / "text.txt"
    text.write_bytes("ab\n".encode(encoding))
    check_before_launch(cfg, text, None, 2, out=tmp_path / "runs" / "b")


@pytest.mark.parametrize("encoding", ["nosuch", "hex"])  # hex: a codec, but not a text encoding
def test_nproc_refuses_an_unknown_encoding_as_one_process_does(tmp_path, encoding):
    from charlm.launch import check_before_launch

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n", encoding="utf-8")
    cfg = load_config(overrides=["train.batch_size=4", f"data.encoding={encoding}"])
    with pytest.raises(UsageError, match=f"unknown text encoding '{encoding}'"):
        check_before_launch(cfg, corpus, None, 2, out=tmp_path / "runs" / "b")
    with pytest.raises(UsageError, match=f"unknown text encoding '{encoding}'"):
        train(cfg, corpus, out=tmp_path / "runs" / "c", show_progress=False, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damaged", ["best", "last"])
def test_a_run_with_an_unreadable_checkpoint_is_broken_not_done(tmp_path, damaged):
    run = tmp_path / "runs" / "k"
    make_run(tmp_path, run)
    manifest = run / damaged / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])  # cut short, as by a full disk
    (summary,) = list_runs(tmp_path / "runs")
    assert summary.status == "broken" and summary.problem == f"unreadable {damaged}/manifest.json"
    assert summary.steps is not None  # what could be read is still shown


def test_runs_table_lines_up_with_chinese_run_names(tmp_path):
    make_run(tmp_path, tmp_path / "runs" / "莎士比亚")
    make_run(tmp_path, tmp_path / "runs" / "plain")
    table = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()[:3]
    # each CJK character takes two terminal columns: the status column starts at the same column on every line
    starts = [2 * len(line[:line.index(word)]) - len(line[:line.index(word)].encode("ascii", "ignore"))
              for line, word in zip(lines, ("status", "done", "done"))]
    assert len(set(starts)) == 1, lines


def test_runs_command_prints_a_table_and_json(tmp_path):
    make_run(tmp_path, tmp_path / "runs" / "lstm")
    make_run(tmp_path, tmp_path / "runs" / "rnn", "model.cell=rnn")
    (tmp_path / "runs" / "empty").mkdir()  # not a run: ignored
    runner = CliRunner()
    table = runner.invoke(app, ["runs", str(tmp_path / "runs"), "--sort", "parameters"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "status", "level"]
    assert [ln.split()[0] for ln in lines[1:]] == ["rnn", "lstm"]  # the RNN has fewer parameters
    assert "1x16" in lines[1]
    js = runner.invoke(app, ["runs", str(tmp_path / "runs"), "--json"])
    records = [json.loads(ln) for ln in js.stdout.splitlines()]
    assert [r["name"] for r in records] == ["lstm", "rnn"]
    assert all(r["status"] == "done" and r["steps"] == 6 for r in records)


def test_runs_command_refuses_unknown_column_and_missing_folder(tmp_path):
    runner = CliRunner()
    bad_sort = runner.invoke(app, ["runs", str(tmp_path), "--sort", "colour"])
    assert bad_sort.exit_code == 2 and "unknown column 'colour'" in bad_sort.stderr
    missing = runner.invoke(app, ["runs", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "folder not found" in missing.stderr


def _hand_made_run(folder: Path, records: list[dict], manifest: dict) -> Path:
    import json

    (folder / "last").mkdir(parents=True)
    (folder / "config.yaml").write_text("data: {level: char}\nmodel: {cell: lstm, hidden_size: 8}\n", encoding="utf-8")
    (folder / "last" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def test_a_summary_shows_the_latest_time_and_step_a_run_reached(tmp_path):
    """Catches: the elapsed time taken as the smallest of the records' (the first log line's) instead of the largest."""
    from charlm.runs import summarize

    latest = 3.0  # the end record's `elapsed`, written into the hand-made file: nothing is timed
    run = _hand_made_run(tmp_path / "r", [
        {"event": "start", "parameters": 10},
        {"step": 2, "elapsed": 1.0, "train_loss": 2.0},
        {"step": 4, "elapsed": 2.5, "val_loss": 1.5, "val_bpc": 2.1},
        {"event": "end", "steps": 4, "elapsed": latest},
    ], {"step": 4, "elapsed": 0.5, "parameters": 10})
    s = summarize(run)
    assert (s.status, s.steps, s.best_val_loss, s.elapsed) == ("done", 4, 1.5, latest)  # as written above, not timed


@pytest.mark.parametrize("sort", ["val_loss", "-val_loss"])
def test_runs_without_the_sorted_value_come_last_either_way(tmp_path, sort):
    """Catches: runs missing the column's value listed first."""
    from charlm.runs import list_runs

    end = {"event": "end", "steps": 2, "elapsed": 1.0}
    _hand_made_run(tmp_path / "a-none", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}, end], {"step": 2})
    _hand_made_run(tmp_path / "b-low", [{"step": 2, "elapsed": 1.0, "val_loss": 1.0}, end], {"step": 2})
    _hand_made_run(tmp_path / "c-high", [{"step": 2, "elapsed": 1.0, "val_loss": 2.0}, end], {"step": 2})
    names = [r.name for r in list_runs(tmp_path, sort)]
    assert names == (["b-low", "c-high", "a-none"] if sort == "val_loss" else ["c-high", "b-low", "a-none"])


def test_terminal_columns_count_full_width_forms_as_two_and_combining_marks_as_none():
    """Catches: _columns treating full-width forms (east-asian width F, e.g. 'Ａ') as one column, or a combining
    mark as one: `charlm runs` would then misalign the columns after such a run name."""
    from charlm.cli import _columns

    assert _columns("ＡＢ") == 4          # full-width Latin letters (F)
    assert _columns("中文") == 4          # CJK ideographs (W)
    assert _columns("cafe\u0301") == 4    # a decomposed accent: the mark takes no column
    assert _columns("plain") == 5


def test_check_before_launch_refuses_a_batch_that_does_not_split_over_the_processes(tmp_path):
    """Catches: `train --nproc N` no longer checking train.batch_size % N before torchrun starts (every worker
    would then start, load torch and refuse it N times)."""
    from charlm.config import load_config
    from charlm.errors import UsageError
    from charlm.launch import check_before_launch

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 20, encoding="utf-8")
    cfg = load_config(None, ["train.batch_size=3"], {})
    with pytest.raises(UsageError, match=r"train.batch_size 3 must be a multiple of --nproc 2"):
        check_before_launch(cfg, corpus, None, 2, tmp_path / "run")
    check_before_launch(load_config(None, ["train.batch_size=4"], {}), corpus, None, 2, tmp_path / "run")
    # fresh rows need no multiple: a rank takes every world-th of them, and the loss is weighted for it
    check_before_launch(load_config(None, ["train.batch_size=4", "train.fresh_streams=3"], {}), corpus, None, 2,
                        tmp_path / "run")


def test_a_loss_measured_on_a_slice_is_labelled_and_runs_shows_the_loss_of_the_model_best_holds(write_corpus,
                                                                                              tmp_path, monkeypatch):
    """The periodic checks of a run with train.eval_tokens read the first tokens of the validation split only,
    and their loss can be far lower than the whole split's (1.43 against 1.48 for the shipped character
    config): train, info and runs say when the loss they show was measured on the slice. Catches: `runs`
    showing the whole-split loss of the final model (3.0) as the run's best, where best/ holds the model of
    step 1, chosen on the slice (an over-fitting run ranked by its worst model)."""
    from charlm import train as train_module
    from conftest import TINY_TEXT, tiny_config

    losses = iter([1.0, 2.0, 3.0])  # step 1 and step 2 on the slice, then the whole split at the end
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    run = tmp_path / "runs" / "sliced"
    result = train(tiny_config(train__max_steps=2, train__eval_interval=1, train__eval_tokens=5),
                   write_corpus(TINY_TEXT), out=run, show_progress=False)
    assert (result.val_loss, result.best_val_loss, result.best_val_tokens) == (3.0, 1.0, 5)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["val_loss"], r["val_slice"]) for r in records if "val_slice" in r] == [(1.0, True), (2.0, True),
                                                                                      (3.0, False)]
    summary = summarize(run)  # best/'s own figure, marked as the slice's, not the final model's 3.0
    assert (summary.best_val_loss, summary.best_val_slice, summary.best_val_tokens) == (1.0, True, 5)
    table = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")]).stdout.splitlines()
    assert "1.0000*" in table[1] and table[2].startswith("* best/ was chosen on the first train.eval_tokens")
    best = json.loads((run / "best" / "manifest.json").read_text())
    assert (best["step"], best["val_loss"], best["val_slice"]) == (1, 1.0, True)
    shown = CliRunner().invoke(app, ["info", str(run)])
    assert shown.exit_code == 0, shown.output
    assert "val_loss        1.0000 nats/token (on the first 5 validation tokens)" in shown.stdout.splitlines()


def test_a_resume_that_changes_what_the_checks_measure_chooses_best_afresh(write_corpus, tmp_path, monkeypatch):
    """A best/ chosen on a slice's loss (1.0) cannot be compared with whole-split losses after a resume without
    train.eval_tokens: kept, it would never be replaced by a model whose whole-split loss is 2.5."""
    import io

    from charlm import train as train_module
    from conftest import TINY_TEXT, tiny_config

    losses = iter([1.0, 2.0, 3.0, 2.5])  # two checks on the slice, the whole split at the end; then resumed
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "runs" / "r"
    train(tiny_config(train__max_steps=2, train__eval_interval=1, train__eval_tokens=5), corpus, out=run,
          show_progress=False)
    log = io.StringIO()
    result = train(tiny_config(train__max_steps=3, train__eval_interval=1), corpus, resume=run, show_progress=False,
                   log_stream=log)
    assert "best/ was chosen on the first 5 validation tokens and this run's checks read the whole split" in log.getvalue()
    best = json.loads((run / "best" / "manifest.json").read_text())
    assert (best["step"], best["val_loss"], result.best_val_loss, result.best_val_tokens) == (3, 2.5, 2.5, None)


@pytest.mark.parametrize("change", ["val", "eval_batch_size"])
def test_a_resume_on_other_validation_text_or_streams_chooses_best_afresh(write_corpus, tmp_path, monkeypatch,
                                                                          change):
    """Catches: best/ kept across a resume whose checks read another --val file (or the split in another
    number of streams), although its 1.0 and their 3.0 measure different things."""
    import io

    from charlm import train as train_module
    from conftest import TINY_TEXT, tiny_config

    losses = iter([1.0, 2.0, 3.0])  # the checks of steps 1 and 2 (the second is the end's), then the resume's
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "runs" / "r"
    val = tmp_path / "val.txt"
    val.write_text("the cat sat.\n" * 5, encoding="utf-8")
    train(tiny_config(train__max_steps=2, train__eval_interval=1), corpus, out=run, val=val, show_progress=False)
    other = tmp_path / "other.txt"
    other.write_text("the dog sat on the log.\n" * 5, encoding="utf-8")
    extra = {"train__eval_batch_size": 2} if change == "eval_batch_size" else {}
    log = io.StringIO()
    result = train(tiny_config(train__max_steps=3, train__eval_interval=1, **extra), corpus, resume=run,
                   val=other if change == "val" else None, show_progress=False, log_stream=log)
    assert ("best/ was chosen on other validation text (or another train.eval_batch_size) than this run's checks "
            "read: the next check replaces it") in log.getvalue()
    best = json.loads((run / "best" / "manifest.json").read_text())
    assert (best["step"], best["val_loss"], result.best_val_loss) == (3, 3.0, 3.0)
    plain = tmp_path / "runs" / "plain"  # the same text and streams on resume: best/ kept
    losses = iter([1.0, 2.0, 3.0])
    train(tiny_config(train__max_steps=2, train__eval_interval=1), corpus, out=plain, val=val, show_progress=False)
    log = io.StringIO()
    kept = train(tiny_config(train__max_steps=3, train__eval_interval=1), corpus, resume=plain, val=val,
                 show_progress=False, log_stream=log)
    assert "best/ was chosen" not in log.getvalue() and kept.best_val_loss == 1.0


def test_a_run_resumed_after_an_older_version_ranks_by_its_whole_split_checks(tmp_path):
    """The older version logged no val_slice: its checks count as slices once newer records say which are which."""
    end = {"event": "end", "steps": 3, "elapsed": 3.0}
    run = _hand_made_run(tmp_path / "r", [{"step": 1, "elapsed": 1.0, "val_loss": 1.50},
                                          {"step": 2, "elapsed": 2.0, "val_loss": 1.43},
                                          {"step": 2, "elapsed": 2.0, "val_loss": 1.48},
                                          {"step": 3, "elapsed": 3.0, "val_loss": 1.41, "val_slice": True},
                                          {"step": 3, "elapsed": 3.0, "val_loss": 1.47, "val_slice": False}, end],
                         {"step": 3})
    assert summarize(run).best_val_loss == 1.47
    older = _hand_made_run(tmp_path / "o", [{"step": 1, "elapsed": 1.0, "val_loss": 1.50},
                                            {"step": 2, "elapsed": 2.0, "val_loss": 1.43}, end], {"step": 2})
    assert summarize(older).best_val_loss == 1.43  # nothing says which were slices: all of them, as before


def test_a_resume_with_the_same_checks_keeps_best_against_a_worse_check(write_corpus, tmp_path, monkeypatch):
    import io

    from charlm import train as train_module
    from conftest import TINY_TEXT, tiny_config

    losses = iter([1.0, 2.0, 3.0, 2.5, 4.0])  # the resume's check (2.5) and its whole split (4.0) are worse
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "runs" / "r"
    settings = dict(train__eval_interval=1, train__eval_tokens=5)
    train(tiny_config(train__max_steps=2, **settings), corpus, out=run, show_progress=False)
    log = io.StringIO()
    result = train(tiny_config(train__max_steps=3, **settings), corpus, resume=run, show_progress=False,
                   log_stream=log)
    assert "best/ was chosen" not in log.getvalue()  # no resume note (the whole split of 4.0 gets its own)
    best = json.loads((run / "best" / "manifest.json").read_text())
    assert (best["step"], best["val_loss"], result.best_val_loss, result.best_val_tokens) == (1, 1.0, 1.0, 5)


def test_after_a_resume_on_another_val_text_runs_shows_the_loss_best_was_chosen_on(write_corpus, tmp_path,
                                                                                     monkeypatch):
    """Catches: `runs` taking the lowest loss of metrics.jsonl (1.0, on the first --val text, of a model
    best/ no longer holds) where the resume on another text chose best/ afresh (5.0)."""
    from charlm import train as train_module
    from conftest import TINY_TEXT, tiny_config

    losses = iter([1.0, 1.2, 5.0, 5.5])  # steps 1 and 2 on the first text; step 3 and the final on the second
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    corpus, run = write_corpus(TINY_TEXT), tmp_path / "runs" / "r"
    first, second = write_corpus(TINY_TEXT[:400], "v1.txt"), write_corpus(TINY_TEXT[400:800], "v2.txt")
    train(tiny_config(train__max_steps=2, train__eval_interval=1), corpus, out=run, val=first, show_progress=False)
    train(tiny_config(train__max_steps=3, train__eval_interval=1), corpus, resume=run, val=second,
          show_progress=False, log_stream=io.StringIO())
    best = json.loads((run / "best" / "manifest.json").read_text())
    assert (best["step"], best["val_loss"]) == (3, 5.0)
    summary = summarize(run)
    assert (summary.best_val_loss, summary.best_val_slice) == (5.0, False)


def test_info_and_runs_agree_on_a_best_whose_step_the_final_check_read_whole(write_corpus, tmp_path, monkeypatch):
    """Catches: `info` showing the slice's loss of best/ (1.0, "on the first 5 validation tokens") where the
    final check read the whole split at that very step, on the same weights (3.0), which `runs` shows."""
    from charlm import train as train_module
    from conftest import TINY_TEXT, tiny_config

    losses = iter([2.0, 1.0, 3.0])  # slices at steps 1 and 2 (best/ at step 2), the whole split at step 2
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    run = tmp_path / "runs" / "r"
    train(tiny_config(train__max_steps=2, train__eval_interval=1, train__eval_tokens=5), write_corpus(TINY_TEXT),
          out=run, show_progress=False)
    best = json.loads((run / "best" / "manifest.json").read_text())
    assert (best["step"], best["val_loss"], best["val_slice"]) == (2, 1.0, True)
    assert (summarize(run).best_val_loss, summarize(run).best_val_slice) == (3.0, False)
    shown = json.loads(CliRunner().invoke(app, ["info", str(run), "--json"]).stdout)
    assert (shown["val_loss"], shown["val_slice"]) == (3.0, False)
    table = CliRunner().invoke(app, ["info", str(run)]).stdout.splitlines()
    assert "val_loss        3.0000 nats/token" in table


def _run_with_best(folder: Path, records: list[dict], best: dict) -> Path:
    run = _hand_made_run(folder, records + [{"event": "end", "steps": 20, "elapsed": 3.0}], {"step": 20})
    (run / "best").mkdir()
    (run / "best" / "manifest.json").write_text(json.dumps(best), encoding="utf-8")
    return run


def test_a_best_chosen_on_a_slice_at_the_last_step_shows_the_final_whole_split_figure(tmp_path):
    """Catches: best/ saved at a periodic check on the slice (step 20), the final check at the same step then
    reading the whole split of the same weights without saving best/ again: `runs` showed the slice's 2.4760*
    where metrics.jsonl holds the whole split's 2.4475 for that very model (any --max-steps that is a multiple
    of train.eval_interval)."""
    run = _run_with_best(tmp_path / "runs" / "a", [
        {"step": 10, "elapsed": 1.0, "val_loss": 2.554, "val_bpc": 3.68, "val_slice": True, "val_tokens": 20},
        {"step": 20, "elapsed": 2.0, "val_loss": 2.476, "val_bpc": 3.57, "val_slice": True, "val_tokens": 20},
        {"step": 20, "elapsed": 3.0, "val_loss": 2.4475, "val_bpc": 3.53, "val_slice": False}],
        {"step": 20, "val_loss": 2.476, "val_slice": True})
    s = summarize(run)
    assert (s.best_val_loss, s.best_val_bpc, s.best_val_slice) == (2.4475, 3.53, False)


@pytest.mark.parametrize("sort", ["val_loss", "-val_loss", "bpc"])
def test_runs_whose_best_was_chosen_on_a_slice_sort_after_the_whole_split_figures(tmp_path, sort):
    """Catches: a slice figure (lower than the whole split's by about 0.05 on Shakespeare) ranked among the
    whole-split ones, which the table's footnote calls not comparable."""
    whole = {"step": 20, "elapsed": 2.0, "val_loss": 1.50, "val_bpc": 2.1, "val_slice": False}
    _run_with_best(tmp_path / "runs" / "whole-high", [whole], whole)
    _run_with_best(tmp_path / "runs" / "whole-low", [whole | {"val_loss": 1.45, "val_bpc": 2.0}],
                   whole | {"val_loss": 1.45})
    sliced = {"step": 10, "elapsed": 1.0, "val_loss": 1.40, "val_bpc": 1.9, "val_slice": True, "val_tokens": 5}
    _run_with_best(tmp_path / "runs" / "sliced", [sliced, whole | {"val_loss": 1.60, "val_bpc": 2.3}], sliced)
    names = [r.name for r in list_runs(tmp_path / "runs", sort)]
    assert names == (["whole-high", "whole-low", "sliced"] if sort == "-val_loss"
                     else ["whole-low", "whole-high", "sliced"])


def test_an_older_run_that_checked_the_whole_split_keeps_its_older_checks_after_a_resume(tmp_path):
    end = {"event": "end", "steps": 3, "elapsed": 3.0}
    run = _hand_made_run(tmp_path / "w", [{"step": 1, "elapsed": 1.0, "val_loss": 1.50},
                                          {"step": 2, "elapsed": 2.0, "val_loss": 1.40},
                                          {"step": 3, "elapsed": 3.0, "val_loss": 1.45, "val_slice": False}, end],
                         {"step": 3})
    assert summarize(run).best_val_loss == 1.40  # no labelled record read a slice: the older ones are whole-split


# Kills runs.py:84 (non-object lines not counted: `record.get` on an int raises) and runs.py:336 (_int
# without isfinite: int(inf) raises OverflowError); summarize must never raise for a damaged run.
def test_metrics_lines_that_are_not_objects_or_hold_an_infinite_step_do_not_break_the_summary(tmp_path):
    run = _hand_made_run(tmp_path / "r", [
        {"step": 2, "elapsed": 1.0, "train_loss": 2.0},
        {"step": float("inf"), "elapsed": 1.5, "train_loss": 1.9},
        {"event": "end", "steps": 4, "elapsed": 3.0},
    ], {"step": 4})
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write("3\n[1, 2]\n")
    assert read_metrics(run).bad_lines == 2
    s = summarize(run)
    assert (s.status, s.steps) == ("done", 4)


# Kills runs.py:127 (is_run_dir ignoring "config.yaml beside best/ or last/": a run without metrics is not found).
def test_a_run_folder_without_metrics_is_found_by_its_config_and_checkpoint(tmp_path):
    run = _hand_made_run(tmp_path / "runs" / "old", [], {"step": 3})
    (run / "metrics.jsonl").unlink()
    assert find_runs(tmp_path / "runs") == [run]
    (summary,) = list_runs(tmp_path / "runs")
    assert summary.status == "broken" and summary.problem == "no metrics.jsonl" and summary.steps == 3


# Kills runs.py:190 (hidden folders searched: a run kept under runs/.trash is listed).
def test_runs_under_a_hidden_folder_are_not_listed(tmp_path):
    end = {"event": "end", "steps": 2, "elapsed": 1.0}
    _hand_made_run(tmp_path / "runs" / "a", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}, end], {"step": 2})
    _hand_made_run(tmp_path / "runs" / ".trash" / "old", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}, end],
                   {"step": 2})
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["a"]


# Kills runs.py:254 (non-finite validation losses kept: min() over a NaN gives NaN as the best loss).
def test_a_nan_validation_loss_never_becomes_the_best(tmp_path):
    run = _hand_made_run(tmp_path / "r", [
        {"step": 2, "elapsed": 1.0, "val_loss": float("nan"), "val_bpc": float("nan")},
        {"step": 4, "elapsed": 2.0, "val_loss": 1.5, "val_bpc": 2.2},
        {"event": "end", "steps": 4, "elapsed": 3.0},
    ], {"step": 4})
    s = summarize(run)
    assert (s.best_val_loss, s.best_val_bpc) == (1.5, 2.2)


# Kills runs.py:266 (the manifest's val_loss no longer used when the metrics hold no validation line).
def test_the_best_loss_falls_back_to_the_checkpoint_manifest(tmp_path):
    run = _hand_made_run(tmp_path / "r", [{"step": 4, "elapsed": 1.0, "train_loss": 2.0},
                                          {"event": "end", "steps": 4, "elapsed": 2.0}],
                         {"step": 4, "val_loss": 1.75})
    assert summarize(run).best_val_loss == 1.75


# Kills runs.py:285 (the name sort before the column sort dropped: ties come in folder-walk order).
def test_runs_with_equal_values_are_listed_in_name_order(tmp_path):
    records = [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}, {"event": "end", "steps": 2, "elapsed": 1.0}]
    _hand_made_run(tmp_path / "b", records, {"step": 2})
    _hand_made_run(tmp_path / "a" / "x", records, {"step": 2})  # found after b: the walk finds b first
    for sort in ("steps", "-steps"):
        assert [r.name for r in list_runs(tmp_path, sort)] == ["a/x", "b"]


# Kills runs.py:246 (the end record's step count ignored: a run whose last log line came before its end).
def test_a_finished_run_counts_the_steps_its_end_record_gives(tmp_path):
    run = _hand_made_run(tmp_path / "r", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0},
                                          {"step": 4, "elapsed": 2.0, "train_loss": 1.8},
                                          {"event": "end", "steps": 5, "elapsed": 2.5}], {"step": 4})
    assert summarize(run).steps == 5


# Kills runs.py:242 (parameters taken from the checkpoint manifest only: a run before its first save shows none).
def test_a_run_before_its_first_checkpoint_shows_its_parameters_from_the_start_record(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("data: {level: char}\nmodel: {cell: lstm, hidden_size: 8}\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start", "parameters": 1234}) + "\n"
                                       + json.dumps({"step": 2, "elapsed": 1.0, "train_loss": 2.0}) + "\n",
                                       encoding="utf-8")
    s = summarize(run)
    assert (s.status, s.parameters, s.steps) == ("unfinished", 1234, 2)


def test_a_run_that_failed_shows_as_failed_until_a_resume_goes_on(write_corpus, tmp_path, monkeypatch):
    """Catches: a run stopped by a NaN listed as 'unfinished', as if still training, and `info` on one that
    failed before its first checkpoint saying that it will save one. The failure is a metrics record, which a
    resume drops."""
    from charlm import train as train_module
    from charlm.errors import RunFailure
    from conftest import TINY_TEXT, tiny_config

    corpus = write_corpus(TINY_TEXT)
    losses = iter([2.0, float("nan")])  # the second check fails, after the first saved best/ and last/
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    run = tmp_path / "runs" / "nan"
    with pytest.raises(RunFailure, match="step 4: the validation loss is NaN"):
        train(tiny_config(train__max_steps=8, train__eval_interval=2), corpus, out=run, show_progress=False)
    failed = summarize(run)
    assert failed.status == "failed" and "stopped at step 4: the validation loss is NaN" in failed.problem
    assert read_metrics(run).failed == {"event": "failed", "step": 4, "error": failed.problem.split(": ", 1)[1]}
    listed = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")])
    assert "nan: failed: stopped at step 4" in listed.stdout
    monkeypatch.undo()
    train(tiny_config(train__max_steps=8, train__eval_interval=2), None, resume=run, show_progress=False)
    assert summarize(run).status == "done" and read_metrics(run).failed is None

    early = tmp_path / "runs" / "early"  # fails at its second step, before any checkpoint
    with pytest.raises(RunFailure, match="no checkpoint was saved"):
        train(tiny_config(train__max_steps=8, train__lr=1e39), corpus, out=early, show_progress=False)
    assert summarize(early).status == "failed"
    shown = CliRunner().invoke(app, ["info", str(early)])
    assert shown.exit_code == 2
    assert "holds no checkpoint: its training stopped at step" in shown.stderr and "yet" not in shown.stderr


def test_runs_table_right_aligns_its_numeric_columns(tmp_path):
    """Catches: the numeric columns padded on the right like the text ones (cli.py:515): steps 3 and 12 (and
    the other figures) no longer lined up on their last digit under the header."""
    make_run(tmp_path, tmp_path / "runs" / "short", steps=3)
    make_run(tmp_path, tmp_path / "runs" / "long", steps=12)
    table = CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--json"])
    import json

    steps = {r["name"]: r["steps"] for r in map(json.loads, table.stdout.splitlines())}
    assert steps == {"long": 12, "short": 3}
    lines = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")]).stdout.splitlines()
    header, rows = lines[0], lines[1:3]
    end = header.index("steps") + len("steps")
    for row, name in zip(rows, ("long", "short")):
        assert row.startswith(name)
        assert row[:end].endswith(f" {steps[name]}"), (header, row)


def _long_log(lines: int, seed: int = 0) -> list[dict]:
    """The records of a metrics.jsonl as a run writes them: the start record, `lines` training lines (a falling,
    noisy loss) with a validation line after every 100, and the end record."""
    import math
    import random

    rng = random.Random(seed)
    records = [{"event": "start", "step": 0, "parameters": 100, "vocab_size": 20}]
    for i in range(1, lines + 1):
        records.append({"step": 20 * i, "epoch": i / 1000, "elapsed": round(0.05 * i, 3),
                        "train_loss": 1.2 + 2 * math.exp(-i / 500) + rng.gauss(0, 0.05), "lr": 0.003,
                        "grad_norm": rng.random(), "tokens_per_second": 1e5 * rng.random()})
        if i % 100 == 0:
            records.append({"step": 20 * i, "epoch": i / 1000, "elapsed": round(0.05 * i + 0.01, 3),
                            "val_loss": 1.3 + 2 * math.exp(-i / 500), "val_bpc": 2.0, "val_slice": False,
                            "val_tokens": None})
    return records + [{"event": "end", "steps": 20 * lines, "elapsed": 0.05 * lines + 1}]


def test_a_long_log_keeps_a_bounded_part_of_its_training_lines_and_every_check(tmp_path):
    """Catches: read_metrics keeping a dict for every line of a long run's log (100,000 lines for 2,000,000
    steps: a gigabyte). What it keeps must still start and end where the log does and hold its extremes."""
    records = _long_log(20_000)
    written = [r for r in records if "train_loss" in r]
    written[7_777]["train_loss"] = 9.0  # a spike in the middle of the run
    run = _hand_made_run(tmp_path / "r", records, {"step": 1})
    m = read_metrics(run)
    assert 2_048 < len(m.train) <= 4_096  # 4 lines of each stretch, at most 4 * runs.CURVE_STRETCHES
    assert m.train_lines == 20_000 and len(m.val) == 200 and m.start is not None and m.end is not None
    kept = [(r["step"], r["train_loss"]) for r in m.train]
    assert kept == sorted(kept)  # in the order of the file
    assert kept[0] == (written[0]["step"], written[0]["train_loss"])
    assert kept[-1] == (written[-1]["step"], written[-1]["train_loss"])
    lowest = min(written, key=lambda r: r["train_loss"])
    assert (lowest["step"], lowest["train_loss"]) in kept and (written[7_777]["step"], 9.0) in kept


def test_each_stretch_of_a_long_curve_keeps_its_first_last_lowest_and_highest_lines():
    """The rule that TrainingCurve's docstring states, line by line, for a curve made to merge its
    stretches several times (and a short curve, kept whole)."""
    import random

    from charlm.runs import TrainingCurve

    rng = random.Random(1)
    losses = [rng.random() for _ in range(1_000)]
    curve = TrainingCurve(stretches=8)
    for step, loss in enumerate(losses):
        curve.add(loss, step, step / 10)
    width = curve.width
    assert 4 <= len(losses) / width <= 8  # between half the stretches and all of them
    expected = set()
    for start in range(0, len(losses), width):
        part = range(start, min(start + width, len(losses)))
        expected |= {part[0], part[-1], min(part, key=losses.__getitem__), max(part, key=losses.__getitem__)}
    assert [r["step"] for r in curve.records()] == sorted(expected)
    assert all(r["train_loss"] == losses[r["step"]] and r["elapsed"] == r["step"] / 10 for r in curve.records())

    short = TrainingCurve(stretches=8)
    for step, loss in enumerate(losses[:16]):
        short.add(loss, step, None)
    assert [r["step"] for r in short.records()] == list(range(16))



def test_an_odd_number_of_stretches_merges_without_dropping_the_last_one():
    """Catches: an odd number of stretches used as it is given: merged in pairs, the last stretch had no
    partner, and its lines (the latest of the log at that point) were lost."""
    import random

    from charlm.runs import TrainingCurve

    rng = random.Random(2)
    losses = [rng.random() for _ in range(1_000)]
    curve = TrainingCurve(stretches=7)
    for step, loss in enumerate(losses):
        curve.add(loss, step, None)
    width = curve.width
    assert len(losses) / width <= 7
    expected = set()
    for start in range(0, len(losses), width):
        part = range(start, min(start + width, len(losses)))
        expected |= {part[0], part[-1], min(part, key=losses.__getitem__), max(part, key=losses.__getitem__)}
    assert [r["step"] for r in curve.records()] == sorted(expected)


def test_a_long_log_draws_no_nan_or_infinite_loss_and_keeps_the_spike_after_one(tmp_path):
    """Catches: a NaN or infinite training loss put into the curve. Made the first line of a stretch, it
    stood as that stretch's lowest and highest (no comparison passes a NaN; nothing passes infinity), so the
    spike after it was not kept, and plot (which leaves such points out) drew the stretch without it."""
    records = _long_log(20_000)
    written = [r for r in records if "train_loss" in r]
    written[3_200]["train_loss"], written[3_201]["train_loss"] = float("nan"), 9.0
    written[6_400]["train_loss"], written[6_401]["train_loss"] = float("inf"), 9.5
    run = _hand_made_run(tmp_path / "r", records, {"step": 1})
    m = read_metrics(run)
    kept = {(r["step"], r["train_loss"]) for r in m.train}
    assert all(math.isfinite(loss) for _, loss in kept)
    assert (written[3_201]["step"], 9.0) in kept and (written[6_401]["step"], 9.5) in kept
    assert m.train_lines == 20_000

def test_reading_a_long_log_holds_neither_its_text_nor_a_dict_per_line(tmp_path):
    """Catches: the whole file read as one string and every line kept as a dict (seven times the file's size
    in memory). Python's own allocations are counted (tracemalloc), not the process's, and nothing is timed."""
    import tracemalloc

    run = _hand_made_run(tmp_path / "r", _long_log(40_000), {"step": 1})
    size = (run / "metrics.jsonl").stat().st_size
    tracemalloc.start()
    try:
        read_metrics(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 4, (peak, size)


def test_the_summary_of_a_long_log_counts_every_line_not_only_those_kept_for_the_plot(tmp_path):
    """Catches: the furthest step and the longest time taken from the lines kept for the plot. A line that
    is neither the first nor the last of its stretch, nor its lowest or highest loss, still counts (a log
    written out of order, as a hand-made one may be)."""
    records = _long_log(20_000)
    run = _hand_made_run(tmp_path / "r", records, {"step": 1})
    kept = {r["step"] for r in read_metrics(run).train}
    hidden = next(r for r in records[10_000:] if "train_loss" in r and r["step"] not in kept)
    hidden["step"], hidden["elapsed"] = 999_999, 99_999.5  # beyond the end record's 400,000 steps, 1,001 s
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert 999_999 not in {r["step"] for r in read_metrics(run).train}
    s = summarize(run)
    assert (s.status, s.steps, s.elapsed) == ("done", 999_999, 99_999.5)


def test_blank_torn_and_odd_lines_give_the_same_summary_read_line_by_line(tmp_path):
    """The lines as str.splitlines cuts the whole text: CRLF endings, blank lines, a line that U+2028 cuts
    in two (both halves bad, so its step and time do not count), a byte-order mark, a torn last line."""
    run = _hand_made_run(tmp_path / "r", [], {"step": 4, "elapsed": 0.5, "parameters": 10})
    lines = [json.dumps({"event": "start", "parameters": 10}), "", "   ",
             json.dumps({"step": 2, "elapsed": 1.0, "train_loss": 2.0}),
             '{"step": 9, "elapsed": 9.0, "train_loss": 1.9, "note": "a\u2028b"}', "[1, 2]",
             '\ufeff{"step": 8, "elapsed": 8.0, "train_loss": 1.0}',
             json.dumps({"step": 4, "elapsed": 2.5, "val_loss": 1.5, "val_bpc": 2.1}),
             json.dumps({"event": "end", "steps": 4, "elapsed": 3.0}), '{"step": 7, "ela']
    (run / "metrics.jsonl").write_bytes("\r\n".join(lines).encode("utf-8"))
    m = read_metrics(run)
    assert (m.bad_lines, len(m.val)) == (5, 1)
    s = summarize(run)
    assert (s.status, s.steps, s.elapsed, s.best_val_loss, s.best_val_bpc) == ("done", 4, 3.0, 1.5, 2.1)


def test_runs_lists_the_runs_without_importing_torch(tmp_path):
    """Catches: `charlm runs` importing torch (the set-up of the commands that load a model), which took 2.3
    of its 2.7 seconds and 250 of its 290 MB on a small run, for a command that reads only text files."""
    import subprocess
    import sys
    import textwrap

    _hand_made_run(tmp_path / "runs" / "r", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}], {"step": 2})
    script = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from charlm.cli import app
        result = CliRunner().invoke(app, ["runs", sys.argv[1]])
        assert result.exit_code == 0, result.output
        print(result.stdout.splitlines()[1].split()[0], "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["r", "False"]


def test_plot_draws_without_importing_torch(tmp_path):
    """Catches: `charlm plot` importing torch (2.3 s and 270 MB of a command that reads text files only)."""
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("matplotlib")
    _hand_made_run(tmp_path / "r", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}], {"step": 2})
    script = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from charlm.cli import app
        result = CliRunner().invoke(app, ["plot", sys.argv[1], "--out", sys.argv[2]])
        assert result.exit_code == 0, result.output
        print(result.stdout.split()[0], "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r"), str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["wrote", "False"]
