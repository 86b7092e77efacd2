"""The command-line tool: parse, call one library function, print.

Every command turns a `CharlmError` into one line on stderr and its exit
code (0 ok, 1 failure while running, 2 bad input, 129 SIGHUP, 130 SIGINT, 143 SIGTERM);
`--debug` shows the traceback instead. torch is imported inside the commands,
so `charlm --help` answers at once.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import sys
import traceback
import unicodedata
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from . import __version__
from .errors import (EXIT_FAILURE, EXIT_SIGINT, EXIT_SIGNALS, SIGHUP, CharlmError, StopSignal, caught_signals,
                     is_out_of_memory, signal_exit_code, to_devnull)


class _Command(typer.core.TyperCommand):
    """Typer's command, with the usage line Click and the READMEs write: `charlm score [OPTIONS] RUN_DIR
    [TEXT]...`, where Typer 0.2x writes a required argument as `{run_dir}`, which reads as a set to pick
    from, or as braces to type."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces += param.get_usage_pieces(ctx)
                continue
            name = (param.metavar or param.name.upper()).removesuffix("...")
            pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
        return pieces


app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  help="Train, sample and score character- and word-level RNN / GRU / LSTM language models.",
                  context_settings={"help_option_names": ["-h", "--help"]})
_debug = {"on": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    _debug["on"] = debug


def _err(message: str) -> None:
    try:  # one write (print makes two): the lines of the processes of --nproc, on one pipe, never interleave
        sys.stderr.write(f"charlm: error: {message}\n")
        sys.stderr.flush()
    except OSError:  # a terminal that hung up (EIO) or a reader gone: the exit code still tells
        try:  # and Python's flush at exit does not fail (exit 120)
            to_devnull(sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's buffer)
            pass


_held: dict = {"on": False, "signals": []}  # while torch is imported, a signal is held back (_holding_signals)
_console: dict = {"on": False}  # the process is charlm's own (main), not a caller's that runs a command in it


def _signal_error(signum) -> BaseException:
    """What a stop signal raises outside the training loop (which saves first): the command unwinds."""
    return StopSignal(signum)


def _stop_word(signum: int) -> str:
    return {signal.SIGTERM: "terminated", SIGHUP: "hung up"}.get(signum, "interrupted")


def _on_signal(signum, frame) -> None:
    if _held["on"]:
        _held["signals"].append(signum)
        if len(_held["signals"]) > 1 and _console["on"]:  # asked twice: an import that hangs (a stalled disk)
            _signals_end_the_process()                  # is not waited for
            os.kill(os.getpid(), signum)
        return
    raise _signal_error(signum)


@contextmanager
def _holding_signals():
    """Hold SIGINT / SIGTERM / SIGHUP back while the block runs, then raise the first that came. Raised inside
    `import torch`, an exception is swallowed or turned into another by the import machinery and numpy's
    (a run then trained to its end and exited 0, or failed with a RecursionError)."""
    _held["on"], _held["signals"] = True, []
    try:
        yield
    finally:
        _held["on"] = False
    if _held["signals"]:
        raise _signal_error(_held["signals"][0])


def _signals_end_the_process() -> None:
    """After the first signal has been answered (and the run saved): a second one ends the process at once
    (as killed by that signal), not with a traceback from the interpreter's teardown or a second line. Only
    in charlm's own process: a program (or a test) that runs a command keeps its handlers."""
    if not _console["on"]:
        return
    try:
        for sig in caught_signals():
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass


def _fail(message: str, code: int) -> typer.Exit:
    """One line on stderr (after the traceback with --debug) and the exit code to raise."""
    if _debug["on"]:
        traceback.print_exc(file=sys.stderr)
    _err(message)
    return typer.Exit(code)


# What a command's options can change when memory runs out, where a smaller value is left to give
_NOT_FIT = "the model does not fit in this machine"
_TRAIN_MEMORY = "use a smaller train.batch_size or train.seq_len (or model.hidden_size)"
_BENCH_MEMORY = "measure a smaller --batch-size, --seq-len or --hidden-size"


def _memory_advice(lower: list[tuple[str, int, int]]) -> str:
    """Out-of-memory advice from ('smaller --option', its value, the value below which memory no longer
    falls) of a command: the options that can still go lower, or that the model does not fit."""
    options = [option for option, value, floor in lower if value > floor]
    return f"use a {' or a '.join(options)}" if options else _NOT_FIT


def _sample_memory(num_samples: int, max_length: int, prime: str) -> str:
    from .sample import GROUP  # samples are drawn GROUP at a time: fewer than that lowers memory, more does not

    return _memory_advice([("smaller --num-samples", min(num_samples, GROUP), 1),
                           ("smaller --max-length", max_length, 1), ("shorter --prime", len(prime), 0)])


@contextmanager
def _errors(memory: str | Callable[[], str] = _NOT_FIT, torch: bool = True):
    """Map library errors to one stderr line and an exit code (and set up the process for torch, unless
    `torch` is False: a command that reads only text files, whose run the import of torch would make
    seconds and 270 MB longer); `memory` says what the running command can change when memory runs out."""
    try:
        if torch:
            with _holding_signals():
                from .runtime import keep_freed_memory  # imports torch: here, so that --help stays fast

            keep_freed_memory()  # big buffers are reused, not page-faulted in at every step
        yield
    except CharlmError as exc:
        if exc.exit_code in EXIT_SIGNALS:
            _signals_end_the_process()
        raise _fail(exc.message, exc.exit_code) from None
    except BrokenPipeError:
        to_devnull(sys.stdout.fileno())  # the reader went away (`charlm sample | head -1`): stop quietly
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        _signals_end_the_process()
        raise _fail("interrupted", EXIT_SIGINT) from None
    except StopSignal as exc:
        _signals_end_the_process()
        raise _fail(_stop_word(exc.signum), signal_exit_code(exc.signum)) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # a bug or an environment failure: still one line, the traceback with --debug
        text = str(exc).strip().splitlines()
        if is_out_of_memory(exc):
            message = f"out of memory: {memory() if callable(memory) else memory}"
        else:
            message = f"{type(exc).__name__}: {text[0] if text else ''}"
            if not _debug["on"]:  # with --debug the traceback is printed just above
                message += " (run with --debug for the traceback)"
        raise _fail(message, EXIT_FAILURE) from None


def _columns(text: str) -> int:
    """Terminal columns of `text`: a wide character (CJK, full-width forms) takes two, a combining mark none."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _out(line: str = "") -> None:
    print(line, flush=False)


def _limit_advice(stopped_by: str, t) -> str:
    """For a resume that had nothing left to do: which limit of the train config `t` the run had already
    reached, and how to lift it (the limits count the whole run)."""
    options = {"max_steps": "--max-steps", "max_epochs": "--max-epochs", "max_time": "--max-time"}
    if stopped_by not in options:
        return "the run had already ended"
    if stopped_by == "max_epochs" and t.max_epochs is None:  # no limit at all: a run trains one epoch
        return "with no limit set a run trains one epoch, which it has; give it one, such as --max-epochs N"
    advice = f"train.{stopped_by} is already reached; raise it with {options[stopped_by]}"
    others = [name for name in options if name != stopped_by and getattr(t, name)]
    if others:  # lifting this limit leaves another one to stop the run
        advice += f", or --set train.{stopped_by}=null to let {', '.join(f'train.{o}' for o in others)} decide"
    return advice


PERPLEXITY_CAP = 1.0142320547350045e304  # e ** model.MAX_LOG_PERPLEXITY, where perplexity() stops (model imports
# torch, which the CLI loads only inside its commands)


def _figure(x: float, spec: str) -> str:
    """x in `spec` (fixed decimals), or in exponent form where that would print hundreds of digits (the
    perplexity of a model whose loss blew up); a perplexity at the cap is a bound, and says so."""
    if abs(x) < 1e15:
        return format(x, spec)
    width = spec.split(".")[0]
    if math.isinf(x):
        return format(x, f"{width}")
    if x >= PERPLEXITY_CAP:
        return format(">1e+304", f">{width}" if width else "")
    return format(x, f"{width}.4g")


def _path(raw: str) -> Path:
    """A path argument or option as a Path; an empty one is refused: Path("") is ".", so `--out "$RUN"` with
    RUN unset trained into the current folder, and `charlm sample ""` looked for a checkpoint there."""
    if raw == "":
        raise typer.BadParameter("an empty path (is a shell variable unset?)")
    return Path(raw)


def _file_path(raw: str) -> Path:
    """A file option's value as a Path. Path("./-") is Path("-"), which the commands read as standard input;
    a file that is really named "-" is reached as ./- , so that spelling keeps its folder (made absolute)."""
    path = _path(raw)
    return path.absolute() if str(path) == "-" and raw != "-" else path


# ---------------------------------------------------------------- train
@app.command(cls=_Command)
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", parser=_path, metavar="<path>", help="YAML config file (sections data, model, train).")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Text file to train on (UTF-8 unless --encoding).",
                                                   parser=_file_path, metavar="<path>")] = None,
    val: Annotated[Optional[Path], typer.Option(help="Validation text file (default: the last data.val_fraction of "
                                                     "the corpus).", parser=_file_path, metavar="<path>")] = None,
    out: Annotated[Optional[Path], typer.Option(parser=_path, metavar="<path>", help="Run folder to create (default: runs/<corpus name>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(parser=_path, metavar="<path>", help="Continue the run in this folder from its last checkpoint.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (model.device).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (train.seed).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (train.max_steps).")] = None,
    max_epochs: Annotated[Optional[float], typer.Option(help="Stop after this many epochs (train.max_epochs).")] = None,
    max_time: Annotated[Optional[float], typer.Option(help="Wall-clock budget in seconds (train.max_time).")] = None,
    encoding: Annotated[Optional[str], typer.Option(help="Text encoding of the corpus, e.g. latin-1 (data.encoding).")] = None,
    errors: Annotated[Optional[str], typer.Option(help="Undecodable bytes: strict refuses the file, replace substitutes U+FFFD (data.errors).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="<section.field=value>", help="Override a config field: section.field=value (repeatable).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(parser=_path, metavar="<path>", help="Folder for token files, reused while the corpus and tokenizer settings are unchanged (default: $CHARLM_CACHE_DIR, else .charlm-cache).")] = None,
    nproc: Annotated[int, typer.Option(help="Train data-parallel on this many local processes (launches torchrun).")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or log lines.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Train a language model.

    Example: charlm train --config configs/char_shakespeare.yaml --corpus data/shakespeare.txt --max-time 180
    """
    with _errors(_TRAIN_MEMORY):
        from .config import load_config
        from .train import train as run_training

        from .errors import UsageError

        if nproc < 1:
            raise UsageError(f"--nproc must be at least 1, got {nproc}")
        extra = {"model.device": device, "train.seed": seed, "train.max_steps": max_steps,
                 "train.max_epochs": max_epochs, "train.max_time": max_time, "data.encoding": encoding,
                 "data.errors": errors}
        _check_shortcuts(extra, set_ or [])
        base = None
        if resume is not None and config is None:
            from .checkpoint import CONFIG_FILE, find_checkpoint
            from .runs import run_folder_of
            from .train import check_run_folder_free

            run_folder = run_folder_of(resume, "--resume", names=("last",))
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone: it locks the folder next
                check_run_folder_free(run_folder)  # a run still training, before its first checkpoint: say so
            base = find_checkpoint(run_folder, "last") / CONFIG_FILE
        cfg = load_config(config, set_, extra, base=base)
        if nproc > 1:
            from .launch import check_before_launch, run_torchrun

            run_dir = check_before_launch(cfg, corpus, val, nproc, out, resume)
            raise typer.Exit(run_torchrun(sys.argv[1:], nproc, own_process=_console["on"], run_dir=run_dir))
        result = run_training(cfg, corpus, out=out, val=val, resume=resume, show_progress=not quiet,
                              cache_dir=cache_dir, note_changes=f"--config {config}" if config is not None else None)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun only rank 0 reports
        if as_json:
            _out(json.dumps(asdict(result)))
            return
        _out(f"run folder      {result.run_dir}")
        _out(f"steps           {result.steps:,} ({result.epochs:.2f} epochs, {result.elapsed:.1f} s, stopped by {result.stopped_by})")
        _out(f"train loss      {_figure(result.train_loss, '.4f')}" if result.train_loss is not None
             else f"train loss      - (no step left to run: {_limit_advice(result.stopped_by, cfg.train)})")
        if result.val_loss is not None:
            # the checkpoint was chosen on a slice of the split, whose loss is not comparable with the whole's
            best = _figure(result.best_val_loss, '.4f')
            if result.best_val_tokens:
                from .runs import read_manifest

                step = (read_manifest(Path(result.run_dir), "best") or {}).get("step")
                which = ("best/ holds this model, chosen" if step == result.steps
                         else f"best/ (step {step:,}) chosen" if isinstance(step, int) else "best/ chosen")
                best = f"{which} at {best} on the first {result.best_val_tokens:,} validation tokens"
            else:
                best = f"best {best}"
            _out(f"val loss        {_figure(result.val_loss, '.4f')} nats/token, perplexity "
                 f"{_figure(result.val_perplexity, '.2f')}, {_figure(result.val_bits_per_char, '.4f')} bits/char "
                 f"({best})")
        _out(f"tokens/second   {result.tokens_per_second:,.0f}" if result.train_loss is not None
             else "tokens/second   - (no step run)")
        _out(f"parameters      {result.parameters:,}")


# ---------------------------------------------------------------- sample
@app.command(cls=_Command)
def sample(
    run_dir: Annotated[Path, typer.Argument(parser=_path, help="Run folder (or a checkpoint folder inside it).", metavar="RUN_DIR")],
    prime: Annotated[str, typer.Option(help="Text to start from; generation continues it.")] = "",
    max_length: Annotated[int, typer.Option(help="Stop after this many generated tokens.")] = 500,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: the smallest set with this much probability.")] = 1.0,
    num_samples: Annotated[int, typer.Option(help="How many samples.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Random seed, for reproducible samples.")] = None,
    allow_unk: Annotated[bool, typer.Option("--allow-unk", help="Let <unk> be sampled (masked by default).")] = False,
    checkpoint: Annotated[Optional[str], typer.Option(help="best or last (default: best, else last; or the "
                                                          "checkpoint folder named).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    impl: Annotated[Optional[str], typer.Option(help="Read the run on custom or torch cells (default: the run's "
                                                     "own), to check one against the other.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sample, with its log-probability under the model (temperature 1, untruncated).")] = False,
) -> None:
    """Generate text from a trained model, stopping at <eos> or --max-length.

    Example: charlm sample runs/shakespeare --prime "O Romeo, " --temperature 0.8 --seed 1
    """
    with _errors(lambda: _sample_memory(num_samples, max_length, prime)):
        from .runtime import resolve_device
        from .sample import check_options, iter_samples

        check_options(max_length, temperature, top_k, top_p, num_samples, seed)
        dev = resolve_device(device)
        model, codec, _ = _load(run_dir, dev, checkpoint, impl)
        samples = iter_samples(model, codec, prime, max_length, temperature, top_k, top_p, num_samples, seed,
                               allow_unk, dev)
        ended_at_once = 0  # samples whose first token was <eos>: nothing generated
        for k, s in enumerate(samples):  # drawn a group at a time: each is shown as soon as its group is done
            if k == 0 and s.prime_unk:
                _err_note(f"{s.prime_unk} token{'s' if s.prime_unk > 1 else ''} of --prime "
                          f"{'are' if s.prime_unk > 1 else 'is'} not in the run's vocabulary: the model reads "
                          f"{'them' if s.prime_unk > 1 else 'it'} as <unk>")
            if as_json:
                _out(json.dumps({"text": s.text, "generated": s.generated, "logprob": s.logprob,
                                 "tokens": len(s.tokens), "stopped_at": s.stopped_at, "prime_unk": s.prime_unk},
                                ensure_ascii=False))
            else:
                _out(s.text)
            sys.stdout.flush()
            ended_at_once += not s.generated and s.stopped_at == "eos"
        which = "the sample" if num_samples == 1 else f"{ended_at_once} of {num_samples} samples"
        if ended_at_once and len(codec.vocab) <= 2 and not allow_unk:  # <unk> and <eos> only: nothing to draw
            _err_note(f"{which} {'is' if num_samples == 1 else 'are'} empty: the run's vocabulary holds only <eos> "
                      f"and <unk> (its data.min_freq is above every token's count), so <eos> is all there is to "
                      f"draw; train again with a lower data.min_freq")
        elif ended_at_once and prime:
            _err_note(f"{which} ended right after --prime: the model closed the line there (a prime that starts a "
                      f"line the model would go on with, such as the first words of a sentence, gives more)")
        elif ended_at_once:  # the model learned that lines may be empty (a blank line between paragraphs)
            _err_note(f"{which} {'is' if num_samples == 1 else 'are'} empty: the model ended "
                      f"{'it' if num_samples == 1 else 'them'} at once (in a corpus with blank lines, a line may "
                      f"be empty); --prime gives each sample a start")


def _check_errors(errors: str) -> None:
    from .errors import UsageError
    if errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be strict or replace, got '{errors}'")


def _load(run_dir: Path, device, checkpoint: str | None, impl: str | None = None):
    """load_run, with a note on stderr when a run without best/ answers from last/ (`--checkpoint` not given)."""
    from .checkpoint import is_checkpoint_folder, load_run, why_no_best

    loaded = load_run(run_dir, device, _which(checkpoint), impl)
    folder = loaded[2].folder
    if checkpoint is None and not is_checkpoint_folder(Path(run_dir)) and folder.name.startswith("last"):
        _err_note(f"{run_dir}: {why_no_best(run_dir)}; reading {folder.name}/")
    return loaded


_SHORTCUTS = {"model.device": "--device", "train.seed": "--seed", "train.max_steps": "--max-steps",
              "train.max_epochs": "--max-epochs", "train.max_time": "--max-time", "data.encoding": "--encoding",
              "data.errors": "--errors"}


def _check_shortcuts(extra: dict, overrides: list[str]) -> None:
    """Refuse a field that a shortcut option and --set give different values (the option would win, whatever
    their order, in silence)."""
    from .config import checked_value, parse_override
    from .errors import UsageError

    for item in overrides:
        section, name, value = parse_override(item)
        key = f"{section}.{name}"
        if extra.get(key) is None:
            continue
        try:  # compared as the config reads them: --max-time 1000 and --set train.max_time=1e3 agree
            same = checked_value(section, name, extra[key]) == checked_value(section, name, value)
        except UsageError:  # a value the config refuses: compared as given
            same = extra[key] == value
        if not same:
            raise UsageError(f"{key} is given twice, as {_SHORTCUTS[key]} {extra[key]} and as --set {item.strip()}: "
                             f"give it once")


def _which(checkpoint: str | None) -> str | None:
    from .errors import UsageError
    if checkpoint not in ("best", "last", None):
        raise UsageError(f"--checkpoint must be best or last, got '{checkpoint}'")
    return checkpoint


# ---------------------------------------------------------------- score
@app.command(cls=_Command)
def score(
    run_dir: Annotated[Path, typer.Argument(parser=_path, help="Run folder (or a checkpoint folder inside it).", metavar="RUN_DIR")],
    text: Annotated[Optional[list[str]], typer.Argument(metavar="TEXT...", help="Sentences to score (default: --file, else stdin).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Score every line of this file ('-': "
                                                 "standard input).", parser=_file_path, metavar="<path>")] = None,
    per_token: Annotated[bool, typer.Option("--per-token", help="Also give every token's log-probability: log10 "
                                                                "in the table, natural log in --json.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sentence.")] = False,
    batch_size: Annotated[int, typer.Option(help="Sentences scored together.")] = 128,
    encoding: Annotated[Optional[str], typer.Option(help="Text encoding of --file (default: the run's data.encoding) "
                                                    "or of standard input (default: the terminal's, as for the "
                                                    "sentences given as arguments).")] = None,
    errors: Annotated[str, typer.Option(help="Undecodable bytes in --file or standard input: strict refuses it, "
                                             "replace substitutes U+FFFD.")] = "strict",
    checkpoint: Annotated[Optional[str], typer.Option(help="best or last (default: best, else last; or the "
                                                          "checkpoint folder named).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    impl: Annotated[Optional[str], typer.Option(help="Read the run on custom or torch cells (default: the run's "
                                                     "own), to check one against the other.")] = None,
) -> None:
    """Give each sentence its probability: log P(tokens + <eos>), from a fresh start.

    Example: charlm score runs/shakespeare "To be, or not to be." --per-token
    """
    with _errors(_memory_advice([("smaller --batch-size", batch_size, 1)])):
        from .data import read_pieces
        from .errors import UsageError
        from .runtime import resolve_device
        from .score import RunningTotals, line_chunks, score_sentences

        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        if text and file is not None:
            raise UsageError("give the sentences to score as arguments or as --file, not both")
        _check_errors(errors)
        dev = resolve_device(device)
        model, codec, saved = _load(run_dir, dev, checkpoint, impl)
        if file is not None and str(file) == "-":  # the usual name of standard input
            file = None
        typed = not text and file is None and sys.stdin.isatty()
        if typed:
            print("charlm: reading sentences from standard input, one a line (end with Ctrl-D)", file=sys.stderr)
        if text:
            named = next((t for t in text if _names_a_file(t)), None)
            if named is not None:  # `score RUN FILE`: the -f forgotten, or a sentence that is also a file name
                print(f"charlm: note: '{named}' is scored as a sentence; to score the lines of the file {named}, "
                      f"use --file {named}", file=sys.stderr)
            chunks = iter([[line for t in text for line in (codec.tokenizer.lines(t) or [""])]])
        else:
            # a file in the run's encoding; text typed or piped in, as the arguments are, in the terminal's, not the
            # corpus's (a run trained on a cp1252 file read a piped 'thé' as 'thÃ©'). Read and scored a batch of
            # lines at a time, each printed before the next is read; typed lines one by one, as they come.
            source, default = (file, saved.cfg.data.encoding) if file is not None else (
                Path("-"), sys.stdin.encoding or "utf-8")
            chunks = line_chunks(read_pieces(source, encoding or default, errors, codec.tokenizer.level, typed),
                                 each_piece=typed)
        totals = RunningTotals()
        for sentences in chunks:
            results = score_sentences(model, codec, sentences, batch_size, dev)
            _print_scores(results, per_token, as_json, codec.tokenizer)
            sys.stdout.flush()  # a batch's results reach a pipe before the next batch is read
            totals.add(results)
        if not totals.sentences:  # as `charlm eval` does: an empty input is more likely a mistake than a request
            raise UsageError(f"{file if file is not None else 'standard input'} holds no lines to score")
        if not as_json:
            t = totals.totals()
            _out(f"Total: ln P {_figure(t.logprob, '.4f')}  log10 P {_figure(t.log10prob, '.4f')}  tokens {t.tokens}  "
                 f"OOV {t.oov}")
            _out(f"Perplexity including OOVs: {_figure(t.perplexity, '.4f')}")
            _out(f"Perplexity excluding OOVs: {_figure(t.perplexity_no_oov, '.4f')}")


def _written(tokenizer, text: str, tokens: list[str]) -> list[str]:
    """Each scored token as the text writes it ("The" where a lowercasing run scored "the", the word that
    became <unk>), the closing <eos> last; where normalising the text changed how it splits, as it reads."""
    from .tokenizer import Tokenizer, normalize

    read = tokenizer.split(text)
    as_typed = Tokenizer(tokenizer.level, False, tokenizer.word_split).split(text) if tokenizer.lowercase else read
    if len(as_typed) == len(read):  # each typed token where it lowers to the one read (not "İ", which grows)
        read = [t if normalize(t, True) == r else r for t, r in zip(as_typed, read)]
    return read + tokens[len(read):]


TABLE_TEXT_CHARS = 300  # the score table echoes at most this much of a sentence; --json gives it whole
# the bidirectional embeddings, overrides and isolates, which reorder what a terminal shows after them
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _shown(text: str, limit: int | None = TABLE_TEXT_CHARS) -> str:
    """`text` as the score table echoes it: control characters written as escapes (a terminal escape sequence
    in a scored file does not reach the terminal, a tab token does not split the tab-separated --per-token
    line, a right-to-left override does not reorder the row), and a line longer than `limit` cut, with its
    length."""
    cut = text if limit is None or len(text) <= limit else text[:limit]
    shown = "".join(f"\\u{ord(c):04x}" if c in _BIDI_CONTROLS else repr(c)[1:-1] if unicodedata.category(c) == "Cc"
                    else c for c in cut)
    return shown if cut is text else f"{shown}... ({len(text):,} characters in all)"


def _names_a_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):  # too long a name, a NUL: a sentence, not a path
        return False


def _print_scores(results, per_token: bool, as_json: bool, tokenizer) -> None:
    """Each sentence's line of the score table, or its JSON object; the totals follow the last batch."""
    from .score import LN10

    for r in results:
        if as_json:
            record = {"text": r.text, "logprob": r.logprob, "log10prob": r.log10prob, "tokens": len(r.tokens),
                      "oov": r.oov, "perplexity": r.perplexity, "perplexity_no_oov": r.perplexity_no_oov,
                      "bits_per_token": r.bits_per_token}
            if per_token:
                record["token_logprobs"] = [[t, lp] for t, lp in zip(r.tokens, r.token_logprobs)]
                record["written"] = _written(tokenizer, r.text, r.tokens)
            _out(json.dumps(record, ensure_ascii=False))
            continue
        if per_token:  # a token shown as the text has it, then as it was scored where that differs (<unk>)
            words = _written(tokenizer, r.text, r.tokens)
            _out("\t".join(f"{_shown(t, None) if w == t else f'{_shown(w, None)}({t})'}={_figure(lp / LN10, '.4f')}"
                           for w, t, lp in zip(words, r.tokens, r.token_logprobs)))
        _out(f"ln P {_figure(r.logprob, '10.4f')}  log10 P {_figure(r.log10prob, '9.4f')}  tokens {len(r.tokens):4d}  "
             f"OOV {r.oov:3d}  ppl {_figure(r.perplexity, '9.3f')}  bits/token {_figure(r.bits_per_token, '6.3f')}  "
             f"| {_shown(r.text)}")


# ---------------------------------------------------------------- eval
@app.command("eval", cls=_Command)
def eval_(
    run_dir: Annotated[Path, typer.Argument(parser=_path, help="Run folder (or a checkpoint folder inside it).", metavar="RUN_DIR")],
    file: Annotated[Path, typer.Option("--file", "-f", help="Text file to evaluate, read as one stream "
                                                            "(-: standard input).", parser=_file_path,
                                       metavar="<path>")],
    streams: Annotated[int, typer.Option(help="Parallel streams; 1 (default) is the exact likelihood of the file.")] = 1,
    encoding: Annotated[Optional[str], typer.Option(help="Text encoding of --file (default: the run's data.encoding).")] = None,
    errors: Annotated[str, typer.Option(help="Undecodable bytes in --file: strict refuses it, replace substitutes U+FFFD.")] = "strict",
    checkpoint: Annotated[Optional[str], typer.Option(help="best or last (default: best, else last; or the "
                                                          "checkpoint folder named).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    impl: Annotated[Optional[str], typer.Option(help="Read the run on custom or torch cells (default: the run's "
                                                     "own), to check one against the other.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Corpus-level loss, perplexity and bits per character of a text file.

    Example: charlm eval runs/shakespeare --file val.txt
    """
    with _errors(_memory_advice([("smaller --streams", streams, 1)])):
        from .errors import UsageError
        from .runtime import resolve_device
        from .score import evaluate_file

        if streams < 1:
            raise UsageError(f"--streams must be at least 1, got {streams}")
        _check_errors(errors)
        dev = resolve_device(device)
        model, codec, saved = _load(run_dir, dev, checkpoint, impl)
        if str(file) == "-" and sys.stdin.isatty():
            print("charlm: reading the text to evaluate from standard input (end with Ctrl-D)", file=sys.stderr)
        r = evaluate_file(model, codec, file, streams, encoding or saved.cfg.data.encoding, errors, dev)
        if as_json:
            _out(json.dumps(asdict(r)))
            return
        _out(f"file            {r.file}{' (standard input)' if r.file == '-' else ''}")
        _out(f"tokens          {r.tokens:,} ({r.characters:,} characters, {r.lines:,} "
             f"line{'' if r.lines == 1 else 's'}, {r.oov:,} OOV)")
        _out(f"loss            {r.loss:.4f} nats/token")
        _out(f"perplexity      {_figure(r.perplexity, '.3f')}")
        _out(f"bits per token  {r.bits_per_token:.4f}")
        _out(f"bits per char   {r.bits_per_char:.4f}")
        if not r.exact:
            _out(f"streams         {r.streams}, read side by side, each after the first from a fresh state: "
                 f"not the exact likelihood of the file")


# ---------------------------------------------------------------- info
_INFO_TOKENS = 20  # the vocabulary's first tokens that info shows
_INFO_FORMATS = {"epoch": (".2f", ""), "val_loss": (".4f", " nats/token"), "elapsed": (".1f", " s")}


def _info_value(key: str, value) -> str:
    """One value of `charlm info`'s table as a person reads it (--json keeps the full values)."""
    if value is None:
        return "- (no validation)" if key == "val_loss" else "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float) and key in _INFO_FORMATS:
        spec, unit = _INFO_FORMATS[key]
        return _figure(value, spec) + unit  # a loss that blew up in exponent form, as train and runs print it
    return str(value)


@app.command(cls=_Command)
def info(
    run_dir: Annotated[Path, typer.Argument(parser=_path, help="Run folder (or a checkpoint folder inside it).", metavar="RUN_DIR")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Describe a run: config, parameters, vocabulary, steps, best validation loss, training time.

    Example: charlm info runs/shakespeare
    """
    with _errors():
        from .checkpoint import load_run
        from .config import dump_yaml
        from .model import count_parameters
        from .runs import summarize, whole_split_loss

        model, codec, saved = load_run(run_dir, "cpu")
        m = saved.manifest
        val_loss, on_slice = m.get("val_loss"), bool(m.get("val_slice"))
        whole = whole_split_loss(saved.folder.parent, m.get("step")) if on_slice else None
        if whole is not None:  # the same weights, read over the whole split by the final check (as runs shows)
            val_loss, on_slice = whole, False
        run = summarize(saved.folder.parent)  # the run's own steps and time: best/ may lie far behind them
        record = {"checkpoint": str(saved.folder), "parameters": count_parameters(model),
                  "vocab_size": len(codec.vocab), "vocab_first": codec.vocab.tokens[:_INFO_TOKENS],
                  "level": codec.tokenizer.level, "step": m.get("step"),
                  "epoch": m.get("epoch"), "val_loss": val_loss, "val_slice": on_slice,
                  "elapsed": m.get("elapsed"), "run_steps": run.steps, "run_elapsed": run.elapsed,
                  "config": saved.cfg.to_dict()}
        if as_json:
            _out(json.dumps(record, ensure_ascii=False))
            return
        for key in ("checkpoint", "parameters", "vocab_size", "level", "step", "epoch", "val_loss", "elapsed"):
            value = _info_value(key, record[key])
            if key == "val_loss" and record["val_slice"] and saved.cfg.train.eval_tokens:
                value += f" (on the first {saved.cfg.train.eval_tokens:,} validation tokens)"
            if key == "step" and run.steps is not None and record["step"] != run.steps:
                value += f" (this checkpoint's; the run went on to step {run.steps:,})"
            if key == "elapsed" and run.elapsed is not None and record["step"] != run.steps:
                value += f" (the run trained {_info_value(key, run.elapsed)})"
            _out(f"{key:15s} {value}")
            if key == "vocab_size":  # which tokens: the specials, then the most frequent (JSON quotes a space)
                more = len(codec.vocab) - _INFO_TOKENS
                _out(f"{'vocabulary':15s} {json.dumps(record['vocab_first'], ensure_ascii=False)}"
                     + (f" and {more:,} more (vocab.json holds them all)" if more > 0 else ""))
        _out("config:")
        for line in dump_yaml(saved.cfg).splitlines():
            _out(f"  {line}")


# ---------------------------------------------------------------- runs
@app.command(cls=_Command)
def runs(
    folder: Annotated[Path, typer.Argument(parser=_path, metavar="FOLDER", help="Folder to search for run folders (a run folder, or its best/ or "
                                                "last/, lists that run).")] = Path("runs"),
    sort: Annotated[str, typer.Option(help="Column to sort by: name, status, level, cell, impl, size (the hidden "
                                            "size), parameters, steps, val_loss, bpc, time (also layers, "
                                            "hidden_size); a leading '-' sorts descending.")] = "name",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run.")] = False,
) -> None:
    """List the runs under a folder: cell, size, parameters, steps, best validation loss, time.

    Reads only config.yaml, metrics.jsonl and the checkpoints' manifest.json; a damaged run is listed as broken.

    Example: charlm runs runs --sort val_loss
    """
    with _errors(torch=False):
        from .runs import list_runs

        summaries = list_runs(folder, sort)
        if as_json:
            for s in summaries:
                _out(json.dumps(asdict(s), ensure_ascii=False))
            return
        if not summaries:
            _out(f"no runs under {folder}")
            return
        _print_runs(summaries)


def _print_runs(summaries) -> None:
    def fmt(value, spec: str = "") -> str:
        return "-" if value is None else _figure(value, spec) if isinstance(value, float) else format(value, spec)

    def clock(seconds) -> str:
        if seconds is None:
            return "-"
        minutes, sec = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"

    header = ("name", "status", "level", "cell", "impl", "size", "parameters", "steps", "val_loss", "bpc", "time")
    rows = [header]
    for s in summaries:
        size = f"{s.layers}x{s.hidden_size}" if s.layers is not None and s.hidden_size is not None else "-"
        mark = "*" if s.best_val_slice and s.best_val_loss is not None else ""
        rows.append((s.name, s.status, fmt(s.level), fmt(s.cell), fmt(s.impl), size, fmt(s.parameters, ","),
                     fmt(s.steps, ","), fmt(s.best_val_loss, ".4f") + mark,
                     fmt(s.best_val_bpc, ".4f") + (mark if s.best_val_bpc is not None else ""),
                     clock(s.elapsed)))
    widths = [max(_columns(r[i]) for r in rows) for i in range(len(header))]
    numeric = {6, 7, 8, 9, 10}
    for r in rows:
        pads = [" " * (w - _columns(c)) for c, w in zip(r, widths)]
        _out("  ".join(pad + c if i in numeric else c + pad for i, (c, pad) in enumerate(zip(r, pads))).rstrip())
    if any(s.best_val_slice and s.best_val_loss is not None for s in summaries):
        _out("* best/ was chosen on the first train.eval_tokens of the validation split, and its loss on the "
             "whole split is not known: not comparable with the other figures")
    for s in summaries:
        if s.problem:
            _out(f"{s.name}: {s.status}: {s.problem}")


# ---------------------------------------------------------------- plot
@app.command(cls=_Command)
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(parser=_path, metavar="RUN_DIR...", help="One or more run folders, drawn on one figure.")],
    out: Annotated[Path, typer.Option(parser=_path, metavar="<path>", help="PNG file to write (one already there is replaced, with a note).")] = Path(
        "curves.png"),
) -> None:
    """Draw training and validation loss (and bits per character) against steps and time, as a PNG.

    Needs matplotlib: pip install 'matplotlib>=3.7'.

    Example: charlm plot runs/lstm runs/gru --out curves.png
    """
    with _errors(torch=False):  # a plot reads text files: torch's import would cost it 2.3 s and 270 MB
        from .plot import plot_runs, warm_up

        with _holding_signals():  # an interrupt inside matplotlib's (and numpy's) import is raised after it
            warm_up()
        replaced = out.is_file()  # said after the picture is drawn, not if the plot is refused
        result = plot_runs(run_dirs, out)
        if replaced:
            _err_note(f"{out} was there before and is replaced (--out FILE writes another)")
        for name in result.skipped:
            _err_note(f"{name}: no steps logged yet, left out")
        for name in result.repeated:
            _err_note(f"{name}: the same run as a folder named before it, drawn once")
        if result.glyphs_missing:
            from .plot import font_list_cache

            _err_note(f"no installed font has some characters of the run names, which show as boxes: install "
                      f"a font with them (for Chinese, e.g. Noto Sans CJK: fonts-noto-cjk), then remove "
                      f"{font_list_cache()} so that matplotlib looks for fonts again")
        _out(f"wrote {result.out} ({result.width}x{result.height} px, {len(result.runs)} run"
             f"{'s' if len(result.runs) != 1 else ''})")


def _err_note(message: str) -> None:
    print(f"charlm: note: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- export
@app.command(cls=_Command)
def export(
    run_dir: Annotated[Path, typer.Argument(parser=_path, help="Run folder (or a checkpoint folder inside it).", metavar="RUN_DIR")],
    out: Annotated[Path, typer.Option(parser=_path, metavar="<path>", help="File to write (e.g. model.pt or model.onnx; one already there is "
                                           "replaced, with a note).")],
    format_: Annotated[Optional[str], typer.Option("--format", help="torchscript, or onnx (needs onnx and "
                                                      "onnxruntime); default: onnx for an --out ending in "
                                                      ".onnx, else torchscript.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="best or last (default: best, else last; or the "
                                                          "checkpoint folder named).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Export one generation step (tokens and state in, logits and state out) that runs without charlm.

    The file is read back and checked against charlm's model over a few steps.

    Example: charlm export runs/shakespeare --format torchscript --out shakespeare.pt
    """
    with _errors():
        from .export import export_model

        replaced = out.is_file()  # said once the file is written, not if the export is refused
        r = export_model(run_dir, format_, out, _which(checkpoint))
        if replaced:
            _err_note(f"{out} was there before and is replaced (--out FILE writes another)")
        if as_json:
            _out(json.dumps(asdict(r)))
            return
        s, layers, _, hidden = r.state_shape
        _out(f"wrote           {r.out} ({r.format}, from {r.checkpoint})")
        _out(f"signature       step(tokens (B,) int64, state ({s}, {layers}, B, {hidden}) float32) "
             f"-> (logits (B, {r.vocab_size}), state)")
        if r.max_abs_diff is None:
            _out("check           skipped: onnxruntime is not installed")
        else:
            _out(f"check           max |difference| from charlm over {r.check_steps} steps: {r.max_abs_diff:.3g}")


# ---------------------------------------------------------------- bench
@app.command(cls=_Command)
def bench(
    cells: Annotated[str, typer.Option(help="Cells to measure, comma-separated: rnn,gru,lstm.")] = "rnn,gru,lstm",
    impls: Annotated[str, typer.Option(help="Implementations, comma-separated: custom, torch, and reference "
                                            "(the custom cells' step functions under autograd).")] = "custom,torch",
    hidden_size: Annotated[int, typer.Option(help="Hidden size of each layer.")] = 256,
    embedding_size: Annotated[int, typer.Option(help="Embedding size.")] = 64,
    layers: Annotated[int, typer.Option(help="Stacked recurrent layers.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Parallel streams.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 64,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (random tokens).")] = 65,
    seconds: Annotated[float, typer.Option(help="Timed seconds per model and measurement, split over the rounds.")] = 3.0,
    rounds: Annotated[int, typer.Option(help="Timed rounds; the median is reported.")] = 5,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default, one per core).")] = 0,
    grid: Annotated[bool, typer.Option("--grid/--no-grid", help="Measure every cell x impl (skip with --no-grid "
                                                                 "to run only --generate / --score-lines).")] = True,
    generate_tokens: Annotated[int, typer.Option("--generate", help="Also time generating this many tokens with "
                                                                   "`charlm sample`'s code (batch 1); 0: off.")] = 0,
    score_lines: Annotated[int, typer.Option(help="Also time scoring this many random lines batched against one "
                                                  "at a time; 0: off.")] = 0,
    score_batch_size: Annotated[int, typer.Option(help="Lines scored together for --score-lines.")] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Markdown tables instead of plain text.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Tokens per second of training, inference and sampling for every cell x impl, and custom / torch ratios.

    Example: charlm bench --cells lstm --hidden-size 512 --seconds 10
    """
    with _errors(_BENCH_MEMORY):
        from .bench import CELLS, IMPLS, BenchSettings, generate_speed, parse_list, run_bench, score_speed
        from .errors import UsageError

        s = BenchSettings(parse_list(cells, CELLS, "--cells"), parse_list(impls, IMPLS, "--impls"), hidden_size,
                          embedding_size, layers, batch_size, seq_len, vocab_size, seconds, rounds, device=device,
                          threads=threads)
        s.check()
        if generate_tokens < 0 or score_lines < 0 or score_batch_size < 1:
            raise UsageError("--generate and --score-lines must be >= 0, --score-batch-size >= 1")
        if not grid and not generate_tokens and not score_lines:
            raise UsageError("--no-grid leaves nothing to measure: add --generate N or --score-lines N")
        if as_json and markdown:
            raise UsageError("--json and --markdown are two ways to print the results: choose one")
        say = (lambda m: None) if quiet else (lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
        results = run_bench(s, say) if grid else []
        gen = [generate_speed(c, i, s, generate_tokens) for c in s.cells for i in s.impls] if generate_tokens else []
        sco = ([score_speed(c, i, s, score_lines, score_batch_size) for c in s.cells for i in s.impls]
               if score_lines else [])
        if as_json:
            for kind, rows in (("model", results), ("generate", gen), ("score", sco)):
                for r in rows:
                    _out(json.dumps({"measure": kind, **asdict(r)}))
            return
        _print_bench(results, gen, sco, markdown)


def _print_bench(results, gen, sco, markdown: bool) -> None:
    def table(head: list[str], rows: list[list[str]]) -> None:
        if markdown:
            _out("| " + " | ".join(head) + " |")
            _out("|" + "|".join("---:" if i > 1 else "---" for i in range(len(head))) + "|")
            for row in rows:
                _out("| " + " | ".join(row) + " |")
        else:
            widths = [max(len(x) for x in col) for col in zip(head, *rows)]
            for row in [head, *rows]:
                _out("  ".join(x.rjust(w) if i > 1 else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
        _out()

    def ratio(x) -> str:
        return "-" if x is None else f"{x:.2f}"

    if results:
        r0 = results[0]
        custom = [r for r in results if r.products != "-"]  # the custom cells' CPU path, if measured
        kernels = {r.cell: r.native for r in custom}
        kernels = (next(iter(kernels.values())) if len(set(kernels.values())) == 1  # an LSTM's may differ
                   else "; ".join(f"{cell} {state}" for cell, state in kernels.items()))
        products = f", custom cells: {custom[0].products} products, native kernels {kernels}" if custom else ""
        rounds = len(r0.train_rounds)
        rounds = "the median of 1 round" if rounds == 1 else f"medians of {rounds} rounds"
        threads = f"{r0.threads} thread" + ("s" if r0.threads != 1 else "")
        _out(f"device {r0.device} ({threads}{products}), hidden {r0.hidden_size}, embedding {r0.embedding_size}, "
             f"layers {r0.layers}, batch {r0.batch_size}, window {r0.seq_len}, vocabulary {r0.vocab_size}; "
             f"tokens/s are {rounds}; ratio = this impl / torch; memory: {r0.memory_measure}")
        _out()
        table(["cell", "impl", "train tok/s", "infer tok/s", "sample tok/s", "train ratio", "infer ratio",
               "sample ratio", "peak MiB", "parameters"],
              [[r.cell, r.impl, f"{r.train_tokens_per_s:,.0f}", f"{r.infer_tokens_per_s:,.0f}",
                f"{r.sample_tokens_per_s:,.0f}", ratio(r.train_ratio), ratio(r.infer_ratio), ratio(r.sample_ratio),
                "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.1f}", f"{r.parameters:,}"]
               for r in results])
    if gen:
        table(["cell", "impl", "hidden", "layers", "vocabulary", "tokens generated", "seconds", "tokens/s"],
              [[g.cell, g.impl, str(g.hidden_size), str(g.layers), str(g.vocab_size), f"{g.tokens:,}",
                f"{g.seconds:.3f}", f"{g.tokens_per_s:,.0f}"] for g in gen])
    if sco:
        table(["cell", "impl", "hidden", "layers", "lines", "tokens", "batched lines/s", "one-at-a-time lines/s",
               "speedup"],
              [[c.cell, c.impl, str(c.hidden_size), str(c.layers), f"{c.lines:,}", f"{c.tokens:,}",
                f"{c.batched_lines_per_s:,.0f}", f"{c.single_lines_per_s:,.1f}", f"{c.speedup:.1f}x"] for c in sco])


def _command_path(args: list[str]) -> str:
    """`charlm COMMAND` for a command line whose error Click raised without a context (an option at the end
    without its value): the first word that names a command, else `charlm`."""
    main_module = sys.modules.get("__main__")
    program = f"python -m {main_module.__package__}" if getattr(main_module, "__package__", None) else "charlm"
    names = set(typer.main.get_command(app).commands)  # as Click names the program, for `python -m charlm`
    command = next((a for a in args if a in names), None)
    return f"{program} {command}" if command else program


def main() -> None:
    """Console entry point: output survives ASCII terminals and closed pipes; a bad command line,
    like every other error, is one line on stderr (Click's own display takes four)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    _console["on"] = True
    try:
        for sig in caught_signals():
            signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread
        pass
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `charlm` or `charlm train` alone: the help
            exc.show()
        else:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else _command_path(sys.argv[1:])
            message = exc.format_message()
            param = getattr(exc, "param", None)
            if type(exc).__name__ == "MissingParameter" and getattr(param, "param_type_name", "") == "argument":
                shown = (param.metavar or param.name.upper()).removesuffix("...")  # RUN_DIR, as the help shows it
                message = message.replace(f"'{param.name}'", shown).replace(f"'{param.metavar}'", shown)
            if getattr(exc, "option_name", None) == "--debug" and ctx is not None and ctx.parent is not None:
                message += f"; --debug goes before the command: charlm --debug {ctx.info_name} ..."  # not after it
            option = getattr(exc, "option_name", None) or ""
            if (type(exc).__name__ == "NoSuchOption" and ctx is not None and ctx.info_name == "score"
                    and (not option.startswith("--") or " " in option)):  # a sentence, not a mistyped option
                import shlex

                # the sentence: an argument that begins with '-' and holds a space, else the one read as the option
                words = [a for a in sys.argv[2:] if a.startswith("-") and a != "--"]
                sentence = next((a for a in words if " " in a),
                                next((a for a in words if option.strip() in a), option))
                message += (f"; a sentence that begins with '-' goes after --: "
                            f"charlm score RUN -- {shlex.quote(sentence)}")
            _err(f"{message} (see {where} -h)")
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        to_devnull(sys.stdout.fileno())
        sys.exit(0)
    except StopSignal as exc:  # while the command line was parsed, before a command ran
        _signals_end_the_process()
        _err(_stop_word(exc.signum))
        sys.exit(signal_exit_code(exc.signum))
    except typer.Abort:
        _err("aborted")
        sys.exit(EXIT_FAILURE)
    _exit(code if isinstance(code, int) else 0)


def _exit(code: int) -> None:
    """sys.exit(code); but a rank of a torchrun job (WORLD_SIZE > 1) that succeeded leaves without the
    interpreter's teardown, once its output is flushed and the atexit functions have run (native.py's
    temporary folder). After a complete two-process run, now and then a rank aborted (SIGABRT, "terminate
    called without an active exception") in C++ teardown after its last Python line, with the process group
    already destroyed, and torchrun reported the whole job failed (tests/test_distributed.py, about one run
    in 25 on the Zen 4 host of 2026-12-06). A rank that failed keeps the usual exit: one that left at once
    after a peer's death could reach torchrun first and be named as the worker that failed first.

    The command's work is done: a signal from here on (torchrun ending a rank that failed, a late Ctrl-C)
    ends the process as that signal does, not with a traceback from an atexit function it interrupted."""
    _signals_end_the_process()
    if code != 0 or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:  # runtime.world_size(), without torch's import
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _is_usage_error(exc: BaseException) -> bool:
    """A Click error about the command line (a bad option value, a missing argument, an unknown command).

    Recognised by its interface: Typer ships Click under another name in some versions.
    """
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


if __name__ == "__main__":
    main()
