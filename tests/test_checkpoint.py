"""Checkpoints: written atomically, verified, reloaded into a model that scores exactly the same."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from charlm.checkpoint import (Checkpoint, find_checkpoint, load_checkpoint, load_run, recover,
                               save_checkpoint, sha256)
from charlm.errors import RunFailure, UsageError
from charlm.model import build_model
from charlm.score import score_sentences
from charlm.tokenizer import TextCodec, Tokenizer, Vocabulary, count_tokens
from conftest import TINY_TEXT, tiny_config

SENTENCES = ["the cat sat on the mat.", "", "a dog!", "zzz unknown ☃", "the log."]


def codec_and_model(**fields):
    cfg = tiny_config(**fields)
    tokenizer = Tokenizer(cfg.data.level)
    codec = TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, TINY_TEXT)))
    torch.manual_seed(0)
    model = build_model(cfg.model, len(codec.vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the initial values the reload would build
    return cfg, codec, model.eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("cell,impl", [("lstm", "torch"), ("gru", "custom"), ("rnn", "custom")])
def test_reloaded_checkpoint_gives_exactly_the_same_scores(tmp_path, cell, impl, tie):
    cfg, codec, model = codec_and_model(model__cell=cell, model__impl=impl, model__tie_weights=tie,
                                        model__embedding_size=32, model__layers=2)
    before = score_sentences(model, codec, SENTENCES)
    folder = save_checkpoint(tmp_path / "run", "best", model, cfg, codec)
    loaded, loaded_codec, saved = load_run(tmp_path / "run")
    assert saved.folder == folder and saved.cfg == cfg
    assert loaded_codec.vocab.tokens == codec.vocab.tokens
    after = score_sentences(loaded, loaded_codec, SENTENCES)
    assert [r.token_logprobs for r in after] == [r.token_logprobs for r in before]  # bit for bit
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    if tie:
        assert loaded.decoder.weight is loaded.encoder.weight
        stored = load_file(str(folder / "model.safetensors"))
        assert "decoder.weight" not in stored and "encoder.weight" in stored  # the shared matrix, once


def test_checkpoint_folder_has_a_manifest_of_hashes(tmp_path):
    cfg, codec, model = codec_and_model()
    folder = save_checkpoint(tmp_path, "last", model, cfg, codec, {"step": 3, "note": [1, 2]}, {"step": 3})
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.yaml", "vocab.json", "trainer.pt"}
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert manifest["step"] == 3
    state = load_checkpoint(tmp_path, "last").trainer_state()
    assert state == {"step": 3, "note": [1, 2]}


def test_saving_again_replaces_the_checkpoint_and_leaves_no_temporary_files(tmp_path):
    cfg, codec, model = codec_and_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec)
    with torch.no_grad():
        model.decoder.bias.add_(1.0)
    save_checkpoint(tmp_path, "last", model, cfg, codec)
    loaded, _, _ = load_run(tmp_path, which="last")
    assert torch.equal(loaded.decoder.bias, model.decoder.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_an_altered_file_is_refused(tmp_path):
    cfg, codec, model = codec_and_model()
    folder = save_checkpoint(tmp_path, "best", model, cfg, codec)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["decoder.bias"] = tensors["decoder.bias"] + 1
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UsageError, match="SHA-256"):
        load_run(tmp_path)


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg, codec, model = codec_and_model()
    with torch.no_grad():
        model.decoder.bias[0] = math.nan
    with pytest.raises(RunFailure, match="NaN"):
        save_checkpoint(tmp_path, "best", model, cfg, codec)
    assert not (tmp_path / "best").exists()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg, codec, model = codec_and_model()
    folder = save_checkpoint(tmp_path, "best", model, cfg, codec)
    text = (folder / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 33")
    (folder / "config.yaml").write_text(text)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = sha256(folder / "config.yaml")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="shape"):
        load_run(tmp_path)


class _NotPlainData:
    pass


def test_trainer_state_that_is_more_than_tensors_is_refused(tmp_path):
    torch.save({"payload": _NotPlainData()}, tmp_path / "trainer.pt")
    checkpoint = Checkpoint(tmp_path, None, None, {}, {})
    with pytest.raises(UsageError, match="refusing"):
        checkpoint.trainer_state()


def test_find_checkpoint_prefers_best_then_last(tmp_path):
    cfg, codec, model = codec_and_model()
    with pytest.raises(UsageError, match="not found"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="no checkpoint"):
        find_checkpoint(tmp_path)
    save_checkpoint(tmp_path, "last", model, cfg, codec)
    assert find_checkpoint(tmp_path) == tmp_path / "last"
    save_checkpoint(tmp_path, "best", model, cfg, codec)
    assert find_checkpoint(tmp_path) == tmp_path / "best"
    assert find_checkpoint(tmp_path, "last") == tmp_path / "last"
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last"  # a checkpoint folder itself


def test_recover_restores_a_checkpoint_caught_between_the_renames(tmp_path):
    cfg, codec, model = codec_and_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec)
    (tmp_path / "last").rename(tmp_path / "last.old")  # as if killed after the first rename
    (tmp_path / ".tmp-last-123").mkdir()               # a half-written new checkpoint
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    load_run(tmp_path, which="last")


def test_a_trained_run_reloads_from_both_checkpoints(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], run)
    for which in ("best", "last"):
        model, codec, saved = load_run(run, which=which)
        assert not model.training
        first = score_sentences(model, codec, SENTENCES)
        again = score_sentences(*load_run(run, which=which)[:2], SENTENCES)
        assert [r.logprob for r in first] == [r.logprob for r in again]
        assert all(math.isfinite(r.logprob) for r in first)


def test_a_manifest_that_does_not_list_the_weights_is_refused(tmp_path):
    # Otherwise the weights would load without their hash being checked.
    cfg = tiny_config()
    codec = TextCodec(Tokenizer("char"), Vocabulary(["<unk>", "<eos>", "a", "b"]))
    folder = save_checkpoint(tmp_path, "best", build_model(cfg.model, len(codec.vocab)), cfg, codec)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["model.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((UsageError, RunFailure), match="model.safetensors"):
        load_checkpoint(tmp_path)


# Kills checkpoint.py:145 (`if old.exists(): shutil.rmtree(old)` dropped before `os.rename(final, old)`).
def test_saving_over_a_stale_old_copy_left_by_a_crash_replaces_both(tmp_path):
    """A crash after the swap but before `last.old` was removed leaves it behind; a process that saves
    without running recover() first must still be able to save (rename onto a non-empty folder fails)."""
    cfg, codec, model = codec_and_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec)
    shutil.copytree(tmp_path / "last", tmp_path / "last.old")
    with torch.no_grad():
        model.decoder.bias.add_(1.0)
    save_checkpoint(tmp_path, "last", model, cfg, codec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    loaded, _, _ = load_run(tmp_path, which="last")
    assert torch.equal(loaded.decoder.bias, model.decoder.bias)


# Kills checkpoint.py:126 (`if tmp.exists(): shutil.rmtree(tmp)` dropped: mkdir of the temp folder fails).
def test_saving_clears_a_leftover_temporary_folder_of_the_same_process_id(tmp_path):
    cfg, codec, model = codec_and_model()
    stale = tmp_path / f".tmp-best-{os.getpid()}"  # a crashed process of the same pid, never recovered
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    save_checkpoint(tmp_path, "best", model, cfg, codec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    load_run(tmp_path, which="best")


# Kills checkpoint.py:283 (the `"/" in name` test dropped: an absolute path in the manifest is hashed and accepted).
def test_a_manifest_naming_an_absolute_path_is_refused(tmp_path):
    cfg, codec, model = codec_and_model()
    folder = save_checkpoint(tmp_path / "run", "best", model, cfg, codec)
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the checkpoint")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][str(outside)] = sha256(outside)  # a forger's manifest that matches the outside file
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="unexpected file"):
        load_checkpoint(tmp_path / "run")


def _rewrite_weights(folder, change):
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "1"})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = sha256(folder / "model.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))


# Kills checkpoint.py:356 (`missing or unexpected` -> `unexpected`) and checkpoint.py:367 (_is_tied_alias
# ignoring tie_weights): the untied decoder weight is missing and the model would keep its random initial values.
def test_a_weight_missing_from_the_file_is_refused_not_left_at_its_initial_value(tmp_path):
    cfg, codec, model = codec_and_model()
    assert not cfg.model.tie_weights
    folder = save_checkpoint(tmp_path, "best", model, cfg, codec)
    _rewrite_weights(folder, lambda t: t.pop("decoder.weight"))
    with pytest.raises(UsageError, match="missing.*decoder.weight"):
        load_run(tmp_path)


# Kills checkpoint.py:356 (`missing or unexpected` -> `missing`): an extra tensor then fails as a KeyError.
def test_a_weight_the_model_does_not_have_is_refused(tmp_path):
    cfg, codec, model = codec_and_model()
    folder = save_checkpoint(tmp_path, "best", model, cfg, codec)
    _rewrite_weights(folder, lambda t: t.update({"extra.weight": torch.zeros(2, 2)}))
    with pytest.raises(UsageError, match="unexpected.*extra.weight"):
        load_run(tmp_path)


# Kills checkpoint.py:345 (`rows.shape[0] != len(codec.vocab)` -> `>`): a vocabulary longer than the weights.
def test_a_vocabulary_longer_than_the_weights_is_refused_when_loading(tmp_path):
    cfg, codec, model = codec_and_model()
    folder = save_checkpoint(tmp_path, "best", model, cfg, codec)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokens"].append("\u2603")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["vocab.json"] = sha256(folder / "vocab.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="do not belong together"):
        load_checkpoint(tmp_path)
