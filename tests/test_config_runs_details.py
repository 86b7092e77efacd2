"""Config validation, run listing and tokenizer details that no earlier test pinned.

Each test names the mutant it kills (file:line as of the mutation audit of 2026-12-07)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charlm.config import from_dict, load_config
from charlm.errors import UsageError
from charlm.runs import find_runs, is_run_dir, list_runs, summarize
from charlm.tokenizer import unsegmented_cjk


# Kills config.py:158 (`isinstance(value, bool) or` dropped from the whole-number check: YAML `true` became
# the number 1, so `max_steps: true` trained for one step and `batch_size: yes` ran one stream, in silence).
@pytest.mark.parametrize("key,value", [("max_steps", True), ("batch_size", False), ("seed", True)])
def test_true_or_false_given_for_a_whole_number_is_refused_naming_the_key(key, value):
    with pytest.raises(UsageError, match=rf"train\.{key} must be a whole number, got {value}") as info:
        from_dict({"train": {key: value}})
    assert info.value.exit_code == 2


def test_a_set_of_true_for_a_whole_number_is_refused():
    with pytest.raises(UsageError, match="train.eval_interval must be a whole number"):
        load_config(None, ["train.eval_interval=true"])
    assert load_config(None, ["train.eval_interval=1"]).train.eval_interval == 1  # the number itself is fine


# Kills tokenizer.py:50 (`> len(words) / 2` -> `>=`: a vocabulary with as many plain words as CJK runs was
# called unsegmented Chinese, and `train` printed a note telling the user to segment a corpus that is fine).
def test_a_vocabulary_with_as_many_plain_words_as_cjk_runs_is_not_called_unsegmented():
    half = ["<unk>", "<eos>", "我们都是好学生", "hello", "今天天气很好啊", "world"]
    assert unsegmented_cjk(half) is False
    assert unsegmented_cjk(half + ["他们也是好学生"]) is True  # one more run: most words are runs
    assert unsegmented_cjk(["<unk>", "<eos>"]) is False


def _run_folder(folder: Path, records: list[dict], checkpoints: dict[str, dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("data: {level: char}\nmodel: {cell: lstm, hidden_size: 8}\n", encoding="utf-8")
    for name, manifest in checkpoints.items():
        (folder / name).mkdir()
        (folder / name / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


# Kills runs.py:131 (`(path / CONFIG_FILE).is_file() and` dropped from is_run_dir: any folder that merely holds a
# folder named last/ or best/, such as a data folder, was listed by `charlm runs` as a broken run, and a new
# run's --out above it was refused as "holds other runs").
def test_a_folder_that_only_holds_a_folder_named_last_or_best_is_no_run(tmp_path):
    _run_folder(tmp_path / "runs" / "real", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0},
                                             {"event": "end", "steps": 2, "elapsed": 1.0}], {"last": {"step": 2}})
    (tmp_path / "runs" / "datasets" / "last").mkdir(parents=True)
    (tmp_path / "runs" / "notes" / "best").mkdir(parents=True)
    assert not is_run_dir(tmp_path / "runs" / "datasets") and not is_run_dir(tmp_path / "runs" / "notes")
    assert find_runs(tmp_path / "runs") == [tmp_path / "runs" / "real"]
    assert [(r.name, r.status) for r in list_runs(tmp_path / "runs")] == [("real", "done")]


# The `elapsed` of last/'s manifest in the hand-made runs below: a value written into a file and read back by
# summarize, not a time that anything measures.
LAST_ELAPSED = 1.4


# Kills runs.py:255 (`s.steps = max(steps + [manifest step])` -> `max(steps)`: a run stopped by Ctrl-C at step 7
# before any validation, whose last log line was at step 5, was listed at step 5 though --resume goes on from 7).
def test_an_interrupted_run_counts_the_step_of_its_checkpoint_beyond_its_last_log_line(tmp_path):
    run = _run_folder(tmp_path / "r", [{"event": "start", "parameters": 10},
                                       {"step": 5, "elapsed": 1.0, "train_loss": 2.0}],
                      {"last": {"step": 7, "elapsed": LAST_ELAPSED, "val_loss": None, "parameters": 10}})
    s = summarize(run)
    assert (s.status, s.steps, s.elapsed) == ("unfinished", 7, LAST_ELAPSED)  # the manifest's own figure, not a timing


def test_an_interrupted_run_with_an_older_best_counts_the_step_of_its_last_checkpoint(tmp_path):
    """Catches: summarize reading the first manifest found, best/'s (step 4), so that a run stopped by Ctrl-C
    at step 7, whose last log line was at step 5, was listed at step 5 though --resume goes on from 7."""
    run = _run_folder(tmp_path / "r", [{"event": "start", "parameters": 10},
                                       {"step": 4, "elapsed": 0.8, "val_loss": 2.5},
                                       {"step": 5, "elapsed": 1.0, "train_loss": 2.0}],
                      {"best": {"step": 4, "elapsed": 0.8, "val_loss": 2.5, "parameters": 10},
                       "last": {"step": 7, "elapsed": LAST_ELAPSED, "val_loss": None, "parameters": 10}})
    s = summarize(run)
    assert (s.status, s.steps, s.elapsed) == ("unfinished", 7, LAST_ELAPSED)  # the manifest's own figure, not a timing


@pytest.mark.parametrize("empty", [[], 0, "", False])
def test_a_section_that_is_empty_but_no_mapping_is_refused_as_other_non_mappings_are(empty):
    """Catches: `model: []` (or 0, "", false) read as the defaults in silence (`raw.get(name) or {}`), where
    `model: [1, 2]` is refused, and where the same file with a --set of that section is refused too."""
    with pytest.raises(UsageError, match="section 'model' must be a mapping"):
        from_dict({"model": empty})
    assert from_dict({"model": None}).model.hidden_size == 256  # `model:` with nothing under it: the defaults


def test_an_empty_section_takes_a_set_or_a_shortcut_for_it(tmp_path):
    """Catches: a `model:` section with nothing under it (its keys commented out) read as the defaults alone, but
    refused as "not a mapping" once --set or --device gave a value in it."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n#  cell: gru\ntrain:\n  max_steps: 3\n", encoding="utf-8")
    cfg = load_config(path, ["model.hidden_size=32"], {"model.device": "cpu"})
    assert (cfg.model.hidden_size, cfg.model.device, cfg.train.max_steps) == (32, "cpu", 3)
