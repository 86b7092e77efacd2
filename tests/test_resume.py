"""Resume is exact: N steps in one run equal k steps, a stop, and a resume to N, bit for bit on the CPU;
a resume that cannot be exact (another config, another corpus, another format) is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from charlm import train as train_mod
from charlm.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted
from charlm.train import train
from helpers_reliability import (assert_one_line_error, cli, metric_lines, one_thread, rehash,  # noqa: F401
                                 tiny_config, train_run, write_corpus)

N = 12



def _without_clock(progress: dict) -> dict:
    """Everything a resumed run must reproduce bit for bit: all but the wall-clock seconds."""
    return {k: v for k, v in progress.items() if k != "elapsed"}

def weights(run, name="last"):
    return load_file(str(run / name / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bitwise, not approximately


def trainer_state(run):
    return torch.load(run / "last" / "trainer.pt", weights_only=True)


def without_stop_evaluation(lines, k, eval_interval):
    """The split run's metrics without the final evaluation that ended its first part at step k (none when
    the periodic check at step k had just read the whole split)."""
    if k % eval_interval == 0:
        return lines
    last = max(i for i, r in enumerate(lines) if "val_loss" in r and r["step"] == k)
    return lines[:last] + lines[last + 1:]


SETTINGS = {
    "constant_dropout": dict(model__dropout=0.3, model__layers=2),
    "warmup_only": dict(train__warmup_steps=8, model__dropout=0.2),
    "plateau": dict(train__schedule="plateau", train__plateau_patience=0, train__plateau_factor=0.5,
                    train__eval_interval=2, model__dropout=0.1),
    "custom_gru_sgd_momentum": dict(model__cell="gru", model__impl="custom", model__dropout=0.25,
                                    train__optimizer="sgd", train__momentum=0.9, train__lr=0.5),
    "word_level_rnn": dict(data__level="word", model__cell="rnn", model__dropout=0.3, train__seq_len=4),
}


@pytest.mark.parametrize("k", [5, 8])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_k_steps_stop_and_resume_to_n_equals_n_steps_bitwise(tmp_path, setting, k):
    corpus = write_corpus(tmp_path)
    fields = SETTINGS[setting]
    one = train_run(tmp_path, "one", corpus, train__max_steps=N, **fields)
    split = train_run(tmp_path, "split", corpus, train__max_steps=k, **fields)
    assert trainer_state(split)["progress"]["step"] == k
    result = train(tiny_config(train__max_steps=N, **fields), None, resume=split, show_progress=False)
    assert result.steps == N and result.stopped_by == "max_steps"
    assert_same_weights(one, split)
    a, b = trainer_state(one), trainer_state(split)
    assert _without_clock(a["progress"]) == _without_clock(b["progress"])
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa)
    interval = tiny_config(**fields).train.eval_interval
    assert metric_lines(one) == without_stop_evaluation(metric_lines(split), k, interval)
    assert len(metric_lines(one)) >= N // 2  # the comparison above compared something


def test_resume_after_a_stop_is_not_the_same_as_a_fresh_start(tmp_path):
    """The control: without the saved optimizer and RNG state, the weights would differ."""
    corpus = write_corpus(tmp_path)
    one = train_run(tmp_path, "one", corpus, train__max_steps=N, model__dropout=0.3)
    split = train_run(tmp_path, "split", corpus, train__max_steps=5, model__dropout=0.3)
    state = trainer_state(split)
    state["rng_cpu"] = torch.manual_seed(99).get_state()  # only the dropout RNG differs
    torch.save(state, split / "last" / "trainer.pt")
    rehash(split / "last", "trainer.pt")
    train(tiny_config(train__max_steps=N, model__dropout=0.3), None, resume=split, show_progress=False)
    assert not all(torch.equal(weights(one)[k], weights(split)[k]) for k in weights(one))


def test_a_run_saved_with_foreach_updates_resumes_on_the_fused_ones(tmp_path, monkeypatch):
    """Runs saved before 2026-12-06 asked for foreach optimizer updates; a resume takes this version's fused
    update (they agree to float32 rounding), and the continued run is the uninterrupted one to within that."""
    corpus = write_corpus(tmp_path)
    one = train_run(tmp_path, "one", corpus, train__max_steps=N, model__dropout=0.3, train__optimizer="adam")
    real = train_mod._make_optimizer

    def with_foreach(cfg, model):  # the optimizer as the older charlm made it
        t = cfg.train
        return torch.optim.Adam(model.parameters(), lr=t.lr, betas=(0.9, t.beta2), foreach=True)
    monkeypatch.setattr(train_mod, "_make_optimizer", with_foreach)
    split = train_run(tmp_path, "split", corpus, train__max_steps=5, model__dropout=0.3, train__optimizer="adam")
    assert trainer_state(split)["optimizer"]["param_groups"][0]["foreach"] is True
    monkeypatch.setattr(train_mod, "_make_optimizer", real)
    result = train(tiny_config(train__max_steps=N, model__dropout=0.3, train__optimizer="adam"), None, resume=split,
                   show_progress=False)
    assert result.steps == N
    group = trainer_state(split)["optimizer"]["param_groups"][0]
    assert group["fused"] is True and group["foreach"] is None
    for key, value in weights(one).items():
        torch.testing.assert_close(weights(split)[key], value, atol=1e-5, rtol=1e-4)


def _signal_at_step(monkeypatch, step, signum):
    """Send ourselves `signum` in the middle of training step `step` (from inside the loop)."""
    real = train_mod.learning_rate

    def learning_rate(cfg, p, fraction):
        if p.step + 1 == step:
            os.kill(os.getpid(), signum)
        return real(cfg, p, fraction)
    monkeypatch.setattr(train_mod, "learning_rate", learning_rate)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)])
def test_stop_by_signal_then_resume_equals_one_run_bitwise_even_with_cosine(tmp_path, monkeypatch, signum, code):
    fields = dict(train__schedule="cosine", train__warmup_steps=2, model__dropout=0.3)
    corpus = write_corpus(tmp_path)
    one = train_run(tmp_path, "one", corpus, train__max_steps=N, **fields)
    _signal_at_step(monkeypatch, 7, signum)
    with pytest.raises(Interrupted) as info:
        train_run(tmp_path, "split", corpus, train__max_steps=N, **fields)
    assert info.value.exit_code == code and "at step 7" in info.value.message
    monkeypatch.undo()
    split = tmp_path / "split"
    assert trainer_state(split)["progress"]["step"] == 7
    train(tiny_config(train__max_steps=N, **fields), None, resume=split, show_progress=False)
    assert_same_weights(one, split)
    assert metric_lines(one) == metric_lines(split)  # a stop by signal adds no evaluation


# ---------------------------------------------------------------- what may and may not change
@pytest.fixture
def stopped(tmp_path):
    corpus = write_corpus(tmp_path)
    return train_run(tmp_path, "run", corpus, train__max_steps=6), corpus


@pytest.mark.parametrize("changes,named", [
    (["model.hidden_size=32"], ["model.hidden_size"]),
    (["model.cell=gru"], ["model.cell"]),
    (["model.layers=2", "model.impl=custom"], ["model.layers", "model.impl"]),
    (["data.level=word"], ["data.level"]),
    (["data.lowercase=true", "data.word_split=space"], ["data.lowercase", "data.word_split"]),
    (["data.min_freq=3"], ["data.min_freq"]),
    (["data.max_size=10"], ["data.max_size"]),
    (["train.lr=0.5", "train.batch_size=8"], ["train.lr", "train.batch_size"]),
])
def test_resume_with_a_conflicting_config_is_exit_2_naming_the_fields(stopped, changes, named):
    run, _ = stopped
    args = [a for c in changes for a in ("--set", c)]
    line = assert_one_line_error(cli("train", "--resume", run, "-q", *args), 2, "--resume", *named)
    assert "config differs" in line
    assert trainer_state(run)["progress"]["step"] == 6  # nothing was trained or saved


@pytest.mark.parametrize("damage", ["a group that is no mapping", "no param_groups"])
def test_resume_with_an_optimizer_state_that_does_not_fit_is_exit_2(stopped, damage):
    run, _ = stopped
    state = trainer_state(run)
    if damage == "no param_groups":
        del state["optimizer"]["param_groups"]
    else:
        state["optimizer"]["param_groups"] = [[1, 2]]
    torch.save(state, run / "last" / "trainer.pt")
    rehash(run / "last", "trainer.pt")  # a consistent manifest: the content itself must be refused
    result = cli("train", "--resume", run, "--set", "train.max_steps=8", "-q")
    assert_one_line_error(result, 2, "trainer.pt", "does not fit this run")


def test_a_config_given_on_resume_says_which_settings_of_the_run_it_changes(stopped, tmp_path):
    """Catches: `--resume RUN --config FILE` taking the file's limits in silence (a run stopped at 6 of its
    max_steps went on to the file's, and its max_time became the file's null)."""
    run, _ = stopped
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["train"].update(max_steps=8, max_time=None, log_interval=config["train"]["log_interval"] + 1)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli("train", "--resume", run, "--config", path, "-q", "--json")
    assert result.exit_code == 0, result.stderr
    log = config["train"]["log_interval"]
    assert result.stderr.splitlines() == [f"charlm: note: this resume (with --config {path}) changes the run's "
                                          f"train.max_steps 6 -> 8, train.log_interval {log - 1} -> {log}"]
    plain = cli("train", "--resume", run, "-q", "--json", "--max-steps", "9")  # the run's own config: no note
    assert plain.exit_code == 0 and plain.stderr == ""
    config["train"]["max_steps"] = 1  # a value of 1 is shown as 1, not as true
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    again = cli("train", "--resume", run, "--config", path, "-q")
    assert again.exit_code == 0 and again.stderr.endswith("changes the run's train.max_steps 9 -> 1\n"), again.stderr
    # refused: the error alone, no note before it
    assert_one_line_error(cli("train", "--resume", run, "--config", path, "--out", tmp_path / "elsewhere"), 2,
                          "--out")
    config["model"]["hidden_size"] += 1
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert_one_line_error(cli("train", "--resume", run, "--config", path), 2, "model.hidden_size")


def test_resume_accepts_harmless_changes(stopped):
    run, _ = stopped
    result = cli("train", "--resume", run, "-q", "--json", "--max-steps", "9", "--max-time", "600",
                 "--set", "train.log_interval=3", "--set", "train.eval_interval=5", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 9
    # the run folder's config.yaml, "the resolved config of the run", says what the run now is
    resolved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]
    assert (resolved["max_steps"], resolved["max_time"], resolved["log_interval"]) == (9, 600, 3)


def test_resume_with_another_corpus_is_refused(stopped, tmp_path):
    run, corpus = stopped
    other = write_corpus(tmp_path, "other.txt", seed=3)
    assert_one_line_error(cli("train", "--resume", run, "--corpus", other), 2, "other.txt", "SHA-256")
    corpus.write_text(corpus.read_text() + "one more line.\n")  # the same file, changed since
    assert_one_line_error(cli("train", "--resume", run), 2, "not the text this run was trained on")


def test_resume_when_the_corpus_has_moved_asks_for_it(stopped, tmp_path):
    run, corpus = stopped
    moved = tmp_path / "moved.txt"
    shutil.move(corpus, moved)
    assert_one_line_error(cli("train", "--resume", run), 2, "--corpus", corpus.name)
    result = cli("train", "--resume", run, "--corpus", moved, "-q", "--max-steps", "8")
    assert result.exit_code == 0, result.stderr


def test_resume_with_out_naming_another_folder_is_refused(stopped, tmp_path):
    run, _ = stopped
    assert_one_line_error(cli("train", "--resume", run, "--out", tmp_path / "elsewhere"), 2, "--resume", "--out")
    assert not (tmp_path / "elsewhere").exists()
    result = cli("train", "--resume", run, "--out", run, "-q", "--max-steps", "7")  # the same folder is fine
    assert result.exit_code == 0, result.stderr


def test_resume_from_another_working_folder_finds_the_corpus(stopped, tmp_path, monkeypatch):
    run, corpus = stopped
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Path(trainer_state(run)["corpus"]).is_absolute()
    result = cli("train", "--resume", run, "-q", "--max-steps", "8")
    assert result.exit_code == 0, result.stderr


def test_resume_with_a_vocabulary_that_does_not_fit_is_refused(stopped):
    run, _ = stopped
    vocab = json.loads((run / "last" / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokens"] = vocab["tokens"][:2] + vocab["tokens"][3:] + ["q"]  # one token swapped for another
    (run / "last" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    rehash(run / "last", "vocab.json")
    result = cli("train", "--resume", run, "-q", "--max-steps", "8")
    assert_one_line_error(result, 2, "vocabulary", "does not match")


@pytest.mark.parametrize("found,fragment", [(2, "newer charlm"), (0, "older charlm")])
def test_resume_of_a_run_folder_of_another_format_is_refused(stopped, found, fragment):
    run, _ = stopped
    for name in ("last", "best"):
        manifest = json.loads((run / name / "manifest.json").read_text())
        manifest["format"] = found
        (run / name / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("train", "--resume", run, "--max-steps", "8"), 2, fragment)


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(stopped):
    run, _ = stopped
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "train_lo')  # what kill -9 in the middle of a write leaves
    result = cli("train", "--resume", run, "-q", "--max-steps", "8")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 6, "device": "cpu"} in records
    assert [r["step"] for r in records if "train_loss" in r and "event" not in r] == [2, 4, 6, 8]



def test_resume_keeps_the_lines_logged_by_its_step_and_drops_the_rest_of_a_hand_edited_log(stopped):
    """Catches: a resume that failed with a TypeError on a metrics line whose step is no number (null, or text,
    in a hand-edited log), or on a JSON line that is no object; that kept the failure record of the run that
    stopped when it came at the step resumed from (`runs` then listed the run going on as failed); or that
    dropped a line without a step, which no later step replaces."""
    run, _ = stopped  # last/ at step 6
    odd = [{"event": "failed", "step": 6, "error": "no space left on device"}, [1, 2], {"note": "by hand"},
           {"step": None, "train_loss": 1.0}, {"step": "5", "train_loss": 1.0}, {"step": True, "train_loss": 1.0}]
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("".join(json.dumps(record) + "\n" for record in odd))
    result = cli("train", "--resume", run, "-q", "--max-steps", "8")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"note": "by hand"} in records and [1, 2] not in records
    assert not any(r.get("event") == "failed" for r in records)
    assert [r["step"] for r in records if "train_loss" in r and "event" not in r] == [2, 4, 6, 8]

def test_resume_of_a_checkpoint_folder_continues_its_run(tmp_path):
    """`--resume runs/x/last` (the README lets every command take a checkpoint folder) continues runs/x
    itself, exactly as `--resume runs/x` does, and does not start a second run inside last/."""
    corpus = write_corpus(tmp_path)
    a = train_run(tmp_path, "a", corpus, train__max_steps=4)
    b = train_run(tmp_path, "b", corpus, train__max_steps=4)
    train(tiny_config(train__max_steps=8), None, resume=a, show_progress=False)
    result = train(tiny_config(train__max_steps=8), None, resume=b / "last", show_progress=False)
    assert trainer_state(b)["progress"]["step"] == result.steps == 8
    assert not (b / "last" / "last").exists() and not (b / "last" / "metrics.jsonl").exists()
    assert_same_weights(a, b)


def test_resume_of_a_lone_checkpoint_folder_is_exit_2(tmp_path):
    run = train_run(tmp_path)
    lone = tmp_path / "copy"
    shutil.copytree(run / "last", lone)
    assert_one_line_error(cli("train", "--resume", lone), 2, "checkpoint folder, not a run folder")


def test_a_resume_with_no_step_left_reports_no_train_loss_and_writes_strict_json(tmp_path):
    """Nothing is trained, so there is no loss to report: null, not NaN (which strict JSON parsers refuse)."""
    run = train_run(tmp_path, train__max_steps=4)
    result = cli("train", "--resume", run, "--max-steps", "4", "-q", "--json")
    assert result.exit_code == 0, result.stderr

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    assert strict(result.stdout)["train_loss"] is None
    end = strict((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert end["event"] == "end" and end["steps"] == 4 and end["train_loss"] is None
    text = cli("train", "--resume", run, "--max-steps", "4", "-q")
    assert text.exit_code == 0 and "no step left" in text.stdout
    assert "train.max_steps is already reached; raise it with --max-steps" in text.stdout


@pytest.mark.parametrize("name", ["best", "last.old"])
def test_resume_of_another_checkpoint_than_last_is_exit_2_naming_the_run(tmp_path, name):
    """A resume starts from last/: naming best/ or last.old/ would silently start elsewhere."""
    run = train_run(tmp_path)
    folder = run / name
    if not folder.exists():
        shutil.copytree(run / "last", folder)
    line = assert_one_line_error(cli("train", "--resume", folder), 2, "not a run folder")
    assert str(run) in line


def test_resume_accepts_new_evaluation_settings(stopped):
    """Catches: train.eval_tokens or train.eval_batch_size dropped from RESUMABLE_CHANGES, so a resume that
    only changes how validation is read is refused as a conflicting config."""
    run, _ = stopped
    result = cli("train", "--resume", run, "-q", "--json", "--max-steps", "8", "--set", "train.eval_tokens=40",
                 "--set", "train.eval_batch_size=2")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 8


def test_a_resumed_run_has_one_end_record_and_no_repeated_metrics_line(tmp_path):
    """Catches: _Log keeping the end record of the finished first part on resume (its 'steps' key is no 'step',
    so the step filter alone keeps it): metrics.jsonl would hold two end records, the stale one first."""
    run = train_run(tmp_path, train__max_steps=4)
    result = cli("train", "--resume", run, "-q", "--max-steps", "8")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    ends = [r for r in records if r.get("event") == "end"]
    assert len(ends) == 1 and records[-1] is ends[0] and ends[0]["steps"] == 8
    seen = [(r["step"], "train_loss" in r) for r in records if "event" not in r]
    assert len(seen) == len(set(seen)), seen
    assert [r["event"] for r in records if "event" in r] == ["start", "resume", "end"]


def test_resume_keeps_validating_on_the_runs_val_file(tmp_path):
    """Catches: a resume without --val forgetting the run's --val file (from the trainer state): it would
    validate on a cut of the corpus instead, or refuse the vocabulary that the whole corpus built."""
    corpus = write_corpus(tmp_path)
    val = write_corpus(tmp_path, "val.txt", lines=40, seed=5)
    one = tmp_path / "one"
    train(tiny_config(train__max_steps=12), corpus, out=one, val=val, show_progress=False)
    split = tmp_path / "split"
    train(tiny_config(train__max_steps=8), corpus, out=split, val=val, show_progress=False)
    result = train(tiny_config(train__max_steps=12), None, resume=split, show_progress=False)
    assert result.val_loss is not None
    assert_same_weights(one, split)
    assert [r for r in metric_lines(split) if "val_loss" in r and r["step"] == 12] == \
        [r for r in metric_lines(one) if "val_loss" in r and r["step"] == 12]


def test_resume_with_val_is_refused_when_the_run_cut_its_validation_from_the_corpus(tmp_path):
    """Catches: --val on a resume of a run whose validation text is the corpus's last data.val_fraction. All of
    the corpus would become training text, another stream than the run's (and often another vocabulary, which
    was refused as 'belongs to another corpus'); the error now says what --val does here."""
    corpus = write_corpus(tmp_path)
    val = write_corpus(tmp_path, "val.txt", lines=40, seed=5)
    run = tmp_path / "run"
    train(tiny_config(train__max_steps=4), corpus, out=run, show_progress=False)
    before = weights(run)
    line = assert_one_line_error(cli("train", "--resume", run, "--val", val, "--max-steps", "8", "-q"), 2,
                                 "data.val_fraction 0.1", "without --val", f"--file {val}")
    assert "another corpus" not in line
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained
    # a run that started with --val may change it on a resume
    run2 = tmp_path / "run2"
    train(tiny_config(train__max_steps=4), corpus, out=run2, val=val, show_progress=False)
    assert train(tiny_config(train__max_steps=6), None, resume=run2, val=corpus, show_progress=False).steps == 6


def test_resume_may_add_val_when_no_validation_part_was_cut(tmp_path):
    """Catches: refusing --val on a resume because data.val_fraction > 0 when the corpus had no line end to cut
    at. The run trained on all of it and its note said to pass --val; with --val the stream is the same."""
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("to be or not to be that is the question " * 40, encoding="utf-8")
    val = write_corpus(tmp_path, "val.txt", lines=40, seed=5)
    run = tmp_path / "run"
    first = train(tiny_config(train__max_steps=4), corpus, out=run, show_progress=False)
    assert first.val_loss is None
    result = train(tiny_config(train__max_steps=8), None, resume=run, val=val, show_progress=False)
    assert result.steps == 8 and result.val_loss is not None


def test_a_run_saved_before_fresh_streams_resumes_without_them(tmp_path):
    """Catches: a run whose config.yaml predates train.fresh_streams resuming with the new default of 2 fresh
    rows (its checkpoint's config read without saved_run): the resumed steps would differ from the run's."""
    corpus = write_corpus(tmp_path)
    one = tmp_path / "one"
    train(tiny_config(train__max_steps=N, train__fresh_streams=0), corpus, out=one, show_progress=False)
    split = tmp_path / "split"
    train(tiny_config(train__max_steps=N // 2, train__fresh_streams=0), corpus, out=split, show_progress=False)
    for folder in (split, split / "last", split / "best"):  # as the older version wrote them
        path = folder / "config.yaml"
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        del raw["train"]["fresh_streams"]
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        if folder != split:
            rehash(folder, "config.yaml")
    result = cli("train", "--resume", split, "--max-steps", N, "-q")
    assert result.exit_code == 0, result.stderr
    assert_same_weights(one, split)


def test_a_resume_whose_limits_move_the_decay_says_where_the_rate_goes(tmp_path):
    """Catches: more steps after a finished cosine run starting again at a high learning rate without a word
    (the schedule spans the new budget), which a user continuing 'exactly where it left off' would not expect."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    train(tiny_config(train__max_steps=6, train__schedule="cosine"), corpus, out=run, show_progress=False)
    result = cli("train", "--resume", run, "--max-steps", 12, "-q")
    assert result.exit_code == 0, result.stderr
    assert "note: the cosine learning-rate schedule spans the new limits: it goes on at" in result.stderr
    assert "where the run had reached 0\n" in result.stderr
    again = cli("train", "--resume", run, "--max-steps", 12, "-q")  # the same limits: nothing moved
    assert again.exit_code == 0 and "schedule" not in again.stderr
    flat = tmp_path / "flat"
    train(tiny_config(train__max_steps=6, train__schedule="constant"), corpus, out=flat, show_progress=False)
    assert "schedule" not in cli("train", "--resume", flat, "--max-steps", 12, "-q").stderr


def test_an_old_run_resumed_with_a_config_file_is_told_how_to_keep_its_fresh_streams(tmp_path):
    """Catches: `--resume OLD --config FILE` refused with 'the config differs in train.fresh_streams' though the
    user changed nothing (the file gets the new default 2, the run trains with 0), and no word on the fix."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    train(tiny_config(train__max_steps=4, train__fresh_streams=0), corpus, out=run, show_progress=False)
    config = tmp_path / "mine.yaml"
    raw = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    del raw["train"]["fresh_streams"]  # a config written before the field existed, or without it
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert_one_line_error(cli("train", "--resume", run, "--config", config, "--max-steps", 8, "-q"), 2,
                          "differs from the checkpoint in train.fresh_streams",
                          "add --set train.fresh_streams=0")
    result = cli("train", "--resume", run, "--config", config, "--set", "train.fresh_streams=0", "--max-steps", 8,
                 "-q")
    assert result.exit_code == 0, result.stderr


def test_resume_rewrites_a_long_log_a_line_at_a_time(tmp_path):
    """Catches: the resume reading all of metrics.jsonl into memory to drop the lines after its step (a long run's
    log is 100,000 lines and more). The lines kept are those of the step or before, in order, without the end
    record, a torn line or what a hand edit broke; a U+2028 inside a line splits it, as reading the whole text
    with str.splitlines did."""
    import tracemalloc

    from charlm.train import _Log

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "start", "step": 0}), json.dumps({"step": 2, "train_loss": 1.5}),
             '{"step": 3, "note": "a\u2028b"}', "not json", json.dumps({"step": 4, "val_loss": 1.25}),
             json.dumps({"step": 6, "train_loss": 1.0}), json.dumps({"event": "end", "steps": 6})]
    path.write_text("\r\n".join(lines) + '\n{"step": 7, "train_lo', encoding="utf-8")
    _Log(path, 4).close()
    assert path.read_text(encoding="utf-8").splitlines() == [lines[0], lines[1], lines[4]]

    filler = json.dumps({"step": 1, "train_loss": 2.0, "elapsed": 0.5, "lr": 0.001}) + "\n"
    path.write_text(filler * 200_000, encoding="utf-8")  # 12 MB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        _Log(path, 1).close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == size
    assert peak < size / 10, (peak, size)  # the old code held the text, then a list of its lines: several times it
