"""Run folders at a glance: find the runs under a folder and summarise each one.

Only the small text files of a run are read (`config.yaml`, `metrics.jsonl`,
the checkpoints' `manifest.json`), never the weights, so listing a hundred runs
is instant. A run that cannot be read is still listed, marked broken with the
reason, because a listing that crashes on one bad folder hides all the others.

`read_metrics` is also what `plot` draws from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UsageError

# The run-folder file names of `checkpoint.py`, repeated here so that listing runs
# does not import torch (checkpoint.py does); tests/test_runs.py checks they agree.
CONFIG_FILE, MANIFEST_FILE, METRICS_FILE = "config.yaml", "manifest.json", "metrics.jsonl"
CHECKPOINT_NAMES = ("best", "last", "best.old", "last.old")  # the checkpoint folders inside a run folder


def is_checkpoint_folder(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).exists()


def checkpoint_folder_holding(path: Path) -> Path | None:
    """The checkpoint folder that `path` is or lies inside (absolute), or None."""
    path = Path(path).absolute()
    return next((folder for folder in (path, *path.parents) if is_checkpoint_folder(folder)), None)


def run_folder_of(path: Path, option: str, names: tuple[str, ...] = CHECKPOINT_NAMES) -> Path:
    """The run folder for `path`, which may name one of its checkpoint folders `names` (runs/x/best ->
    runs/x). Another checkpoint folder (a copy outside a run, say, or one not in `names`): a UsageError."""
    path = Path(path)
    if not is_checkpoint_folder(path):
        return path
    if path.name in names and not is_checkpoint_folder(path.parent):
        return path.parent
    run = f" ({path.parent})" if path.name in CHECKPOINT_NAMES else ""
    raise UsageError(f"{option} {path}: this is a checkpoint folder, not a run folder; name the run folder "
                     f"that holds it{run}")


CHECKPOINTS = ("best", "last")


@dataclass
class Metrics:
    """The lines of a metrics.jsonl, sorted by kind: the validation lines and the events as the JSON objects
    written. The training lines of a long run are many (100,000 for 2,000,000 steps logged every 20), so
    they are not all kept: `train` holds those that a plot draws (TrainingCurve), and the figures that
    `runs` takes from all of them are gathered as the file is read."""

    train: list[dict] = field(default_factory=list)   # lines with a finite train_loss, as their step, elapsed
                                                       # and train_loss: every one of a log of up to
                                                       # 2 * CURVE_STRETCHES, a selection of a longer one
    val: list[dict] = field(default_factory=list)     # lines with val_loss (and no train_loss): all of them
    start: dict | None = None                          # {"event": "start", ...}
    end: dict | None = None                            # {"event": "end", ...}: the run finished
    failed: dict | None = None                         # {"event": "failed", "step", "error"}: it stopped on an error
    bad_lines: int = 0                                 # lines that are not JSON objects (a torn last line)
    train_lines: int = 0                               # lines with train_loss (NaN too), all of them
    train_step: int | None = None                      # the furthest step of those lines, and their longest elapsed
    train_elapsed: float | None = None                 # (both as max() over them gives it: see _further)


# A long log's training lines are cut into at most this many stretches (at least half as many), each drawn by
# four of its lines: finer than the pixels of a plot's panel, which is about 500 wide.
CURVE_STRETCHES = 1024


class TrainingCurve:
    """The training lines that a plot draws: at most 4 * CURVE_STRETCHES of them, however long the log.

    The lines are cut into stretches of consecutive lines, as many lines in each (a power of two, which
    doubles whenever the stretches fill up: two neighbours become one), and each stretch keeps its first
    line, its last, and those with its lowest and its highest loss. Where a stretch is narrower than a
    pixel, a line through these four covers the same pixels as one through all of its lines (the band that
    the noise of the loss draws, every spike, the first and the last point); a mean per stretch would draw
    a smoother curve than the run had. A log of up to 2 * CURVE_STRETCHES lines keeps every line."""

    def __init__(self, stretches: int = CURVE_STRETCHES):
        self.limit = stretches - stretches % 2  # even: they are merged in pairs
        self.width = 1                          # lines in each stretch: the last one may hold fewer
        self.count = 0                          # lines added
        self.stretches: list[list[tuple]] = []  # [first, lowest, highest, last], each (index, loss, step, elapsed)

    def add(self, loss: float, step, elapsed) -> None:
        """The next line: its finite train_loss, and its step and elapsed as written."""
        point = (self.count, loss, step, elapsed)
        if self.count == len(self.stretches) * self.width:  # the last stretch is full
            if len(self.stretches) == self.limit:
                self._merge_pairs()
            self.stretches.append([point, point, point, point])
        else:
            stretch = self.stretches[-1]
            if loss < stretch[1][1]:
                stretch[1] = point
            if loss > stretch[2][1]:
                stretch[2] = point
            stretch[3] = point
        self.count += 1

    def _merge_pairs(self) -> None:
        pairs = zip(self.stretches[0::2], self.stretches[1::2])
        self.stretches = [[a[0], min(a[1], b[1], key=_loss), max(a[2], b[2], key=_loss), b[3]] for a, b in pairs]
        self.width *= 2

    def records(self) -> list[dict]:
        """The kept lines in the order of the file, each as {"step", "elapsed", "train_loss"}."""
        kept = []
        for stretch in self.stretches:
            points = {point[0]: point for point in stretch}  # one line may be both first and lowest
            kept += [{"step": step, "elapsed": elapsed, "train_loss": loss}
                     for _, loss, step, elapsed in (points[index] for index in sorted(points))]
        return kept


def _loss(point: tuple) -> float:
    return point[1]


def read_metrics(run_dir: Path) -> Metrics:
    """Parse RUN_DIR/metrics.jsonl; a missing file raises UsageError, a bad line is counted and skipped.

    The file is read a line at a time, and of the training lines only a TrainingCurve is kept, so a log of
    millions of lines needs a few megabytes, not its whole text and a dict per line (gigabytes)."""
    path = Path(run_dir) / METRICS_FILE
    m, curve = Metrics(), TrainingCurve()
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for text in fh:
                # a line of the file may hold more than one line for str.splitlines, which also breaks at
                # \x1c, U+2028 and the like (in a hand-edited file): cut where it cuts the whole text, so
                # that the lines, bad ones included, and thus the summary, do not depend on how it is read
                for line in text.splitlines():
                    _read_line(line, m, curve)
    except FileNotFoundError:
        raise UsageError(f"{run_dir} has no {METRICS_FILE}: is it a run folder?") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    m.train = curve.records()
    return m


def _read_line(line: str, m: Metrics, curve: TrainingCurve) -> None:
    """Sort one line of metrics.jsonl into `m` (a training line also into `curve`)."""
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except ValueError:
        m.bad_lines += 1
        return
    if not isinstance(record, dict):
        m.bad_lines += 1
        return
    event = record.get("event")
    if event == "start":
        m.start = record
    elif event == "end":
        m.end = record
    elif event == "failed":
        m.failed = record
    elif (loss := _number(record.get("train_loss"))) is not None:
        m.train_lines += 1
        m.train_step = _further(m.train_step, _int(record.get("step")))
        m.train_elapsed = _further(m.train_elapsed, _number(record.get("elapsed")))
        if math.isfinite(loss):  # a NaN or infinite loss is never drawn
            curve.add(loss, record.get("step"), record.get("elapsed"))
    elif _number(record.get("val_loss")) is not None:
        m.val.append(record)


def _further(best, value):
    """`value` where it is not None and passes `best` (None: no value yet), else `best`. Folded over values
    in turn, this is max() of those that are not None, with max()'s own comparisons, so that a NaN in a
    damaged log (which no comparison passes) counts just where max() of a list of them would count it."""
    return value if value is not None and (best is None or value > best) else best


@dataclass
class RunSummary:
    """One row of `charlm runs`. Fields are None where the run does not say."""

    name: str
    path: str
    status: str                      # "done", "unfinished" (no end record: still running, or stopped), "failed"
                                     # (stopped on an error: `problem` says which) or "broken"
    level: str | None = None
    cell: str | None = None
    impl: str | None = None
    layers: int | None = None
    hidden_size: int | None = None
    parameters: int | None = None
    steps: int | None = None
    best_val_loss: float | None = None  # of the model best/ holds, where its manifest says so
    best_val_bpc: float | None = None
    best_val_slice: bool = False        # best_val_loss measured on a train.eval_tokens slice of the split
    best_val_tokens: int | None = None  # the slice's size, where the record says
    elapsed: float | None = None
    problem: str | None = None       # why a run is broken


# `--sort` names, mapped to the field they sort by.
SORT_KEYS = {"name": "name", "status": "status", "level": "level", "cell": "cell", "impl": "impl",
             "size": "hidden_size", "layers": "layers", "hidden_size": "hidden_size", "parameters": "parameters",
             "steps": "steps", "val_loss": "best_val_loss", "bpc": "best_val_bpc", "time": "elapsed"}


def is_run_dir(path: Path) -> bool:
    """A run folder has a metrics log, or a config beside a best/ or last/ checkpoint folder."""
    if (path / METRICS_FILE).is_file():
        return True
    return (path / CONFIG_FILE).is_file() and any((path / c).is_dir() for c in CHECKPOINTS)


def check_room_for_a_new_run(run_dir: Path) -> None:
    """A new run's folder neither holds runs (`--out runs`) nor lies inside one: `charlm runs` does not
    look inside a run folder, so either way runs would drop out of its table. It only reads, so that every
    process may call it before any folder is made. Above: the folders of the path up to the current one
    (for a path outside it, the nearest four: not a stray metrics.jsonl far up); below: three levels."""
    run_dir = Path(os.path.normpath(run_dir))
    here = Path.cwd()
    if run_dir.is_absolute() and run_dir.is_relative_to(here):
        run_dir = run_dir.relative_to(here)
    above = list(run_dir.parents)[:4] if run_dir.is_absolute() else list(run_dir.parents)[:-1]
    for parent in above:
        if _quietly(is_run_dir, parent):
            raise UsageError(f"run folder {run_dir} would lie inside the run folder {parent}: choose another --out")
    inside = _runs_below(run_dir, 3)
    if inside:
        names = [p.relative_to(run_dir).as_posix() for p in inside]
        raise UsageError(f"run folder {run_dir} holds other runs ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}): give this run a folder of its own, such as "
                         f"{run_dir / 'new-run'}")


def _runs_below(folder: Path, depth: int) -> list[Path]:
    """Run folders below `folder`, at most `depth` levels down; what cannot be read is passed over."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_symlink()
                         and _quietly(Path.is_dir, p))
    except OSError:
        return []
    found = []
    for entry in entries:
        if _quietly(is_run_dir, entry):
            found.append(entry)
        elif depth > 1:
            found += _runs_below(entry, depth - 1)
    return found


def _quietly(test, path: Path) -> bool:
    """test(path), False where the path cannot be looked at (a folder without search permission)."""
    try:
        return test(path)
    except OSError:
        return False


def find_runs(folder: Path) -> list[Path]:
    """Every run folder at or below `folder` (not descending into a run once found)."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    if is_run_dir(folder):
        return [folder]
    real = Path(os.path.realpath(folder))  # runs/x/best named as such, as `.` inside it, or through a link
    if real.name in CHECKPOINTS and is_checkpoint_folder(real) and is_run_dir(real.parent):
        return [real.parent]  # the run that holds it, as every other command reads it
    found = []
    for root, dirs, _ in os.walk(folder):
        here = Path(root)
        dirs.sort()
        keep = []
        for d in dirs:
            if d.startswith("."):
                continue  # .tmp-* checkpoint folders being written, hidden folders
            if is_run_dir(here / d):
                found.append(here / d)
            else:
                keep.append(d)
        dirs[:] = keep
    return found


def slice_and_whole_checks(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """A run's validation records as (checks on a train.eval_tokens slice of the split, checks of the whole
    split). Records of an older version, without `val_slice`, count as slices only in a run whose labelled
    records show slices (a run resumed with the same settings); where none does, every check is whole-split."""
    if not any(r.get("val_slice") is True for r in records):
        return [], records
    return [r for r in records if r.get("val_slice") is not False], [r for r in records if r.get("val_slice") is False]


def summarize(run_dir: Path, name: str | None = None) -> RunSummary:
    """A RunSummary from the text files of one run; never raises for a damaged run."""
    run_dir = Path(run_dir)
    s = RunSummary(name=name or run_dir.name, path=str(run_dir), status="done")
    problems = []

    model, data, problem = _config_sections(run_dir)
    if problem is not None:
        problems.append(problem)
    s.cell, s.impl = model.get("cell"), model.get("impl")
    s.layers, s.hidden_size = _int(model.get("layers")), _int(model.get("hidden_size"))
    s.level = data.get("level")

    manifests = {name: read_manifest(run_dir, name) for name in CHECKPOINTS}  # each read once
    saved = [m for m in manifests.values() if m is not None]  # best/'s first, as the commands read them
    manifest = saved[0] if saved else None
    problems += _damaged_checkpoints(run_dir, manifests)
    no_checkpoint_at = len(problems)  # "no checkpoint" goes here once the metrics say whether the run ended
    if manifest is not None:
        s.parameters = _int(manifest.get("parameters"))
    # the furthest checkpoint: last/ is often ahead of best/, and of the last metrics line (a run stopped by a
    # signal between two of them, which --resume goes on from)
    s.steps = max((x for x in (_int(m.get("step")) for m in saved) if x is not None), default=None)
    s.elapsed = max((x for x in (_number(m.get("elapsed")) for m in saved) if x is not None), default=None)

    try:
        m = read_metrics(run_dir)
    except UsageError:
        m = None
        problems.append(f"no {METRICS_FILE}")
    if m is not None:
        if m.start:
            s.parameters = _int(m.start.get("parameters")) or s.parameters
        # the training lines, the validation lines, the end record, then the checkpoints: in the order of
        # max() over one list of them all (which a NaN time can tell apart)
        steps, times = m.train_step, m.train_elapsed
        for r in m.val:
            steps, times = _further(steps, _int(r.get("step"))), _further(times, _number(r.get("elapsed")))
        if m.end:
            steps, times = _further(steps, _int(m.end.get("steps"))), _further(times, _number(m.end.get("elapsed")))
        if steps is not None:
            s.steps = _further(steps, s.steps)
        if times is not None:
            s.elapsed = _further(times, s.elapsed)
        vals = [r for r in m.val if _number(r.get("val_loss")) is not None and math.isfinite(r["val_loss"])]
        # A check on a slice of the split measures other text than the whole split does, and its loss may be
        # far lower: once the run has a figure for the whole split, the slices step aside.
        sliced, whole = slice_and_whole_checks(vals)
        chosen = _loss_of_best(manifests["best"], vals)
        vals = whole or sliced
        if chosen is not None:
            s.best_val_loss, s.best_val_bpc, s.best_val_slice, s.best_val_tokens = chosen
        elif vals:  # a run saved before manifests said on what their loss was measured, or with no best/
            best = min(vals, key=lambda r: r["val_loss"])
            s.best_val_loss, s.best_val_bpc = float(best["val_loss"]), _number(best.get("val_bpc"))
        if m.end is None:
            s.status = "unfinished"
        if m.end is None and m.failed is not None:
            s.status, s.problem = "failed", f"stopped at step {m.failed.get('step')}: {m.failed.get('error')}"
    if manifest is None and not (m is not None and m.end is None):  # not still before its first checkpoint
        problems.insert(no_checkpoint_at, "no checkpoint")
    if s.best_val_loss is None and manifest is not None:
        s.best_val_loss = _number(manifest.get("val_loss"))

    if problems:
        s.status, s.problem = "broken", "; ".join(problems)
    return s


def _config_sections(run_dir: Path) -> tuple[dict, dict, str | None]:
    """The model and data sections of a run's config.yaml ({} where it lacks one) and what is wrong with the
    file, or None."""
    try:
        raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        model, data = raw.get("model"), raw.get("data")
    except FileNotFoundError:
        return {}, {}, f"no {CONFIG_FILE}"
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return {}, {}, f"unreadable {CONFIG_FILE}"
    if isinstance(model, dict) and isinstance(data, dict):
        return model, data, None
    problem = f"{CONFIG_FILE} without its data and model sections"  # a run writes every section: cut short
    return model if isinstance(model, dict) else {}, data if isinstance(data, dict) else {}, problem


def run_level(run_dir: Path) -> str | None:
    """data.level of a run's config.yaml ("char" or "word"), or None where the file does not say."""
    return _config_sections(Path(run_dir))[1].get("level")


def list_runs(folder: Path, sort: str = "name") -> list[RunSummary]:
    """Summaries of every run under `folder`, sorted by a SORT_KEYS column ('-' in front: descending)."""
    descending = sort.startswith("-")
    key = sort.lstrip("-")
    if key not in SORT_KEYS:
        raise UsageError(f"--sort: unknown column '{key}' (known: {', '.join(SORT_KEYS)})")
    folder = Path(folder)
    runs = [summarize(p, _display_name(p, folder)) for p in find_runs(folder)]
    attr = SORT_KEYS[key]
    present = [r for r in runs if getattr(r, attr) is not None]
    missing = [r for r in runs if getattr(r, attr) is None]
    present.sort(key=lambda r: r.name)
    present.sort(key=lambda r: getattr(r, attr), reverse=descending)  # stable: ties stay in name order
    if attr in ("best_val_loss", "best_val_bpc"):  # a loss on a slice is not comparable: after the others
        present.sort(key=lambda r: r.best_val_slice)
    return present + sorted(missing, key=lambda r: r.name)  # runs without the value always last


def _display_name(path: Path, folder: Path) -> str:
    """A run's name in the listing of `folder`: its path below the folder, or its own name where `folder` is
    the run (or its best/ or last/)."""
    try:
        rel = path.relative_to(folder).as_posix()
    except ValueError:  # the run that holds the checkpoint folder named
        rel = "."
    return os.path.basename(os.path.abspath(path)) if rel == "." else rel  # `runs .` in a run: its own name


def _damaged_checkpoints(run_dir: Path, manifests: dict[str, dict | None]) -> list[str]:
    """What is wrong with the checkpoint folders that are there (a run without best/ is fine): a missing
    or unreadable manifest, or a file it lists that is not there. The weights' hashes are checked when a
    command loads them, not here: that would read every model."""
    problems = []
    for name in CHECKPOINTS:
        if not (run_dir / name).is_dir():
            continue
        manifest = manifests[name]
        if manifest is None:
            there = (run_dir / name / MANIFEST_FILE).exists()
            problems.append(f"{'unreadable' if there else 'no'} {name}/{MANIFEST_FILE}")
            continue
        files = manifest.get("files")
        for f in files if isinstance(files, dict) else ():
            if not _checkpoint_file_there(run_dir / name, f):
                problems.append(f"no {name}/{f}" if plain_file_name(f) else f"{name}/{MANIFEST_FILE} names an "
                                f"unexpected file {f!r}")
                break
    return problems


def plain_file_name(name) -> bool:
    """A file name a checkpoint's manifest may list: in its own folder, not hidden."""
    return isinstance(name, str) and bool(name) and not ("/" in name or "\\" in name or name.startswith("."))


def _checkpoint_file_there(folder: Path, name) -> bool:
    if not plain_file_name(name):
        return False
    try:
        return (folder / name).is_file()
    except (OSError, ValueError):  # a name too long for the file system, or holding a NUL
        return False


def _loss_of_best(manifest: dict | None, vals: list[dict]) -> tuple[float, float | None, bool, int | None] | None:
    """(loss, bits per character, measured on a slice, the slice's size) of the model that best/ holds, from
    its manifest and the validation record it was saved after: the lowest loss in metrics.jsonl may be another
    model's (the last one's, over the whole split, where best/ was chosen on a slice) or another text's (a
    resume with another --val, which chooses best/ afresh). None where best/ or its manifest's `val_slice` is
    missing."""
    if manifest is None or "val_slice" not in manifest:
        return None
    loss, on_slice, step = _number(manifest.get("val_loss")), manifest.get("val_slice") is True, manifest.get("step")
    if loss is None or not math.isfinite(loss):
        return None
    whole = _whole_split_check(vals, step) if on_slice else None
    if whole is not None:  # the final check read the whole split at the very step best/ was saved: its weights
        return float(whole["val_loss"]), _number(whole.get("val_bpc")), False, None
    record = next((r for r in reversed(vals) if r.get("step") == step and r["val_loss"] == loss
                   and bool(r.get("val_slice")) == on_slice), {})
    return loss, _number(record.get("val_bpc")), on_slice, _int(record.get("val_tokens")) if on_slice else None


def read_manifest(run_dir: Path, name: str) -> dict | None:
    """The manifest of the checkpoint `name` of a run, or None where it is missing or unreadable (a FIFO, say,
    which would hold the reader for ever)."""
    if not (run_dir / name / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = json.loads((run_dir / name / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _whole_split_check(vals: list[dict], step) -> dict | None:
    """The last validation record over the whole split at `step` (the final check of a run that also checked
    a slice at that step, on the same weights), or None."""
    return next((r for r in reversed(vals) if r.get("step") == step and r.get("val_slice") is False
                 and _number(r.get("val_loss")) is not None and math.isfinite(r["val_loss"])), None)


def whole_split_loss(run_dir: Path, step) -> float | None:
    """The whole split's loss of the model saved at `step` after a check on a slice, where the final check
    read the whole split at that step (metrics.jsonl), else None."""
    try:
        record = _whole_split_check(read_metrics(run_dir).val, step)
    except UsageError:  # no metrics.jsonl
        return None
    return None if record is None else float(record["val_loss"])


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) else None
