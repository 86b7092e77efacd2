"""The run folder: atomic checkpoints in safetensors, a SHA-256 manifest, safe loading.

    RUN_DIR/
      config.yaml  vocab.json  metrics.jsonl     the run's settings and its log
      last/        the newest checkpoint: resume from here
      best/        the checkpoint with the lowest validation loss: sample and score from here

Each checkpoint folder is self-contained: `model.safetensors` (weights only),
`config.yaml`, `vocab.json`, `trainer.pt` (optimizer, schedule, step, data
position, RNG states: tensors and plain values, read back with
`torch.load(weights_only=True)`), and `manifest.json` with the SHA-256 of each
file. A checkpoint is written to a temporary folder, every file and the
folder fsynced, then swapped in by renames; at every instant either the new
folder or the previous one (`last.old`) is complete, so a crash, kill -9 or
full disk never loses the newest good checkpoint. Loading checks every hash
before any weight is used, and refuses non-finite weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import config as config_mod
from .errors import RunFailure, UsageError
from .runs import (METRICS_FILE, CHECKPOINT_NAMES, checkpoint_folder_holding, is_checkpoint_folder,
                   plain_file_name, read_metrics)
from .runtime import file_sha256
from .tokenizer import TextCodec

FORMAT = 1
MODEL_FILE, TRAINER_FILE, CONFIG_FILE, VOCAB_FILE, MANIFEST_FILE = (
    "model.safetensors", "trainer.pt", "config.yaml", "vocab.json", "manifest.json")
NAMES = ("last", "best")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def reason(exc: BaseException) -> str:
    """The short cause of an I/O error: 'No space left on device', not a traceback."""
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def atomic_write_text(path: Path, text: str | Iterable[str]) -> None:
    """Write a file so that readers see the old or the new content, never a part; `text` may come in pieces
    (a generator that reads the old file line by line holds a line at a time)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            if isinstance(text, str):
                fh.write(text)
            else:
                fh.writelines(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


sha256 = file_sha256  # a checkpoint file's digest, as in manifest.json


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights for safetensors: contiguous CPU copies, a tied weight stored once."""
    tensors, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue  # tied: the decoder shares the embedding's storage
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], where: str, error: type = RunFailure) -> None:
    """Raise `error` naming the first weight that holds NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise error(f"{where}: weight {name} holds NaN or infinite values")


def _format_message(what: str, found) -> str:
    if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT:
        return f"{what} has format {found}, written by a newer charlm; this charlm reads format {FORMAT}: upgrade charlm"
    if isinstance(found, int) and not isinstance(found, bool):
        return (f"{what} has format {found}, written by an older charlm; this charlm reads format {FORMAT}: "
                f"retrain, or use the charlm version that wrote it")
    return f"{what} has no valid format number ({found!r}); this charlm reads format {FORMAT}"


def save_checkpoint(run_dir: Path, name: str, model: torch.nn.Module, cfg, codec: TextCodec,
                    trainer_state: dict | None = None, info: dict | None = None) -> Path:
    """Write checkpoint `name` (last or best) of a run, atomically. Returns its folder."""
    run_dir = Path(run_dir)
    tensors = state_tensors(model)
    check_finite(tensors, f"checkpoint {name} not saved")
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    final, old = run_dir / name, run_dir / f"{name}.old"
    done = False
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / CONFIG_FILE).write_text(config_mod.dump_yaml(cfg), encoding="utf-8")
        (tmp / VOCAB_FILE).write_text(codec.to_json(), encoding="utf-8")
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": str(FORMAT)})
        # safetensors creates its file readable by the owner only; the weights get the mode the umask gave
        # the run's other files, so whoever may read a run's config may read its model too
        os.chmod(tmp / MODEL_FILE, stat.S_IMODE(os.stat(tmp / CONFIG_FILE).st_mode))
        files = [MODEL_FILE, CONFIG_FILE, VOCAB_FILE]
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
            files.append(TRAINER_FILE)
        for f in files:
            _fsync_file(tmp / f)
        manifest = {"format": FORMAT, "files": {f: sha256(tmp / f) for f in files}, **(info or {})}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _fsync_file(tmp / MANIFEST_FILE)
        fsync_dir(tmp)
        # Swap: `final` (if any) becomes `old`, then `tmp` becomes `final`. Should we die
        # between the two renames, `old` is complete and `recover` renames it back.
        if final.exists() or final.is_symlink():  # a link to a disk since unmounted is moved aside too
            if old.exists() or old.is_symlink():
                _remove(old)
            os.rename(final, old)
            fsync_dir(run_dir)
        os.rename(tmp, final)
        done = True
        fsync_dir(run_dir)
    except (OSError, RuntimeError, SafetensorError) as exc:
        # Disk full, file too large, a read-only folder: torch.save reports these as RuntimeError,
        # safetensors as SafetensorError or OSError.
        kept = "the previous checkpoint is intact" if (final.exists() or old.exists()) else "none was saved yet"
        raise RunFailure(f"could not write checkpoint {name} in {run_dir} ({reason(exc)}); {kept}: make room "
                         f"(or fix the folder) and continue with --resume {run_dir}") from None
    finally:
        if not done:  # a failure or a signal: leave no partial folder, put the previous checkpoint back
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                try:
                    os.rename(old, final)
                except OSError:
                    pass  # `recover` and `find_checkpoint` still find it as name.old
    _remove(old, quietly=True)
    return final


def _remove(path: Path, quietly: bool = False) -> None:
    """Remove a replaced checkpoint folder; where the user had made it a link to a folder elsewhere (another
    disk), the link (rmtree refuses links, and every later save failed)."""
    try:
        path.unlink() if path.is_symlink() else shutil.rmtree(path)
    except OSError:
        if not quietly:
            raise


def recover(run_dir: Path) -> None:
    """Clean up after a crash: drop half-written folders, restore a checkpoint caught mid-swap."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for stray in run_dir.glob(".tmp-*"):
        shutil.rmtree(stray, ignore_errors=True) if stray.is_dir() else stray.unlink(missing_ok=True)
    for pattern in (".*.tmp-*", ".write-test-*"):
        for stray in run_dir.glob(pattern):
            stray.unlink(missing_ok=True)
    for name in NAMES:
        final, old = run_dir / name, run_dir / f"{name}.old"
        if old.exists() or old.is_symlink():
            if final.exists() or final.is_symlink():
                _remove(old, quietly=True)
            else:
                os.rename(old, final)
    fsync_dir(run_dir)


def check_new_run_folder(path: Path) -> None:
    """Refuse to start a run in or under a checkpoint folder: the checkpoint would be damaged, and saving
    the checkpoint again (which replaces the whole folder) would delete the new run."""
    folder = checkpoint_folder_holding(path)
    if folder is not None:
        raise UsageError(f"--out {path}: {folder} is a checkpoint folder of a run; choose a folder outside it "
                         f"(to continue that run, use --resume with its run folder)")


def why_no_best(run_dir: Path) -> str:
    """Why a run folder has no usable best/: damaged, or not validated yet."""
    return (f"its best/ folder has no {MANIFEST_FILE} (damaged)" if (Path(run_dir) / "best").exists()
            else "no best/ checkpoint yet (the run has not been validated so far)")


def find_checkpoint(path: Path, which: str | None = None) -> Path:
    """A checkpoint folder from a run folder (None: best/, falling back to last/; `best` or `last`: that one
    only) or a checkpoint folder itself, which must not be the other one of a run's best/ and last/ when
    `which` names one."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"run folder not found: {path}")
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a run folder: name the folder that `charlm train` wrote "
                         f"(its --out)")
    if is_checkpoint_folder(path):
        kind = path.name.removesuffix(".old")
        if which is not None and kind in ("best", "last") and kind != which:
            raise UsageError(f"{path} is a run's {kind} checkpoint, and --checkpoint {which} asks for the other: "
                             f"pass the run folder {path.parent} with --checkpoint {which}, or drop --checkpoint")
        return path
    order = {"best": ("best", "best.old"), "last": ("last", "last.old"), None: CHECKPOINT_NAMES}[which]
    for name in order:
        if is_checkpoint_folder(path / name):
            return path / name
    if which == "best" and any(is_checkpoint_folder(path / name) for name in ("last", "last.old")):
        raise UsageError(f"{path}: {why_no_best(path)}; use --checkpoint last, or drop --checkpoint")
    looked = " or ".join(f"{name}/manifest.json" for name in order if not name.endswith(".old"))
    if path.name.removesuffix(".old") in ("best", "last") and (path.parent / METRICS_FILE).exists():
        raise UsageError(f"{path} is a damaged checkpoint folder (no {MANIFEST_FILE}): pass the run folder "
                         f"{path.parent}, whose other checkpoint is read instead")
    failed = read_metrics(path).failed if (path / METRICS_FILE).is_file() else None
    if failed is not None:  # the run stopped on an error before its first checkpoint
        raise UsageError(f"{path} holds no checkpoint: its training stopped at step {failed.get('step')} before "
                         f"saving one: {failed.get('error')}")
    if (path / METRICS_FILE).exists() or (path / CONFIG_FILE).exists():  # a run that has not saved yet
        raise UsageError(f"{path} holds no checkpoint yet (no {looked}): a run saves one at each validation "
                         f"check (train.eval_interval) and at its end, or when stopped with Ctrl-C")
    runs = sorted(sub.name for sub in path.iterdir() if sub.is_dir() and (sub / CONFIG_FILE).exists()) \
        if path.is_dir() else []
    if runs:
        shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        raise UsageError(f"{path} is not a run folder but holds runs ({shown}): name one of them, "
                         f"e.g. {path / runs[-1]}")
    raise UsageError(f"{path} holds no checkpoint (no {looked}): train into it first")


@dataclass
class Checkpoint:
    folder: Path
    cfg: "config_mod.Config"
    codec: TextCodec
    tensors: dict[str, torch.Tensor]
    manifest: dict

    def trainer_state(self) -> dict:
        path = self.folder / TRAINER_FILE
        if not path.exists():
            raise UsageError(f"checkpoint {self.folder} has no trainer state: resume from a run's last/ folder")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = _load_failure(exc)
            with open(path, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's format
            if zipped and isinstance(exc, pickle.UnpicklingError):  # weights_only refused what it holds
                raise UsageError(f"refusing {path}: it holds more than tensors and plain values ({first[:200]})") \
                    from None
            raise UsageError(f"cannot read {path}: it is damaged or not a torch file ({first[:200]})") from None


def _load_failure(exc: Exception) -> str:
    """torch.load's reason for refusing a file, without the advice around it: torch suggests loading the
    file again without its tensors-only restriction (which would run whatever code the file holds), or
    allowlisting the class the file names; charlm passes on neither."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split(" Please ", 1)[0]
    lines = [line.strip() for line in text.splitlines()]
    advice = ("Weights only load failed", "Check the documentation", "(1) ", "(2) ", "Please ")
    reasons = [line for line in lines if line and not line.startswith(advice)]
    return reasons[0] if reasons else type(exc).__name__


class Damaged(UsageError):
    """A checkpoint whose files are missing, unreadable or not what its manifest says (not one that is
    merely of another format or version)."""


def read_manifest(folder: Path) -> dict:
    if (folder / MANIFEST_FILE).exists() and not (folder / MANIFEST_FILE).is_file():
        raise Damaged(f"checkpoint {folder}: {MANIFEST_FILE} is not a regular file")  # a FIFO: no hang
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Damaged(f"checkpoint {folder}: unreadable {MANIFEST_FILE} ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UsageError(_format_message(f"checkpoint {folder}", found))
    return manifest


def verify(folder: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise Damaged(f"checkpoint {folder}: {MANIFEST_FILE} lists no {MODEL_FILE}")
    for name, digest in files.items():
        if not plain_file_name(name):
            raise UsageError(f"checkpoint {folder}: {MANIFEST_FILE} names an unexpected file {name!r}")
        path = folder / name
        if not path.exists():
            raise Damaged(f"checkpoint {folder}: {name} is missing")
        if not path.is_file():  # a FIFO, or a link to /dev/zero, would hold the reader for ever
            raise Damaged(f"checkpoint {folder}: {name} is not a regular file")
        if sha256(path) != digest:
            raise Damaged(f"checkpoint {folder}: {name} does not match its SHA-256 in {MANIFEST_FILE} "
                             f"(corrupted or altered); refusing to load it")


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def load_checkpoint(path: Path, which: str | None = None) -> Checkpoint:
    """Find, verify and read a checkpoint. Nothing in it can run code.

    A training run may swap in a new checkpoint folder while we read (`charlm sample` during training):
    the folder's identity is compared before and after, and a read that straddled a swap is done again.
    """
    for _ in range(10):
        folder = find_checkpoint(path, which)
        before = _identity(folder)
        try:
            try:
                saved = _read_checkpoint(folder)
            except OSError as exc:  # a file vanished or cannot be read
                raise Damaged(f"checkpoint {folder}: cannot read {Path(exc.filename or '').name or 'a file'} "
                                 f"({reason(exc)})") from None
        except UsageError as exc:
            if _identity(folder) == before:  # nothing moved: the checkpoint itself is bad
                last = folder.parent / "last"
                if isinstance(exc, Damaged) and folder.name == "best" and is_checkpoint_folder(last):
                    raise UsageError(f"{exc}; the run's last checkpoint may be intact: {last}") from None
                raise
        else:
            if _identity(folder) == before:
                return saved
        time.sleep(0.05)
    raise UsageError(f"checkpoint {folder} kept changing while it was read (a run is saving into it); try again")


def _read_checkpoint(folder: Path) -> Checkpoint:
    manifest = read_manifest(folder)
    verify(folder, manifest)
    cfg = config_mod.from_dict(config_mod.read_yaml(folder / CONFIG_FILE), saved_run=True)
    codec = TextCodec.load(folder / VOCAB_FILE)
    data = cfg.data
    if codec.tokenizer.to_dict() != {"level": data.level, "lowercase": data.lowercase, "word_split": data.word_split}:
        raise UsageError(f"checkpoint {folder}: {VOCAB_FILE} was made by tokenizer {codec.tokenizer.to_dict()} but "
                         f"{CONFIG_FILE} asks for level={data.level}, lowercase={data.lowercase}, "
                         f"word_split={data.word_split}; the two files do not belong together")
    try:
        tensors = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise Damaged(f"checkpoint {folder}: {MODEL_FILE} is not a valid safetensors file ({exc})") from None
    check_finite(tensors, f"checkpoint {folder} refused", UsageError)
    rows = tensors.get("encoder.weight")
    if rows is not None and rows.shape[0] != len(codec.vocab):
        raise UsageError(f"checkpoint {folder}: {VOCAB_FILE} holds {len(codec.vocab)} tokens but the weights were "
                         f"trained with a vocabulary of {rows.shape[0]}; the two files do not belong together")
    return Checkpoint(folder, cfg, codec, tensors, manifest)


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved tensors into a model; a tied decoder weight is filled through the embedding."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not _is_tied_alias(model, k)]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UsageError(f"checkpoint {where}: weights do not fit the model in its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in tensors.items():
        if expected[name].shape != tensor.shape:
            raise UsageError(f"checkpoint {where}: weight {name} has shape {tuple(tensor.shape)}, "
                             f"the config builds {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    return key == "decoder.weight" and getattr(model, "cfg", None) is not None and model.cfg.tie_weights


def load_run(path: Path, device: torch.device | str = "cpu", which: str | None = None, impl: str | None = None):
    """A ready model (eval mode, on `device`), its TextCodec and Checkpoint, from a run or checkpoint folder.

    `impl` ('custom' or 'torch') builds the run's model on the other implementation: the weights have torch's
    names either way, so the hand-written cells of a trained model can be checked against torch.nn's. nn.GRU's
    weights are read by the custom GRU's torch form; a classic-form GRU has no torch counterpart and is
    refused."""
    from .model import build_model  # model sits above checkpoint in the import order

    saved = load_checkpoint(path, which)
    model_cfg = saved.cfg.model
    if impl is not None and impl != model_cfg.impl:
        if impl not in ("custom", "torch"):
            raise UsageError(f"--impl must be custom or torch, got '{impl}'")
        if model_cfg.cell == "gru" and model_cfg.impl == "custom" and model_cfg.gru_form == "classic":
            raise UsageError(f"{path}: --impl torch: this run's GRU is the classic form (gru_form: classic), which "
                             f"nn.GRU does not compute; a run trained with gru_form: torch can be read by either")
        model_cfg = dataclasses.replace(model_cfg, impl=impl, gru_form="torch" if model_cfg.cell == "gru" else
                                        model_cfg.gru_form)
    model = build_model(model_cfg, len(saved.codec.vocab))
    load_weights(model, saved.tensors, saved.folder)
    return model.to(device).eval(), saved.codec, saved
