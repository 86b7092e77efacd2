"""Shared helpers of the reliability tests: tiny corpora and runs, the CLI in-process and as a child process.

Every run here is a tiny model on a corpus built inside the test, so a test
takes a fraction of a second in-process and a few seconds as a child process
(most of which is importing torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import from_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models in one CPU thread: on a busy two-core machine, torch's thread pool only makes them wait.

    Autouse in every test module that imports it; the previous setting is put back afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

WORDS = ("the cat sat on a mat and the dog ran far away to the house of the kings "
         "while seven birds sang songs about rain").split()


def corpus_text(lines: int = 300, seed: int = 0) -> str:
    """A deterministic little text of short sentences (a linear congruential choice of words)."""
    state, out = seed * 7919 + 17, []
    for _ in range(lines):
        state = (state * 1103515245 + 12345) % 2**31
        n = 3 + state % 8
        words = []
        for _ in range(n):
            state = (state * 1103515245 + 12345) % 2**31
            words.append(WORDS[state % len(WORDS)])
        out.append(" ".join(words) + ".")
    return "\n".join(out) + "\n"


def write_corpus(folder: Path, name: str = "corpus.txt", lines: int = 300, seed: int = 0) -> Path:
    path = Path(folder) / name
    path.write_text(corpus_text(lines, seed), encoding="utf-8")
    return path


TINY = {
    "data": {"level": "char", "val_fraction": 0.1},
    "model": {"cell": "lstm", "impl": "torch", "layers": 1, "embedding_size": 8, "hidden_size": 16,
              "device": "cpu"},
    "train": {"batch_size": 4, "seq_len": 16, "lr": 0.01, "max_steps": 12, "eval_interval": 4,
              "log_interval": 2, "schedule": "constant", "seed": 7},
}


def tiny_raw(**fields) -> dict:
    """The TINY config as nested dicts, with `section__field=value` changes."""
    raw = {section: dict(values) for section, values in TINY.items()}
    for key, value in fields.items():
        section, name = key.split("__", 1)
        raw[section][name] = value
    return raw


def tiny_config(**fields):
    return from_dict(tiny_raw(**fields))


def write_config(folder: Path, name: str = "tiny.yaml", **fields) -> Path:
    import yaml

    path = Path(folder) / name
    path.write_text(yaml.safe_dump(tiny_raw(**fields)), encoding="utf-8")
    return path


def train_run(tmp_path: Path, name: str = "run", corpus: Path | None = None, **fields) -> Path:
    """Train a tiny run in-process; returns its folder."""
    from charlm.train import train

    corpus = corpus or write_corpus(tmp_path)
    run = Path(tmp_path) / name
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # also when called from a module-scoped fixture, before `one_thread`
    try:
        train(tiny_config(**fields), corpus, out=run, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return run


def cli(*args):
    """The CLI in-process: a result with exit_code, stdout and stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def charlm(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The CLI as a child process (`python -m charlm`), for signals, exit statuses and real streams."""
    return subprocess.run([sys.executable, "-m", "charlm", *map(str, args)], capture_output=True, text=True,
                          env=child_env(env), cwd=kwargs.pop("cwd", ROOT), timeout=kwargs.pop("timeout", 120),
                          **kwargs)


# Runs a command and prints its exit status and peak memory as JSON. It stands between the test and the
# command because Linux counts into a child's peak the memory of the process it was forked from (the
# pytest process, which may be large); forked from this small launcher, the command's peak is its own.
_MEASURE = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = child.stderr.read().decode(errors="replace")
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "peak_kib": usage.ru_maxrss, "stderr": err}))
"""


def peak_memory(*args, cwd: Path = ROOT) -> tuple[int, float, str]:
    """Exit status, peak resident memory (MiB) and stderr of `charlm ARGS` in a child process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "charlm", *map(str, args)],
                         capture_output=True, text=True, env=child_env(), cwd=cwd, timeout=300, check=True)
    record = json.loads(out.stdout)
    return record["code"], record["peak_kib"] / 1024, record["stderr"]


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add noise on a shared machine
    env.update(extra or {})
    return env


def assert_one_line_error(result, code: int, *fragments: str) -> str:
    """The exit code, exactly one line on stderr starting `charlm: error:`, no traceback; returns the line."""
    stderr = result.stderr
    got = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert got == code, (got, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rehash(folder: Path, name: str) -> None:
    """Update a checkpoint's manifest to the current bytes of `name`, as a forger would."""
    manifest_path = Path(folder) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = sha256(Path(folder) / name)
    manifest_path.write_text(json.dumps(manifest))


def metric_lines(run: Path) -> list[dict]:
    """The training and validation lines of metrics.jsonl without wall-clock fields."""
    out = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record and ("train_loss" in record or "val_loss" in record):
            out.append({k: v for k, v in record.items() if k not in ("elapsed", "tokens_per_second")})
    return out
