"""Training-loop behaviour that no earlier test pinned: the metrics means, the fresh
streams, the loss normalisation, the run folder left clean, and paths that survive a change of folder.

Each test names the mutant it kills (file:line as of the mutation audit of 2026-12-07)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from charlm import train as train_mod
from charlm.errors import RunFailure
from charlm.runs import read_metrics, summarize
from charlm.train import train
from helpers_reliability import one_thread, tiny_config, write_corpus  # noqa: F401


def _train_lines(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r and "event" not in r}


# Kills train.py:797 (`p.log_loss_sum, p.log_loss_count = 0.0, 0` dropped after a metrics line): each line's
# train_loss became the mean since the start of the run, not over the steps since the previous line, so the
# curves of `charlm plot` flattened out and the last line no longer said how the model does now.
def test_each_metrics_line_is_the_mean_loss_of_the_steps_since_the_previous_one(tmp_path):
    corpus = write_corpus(tmp_path)
    every = train(tiny_config(train__max_steps=6, train__log_interval=1), corpus, out=tmp_path / "every",
                  show_progress=False)
    third = train(tiny_config(train__max_steps=6, train__log_interval=3), corpus, out=tmp_path / "third",
                  show_progress=False)
    per_step = _train_lines(tmp_path / "every")
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
    assert per_step[6] == pytest.approx(every.train_loss, rel=1e-12)  # one step per line: that step's loss
    assert len(set(per_step.values())) == 6                           # (the losses do change from step to step)
    means = _train_lines(tmp_path / "third")                          # the same training, logged every 3 steps
    assert sorted(means) == [3, 6] and third.train_loss == every.train_loss
    assert means[3] == pytest.approx(sum(per_step[s] for s in (1, 2, 3)) / 3, rel=1e-6)
    assert means[6] == pytest.approx(sum(per_step[s] for s in (4, 5, 6)) / 3, rel=1e-6)


# Kills train.py:740 (fresh_windows called with step 0 instead of p.step): the fresh streams
# (train.fresh_streams) read the same lines at every step, so the model learned how a handful of lines begin.
def test_the_fresh_streams_start_at_other_lines_from_step_to_step(tmp_path, monkeypatch):
    real, seen = train_mod.fresh_windows, []

    def recording(*args, **kwargs):
        x, y = real(*args, **kwargs)
        seen.append(x.clone())
        return x, y
    monkeypatch.setattr(train_mod, "fresh_windows", recording)
    train(tiny_config(train__max_steps=6, train__fresh_streams=3), write_corpus(tmp_path), out=tmp_path / "run",
          show_progress=False)
    assert len(seen) == 6 and all(x.shape[0] == 3 for x in seen)
    assert len({tuple(x.flatten().tolist()) for x in seen}) == 6, "a step repeated another step's fresh rows"


# Kills train.py:638 (`global_rows = batch_size + fresh_streams` -> `batch_size`): the loss of a step, summed over
# the streams and the fresh rows, was divided by the streams' tokens only: the training loss reported was
# (B + k) / B times the mean per token (4x here), and the gradient scaled with it.
def test_the_training_loss_is_a_mean_per_token_over_streams_and_fresh_rows(tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(train__max_steps=1, train__log_interval=1, train__batch_size=2,
                               train__fresh_streams=6), write_corpus(tmp_path), out=run, show_progress=False)
    vocab = len(json.loads((run / "vocab.json").read_text(encoding="utf-8"))["tokens"])
    # a model one step from its random start gives every token about the same probability: about ln V nats
    assert result.train_loss == pytest.approx(math.log(vocab), rel=0.1)
    assert result.train_loss == pytest.approx(result.val_loss, rel=0.1)


# Kills train.py:303 (`path.write_text("")` for a new run dropped): training again into the folder of a run that
# failed before its first checkpoint (which --out allows: it holds no last/ or best/) kept the failed run's log,
# so metrics.jsonl held two start records and the old failure, and plot drew two runs as one.
def test_training_again_into_a_run_folder_that_failed_before_its_first_checkpoint_starts_a_new_log(tmp_path):
    corpus, run = write_corpus(tmp_path), tmp_path / "run"
    with pytest.raises(RunFailure, match="no checkpoint was saved"):
        train(tiny_config(train__max_steps=8, train__lr=1e39), corpus, out=run, show_progress=False)
    assert read_metrics(run).failed is not None and not (run / "last").exists()
    train(tiny_config(train__max_steps=4), corpus, out=run, show_progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["start", "end"]
    assert read_metrics(run).failed is None and summarize(run).status == "done"


# Kills train.py:261 (the write probe's unlink dropped in check_writable: a resume, whose recover() runs before
# the probe, left a `.write-test-PID` file in the run folder) and train.py:408 (`ckpt.recover(resume)` dropped:
# what a crashed process left, a half-written checkpoint folder and a temporary text file, stayed in the run
# folder for ever, the folder holding a checkpoint's worth of dead bytes).
def test_a_resume_clears_what_a_crash_left_and_leaves_no_write_probe(tmp_path):
    corpus, run = write_corpus(tmp_path), tmp_path / "run"
    train(tiny_config(train__max_steps=2), corpus, out=run, show_progress=False)
    assert list(run.glob(".*")) == []
    (run / ".tmp-last-999999").mkdir()  # a save cut short by kill -9
    (run / ".tmp-last-999999" / "model.safetensors").write_bytes(b"partial")
    (run / ".config.yaml.tmp-999999").write_text("partial", encoding="utf-8")
    train(tiny_config(train__max_steps=4), None, resume=run, show_progress=False)
    assert list(run.glob(".*")) == []


# Kills train.py:892 (the --val path saved in the trainer state as given, not made absolute): a run started with
# a relative --val and resumed from another working folder failed with "not found" for its own validation file.
def test_a_run_with_a_relative_val_resumes_from_another_working_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    write_corpus(work)
    write_corpus(work, "val.txt", lines=40, seed=5)
    monkeypatch.chdir(work)
    first = train(tiny_config(train__max_steps=4), Path("corpus.txt"), out=Path("run"), val=Path("val.txt"),
                  show_progress=False)
    state = torch.load(work / "run" / "last" / "trainer.pt", weights_only=True)
    assert Path(state["val"]) == work / "val.txt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = train(tiny_config(train__max_steps=6), None, resume=work / "run", show_progress=False)
    assert result.steps == 6 and result.val_loss is not None and first.val_loss is not None


# Kills train.py:138 (`ids.numel() > max_tokens + 1` -> `> max_tokens`): a train.eval_tokens that covers every
# target of the validation split (the split holds its <eos> start and eval_tokens targets) was taken as a slice:
# the checks were labelled "on the first N validation tokens", best/ was chosen on a "slice" that was the whole
# split, and the end of the run validated the same text twice.
def test_eval_tokens_that_cover_the_whole_split_are_not_a_slice(tmp_path):
    from charlm.data import prepare

    corpus = write_corpus(tmp_path)
    val = write_corpus(tmp_path, "val.txt", lines=6, seed=5)
    n = prepare(tiny_config().data, corpus, val).val.numel()  # <eos> first, then n - 1 targets
    for eval_tokens, sliced in ((n - 1, False), (n - 2, True)):
        run = tmp_path / f"run{eval_tokens}"
        result = train(tiny_config(train__max_steps=4, train__eval_interval=2, train__eval_tokens=eval_tokens),
                       corpus, out=run, val=val, show_progress=False)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        checks = [(r["step"], r["val_slice"]) for r in records if "val_loss" in r and "event" not in r]
        if sliced:
            assert result.best_val_tokens == eval_tokens and checks == [(2, True), (4, True), (4, False)]
        else:
            assert result.best_val_tokens is None and checks == [(2, False), (4, False)]
            assert result.best_val_loss == result.val_loss


# Kills train.py:241 (`"last.old", "best.old"` dropped from the names that mark a folder as holding a run): a run
# whose only checkpoint was caught mid-swap by a crash (last.old, no last/) was taken as an empty folder by a
# new `train --out` there, which recovered last.old into last/ and then trained over it: the run was lost.
@pytest.mark.parametrize("name", ["last", "best"])
def test_a_new_run_is_refused_where_a_crash_left_only_an_old_checkpoint(tmp_path, name):
    import shutil

    from helpers_reliability import assert_one_line_error, cli, write_config

    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    train(tiny_config(train__max_steps=2), corpus, out=run, show_progress=False)
    shutil.rmtree(run / ("best" if name == "last" else "last"))
    (run / name).rename(run / f"{name}.old")  # all that is left of the run's checkpoints
    before = (run / f"{name}.old" / "model.safetensors").read_bytes()
    result = cli("train", "--config", write_config(tmp_path), "--corpus", corpus, "--out", run, "-q")
    assert_one_line_error(result, 2, "already holds a run", "--resume")
    assert (run / f"{name}.old" / "model.safetensors").read_bytes() == before


# Kills train.py:553 (`before = saved.cfg.train.eval_tokens` -> this call's cfg): a trainer state saved before
# best_val_tokens was kept says nothing of what chose best/; the run's own config does. Read from the resume's
# config instead, a run that chose best/ on a train.eval_tokens slice (a low loss) and is resumed without it took
# best/ as chosen on the whole split, so no whole-split check could ever replace it.
def test_an_older_trainer_state_takes_the_measure_of_best_from_the_runs_own_config(tmp_path, monkeypatch):
    import io

    from helpers_reliability import rehash

    losses = iter([1.0, 2.0, 3.0, 2.5])  # slice, slice, whole split at the end; then the resumed check
    monkeypatch.setattr(train_mod, "evaluate", lambda *args, **kwargs: next(losses))
    corpus, run = write_corpus(tmp_path), tmp_path / "run"
    train(tiny_config(train__max_steps=2, train__eval_interval=1, train__eval_tokens=5), corpus, out=run,
          show_progress=False)
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    assert state["progress"]["best_val_tokens"] == 5
    del state["progress"]["best_val_tokens"], state["progress"]["best_val_text"]  # as an older version saved it
    torch.save(state, run / "last" / "trainer.pt")
    rehash(run / "last", "trainer.pt")
    log = io.StringIO()
    result = train(tiny_config(train__max_steps=3, train__eval_interval=1), None, resume=run, show_progress=False,
                   log_stream=log)
    assert "best/ was chosen on the first 5 validation tokens" in log.getvalue()
    best = json.loads((run / "best" / "manifest.json").read_text(encoding="utf-8"))
    assert (best["step"], best["val_loss"], result.best_val_loss, result.best_val_tokens) == (3, 2.5, 2.5, None)


# Kills train.py:565 (the note's threshold `0.01 * max(lr, then)` raised to 0.5): a resume whose new limits move
# the cosine rate by a tenth (max_steps 12 -> 13 at step 6) went on at another rate without a word.
def test_a_resume_that_moves_the_decayed_rate_by_a_tenth_says_so():
    import io

    from charlm.train import Progress, _note_schedule_moved

    before = tiny_config(train__max_steps=12, train__schedule="cosine")
    log = io.StringIO()
    _note_schedule_moved(before, tiny_config(train__max_steps=13, train__schedule="cosine"), Progress(step=6), 50, log)
    assert "goes on at 0.0056 where the run had reached 0.005" in log.getvalue()
    quiet = io.StringIO()
    _note_schedule_moved(before, tiny_config(train__max_steps=12, train__schedule="cosine", train__max_time=9e9),
                         Progress(step=6), 50, quiet)  # a limit that moves nothing: no note
    assert quiet.getvalue() == ""


def _lrs(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r["lr"] for r in lines if "lr" in r and "event" not in r}


# Kills train.py:863 (`p.plateau_bad > t.plateau_patience` -> `>=`): with train.plateau_patience 2 the rate was
# cut after two checks without improvement instead of after three (patience 0, the tests' usual value, hides it);
# and train.py:859 (`val_loss < p.plateau_best` -> `<=`): a loss that only equals the best counted as progress,
# so a stalled run never had its rate cut.
def test_the_plateau_cut_waits_for_patience_plus_one_checks_without_improvement(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "evaluate", lambda *args, **kwargs: 3.0)  # never better than the first check
    run = tmp_path / "run"
    train(tiny_config(train__max_steps=6, train__eval_interval=1, train__log_interval=1, train__schedule="plateau",
                      train__plateau_patience=2, train__plateau_factor=0.5, train__lr=0.01),
          write_corpus(tmp_path), out=run, show_progress=False)
    # checks after steps 2, 3, 4 are the 1st, 2nd and 3rd without improvement: the cut follows the 3rd
    assert [_lrs(run)[s] for s in range(1, 7)] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.005, 0.005])


# Kills train.py:858 (`periodic and` dropped: the extra validation at the end of a run drove the plateau schedule):
# a run stopped at max_steps 3 (a check at 2, the final one at 3) was left with its rate cut by a check that an
# uninterrupted run never makes, and its resume went on at half the rate.
def test_the_final_validation_does_not_drive_the_plateau_schedule(tmp_path, monkeypatch):
    losses = iter([2.0, 2.5, 1.5])  # the check at step 2, the final one at step 3, the resumed check at step 4
    monkeypatch.setattr(train_mod, "evaluate", lambda *args, **kwargs: next(losses))
    settings = dict(train__eval_interval=2, train__log_interval=1, train__schedule="plateau",
                    train__plateau_patience=0, train__plateau_factor=0.5, train__lr=0.01)
    corpus, run = write_corpus(tmp_path), tmp_path / "run"
    train(tiny_config(train__max_steps=3, **settings), corpus, out=run, show_progress=False)
    progress = torch.load(run / "last" / "trainer.pt", weights_only=True)["progress"]
    assert (progress["plateau_scale"], progress["plateau_best"], progress["plateau_bad"]) == (1.0, 2.0, 0)
    train(tiny_config(train__max_steps=4, **settings), None, resume=run, show_progress=False)
    assert _lrs(run)[4] == pytest.approx(0.01)


# Kills train.py:661 (`p.best_val_text = self.reading` for a state that has none dropped): a trainer state saved
# before best_val_text was kept then compared None with this run's reading at the first check after the resume,
# and took that check as best/ however much worse it was than the best the run had.
def test_an_older_trainer_state_keeps_its_best_against_a_worse_check_after_a_resume(tmp_path, monkeypatch):
    from helpers_reliability import rehash

    losses = iter([1.0, 2.0, 2.5])  # best at step 1; the resumed check at step 3 is worse
    monkeypatch.setattr(train_mod, "evaluate", lambda *args, **kwargs: next(losses))
    corpus, run = write_corpus(tmp_path), tmp_path / "run"
    train(tiny_config(train__max_steps=2, train__eval_interval=1), corpus, out=run, show_progress=False)
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    del state["progress"]["best_val_text"]  # as a version before it was kept saved it
    torch.save(state, run / "last" / "trainer.pt")
    rehash(run / "last", "trainer.pt")
    result = train(tiny_config(train__max_steps=3, train__eval_interval=1), None, resume=run, show_progress=False)
    best = json.loads((run / "best" / "manifest.json").read_text(encoding="utf-8"))
    assert (best["step"], best["val_loss"], result.best_val_loss) == (1, 1.0, 1.0)


# Kills train.py:495 (`if t.batch_size % dist.world` -> never): under torchrun started by hand (not through
# --nproc, whose launcher checks first) a batch that does not split over the processes was not refused by name;
# the ranks went on with unequal shares of the streams. Here rank 0 of a two-process job, before any collective.
def test_a_worker_refuses_a_batch_that_does_not_split_over_the_processes(tmp_path):
    import io

    from charlm.errors import UsageError
    from charlm.runtime import Distributed

    run, locks = tmp_path / "run", []
    try:
        with pytest.raises(UsageError, match=r"train.batch_size 3 must be a multiple of the number of processes \(2\)"):
            train_mod._train(tiny_config(train__batch_size=3), write_corpus(tmp_path), run, None, None, False,
                             io.StringIO(), None, Distributed(rank=0, world=2), torch.device("cpu"), [], None, locks)
    finally:
        for fd in locks:  # as train() lets go of the run folder's lock
            os.close(fd)
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
