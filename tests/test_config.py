"""Configuration: YAML in, validated, overrides applied; every shipped config loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from charlm.config import (MAX_SEED, Config, ModelConfig, describe_fields, dump_yaml, from_dict, load_config,
                           parse_override, unread_settings)
from charlm.errors import UsageError
from conftest import PROJECT_ROOT

SHIPPED = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


def test_the_project_ships_configs():
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "char_shakespeare.yaml", "word_wikitext.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the YAML names only known keys: dumping and reading back gives the same config
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.level == "char" and cfg.model.cell == "lstm"


def test_yaml_values_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  cell: gru\n  hidden_size: 17\ntrain:\n  lr: 1.0e-4\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.train.lr) == ("gru", 17, 1e-4)
    assert cfg.model.layers == Config().model.layers


def test_set_overrides_apply_after_the_file_with_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  cell: gru\n", encoding="utf-8")
    cfg = load_config(path, ["model.cell=rnn", "data.level=word", "train.lr=2e-3", "model.tie_weights=false",
                             "train.max_steps=null", "model.hidden_size=64", "model.embedding_size=64"])
    assert cfg.model.cell == "rnn" and cfg.data.level == "word"
    assert cfg.train.lr == 2e-3 and cfg.train.max_steps is None and cfg.model.hidden_size == 64


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4 as a string; a config must still take it as a number.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  max_steps: 1e3\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 1000
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(UsageError, match="must be a number"):
        load_config(None, ["train.lr=fast"])


def test_extra_values_override_set_and_none_means_unset():
    cfg = load_config(None, ["train.seed=1"], {"train.seed": 5, "train.max_steps": None})
    assert cfg.train.seed == 5 and cfg.train.max_steps is None


def test_int_fields_accept_whole_floats_and_float_fields_accept_ints():
    cfg = from_dict({"model": {"hidden_size": 32.0}, "train": {"lr": 1}})
    assert cfg.model.hidden_size == 32 and isinstance(cfg.model.hidden_size, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("raw,message", [
    ({"model": {"cells": "gru"}}, "unknown key model.cells"),
    ({"modle": {}}, "unknown section 'modle'"),
    ({"model": {"cell": "transformer"}}, "model.cell must be one of"),
    ({"model": {"hidden_size": 0}}, "model.hidden_size must be >= 1"),
    ({"model": {"hidden_size": 2.5}}, "whole number"),
    ({"model": {"dropout": 1.0}}, "model.dropout must be < 1"),
    ({"train": {"lr": 0}}, "train.lr must be > 0"),
    ({"train": {"lr": "fast"}}, "must be a number"),
    ({"train": {"lr": float("nan")}}, "finite"),
    ({"data": {"val_fraction": 0.9}}, "data.val_fraction must be <= 0.5"),
    ({"model": {"tie_weights": "yes"}}, "true or false"),
    ({"model": {"cell": None}}, "must not be empty"),
    ({"model": {"tie_weights": True, "embedding_size": 8, "hidden_size": 16}}, "tie_weights"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"model": {"adaptive_cutoffs": "abc"}}, "model.adaptive_cutoffs must be whole numbers"),  # full softmax too
    ({"model": {"softmax": "adaptive", "adaptive_cutoffs": "50,20"}}, "increasing"),
    ([1, 2], "top level"),
])
def test_bad_configs_are_usage_errors_naming_the_key(raw, message):
    with pytest.raises(UsageError, match=message) as info:
        from_dict(raw)
    assert info.value.exit_code == 2
    assert "\n" not in info.value.message


def test_a_single_adaptive_cutoff_may_be_written_as_a_number():
    cfg = from_dict({"model": {"softmax": "adaptive", "adaptive_cutoffs": 2000}})
    assert cfg.model.adaptive_cutoffs == "2000"
    cfg = load_config(overrides=["model.softmax=adaptive", "model.adaptive_cutoffs=10"])
    assert cfg.model.adaptive_cutoffs == "10"
    with pytest.raises(UsageError, match="must be a string"):
        from_dict({"model": {"adaptive_cutoffs": True}})


@pytest.mark.parametrize("item,message", [
    ("model.cell", "section.field=value"),
    ("cell=gru", "section.field=value"),
    ("optim.lr=1", "unknown section"),
    ("model.cell=[a, b]", "single number"),
])
def test_bad_overrides_are_usage_errors(item, message):
    with pytest.raises(UsageError, match=message):
        parse_override(item)


def test_unknown_key_in_an_override_is_refused():
    with pytest.raises(UsageError, match="unknown key train.learning_rate"):
        load_config(None, ["train.learning_rate=0.1"])


def test_yaml_with_python_tags_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not plain YAML"):
        load_config(path)


def test_missing_config_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == Config()


def test_describe_fields_covers_every_field_with_help():
    rows = describe_fields()
    keys = [key for key, *_ in rows]
    expected = {f"{section}.{name}" for section, values in Config().to_dict().items() for name in values}
    assert set(keys) == expected and len(keys) == len(expected)
    assert all(help_text for *_, help_text in rows)


@pytest.mark.parametrize("text, message", [
    # a key given twice is refused, not silently replaced by the second
    ("model:\n  hidden_size: 8\nmodel:\n  cell: gru\n", r"'model' is given twice \(lines 1 and 3\)"),
    ("model:\n  hidden_size: 8\n  hidden_size: 12\n", r"'hidden_size' is given twice \(lines 2 and 3\)"),
    ("model: {hidden_size: 8, hidden_size: 12}\n", r"'hidden_size' is given twice \(line 1\)"),  # on one line
    # what a Chinese input method types: a key's colon as U+FF1A, an indent of U+3000 (before, the errors said
    # that a section or the top level is not a mapping, or named a line past the end)
    ("model:\n  cell\uff1a gru\n", r"line 2\b.*full-width colon"),
    ("train\uff1a\n  lr\uff1a 0.01\n", r"line 1\b.*full-width colon"),
    ("train:\n  max_steps\uff1a 5\n", r"line 2\b.*full-width colon"),
    ("model:\n\u3000\u3000cell: gru\n", r"line 2\b.*full-width spaces"),
])
def test_a_config_that_yaml_would_misread_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        load_config(path)


def test_a_text_file_given_as_config_is_said_to_be_no_config(tmp_path):
    """A play's speaker labels read as YAML keys, repeated: the message says what the file is not."""
    path = tmp_path / "play.txt"
    path.write_text("JULIET: O Romeo.\nROMEO: Lady.\nJULIET: Good night.\n", encoding="utf-8")
    with pytest.raises(UsageError, match="does not look like a charlm config: its top level has 'JULIET'"):
        load_config(path)


def test_a_yaml_syntax_error_names_its_line_and_not_python_tags(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  hidden_size: 8\ntrain: [1, 2\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not plain YAML \\(at the end of the file: ") as caught:  # 3 lines
        load_config(path)
    path.write_text("model:\n  hidden_size: [8\ntrain: {}\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not plain YAML \\(line 3: "):
        load_config(path)
    assert "python" not in str(caught.value)


def test_a_set_value_with_a_python_tag_is_read_as_text_never_constructed(tmp_path):
    """Catches: --set values read with an unsafe YAML loader, which ran the tag's call."""
    from charlm.config import load_config, parse_override
    from charlm.errors import UsageError

    made = tmp_path / "made"
    assert parse_override("data.encoding=!!python/name:os.getcwd") == ("data", "encoding", "!!python/name:os.getcwd")
    try:
        load_config(overrides=[f"model.cell=!!python/object/apply:os.mkdir ['{made}']"])
    except UsageError:
        pass
    assert not made.exists()


def test_an_empty_set_value_means_null():
    """Catches: an empty value kept as the empty string, so `--set train.max_steps=` was refused."""
    from charlm.config import load_config

    cfg = load_config(overrides=["train.max_steps=", "train.max_time=600"])
    assert cfg.train.max_steps is None and cfg.train.max_time == 600


# Kills config.py:173 (`value > high` -> `value >= high`: a closed upper bound refused at the bound itself).
def test_a_value_at_a_closed_upper_bound_is_accepted():
    cfg = from_dict({"data": {"val_fraction": 0.5}, "train": {"final_lr_fraction": 1.0, "seed": MAX_SEED},
                     "model": {"layers": 64}})
    assert (cfg.data.val_fraction, cfg.train.final_lr_fraction, cfg.train.seed, cfg.model.layers) == \
        (0.5, 1.0, MAX_SEED, 64)


# Kills config.py:182 (the mapping check dropped: `set(5)` raises TypeError, a traceback).
@pytest.mark.parametrize("value", [5, "gru", [1, 2]])
def test_a_section_that_is_not_a_mapping_is_a_usage_error(value):
    with pytest.raises(UsageError, match="section 'model' must be a mapping"):
        from_dict({"model": value})


# Kills config.py:200 (`raw.get(name) or {}` -> `raw.get(name, {})`: a section left empty refused).
def test_a_section_with_every_key_commented_out_gives_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  # hidden_size: 8\ntrain:\n  lr: 0.1\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.model == ModelConfig() and cfg.train.lr == 0.1


# Kills config.py:213 (`cutoffs[0] < 1` dropped, or `sorted(set(cutoffs))` -> `sorted(cutoffs)`).
@pytest.mark.parametrize("cutoffs", ["0,10", "10,10", "-5"])
def test_adaptive_cutoffs_must_be_positive_and_strictly_increasing(cutoffs):
    with pytest.raises(UsageError, match="increasing positive"):
        from_dict({"model": {"softmax": "adaptive", "adaptive_cutoffs": cutoffs}})


# Kills config.py:301 (the check dropped: `--set` into a section that is not a mapping raises TypeError).
def test_a_set_into_a_section_that_is_not_a_mapping_is_a_usage_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: 5\n", encoding="utf-8")
    with pytest.raises(UsageError, match="section 'model' must be a mapping"):
        load_config(path, ["model.cell=gru"])


# Kills config.py:228 (`id(node) in seen_nodes` dropped: a recursive alias loops for ever). Run in a child
# process so that the mutant hangs the child, not the test session; the timeout is generous.
def test_a_recursive_yaml_alias_is_refused_and_does_not_hang(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("model: &a [*a]\n", encoding="utf-8")
    script = ("import sys\nfrom charlm.config import load_config\nfrom charlm.errors import UsageError\n"
              "try:\n    load_config(sys.argv[1])\nexcept UsageError as exc:\n    print(exc.message)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert "section 'model' must be a mapping" in done.stdout


def test_a_base_config_that_is_no_mapping_is_named_in_the_error(tmp_path):
    """Catches: a resume's base config (the run's config.yaml, no --config given) named as 'config file None'."""
    base = tmp_path / "config.yaml"
    base.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(UsageError, match=rf"config file {base}: the top level must be a mapping"):
        load_config(None, [], {}, base=base)


def test_full_width_colons_in_comments_and_values_are_fine(tmp_path):
    path = tmp_path / "zh.yaml"
    path.write_text("# 说明：字符级\ntrain:\n  lr: 0.01  # 学习率：很小\ndata:\n  level: char\n", encoding="utf-8")
    assert load_config(path).train.lr == 0.01


def test_a_config_in_another_encoding_is_named_not_utf8(tmp_path):
    path = tmp_path / "gbk.yaml"
    path.write_bytes("# 我的配置\ntrain:\n  lr: 0.01\n".encode("gbk"))
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 0xce at offset 2\): save it as UTF-8") as info:
        load_config(path)
    assert "codec" not in str(info.value)


def test_a_saved_runs_config_without_fresh_streams_reads_as_the_version_that_wrote_it(tmp_path):
    """Catches: a run saved before train.fresh_streams existed taking the new default (2) when it is loaded or
    resumed without --config: the resumed run would silently train otherwise than it did. A config the user
    writes without the field gets the default."""
    raw = {"data": {"level": "char"}, "train": {"batch_size": 4}}
    assert from_dict(raw, saved_run=True).train.fresh_streams == 0
    assert from_dict({"data": {"level": "char"}}, saved_run=True).train.fresh_streams == 0
    assert from_dict(raw).train.fresh_streams == 2
    assert from_dict({"train": {"fresh_streams": 4}}, saved_run=True).train.fresh_streams == 4
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert load_config(None, [], {}, base=path).train.fresh_streams == 0    # a resume's base: the run's own
    assert load_config(path, [], {}).train.fresh_streams == 2               # --config: the user's file
    assert raw == {"data": {"level": "char"}, "train": {"batch_size": 4}}   # the caller's dict is left alone


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_no_shipped_config_sets_what_its_runs_do_not_read(path):
    assert unread_settings(load_config(path)) == []


@pytest.mark.parametrize("overrides, unread", [
    (["model.cell=gru", "model.impl=torch", "model.gru_form=torch"], [("model", "gru_form")]),
    (["model.cell=gru", "model.impl=custom", "model.gru_form=torch"], []),
    (["model.cell=lstm", "model.impl=custom", "model.gru_form=torch"], [("model", "gru_form")]),
    (["model.cell=gru", "model.nonlinearity=relu"], [("model", "nonlinearity")]),
    (["model.cell=rnn", "model.nonlinearity=relu"], []),
    (["train.optimizer=adamw", "train.momentum=0.9"], [("train", "momentum")]),
    (["train.optimizer=sgd", "train.momentum=0.9", "train.beta2=0.99"], [("train", "beta2")]),
    (["train.schedule=constant", "train.final_lr_fraction=0.1", "train.plateau_patience=2"],
     [("train", "final_lr_fraction"), ("train", "plateau_patience")]),
    (["train.schedule=plateau", "train.plateau_factor=0.5", "train.plateau_patience=2"], []),
    (["model.adaptive_cutoffs=100", "model.adaptive_div=2"],
     [("model", "adaptive_cutoffs"), ("model", "adaptive_div")]),
    (["model.softmax=adaptive", "model.adaptive_div=2", "model.tie_weights=true", "model.embedding_size=32",
      "model.hidden_size=32"], [("model", "adaptive_div")]),
    (["data.level=char", "data.word_split=space"], [("data", "word_split")]),
    (["data.level=word", "data.word_split=space"], []),
])
def test_settings_a_run_never_reads_are_found(overrides, unread):
    """Catches: a setting that the run takes silently and ignores (nn.GRU has no classic form, AdamW no
    momentum), so that the user believes they changed the model or the optimizer."""
    cfg = load_config(None, overrides)
    assert [(section, name) for section, name, _ in unread_settings(cfg)] == unread
