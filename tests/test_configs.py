"""Every shipped config loads and trains, and every command runs once: neither can rot unseen."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def corpus(tmp_path):
    """Enough words and characters for the largest shipped batch_size x seq_len."""
    path = tmp_path / "corpus.txt"
    if not path.exists():
        words = "the king said that a horse , a horse ; my kingdom for it . and so on".split()
        lines = [" ".join(words[(i * 5 + j) % len(words)] for j in range(9)) for i in range(420)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_configs_are_shipped():
    assert {c.name for c in CONFIGS} >= {"char_shakespeare.yaml", "word_wikitext.yaml", "tiny.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_trains(config, tmp_path):
    cfg = load_config(config)
    assert cfg.data.level in ("char", "word")
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--corpus", str(corpus(tmp_path)),
                                      "--out", str(tmp_path / "run"), "--max-steps", "2", "--device", "cpu",
                                      "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["steps"] == 2 and record["val_loss"] is not None


def test_every_command_runs_once(tmp_path):
    """One invocation per command on a tiny run; a new command must be added here."""
    run = str(tmp_path / "run")
    text = corpus(tmp_path)
    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    invocations = {
        "train": ["train", "--config", tiny, "--corpus", str(text), "--out", run, "--max-steps", "4", "--quiet"],
        "sample": ["sample", run, "--max-length", "20", "--seed", "1", "--json"],
        "score": ["score", run, "a horse", "my kingdom", "--per-token"],
        "eval": ["eval", run, "--file", str(text)],
        "info": ["info", run, "--json"],
        "runs": ["runs", str(tmp_path), "--sort", "val_loss"],
        "plot": ["plot", run, "--out", str(tmp_path / "curves.png")],
        "export": ["export", run, "--format", "torchscript", "--out", str(tmp_path / "step.pt")],
        "bench": ["bench", "--cells", "gru", "--impls", "custom,torch", "--hidden-size", "8", "--embedding-size", "4",
                  "--batch-size", "2", "--seq-len", "4", "--seconds", "0.05", "--rounds", "1", "--quiet"],
    }
    commands = set(typer.main.get_command(app).commands)
    assert commands <= set(invocations), f"add an invocation for {sorted(commands - set(invocations))} here"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        invocations.pop("plot")
    runner = CliRunner()
    for name, args in invocations.items():  # in order: train first
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"charlm {name}: {result.output}"
        assert result.stdout.strip(), f"charlm {name} printed nothing"
