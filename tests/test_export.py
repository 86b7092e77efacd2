"""charlm export: the single-step model runs without charlm and gives charlm's logits and state."""

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.checkpoint import load_run
from charlm.cli import app
from charlm.config import ModelConfig, load_config
from charlm.export import export_model
from charlm.errors import UsageError
from charlm.model import build_model
from charlm.tokenizer import EOS, UNK
from charlm.train import train
from conftest import block_import

STEPS = 6
TOLERANCE = 1e-4


def make_run(tmp_path, cell, impl, layers=2):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(f"abc {i % 5} xyz, cab {i % 3}." for i in range(120)) + "\n", encoding="utf-8")
    out = tmp_path / f"{cell}-{impl}"
    overrides = [f"model.cell={cell}", f"model.impl={impl}", f"model.layers={layers}", "model.hidden_size=12",
                 "model.embedding_size=6", "train.batch_size=2", "train.seq_len=8", "model.device=cpu"]
    train(load_config(overrides=overrides, extra={"train.max_steps": 3}), corpus, out=out, show_progress=False)
    return out


def charlm_steps(run_dir, tokens):
    """Logits and packed state after each step of charlm's own model, from the zero state."""
    model, _, _ = load_run(run_dir)
    state, logits_seq, state_seq = None, [], []
    with torch.no_grad():
        for step_tokens in tokens:
            logits, state = model.step(step_tokens, state)
            logits_seq.append(logits)
            state_seq.append(torch.stack(state) if isinstance(state, tuple) else state.unsqueeze(0))
    return logits_seq, state_seq


def test_torchscript_export_runs_without_charlm_and_matches_its_logits(tmp_path):
    combos = [("lstm", "torch"), ("lstm", "custom"), ("gru", "torch"), ("gru", "custom")]
    generator = torch.Generator().manual_seed(0)
    jobs = []
    for cell, impl in combos:
        run = make_run(tmp_path, cell, impl)
        _, codec, _ = load_run(run)
        tokens = [torch.full((3,), 1, dtype=torch.long)]  # <eos> first, as in generation
        tokens += [torch.randint(0, len(codec.vocab), (3,), generator=generator) for _ in range(STEPS - 1)]
        path = tmp_path / f"{cell}-{impl}.pt"
        result = CliRunner().invoke(app, ["export", str(run), "--format", "torchscript", "--out", str(path), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["max_abs_diff"] < TOLERANCE
        torch.save(torch.stack(tokens), tmp_path / f"{cell}-{impl}.tokens.pt")
        jobs.append((cell, impl, run, path, tokens, codec.vocab.tokens))

    # A separate interpreter that never imports charlm loads every export and runs it.
    script = textwrap.dedent("""
        import json, sys, torch
        for stem in sys.argv[1:]:
            extra = {"charlm.json": ""}
            step = torch.jit.load(stem + ".pt", _extra_files=extra)
            meta = json.loads(extra["charlm.json"])
            tokens = torch.load(stem + ".tokens.pt", weights_only=True)
            s, layers, _, hidden = meta["state_shape"]
            state = torch.zeros(s, layers, tokens.shape[1], hidden)
            logits_seq, state_seq = [], []
            for t in tokens:
                logits, state = step(t, state)
                logits_seq.append(logits)
                state_seq.append(state)
            torch.save({"logits": logits_seq, "state": state_seq, "tokens": meta["tokens"]}, stem + ".out.pt")
        assert not any(name == "charlm" or name.startswith("charlm.") for name in sys.modules), "charlm was imported"
    """)
    stems = [str(tmp_path / f"{cell}-{impl}") for cell, impl, *_ in jobs]
    done = subprocess.run([sys.executable, "-c", script, *stems], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr

    for (cell, impl, run, path, tokens, vocab), stem in zip(jobs, stems):
        theirs = torch.load(stem + ".out.pt", weights_only=True)
        ours_logits, ours_state = charlm_steps(run, tokens)
        assert theirs["tokens"] == vocab, f"{cell}/{impl}: the vocabulary travels with the export"
        for ours, exported in zip(ours_logits + ours_state, theirs["logits"] + theirs["state"]):
            assert ours.shape == exported.shape
            assert (ours - exported).abs().max() < TOLERANCE, f"{cell}/{impl} differs"


def readme_greedy_snippet() -> str:
    """The README's "greedy generation with nothing but torch" example, as a user would copy it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    after = readme.split("Greedy generation with nothing but torch", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("cell, impl", [("gru", "custom"), ("lstm", "torch")])
def test_the_readmes_greedy_example_runs_on_an_export_and_agrees_with_charlm_sample(tmp_path, cell, impl):
    # The example masks <unk> in place in the logits: that must work on every export (it failed on the
    # custom cells' step while the exported weights still required gradients).
    run = make_run(tmp_path, cell, impl, layers=1)
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "bard.pt")])
    assert result.exit_code == 0, result.output
    done = subprocess.run([sys.executable, "-c", readme_greedy_snippet()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sampled = CliRunner().invoke(app, ["sample", str(run), "--temperature", "0", "--max-length", "200"])
    assert sampled.exit_code == 0, sampled.output
    assert done.stdout.strip() and done.stdout.strip() == sampled.stdout.strip()


def test_onnx_export_matches_charlm_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    for cell, impl in (("lstm", "custom"), ("gru", "torch")):
        run = make_run(tmp_path, cell, impl)
        path = tmp_path / f"{cell}.onnx"
        result = export_model(run, "onnx", path)
        assert result.max_abs_diff is not None and result.max_abs_diff < TOLERANCE
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map["charlm"])
        s, layers, _, hidden = meta["state_shape"]
        tokens = [torch.full((4,), 1, dtype=torch.long)] + [torch.tensor([2, 3, 4, 5]) + k for k in range(STEPS - 1)]
        ours_logits, ours_state = charlm_steps(run, tokens)
        state = torch.zeros(s, layers, 4, hidden).numpy()
        for t, ours_l, ours_s in zip(tokens, ours_logits, ours_state):
            logits, state = session.run(None, {"tokens": t.numpy(), "state": state})
            assert abs(torch.from_numpy(logits) - ours_l).max() < TOLERANCE
            assert abs(torch.from_numpy(state) - ours_s).max() < TOLERANCE


def test_export_refuses_an_unknown_format_and_a_folder_without_checkpoint(tmp_path):
    runner = CliRunner()
    run = make_run(tmp_path, "rnn", "torch", layers=1)
    bad = runner.invoke(app, ["export", str(run), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "--format must be one of torchscript, onnx" in bad.stderr
    empty = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.pt")])
    assert empty.exit_code == 2 and "run folder not found" in empty.stderr
    folder = runner.invoke(app, ["export", str(run), "--out", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.stderr and len(folder.stderr.strip().splitlines()) == 1


def test_export_takes_its_format_from_the_name_and_refuses_a_contradiction(tmp_path):
    runner = CliRunner()
    run = make_run(tmp_path, "rnn", "torch", layers=1)
    pt = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.pt"), "--json"])
    assert pt.exit_code == 0 and json.loads(pt.stdout)["format"] == "torchscript" and pt.stderr == ""
    again = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.pt"), "--json"])
    assert again.exit_code == 0  # a file replaced gets a note, as plot's picture does
    assert again.stderr == (f"charlm: note: {tmp_path / 'm.pt'} was there before and is replaced "
                            f"(--out FILE writes another)\n")
    for name, fmt, other in (("m.onnx", "torchscript", "onnx"), ("m.pt", "onnx", "torchscript")):
        bad = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / f"x-{name}"), "--format", fmt])
        assert bad.exit_code == 2 and f"pass --format {other}" in bad.stderr, bad.stderr
        assert not (tmp_path / f"x-{name}").exists()
    onnx = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx"), "--json"])
    if onnx.exit_code == 0:  # the onnx extra installed: an ONNX file was written
        assert json.loads(onnx.stdout)["format"] == "onnx"
    else:  # without it, the message asks for what ONNX needs: the name chose ONNX
        assert onnx.exit_code == 2 and "pip install 'onnx>=1.15' 'onnxruntime>=1.17'" in onnx.stderr, onnx.stderr


def test_export_to_a_place_that_cannot_be_written_is_one_line(tmp_path):
    """torch.jit.save's own failure to open a file is a RuntimeError of several lines: the file is opened
    by charlm instead. Here the name is a link into a folder that does not exist."""
    run = make_run(tmp_path, "gru", "torch", layers=1)
    out = tmp_path / "link.pt"
    out.symlink_to(tmp_path / "missing" / "m.pt")
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("charlm: error: export: cannot write") and len(result.stderr.splitlines()) == 1


def test_export_never_overwrites_a_checkpoint_or_a_file_that_is_not_an_export(tmp_path):
    runner = CliRunner()
    run = make_run(tmp_path, "gru", "custom", layers=1)
    weights = run / "best" / "model.safetensors"
    before = weights.read_bytes()
    inside = runner.invoke(app, ["export", str(run), "--out", str(weights)])
    assert inside.exit_code == 2 and "inside the checkpoint folder" in inside.stderr
    assert weights.read_bytes() == before and load_run(run)[0] is not None  # the run still loads
    new_inside = runner.invoke(app, ["export", str(run), "--out", str(run / "last" / "model.pt")])
    assert new_inside.exit_code == 2 and not (run / "last" / "model.pt").exists()
    corpus = tmp_path / "corpus.txt"
    text = corpus.read_text(encoding="utf-8")
    clobber = runner.invoke(app, ["export", str(run), "--out", str(corpus)])
    assert clobber.exit_code == 2 and "is not a charlm export" in clobber.stderr
    assert corpus.read_text(encoding="utf-8") == text
    # an earlier export is replaced, as a second `charlm export` to the same name expects
    target = tmp_path / "model.pt"
    for _ in range(2):
        again = runner.invoke(app, ["export", str(run), "--out", str(target)])
        assert again.exit_code == 0, again.output


def test_an_earlier_onnx_export_may_be_replaced(tmp_path):
    pytest.importorskip("onnx")
    run = make_run(tmp_path, "rnn", "torch", layers=1)
    path = tmp_path / "m.onnx"
    export_model(run, "onnx", path)
    export_model(run, "onnx", path)  # no UsageError: the file is recognised as an export
    path.write_bytes(b"\x08\x07not an onnx model")
    with pytest.raises(Exception, match="not a charlm export"):
        export_model(run, "onnx", path)


def test_the_export_check_compares_the_state_as_well_as_the_logits():
    """Catches: check_against compared the logits only, so an export handing back a wrong state (whose effect on
    the logits comes a step later, or never in the steps checked) passed its check."""
    from charlm.export import SingleStep, check_against, zero_state
    from conftest import random_model

    model = random_model("lstm", vocab_size=5).eval()
    right = SingleStep(model).eval()
    kept = {"state": zero_state(model, 3)}

    def run(tokens, state):  # the right logits, from the right state kept here, but a state handed back off by 0.25
        with torch.no_grad():
            logits, kept["state"] = right(tokens, kept["state"])
        return logits, kept["state"] + 0.25

    assert check_against(model, run, steps=4) == pytest.approx(0.25, abs=1e-5)
    kept["state"] = zero_state(model, 3)
    assert check_against(model, lambda t, s: right(t, s), steps=4) < 1e-5


def test_export_human_output_states_the_step_signature(tmp_path):
    """Catches: the printed signature giving the state's dimensions in the wrong order (layers first) or the
    wrong vocabulary size; only --json was checked."""
    run = make_run(tmp_path, "lstm", "torch", layers=1)
    _, codec, _ = load_run(run)
    out = tmp_path / "step.pt"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote           {out} (torchscript, from ")
    assert lines[1] == (f"signature       step(tokens (B,) int64, state (2, 1, B, 12) float32) "
                        f"-> (logits (B, {len(codec.vocab)}), state)")
    assert lines[2].startswith("check           max |difference| from charlm over ")


@pytest.mark.parametrize("cell, s", [("rnn", 1), ("gru", 1), ("lstm", 2)])
def test_export_metadata_names_the_vocabulary_the_special_ids_and_the_state_shape(cell, s):
    """Catches: eos_id and unk_id swapped (or the tokens list cut) in the metadata an exported file carries, which
    the existing export tests never read: a user would start generation from <unk>."""
    from charlm.export import metadata
    from conftest import char_codec

    codec = char_codec("ab")
    model = build_model(ModelConfig(cell=cell, layers=3, embedding_size=4, hidden_size=5), len(codec.vocab))
    meta = json.loads(json.dumps(metadata(model, codec), ensure_ascii=False))  # as stored in the file
    assert meta["tokens"] == [UNK, EOS, "a", "b"] and meta["vocab_size"] == 4
    assert meta["tokens"][meta["eos_id"]] == EOS and meta["tokens"][meta["unk_id"]] == UNK
    assert meta["state_shape"] == [s, 3, "B", 5] and meta["cell"] == cell
    assert meta["tokenizer"] == {"level": "char", "lowercase": False, "word_split": "punct",
                                 "normalization": "NFC", "pattern": None, "pattern_syntax": "python-re"}


def test_export_metadata_lets_a_word_prime_be_split_without_charlm():
    """Catches: metadata naming only the tokenizer's settings, so a deployer without charlm split a prime on
    white space ('(24', 'in),', '3.14') and fed the model unknown words; the pattern and the normalisation
    written into the file give charlm's tokens."""
    import re
    import unicodedata

    from charlm.export import metadata
    from charlm.tokenizer import TextCodec, Tokenizer, Vocabulary

    codec = TextCodec(Tokenizer("word"), Vocabulary())
    model = build_model(ModelConfig(cell="gru", embedding_size=4, hidden_size=5), len(codec.vocab))
    meta = json.loads(json.dumps(metadata(model, codec), ensure_ascii=False))["tokenizer"]
    assert meta["normalization"] == "NFC" and meta["pattern"]
    for text in ["It weighs (24 in), 3.14 kg. Don't stop!", "我爱北京 <unk> café, 'quoted' 👍🏽"]:
        by_hand = re.findall(meta["pattern"], unicodedata.normalize(meta["normalization"], text))
        assert by_hand == codec.tokenizer.split(text)


def test_only_charlms_own_exports_may_be_overwritten(tmp_path):
    """Catches: _is_export taking any zip archive (torch.save's files, a user's .zip) or any file that mentions
    'charlm' near its end (a corpus, notes) for an earlier export, which --out then overwrote."""
    from charlm.export import _check_destination, _is_export

    saved_tensor = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), saved_tensor)  # a zip archive without charlm's extra file
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/corpus.txt", "text")
    notes = tmp_path / "notes.txt"
    notes.write_text("trained with charlm\ncharlm export run --out model.onnx\n", encoding="utf-8")
    for path in (saved_tensor, archive, notes):
        assert not _is_export(path), path
        with pytest.raises(UsageError, match="not a charlm export"):
            _check_destination(path)

    script = tmp_path / "model.pt"  # what torch.jit.save writes, reduced to the part that matters
    with zipfile.ZipFile(script, "w") as z:
        z.writestr("model/extra/charlm.json", "{}")
    onnx_like = tmp_path / "model.onnx"  # a metadata_props entry: field tag, key length, key
    onnx_like.write_bytes(b"\x08\x07graph bytes\x00" + b"\x0a\x06charlm\x12\x02{}")
    for path in (script, onnx_like):
        assert _is_export(path), path
        _check_destination(path)


# Kills export.py:102 (the suffix compared without .lower(): "m.ONNX" written as TorchScript).
def test_export_takes_onnx_from_an_upper_case_suffix(tmp_path):
    pytest.importorskip("onnx")
    run = make_run(tmp_path, "rnn", "torch", layers=1)
    assert export_model(run, None, tmp_path / "m.ONNX").format == "onnx"


# Kills export.py:107 (the contradiction check applied to every name: --format onnx refused for "m.bin").
def test_an_explicit_format_may_write_a_name_of_another_suffix(tmp_path):
    pytest.importorskip("onnx")
    run = make_run(tmp_path, "rnn", "torch", layers=1)
    assert export_model(run, "onnx", tmp_path / "m.bin").format == "onnx"
    assert export_model(run, "torchscript", tmp_path / "m.ts").format == "torchscript"


# Kills export.py:131 (the check's result replaced by 0.0: a broken export reported as exact).
def test_export_reports_the_difference_its_check_finds(tmp_path, monkeypatch):
    from charlm import export as export_mod

    run = make_run(tmp_path, "gru", "torch", layers=1)
    real_load = export_mod._load_torchscript

    def load_off_by_one(path):
        step = real_load(path)
        return lambda tokens, state: (lambda out: (out[0] + 1.0, out[1]))(step(tokens, state))
    monkeypatch.setattr(export_mod, "_load_torchscript", load_off_by_one)
    result = export_model(run, "torchscript", tmp_path / "m.pt")
    assert result.max_abs_diff == pytest.approx(1.0, abs=1e-4) and result.check_steps == 8


# Kills export.py:201 (no onnxruntime made a failure) and export.py:133 (check_steps reported for a check
# that did not run).
def test_an_onnx_export_without_onnxruntime_is_written_and_says_it_was_not_checked(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    run = make_run(tmp_path, "rnn", "torch", layers=1)
    block_import(monkeypatch, "onnxruntime")
    result = export_model(run, "onnx", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert result.max_abs_diff is None and result.check_steps == 0
