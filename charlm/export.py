"""Export a trained model as one generation step that runs without charlm.

The exported function is `RNNLM.step` behind a fixed signature:

    step(tokens (B,) int64, state (S, L, B, H) float32) -> (logits (B, V), state (S, L, B, H))

S is 2 for the LSTM (state[0] = h, state[1] = c) and 1 for the RNN and GRU;
L layers, H hidden size, V vocabulary. Generation starts from a zero state and
the token `<eos>` (id 1), exactly as in charlm: feed a token, get the logits
of the next one and the state to feed back.

Two formats:
- TorchScript (`torch.jit.trace` of the step; load with `torch.jit.load`),
  the vocabulary and settings stored inside as the extra file `charlm.json`;
- ONNX (the TorchScript-based `torch.onnx.export`, needs the optional extra
  `pip install 'onnx>=1.15' 'onnxruntime>=1.17'`), the same JSON in the model's metadata under
  the key `charlm`.

Tracing a step with T = 1 records the custom cells' Python loops unrolled
once per layer, which is all a step needs. After writing, the file is loaded
back and run for a few steps next to charlm's model; the largest difference
in logits and state is returned, so a broken export is seen at once.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import load_run
from .errors import UsageError
from .model import RNNLM
from .runs import checkpoint_folder_holding
from .tokenizer import EOS_ID, UNK_ID

EXPORT_FORMAT = 1
METADATA_KEY = "charlm"          # ONNX metadata key; TorchScript extra file is charlm.json
EXTRA_FILE = "charlm.json"
FORMATS = ("torchscript", "onnx")
INSTALL_HINT = "pip install 'onnx>=1.15' 'onnxruntime>=1.17'"  # not 'charlm[export]': PyPI's charlm is another project
ONNX_OPSET = 17


class SingleStep(nn.Module):
    """RNNLM.step with the state packed in one tensor: (tokens (B,), state (S, L, B, H)) -> (logits, state)."""

    def __init__(self, model: RNNLM):
        super().__init__()
        self.model = model
        self.lstm = model.cfg.cell == "lstm"

    def forward(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        if self.lstm:
            logits, (h, c) = self.model.step(tokens, (state[0], state[1]))
            return logits, torch.stack((h, c))  # (2, L, B, H)
        logits, h = self.model.step(tokens, state[0])
        return logits, h.unsqueeze(0)  # (1, L, B, H)


@dataclass
class ExportResult:
    out: str
    format: str
    checkpoint: str
    cell: str
    impl: str
    state_shape: list          # [S, L, "B", H]
    vocab_size: int
    max_abs_diff: float | None  # exported vs charlm over the check steps; None if the check could not run
    check_steps: int


def metadata(model: RNNLM, codec) -> dict:
    """What a user of the exported file needs: the state shape, the special ids, the vocabulary."""
    cfg = model.cfg
    return {
        "format": EXPORT_FORMAT, "cell": cfg.cell, "impl": cfg.impl, "layers": cfg.layers,
        "hidden_size": cfg.hidden_size, "vocab_size": model.vocab_size,
        "state_shape": [2 if cfg.cell == "lstm" else 1, cfg.layers, "B", cfg.hidden_size],
        "inputs": {"tokens": "(B,) int64", "state": "(S, L, B, H) float32"},
        "outputs": {"logits": "(B, V) float32 scores; log_softmax gives the log-probabilities", "state": "(S, L, B, H) float32"},
        "eos_id": EOS_ID, "unk_id": UNK_ID, "tokenizer": codec.tokenizer.describe(), "tokens": codec.vocab.tokens,
    }


def zero_state(model: RNNLM, batch_size: int) -> Tensor:
    s = 2 if model.cfg.cell == "lstm" else 1
    return torch.zeros(s, model.cfg.layers, batch_size, model.cfg.hidden_size)


def export_model(run_dir: Path, fmt: str | None, out: Path, which: str | None = None, check_steps: int = 8,
                 seed: int = 0) -> ExportResult:
    """Write the single-step model of a run to `out` in `fmt` (None: onnx for a name ending in .onnx, else
    torchscript), then check it against charlm's step."""
    out = Path(out)
    onnx_name = out.suffix.lower() == ".onnx"
    if fmt is None:
        fmt = "onnx" if onnx_name else "torchscript"
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if onnx_name != (fmt == "onnx") and out.suffix.lower() in (".onnx", ".pt", ".pth"):
        raise UsageError(f"export: --out {out} names a{'n ONNX' if onnx_name else ' TorchScript'} file, but --format "
                         f"is {fmt}: pass --format {'onnx' if onnx_name else 'torchscript'} or another name")
    _check_destination(out)
    model, codec, saved = load_run(run_dir, "cpu", which)
    if hasattr(model.rnn, "fast"):
        # The fast layers fill buffers in place, sized by the batch they first see: a trace would fix
        # that size. The step functions compute the same values and trace into plain operations.
        model.rnn.fast = False
    wrapper = SingleStep(model).eval()
    # The export is for inference: with weights that require gradients, TorchScript's outputs would too,
    # and a user's in-place edit of the logits (masking <unk>) would fail on the custom cells' step.
    wrapper.requires_grad_(False)
    meta = metadata(model, codec)
    example = (torch.full((2,), EOS_ID, dtype=torch.long), zero_state(model, 2))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "torchscript":
            _write_torchscript(wrapper, example, out, meta)
        else:
            _write_onnx(wrapper, example, out, meta)
    except OSError as exc:
        raise UsageError(f"export: cannot write {out}: {exc.strerror or exc}") from None
    run = _load_torchscript(out) if fmt == "torchscript" else _load_onnx(out)
    diff = None if run is None else check_against(model, run, check_steps, seed)
    return ExportResult(str(out), fmt, str(saved.folder), model.cfg.cell, model.cfg.impl, meta["state_shape"],
                        model.vocab_size, diff, check_steps if diff is not None else 0)


def _check_destination(out: Path) -> None:
    """Refuse an --out that would damage what is there: a folder, a file inside a checkpoint folder (its
    weights, or a file that the next save of the checkpoint would delete), or an existing file that is
    not an earlier export (a corpus, a run's config)."""
    if out.is_dir():  # torch's writers would fail deep inside with a RuntimeError
        raise UsageError(f"export: --out {out} is a folder; name the file to write (e.g. {out / 'model.pt'})")
    folder = checkpoint_folder_holding(out)
    if folder is not None:
        raise UsageError(f"export: --out {out} is inside the checkpoint folder {folder}; write the export outside it")
    if out.exists() and not _is_export(out):
        raise UsageError(f"export: {out} exists and is not a charlm export; "
                         f"remove it first or choose another name")


def _is_export(path: Path) -> bool:
    """An earlier export: a TorchScript archive with charlm's extra file, or an ONNX model whose metadata
    (written last) holds charlm's key."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(f"/extra/{EXTRA_FILE}") for name in archive.namelist())
        with open(path, "rb") as fh:
            fh.seek(max(path.stat().st_size - (1 << 20), 0))
            return b"\n" + bytes([len(METADATA_KEY)]) + METADATA_KEY.encode() in fh.read()
    except (OSError, zipfile.BadZipFile):
        return False


def _write_torchscript(wrapper: SingleStep, example, out: Path, meta: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings (the step's shapes are fixed but B) and deprecation
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        with open(out, "wb") as fh:  # opened here, so that a path that cannot be written is an OSError
            torch.jit.save(traced, fh, _extra_files={EXTRA_FILE: json.dumps(meta, ensure_ascii=False)})


def _write_onnx(wrapper: SingleStep, example, out: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise UsageError(f"export --format onnx needs the onnx package, which is not installed: {INSTALL_HINT}") from None
    batch = {0: "B"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(wrapper, example, str(out), input_names=["tokens", "state"],
                          output_names=["logits", "state_out"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"tokens": batch, "state": {2: "B"}, "logits": batch,
                                        "state_out": {2: "B"}})
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, ensure_ascii=False)
    onnx.save(proto, str(out))


def _load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 marks TorchScript deprecated
        module = torch.jit.load(str(path), map_location="cpu")
    return lambda tokens, state: tuple(t.detach() for t in module(tokens, state))


def _load_onnx(path: Path):
    try:
        import onnxruntime
    except ImportError:
        return None  # written, but not checked: say so rather than fail
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(tokens: Tensor, state: Tensor):
        logits, new_state = session.run(None, {"tokens": tokens.numpy(), "state": state.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(new_state)
    return run


@torch.no_grad()
def check_against(model: RNNLM, run, steps: int, seed: int = 0, batch_size: int = 3) -> float:
    """Largest |difference| of logits and state between `run` and model.step over `steps` random tokens."""
    generator = torch.Generator().manual_seed(seed)
    ours: object = None
    theirs = zero_state(model, batch_size)
    tokens = torch.full((batch_size,), EOS_ID, dtype=torch.long)
    worst = 0.0
    for _ in range(steps):
        logits, ours = model.step(tokens, ours)
        packed = torch.stack(ours) if isinstance(ours, tuple) else ours.unsqueeze(0)
        their_logits, theirs = run(tokens, theirs)
        worst = max(worst, float((logits - their_logits).abs().max()), float((packed - theirs).abs().max()))
        tokens = torch.randint(0, model.vocab_size, (batch_size,), generator=generator)
    return worst
