"""Typed configuration: YAML in, validated, command-line overrides applied.

A config has three sections, `data`, `model` and `train`, each a dataclass
below. Every field carries its range in `metadata`, so validation, error
messages and the config reference in the README come from one place. YAML is
read with `yaml.safe_load` only: a file with a `!!python/...` tag is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError


def _number(x: float) -> str:
    """A bound as written: whole numbers in full (2^63 - 1, not 9.22337e+18), others as %g."""
    return str(x) if isinstance(x, int) else f"{x:g}"


MAX_SEED = 2**63 - 1  # seeds are 0 .. 2^63 - 1, a signed 64-bit integer as torch's generators store it


def _f(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
       high: float | None = None, low_open: bool = False, high_open: bool = False,
       optional: bool = False, numbers: bool = False) -> Any:
    """A dataclass field with its documentation and valid range (`numbers`: a string of comma-separated
    whole numbers, where a single number may be written as a number)."""
    meta = dict(help=help, choices=choices, low=low, high=high, low_open=low_open,
                high_open=high_open, optional=optional, numbers=numbers)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    level: str = _f("char", "tokenize into characters or words", choices=("char", "word"))
    lowercase: bool = _f(False, "lowercase text before tokenizing")
    word_split: str = _f("punct", "word level: 'punct' splits words from punctuation and each CJK character; "
                         "'space' splits on white space only (for pre-tokenized corpora)", choices=("punct", "space"))
    min_freq: int = _f(1, "drop tokens seen fewer times than this in the training split (they become <unk>)", low=1)
    max_size: int | None = _f(None, "keep at most this many tokens, specials included (null: no limit)",
                              low=3, optional=True)
    val_fraction: float = _f(0.05, "without --val, hold out this last fraction of the corpus for validation",
                             low=0.0, high=0.5)
    encoding: str = _f("utf-8", "text encoding of the corpus")
    errors: str = _f("strict", "undecodable bytes: 'strict' refuses the file, 'replace' puts U+FFFD in their place",
                     choices=("strict", "replace"))


@dataclass
class ModelConfig:
    cell: str = _f("lstm", "recurrent cell", choices=("rnn", "gru", "lstm"))
    impl: str = _f("torch", "'torch': nn.RNN / nn.GRU / nn.LSTM; 'custom': charlm's hand-written cells",
                   choices=("torch", "custom"))
    layers: int = _f(1, "number of stacked recurrent layers", low=1, high=64)
    embedding_size: int = _f(64, "size of the token embedding", low=1)
    hidden_size: int = _f(256, "size of the hidden state of each layer", low=1)
    dropout: float = _f(0.0, "dropout on the embedding, between layers and before the decoder",
                        low=0.0, high=1.0, high_open=True)
    embedding_dropout: float = _f(0.0, "drop whole token types: in each training window every vocabulary entry's "
                                  "embedding is zeroed with this probability (Gal & Ghahramani, 2016)",
                                  low=0.0, high=1.0, high_open=True)
    weight_drop: float = _f(0.0, "dropout on the recurrent weights W_hh, one mask per window "
                            "(DropConnect, as in AWD-LSTM)", low=0.0, high=1.0, high_open=True)
    tie_weights: bool = _f(False, "share the embedding and decoder weights (needs embedding_size == hidden_size)")
    nonlinearity: str = _f("tanh", "activation of the plain RNN cell", choices=("tanh", "relu"))
    softmax: str = _f("full", "output layer: 'full' softmax, or 'adaptive' (frequent tokens in a head, rare "
                      "ones in clusters; exact probabilities, much less work for large vocabularies; with "
                      "tie_weights the clusters score the embedding rows)", choices=("full", "adaptive"))
    adaptive_cutoffs: str = _f("2000,10000", "adaptive softmax: ids where the head and each tail cluster end "
                               "(comma-separated, increasing; those from vocabulary size - 1 up, which would leave a "
                               "cluster of one token or none, are dropped)",
                               numbers=True)
    adaptive_div: float = _f(4.0, "adaptive softmax, untied: each tail cluster's projection is this much "
                             "narrower", low=1.0)
    gru_form: str = _f("classic", "custom GRU: 'classic' textbook form or 'torch' (r applied after W_hn h; "
                       "matches nn.GRU weight for weight)", choices=("classic", "torch"))
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class TrainConfig:
    batch_size: int = _f(32, "parallel token streams per step", low=1)
    seq_len: int = _f(64, "tokens per window of truncated back-propagation through time", low=1)
    fresh_streams: int = _f(2, "streams added to each step that start at a random line from a zero state, as "
                            "sample and score do, so that the model learns how lines begin (the batch_size "
                            "streams carry their state through the corpus)", low=0)
    optimizer: str = _f("adamw", "optimizer", choices=("adamw", "adam", "sgd"))
    lr: float = _f(3e-3, "peak learning rate", low=0.0, low_open=True)
    weight_decay: float = _f(0.0, "decoupled weight decay (adamw) or L2 penalty (adam, sgd)", low=0.0)
    momentum: float = _f(0.0, "SGD momentum", low=0.0, high=1.0, high_open=True)
    beta2: float = _f(0.999, "adam / adamw: decay of the running mean of squared gradients (0.99 adapts "
                      "faster, for short runs)", low=0.0, high=1.0, high_open=True)
    clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)", low=0.0)
    schedule: str = _f("cosine", "learning-rate schedule after warm-up",
                       choices=("constant", "cosine", "linear", "plateau"))
    warmup_steps: int = _f(0, "steps of linear warm-up to lr: update s (from 0) uses lr * (s + 1) / warmup_steps", low=0)
    final_lr_fraction: float = _f(0.0, "cosine, linear: the learning rate decays to lr times this at the end of the budget", low=0.0, high=1.0)
    plateau_factor: float = _f(0.25, "plateau: multiply lr by this when validation stops improving",
                               low=0.0, high=1.0, low_open=True, high_open=True)
    plateau_patience: int = _f(0, "plateau: evaluations without improvement before lr is cut", low=0)
    max_steps: int | None = _f(None, "stop after this many optimizer steps", low=1, optional=True)
    max_epochs: float | None = _f(None, "stop after this many passes over the training split (default 1 "
                                  "when no limit is set)", low=0.0, low_open=True, optional=True)
    max_time: float | None = _f(None, "wall-clock budget in seconds; training stops cleanly, evaluates and saves",
                                low=0.0, low_open=True, optional=True)
    eval_interval: int = _f(200, "evaluate on the validation split every this many steps (0: only at the end)",
                            low=0)
    eval_tokens: int | None = _f(None, "evaluate during training on the first this many validation tokens, "
                                 "which also pick the best checkpoint (the final evaluation reports all of them)",
                                 low=1, optional=True)
    eval_batch_size: int = _f(1, "parallel streams for validation; 1 scores the split as one exact stream", low=1)
    log_interval: int = _f(20, "write a metrics line every this many steps", low=1)
    seed: int = _f(1234, "seed of every random generator", low=0, high=MAX_SEED)
    precision: str = _f("fp32", "fp32, or bf16 autocast (CUDA only)", choices=("fp32", "bf16"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


def _shown(value) -> str:
    """A refused value as a message quotes it: short, whatever it holds (a YAML alias can nest a 1 KB file into
    a list of billions of items, which a plain repr would spell out)."""
    return _SHOWN.repr(value)


def _check_value(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Coerce one value to its field's type and check its range; raise UsageError naming the key."""
    name = f"{section}.{f.name}"
    meta = f.metadata
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if value is None:
        if meta["optional"]:
            return None
        raise UsageError(f"config: {name} must not be empty")
    base = kind.split("|")[0].strip()
    if base in ("int", "float") and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as text: take such numbers as numbers.
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if base == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"config: {name} must be true or false, got {_shown(value)}")
    elif base == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UsageError(f"config: {name} must be a whole number, got {_shown(value)}")
        value = int(value)
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config: {name} must be a number, got {_shown(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"config: {name} must be a finite number, got {_shown(value)}")
    elif base == "str":
        if meta["numbers"] and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # one cutoff, read by YAML (and --set) as a number
        if not isinstance(value, str):
            raise UsageError(f"config: {name} must be a string, got {_shown(value)}")
    if meta["choices"] and value not in meta["choices"]:
        raise UsageError(f"config: {name} must be one of {', '.join(meta['choices'])}; got {_shown(value)}")
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        op = ">" if meta["low_open"] else ">="
        raise UsageError(f"config: {name} must be {op} {_number(low)}, got {_shown(value)}")
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        op = "<" if meta["high_open"] else "<="
        raise UsageError(f"config: {name} must be {op} {_number(high)}, got {_shown(value)}")
    return value


def is_resolved_config(path: Path) -> bool:
    """Whether a config.yaml holds every field of every section, as the one a run writes does (a user's names
    a few); a missing file counts as such too."""
    if not path.exists():
        return True
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and set(raw) == set(SECTIONS) and all(
        isinstance(raw[name], dict) and set(raw[name]) == set(_fields(name)) for name in SECTIONS)


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def checked_value(section: str, name: str, value: Any) -> Any:
    """`value` as the field section.name takes it (`1e3` for a number is 1000.0); UsageError if it cannot."""
    fields = _fields(section)
    if name not in fields:
        raise UsageError(f"config: unknown key {section}.{name} (known keys: {', '.join(fields)})")
    return _check_value(section, fields[name], value)


def _build_section(section: str, values: dict) -> Any:
    cls, fields = SECTIONS[section], _fields(section)
    if not isinstance(values, dict):
        raise UsageError(f"config: section '{section}' must be a mapping of keys to values")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"config: unknown key {section}.{unknown[0]} (known keys: {', '.join(fields)})")
    checked = {k: _check_value(section, fields[k], v) for k, v in values.items()}
    return cls(**checked)


# Fields added after runs were first saved, with the value that a run's config.yaml without them implies
# (what that version did); a config the user writes gets the field's default instead.
SAVED_BEFORE = {("train", "fresh_streams"): 0}


def _fill_saved_before(raw: dict) -> dict:
    """A copy of a run's config with the fields it predates set as its version ran them."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for (section, name), value in SAVED_BEFORE.items():
        if isinstance(raw.get(section, {}), dict):
            raw.setdefault(section, {}).setdefault(name, value)
    return raw


def from_dict(raw: dict, saved_run: bool = False) -> Config:
    """Build and validate a Config from nested plain values (as read from YAML); `saved_run`: a run folder's
    config.yaml, whose missing fields take the value of the version that wrote it (SAVED_BEFORE)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError("config: the top level must be a mapping with sections data, model, train")
    if saved_run:
        raw = _fill_saved_before(raw)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UsageError(f"config: unknown section '{unknown[0]}' (known: data, model, train)")
    # an empty section (`model:` alone) reads as None: the defaults; `model: []` or `model: 0` is refused as
    # `model: [1, 2]` is, not read as the defaults in silence
    cfg = Config(**{name: _build_section(name, {} if raw.get(name) is None else raw[name]) for name in SECTIONS})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve more than one field."""
    m = cfg.model
    try:  # checked whatever the softmax: the model parses it either way
        cutoffs = [int(c) for c in m.adaptive_cutoffs.split(",")]
    except ValueError:
        raise UsageError(f"config: model.adaptive_cutoffs must be whole numbers separated by commas, "
                         f"got {_shown(m.adaptive_cutoffs)}") from None
    if not cutoffs or cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1:
        raise UsageError(f"config: model.adaptive_cutoffs must be increasing positive numbers, "
                         f"got {_shown(m.adaptive_cutoffs)}")
    if m.tie_weights and m.embedding_size != m.hidden_size:
        raise UsageError(f"config: model.tie_weights needs model.embedding_size == model.hidden_size "
                         f"(got {m.embedding_size} and {m.hidden_size})")


# Settings that only some configs read: (section, field, whether this config reads it, which configs do).
# data.val_fraction, which a run with --val does not read, is not among them: a config file may serve both.
_READ_WHEN = (
    ("data", "word_split", lambda c: c.data.level == "word", "data.level word"),
    ("model", "nonlinearity", lambda c: c.model.cell == "rnn", "model.cell rnn"),
    ("model", "gru_form", lambda c: c.model.cell == "gru" and c.model.impl == "custom",
     "model.cell gru, model.impl custom"),
    ("model", "adaptive_cutoffs", lambda c: c.model.softmax == "adaptive", "model.softmax adaptive"),
    ("model", "adaptive_div", lambda c: c.model.softmax == "adaptive" and not c.model.tie_weights,
     "model.softmax adaptive, untied"),
    ("train", "momentum", lambda c: c.train.optimizer == "sgd", "train.optimizer sgd"),
    ("train", "beta2", lambda c: c.train.optimizer != "sgd", "train.optimizer adam or adamw"),
    ("train", "final_lr_fraction", lambda c: c.train.schedule in ("cosine", "linear"),
     "train.schedule cosine or linear"),
    ("train", "plateau_factor", lambda c: c.train.schedule == "plateau", "train.schedule plateau"),
    ("train", "plateau_patience", lambda c: c.train.schedule == "plateau", "train.schedule plateau"),
)


def unread_settings(cfg: Config) -> list[tuple[str, str, str]]:
    """The settings given another value than their default that this config never reads (a GRU's
    nonlinearity, SGD's momentum on AdamW, ...), each as (section, field, which configs read it): a run
    takes them silently, and the user may believe they changed something."""
    found = []
    for section, name, read, readers in _READ_WHEN:
        if getattr(getattr(cfg, section), name) != _fields(section)[name].default and not read(cfg):
            found.append((section, name, readers))
    return found


def _repeated_key(root: yaml.Node | None) -> str | None:
    """A key given twice in one mapping of a composed YAML document, said with its lines; None if none
    is. PyYAML keeps the last of two equal keys, so a second `model:` section would silently replace
    the first. Composing builds nodes only: nothing is constructed, whatever the tags."""
    stack, seen_nodes = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:  # an alias points at a node already walked
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            firsts: dict = {}  # (tag, text) of each plain key -> its line
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line, ident = key.start_mark.line + 1, (key.tag, key.value)
                    if ident in firsts:
                        where = f"lines {firsts[ident]} and {line}" if firsts[ident] != line else f"line {line}"
                        return f"'{key.value}' is given twice ({where}); give each key once"
                    firsts[ident] = line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


# A key followed by a full-width colon, or a line indented with full-width spaces: what a Chinese input method
# types, and YAML reads as plain text (so the error would say that a section is not a mapping)
_WIDE_SYNTAX = re.compile(r"^[ \t]*(?:\u3000|[\w.-]+[ \t]*(?P<colon>\uff1a))")


def _check_ascii_syntax(path: Path, text: str) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        m = _WIDE_SYNTAX.match(line)
        if m is None:
            continue
        if m.group("colon"):
            raise UsageError(f"config file {path}, line {number}: '{line.strip()}' has a full-width colon '：' "
                             f"(U+FF1A); YAML needs the ASCII colon ':' after a key")
        raise UsageError(f"config file {path}, line {number} is indented with full-width spaces (U+3000); "
                         f"YAML needs ASCII spaces")


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with safe_load, refusing a repeated key, every failure a one-line UsageError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    _check_ascii_syntax(path, text)
    try:
        raw = yaml.safe_load(text)
        repeated = _repeated_key(yaml.compose(text))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        mark = getattr(exc, "problem_mark", None)
        # a mark past the last line (an unclosed bracket or quote) is where the file ends
        where = ("" if mark is None else f"line {mark.line + 1}: " if mark.line < len(text.splitlines())
                 else "at the end of the file: ")
        tag = "python tags are never loaded" if "python/" in text or "python/" in str(exc) else ""
        raise UsageError(f"config file {path} is not plain YAML ({where}{problem})" + (f"; {tag}" if tag else "")) \
            from None
    strangers = [k for k in raw if k not in SECTIONS] if isinstance(raw, dict) else []
    if repeated and strangers:  # a text file given as --config is more likely than a doubled key
        raise UsageError(f"config file {path} does not look like a charlm config: its top level has "
                         f"'{strangers[0]}', not the sections data, model, train")
    if repeated:
        raise UsageError(f"config file {path}: {repeated}")
    return {} if raw is None else raw


_WIDE_FORMS = {"＝": "=", "．": ".", "。": "."}  # U+3002, the ideographic full stop, is a Chinese '.' key's default


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split `section.field=value`; the value is read as a YAML scalar (3, 1e-3, true, null, text)."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        wide = [c for c in _WIDE_FORMS if c in item]  # what an input method types for '=' and '.'
        hint = ""
        if wide:
            narrow = " and ".join(dict.fromkeys(repr(_WIDE_FORMS[c]) for c in wide))
            hint = f" (with the ASCII {narrow}, not the full-width {' and '.join(map(repr, wide))})"
        raise UsageError(f"--set expects section.field=value{hint}, got '{item}'")
    if section not in SECTIONS:
        raise UsageError(f"--set {item}: unknown section '{section}' (known: data, model, train)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, (dict, list)):
        raise UsageError(f"--set {item}: the value must be a single number, word or true/false")
    return section, name, value


def load_config(path: Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None, base: Path | None = None) -> Config:
    """Read a YAML config (or `base`, a run's config.yaml, or the defaults), apply `--set` overrides then `extra`
    {'section.field': value}."""
    raw = read_yaml(path) if path is not None else (read_yaml(base) if base is not None else {})
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path or base}: the top level must be a mapping with sections data, model, train")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    items = [parse_override(o) for o in overrides or []]
    items += [(*k.split(".", 1), v) for k, v in (extra or {}).items() if v is not None]
    for section, name, value in items:
        if raw.get(section) is None:  # `model:` with nothing under it (or no such section): the defaults
            raw[section] = {}
        current = raw[section]
        if not isinstance(current, dict):
            raise UsageError(f"config: section '{section}' must be a mapping of keys to values")
        current[name] = value
    return from_dict(raw, saved_run=path is None and base is not None)  # base: a run's own config (a resume)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def describe_fields() -> list[tuple[str, Any, str, str]]:
    """(key, default, range, help) for every field: the source of the README's config reference."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            m = f.metadata
            if m["choices"]:
                rng = " | ".join(m["choices"])
            elif m["low"] is not None or m["high"] is not None:
                lo = "" if m["low"] is None else ("(" if m["low_open"] else "[") + _number(m["low"])
                hi = "∞)" if m["high"] is None else _number(m["high"]) + (")" if m["high_open"] else "]")
                rng = f"{lo or '(-∞'}, {hi}"
            else:
                rng = str(f.type).split("|")[0].strip()
            if m["optional"]:
                rng += " or null"
            rows.append((f"{section}.{f.name}", f.default, rng, m["help"]))
    return rows
