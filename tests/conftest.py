"""Shared fixtures: tiny corpora written into tmp_path, tiny configs, one tiny trained run.

Everything here is small enough to run in seconds on a CPU; nothing reads or
writes outside pytest's temporary folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from charlm.config import ModelConfig, load_config
from charlm.model import build_model
from charlm.tokenizer import TextCodec, Tokenizer, Vocabulary

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A few short lines with repeats, so a small model learns something in a few steps.
TINY_TEXT = "the cat sat on the mat.\nthe dog sat on the log.\na cat and a dog.\n" * 12


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Token files go to a temporary folder, never into the project (subprocesses inherit the variable)."""
    import os

    before = os.environ.get("CHARLM_CACHE_DIR")
    os.environ["CHARLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if before is None:
        os.environ.pop("CHARLM_CACHE_DIR", None)
    else:
        os.environ["CHARLM_CACHE_DIR"] = before


@pytest.fixture
def write_corpus(tmp_path):
    """write_corpus(text, name='corpus.txt') -> Path of a UTF-8 file holding `text`."""

    def write(text: str, name: str = "corpus.txt") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8", newline="")
        return path

    return write


def block_import(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules) fail as if it were not installed."""
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", without)


def tiny_config(**fields):
    """A small, fast Config; keyword arguments are 'section__field' overrides (train__max_steps=5)."""
    extra = {
        "data.val_fraction": 0.1,
        "model.embedding_size": 16, "model.hidden_size": 32, "model.device": "cpu",
        "train.batch_size": 4, "train.seq_len": 16, "train.lr": 0.01, "train.max_steps": 20,
        "train.eval_interval": 10, "train.log_interval": 5, "train.seed": 0,
    }
    extra.update({k.replace("__", "."): v for k, v in fields.items()})
    return load_config(None, None, extra)


def char_codec(symbols: str) -> TextCodec:
    """A character-level codec whose vocabulary is <unk>, <eos> and `symbols` in that order."""
    return TextCodec(Tokenizer("char"), Vocabulary(["<unk>", "<eos>", *symbols]))


def random_model(cell: str = "lstm", impl: str = "torch", vocab_size: int = 4, scale: float = 0.7, seed: int = 0):
    """A small model with random weights, spread wide enough that its distributions are far from uniform."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(cell=cell, impl=impl, layers=2, embedding_size=4, hidden_size=5,
                                    device="cpu", gru_form="torch"), vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder trained for a few steps on TINY_TEXT (shared, read-only for the tests that use it)."""
    from charlm.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    run_dir = root / "run"
    result = train(tiny_config(), corpus, out=run_dir, show_progress=False)
    return {"run_dir": run_dir, "corpus": corpus, "result": result}
