"""The command line as a user meets it: help with an example everywhere, version, completion, progress output."""

import re

import pytest
import typer
from typer.testing import CliRunner

from charlm import __version__
from charlm.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout, f"charlm {command} --help shows no example: add one to its docstring"
    assert f"charlm {command}" in result.stdout


def test_top_level_help_lists_every_command_and_completion():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"charlm {__version__}"


def test_shell_completion_script_and_completion_of_command_names(monkeypatch):
    import typer.completion

    runner = CliRunner()
    # `--show-completion` is a flag: the script is for the shell that Typer finds among the test's parent
    # processes, and where it found none (a run started in the background, 2026-12-02 and 2026-12-07) it said
    # "Shell  not supported" and exit 1. The shell is given here, so the test does not depend on who runs it.
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    script = runner.invoke(app, ["--show-completion"], prog_name="charlm")
    assert script.exit_code == 0 and "_CHARLM_COMPLETE=complete_bash" in script.stdout, \
        (script.output, script.exception)
    # What bash asks when the user types `charlm ex<TAB>`:
    env = {"_CHARLM_COMPLETE": "complete_bash", "COMP_WORDS": "charlm ex", "COMP_CWORD": "1"}
    words = runner.invoke(app, [], prog_name="charlm", env=env)
    assert words.stdout.split() == ["export"]


def tiny_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"the quick brown fox {i % 9} jumps" for i in range(80)) + "\n", encoding="utf-8")
    return path


TRAIN = ["train", "--set", "model.hidden_size=8", "--set", "model.embedding_size=4", "--set", "train.batch_size=2",
         "--set", "train.seq_len=8", "--set", "train.log_interval=2", "--set", "train.eval_interval=4",
         "--device", "cpu", "--max-steps", "6"]


def test_progress_is_plain_log_lines_when_stderr_is_not_a_terminal(tmp_path):
    result = CliRunner().invoke(app, [*TRAIN, "--corpus", str(tiny_corpus(tmp_path)), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert [ln.split()[:2] for ln in lines if " loss " in ln] == [["step", "2"], ["step", "4"], ["step", "6"]]
    assert any(ln.startswith("step 4 val_loss ") and ln.endswith(tuple("0123456789")) for ln in lines)
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr  # no bar redrawn in place, no escapes
    assert "run folder" in result.stdout  # the result still goes to stdout


def test_a_periodic_check_on_a_slice_says_so_in_the_log_line(tmp_path):
    result = CliRunner().invoke(app, [*TRAIN, "--set", "train.eval_tokens=10", "--corpus", str(tiny_corpus(tmp_path)),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("step 4 val_loss "))
    assert line.endswith(" (on the first 10 validation tokens)")


def test_quiet_silences_progress_but_not_the_result(tmp_path):
    result = CliRunner().invoke(app, [*TRAIN, "--quiet", "--corpus", str(tiny_corpus(tmp_path)),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "val loss" in result.stdout
