"""Checkpoints from strangers: nothing loaded runs code, a damaged or forged file is refused by name,
and a failed write never costs the previous checkpoint.

(The general save / load round trips are in test_checkpoint.py.)
"""

from __future__ import annotations

import builtins
import errno
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from charlm import checkpoint as ckpt
from charlm.checkpoint import load_checkpoint, load_run, recover, save_checkpoint
from charlm.errors import RunFailure, UsageError
from helpers_reliability import (assert_one_line_error, cli, one_thread, rehash, sha256, tiny_config,  # noqa: F401
                                 train_run, write_corpus)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(tmp)
    return train_run(tmp, corpus=corpus), corpus


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of a trained run (best/ and last/), and its corpus."""
    source, corpus = trained
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return copy


def every_command(run, corpus):
    return [("sample", run, "--max-length", "5"), ("score", run, "a cat"), ("eval", run, "--file", corpus),
            ("info", run)]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- damaged files
def test_one_byte_flip_in_a_weight_file_is_refused_by_every_command(run, trained):
    weights = run / "best" / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 3)  # inside the tensor data: still a valid safetensors file
    for args in every_command(run, trained[1]):
        assert_one_line_error(cli(*args), 2, "model.safetensors", "SHA-256", f"may be intact: {run / 'last'}")
    assert cli("score", run / "last", "a cat").exit_code == 0  # and it is


def test_one_byte_flip_in_the_trainer_state_is_refused_at_resume(run):
    flip_byte(run / "last" / "trainer.pt", 100)
    assert_one_line_error(cli("train", "--resume", run, "-q"), 2, "trainer.pt", "SHA-256")


def test_truncated_safetensors_is_refused_with_or_without_a_matching_manifest(run):
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(cli("sample", run), 2, "model.safetensors", "SHA-256")
    rehash(run / "best", "model.safetensors")  # a forged manifest: the file itself must still be refused
    assert_one_line_error(cli("sample", run), 2, "model.safetensors", "not a valid safetensors file")


def test_missing_file_or_a_manifest_naming_another_path_is_refused(run):
    (run / "best" / "vocab.json").unlink()
    assert_one_line_error(cli("info", run), 2, "vocab.json is missing")
    manifest = json.loads((run / "last" / "manifest.json").read_text())
    manifest["files"]["../config.yaml"] = manifest["files"]["config.yaml"]
    (run / "last" / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("info", run / "last"), 2, "unexpected file")


# ---------------------------------------------------------------- nothing loaded runs code
class _Payload:
    """Unpickling this calls exec(), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


def _plant_payload(run, marker):
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    state["progress"] = _Payload(marker)
    torch.save(state, run / "last" / "trainer.pt")


def test_pickled_payload_in_the_trainer_state_is_refused_by_the_manifest(run, tmp_path):
    marker = tmp_path / "pwned"
    _plant_payload(run, marker)
    assert_one_line_error(cli("train", "--resume", run, "-q"), 2, "trainer.pt", "SHA-256")
    assert not marker.exists()


def test_pickled_payload_with_a_forged_manifest_is_refused_by_the_unpickler(run, tmp_path):
    marker = tmp_path / "pwned"
    _plant_payload(run, marker)
    rehash(run / "last", "trainer.pt")
    line = assert_one_line_error(cli("train", "--resume", run, "-q"), 2, "refusing", "trainer.pt", "GLOBAL")
    assert "weights_only" not in line  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()
    # the same payload through the library call, and the proof that it is live when unpickled unsafely
    with pytest.raises(UsageError, match="more than tensors"):
        load_checkpoint(run, "last").trainer_state()
    assert not marker.exists()
    torch.load(run / "last" / "trainer.pt", weights_only=False)
    assert marker.exists()


def test_python_tag_in_a_checkpoint_config_is_refused_and_never_run(run, tmp_path):
    marker = tmp_path / "pwned"
    config = run / "best" / "config.yaml"
    config.write_text(f"!!python/object/apply:os.system [\"touch {marker}\"]\n" + config.read_text())
    rehash(run / "best", "config.yaml")
    assert_one_line_error(cli("sample", run), 2, "config.yaml", "python tags are never loaded")
    assert not marker.exists()


# ---------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_checkpoint_with_non_finite_weights_is_refused_by_sample_score_eval(run, trained, value):
    for name in ("best", "last"):
        weights = run / name / "model.safetensors"
        tensors = load_file(str(weights))
        tensors["decoder.bias"][3] = value
        save_file(tensors, str(weights), metadata={"format": "1"})
        rehash(run / name, "model.safetensors")
    for args in every_command(run, trained[1]):
        assert_one_line_error(cli(*args), 2, "decoder.bias", "NaN or infinite")


# ---------------------------------------------------------------- formats and mismatched files
@pytest.mark.parametrize("found,fragment", [(2, "newer charlm"), (0, "older charlm"), ("one", "no valid format")])
def test_checkpoint_of_another_format_gets_a_clear_message(run, found, fragment):
    manifest = json.loads((run / "best" / "manifest.json").read_text())
    manifest["format"] = found
    (run / "best" / "manifest.json").write_text(json.dumps(manifest))
    line = assert_one_line_error(cli("sample", run), 2, fragment, "format")
    assert "may be intact" not in line  # another format is not damage: last/ is of the same format


def test_trainer_state_of_another_format_is_refused_at_resume(run):
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    state["format"] = 99
    torch.save(state, run / "last" / "trainer.pt")
    rehash(run / "last", "trainer.pt")
    assert_one_line_error(cli("train", "--resume", run, "-q"), 2, "trainer state format 99")


def test_trainer_state_that_names_no_format_is_not_called_format_none(run):
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    del state["format"]
    torch.save(state, run / "last" / "trainer.pt")
    rehash(run / "last", "trainer.pt")
    line = assert_one_line_error(cli("train", "--resume", run, "-q"), 2, "not a charlm trainer state",
                                 "names no format")
    assert "None" not in line


def test_vocabulary_file_of_another_format_is_refused(run):
    vocab = json.loads((run / "best" / "vocab.json").read_text(encoding="utf-8"))
    vocab["format"] = 7
    (run / "best" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    rehash(run / "best", "vocab.json")
    assert_one_line_error(cli("sample", run), 2, "vocab.json", "format 7")


def test_vocabulary_that_does_not_fit_the_weights_is_refused(run):
    vocab = json.loads((run / "best" / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokens"] = vocab["tokens"][:-1]
    (run / "best" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    rehash(run / "best", "vocab.json")
    assert_one_line_error(cli("score", run, "a cat"), 2, "vocab.json", "do not belong together")


def test_vocabulary_of_another_tokenizer_than_the_config_is_refused(run):
    vocab = json.loads((run / "best" / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokenizer"]["level"] = "word"
    (run / "best" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    rehash(run / "best", "vocab.json")
    assert_one_line_error(cli("score", run, "a cat"), 2, "level=char", "do not belong together")


# ---------------------------------------------------------------- failed writes and recovery
def _tiny_model(seed=0):
    from charlm.data import build_codec
    from charlm.model import build_model

    cfg = tiny_config()
    codec = build_codec(cfg.data, "the cat sat on the mat\n")
    torch.manual_seed(seed)
    return cfg, codec, build_model(cfg.model, len(codec.vocab))


def _snapshot(folder):
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


def _failing_save_file(monkeypatch, exc):
    """safetensors' writer that writes half a file, then fails like a full disk."""
    def save_file_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 1000)
        raise exc
    monkeypatch.setattr(ckpt, "save_file", save_file_then_fail)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EFBIG, "File too large")])
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch, exc):
    cfg, codec, model = _tiny_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1, "step": 1}, {"step": 1})
    before = _snapshot(tmp_path / "last")
    _failing_save_file(monkeypatch, exc)
    with torch.no_grad():
        model.decoder.bias.add_(1.0)
    with pytest.raises(RunFailure, match=exc.strerror) as info:
        save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1, "step": 2}, {"step": 2})
    assert info.value.exit_code == 1 and "previous checkpoint is intact" in info.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert _snapshot(tmp_path / "last") == before
    assert load_checkpoint(tmp_path, "last").manifest["step"] == 1


def test_torch_save_failure_is_reported_as_a_write_failure(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError (its zip writer), not OSError."""
    cfg, codec, model = _tiny_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 1})
    before = _snapshot(tmp_path / "last")

    def torch_save_fails(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(ckpt.torch, "save", torch_save_fails)
    with pytest.raises(RunFailure, match="PytorchStreamWriter"):
        save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and _snapshot(tmp_path / "last") == before


def test_failure_between_the_renames_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    cfg, codec, model = _tiny_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 1})
    before = _snapshot(tmp_path / "last")
    real_rename = ckpt.os.rename

    def rename(src, dst):
        if str(src).rpartition("/")[2].startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(RunFailure, match="Input/output error") as info:
        save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and _snapshot(tmp_path / "last") == before
    # the message says so too (it said "none was saved yet" when the first rename had moved last/ aside)
    assert "the previous checkpoint is intact" in info.value.message
    assert "none was saved yet" not in info.value.message


def test_interrupt_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg, codec, model = _tiny_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 1})
    before = _snapshot(tmp_path / "last")
    _failing_save_file(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and _snapshot(tmp_path / "last") == before


def test_atomic_text_write_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def replace_fails(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt.os, "replace", replace_fails)
    with pytest.raises(OSError):
        ckpt.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_recover_cleans_stray_temporary_files_and_restores_a_swapped_checkpoint(tmp_path):
    cfg, codec, model = _tiny_model()
    save_checkpoint(tmp_path, "last", model, cfg, codec, {"format": 1}, {"step": 1})
    save_checkpoint(tmp_path, "best", model, cfg, codec, None, {"step": 1})
    good = _snapshot(tmp_path / "last")
    (tmp_path / "last").rename(tmp_path / "last.old")      # killed between the two renames
    shutil.copytree(tmp_path / "best", tmp_path / "best.old")  # killed before the old copy was removed
    half = tmp_path / ".tmp-last-4242"                        # killed while writing the next one
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".config.yaml.tmp-4242").write_text("half")
    (tmp_path / ".write-test-4242").write_text("probe")
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last"]
    assert _snapshot(tmp_path / "last") == good
    load_run(tmp_path, which="last")
    load_run(tmp_path, which="best")


@pytest.mark.parametrize("damage", ["truncated", "json", "empty"])
def test_a_damaged_trainer_state_with_a_matching_manifest_is_called_damaged(run, damage):
    """Not the unpickler's refusal ('more than tensors'): the file is cut short or not a torch file at all."""
    path = run / "last" / "trainer.pt"
    path.write_bytes({"truncated": path.read_bytes()[: path.stat().st_size // 2], "json": b'{"step": 3}',
                      "empty": b""}[damage])
    rehash(run / "last", "trainer.pt")
    line = assert_one_line_error(cli("train", "--resume", run, "-q"), 2, "trainer.pt", "damaged")
    assert "more than tensors" not in line and "weights_only" not in line


@pytest.mark.parametrize("name", ["last", "best"])
@pytest.mark.parametrize("left", ["new and old", "old only", "new and a half-written one",
                                  "old and a half-written one"])
def test_recover_keeps_the_newest_complete_checkpoint_whatever_a_crash_left(tmp_path, name, left):
    """Catches: recover() preferring name.old over a complete name/ (the older weights come back), leaving an
    .old or a .tmp-<name>-<pid> folder behind (best's as well as last's), or not renaming a lone .old back."""
    import json
    import shutil

    cfg, codec, model = _tiny_model()
    run, kept = tmp_path / "run", tmp_path / "kept"
    state = {"format": 1} if name == "last" else None
    save_checkpoint(run, name, model, cfg, codec, state, {"step": 1})
    shutil.copytree(run / name, kept)                            # step 1: the previous checkpoint
    save_checkpoint(run, name, model, cfg, codec, state, {"step": 2})  # step 2: the newer, complete one
    if left != "new and a half-written one":
        shutil.copytree(kept, run / f"{name}.old")               # killed before the old copy was removed
    if left in ("old only", "old and a half-written one"):
        shutil.rmtree(run / name)                                 # killed between the two renames
    if "half-written" in left:
        half = run / f".tmp-{name}-4242"                          # killed while writing the next one
        half.mkdir()
        (half / "model.safetensors").write_bytes(b"\0" * 10)
    recover(run)
    assert sorted(p.name for p in run.iterdir()) == [name]
    step = json.loads((run / name / "manifest.json").read_text())["step"]
    assert step == (2 if left in ("new and old", "new and a half-written one") else 1)
    load_checkpoint(run, name)
