"""Training curves as a PNG: loss (and bits per character) against steps and against time.

One figure, several runs, one colour per run; a solid line is the training
loss (the mean over each logging interval), a dashed line with dots the
validation loss. The top row is the loss in nats per token; the bottom row,
drawn when there is something to put in it, is bits per character: the
validation `val_bpc` of every run, and the training loss / ln 2 of char-level
runs (where a token is a character). A long run's training curve is drawn
from at most a few thousand of its lines, chosen so that it covers the pixels
that every line would (`runs.TrainingCurve`); every validation line is drawn.

matplotlib is an optional extra (`pip install -e '.[plot]'` in charlm's folder, or
`pip install matplotlib`; PyPI's package named charlm is another project). The figure is
drawn with the Agg canvas directly, not through pyplot, so no window opens and
no global backend is switched in the caller's process.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .runs import (Metrics, checkpoint_folder_holding, read_metrics, run_folder_of, run_level,
                   slice_and_whole_checks)

LN2 = math.log(2.0)
INSTALL_HINT = "pip install 'matplotlib>=3.7'"  # not 'charlm[plot]': PyPI's charlm is another project


@dataclass
class PlotResult:
    out: str
    runs: list[str]        # the labels drawn
    skipped: list[str]     # runs with no metrics lines yet
    width: int             # pixels
    height: int
    glyphs_missing: bool = False  # a label has characters that no installed font draws (shown as boxes)
    repeated: list[str] = field(default_factory=list)  # folders named again (runs/x and runs/x/best): drawn once


@dataclass
class _Curves:
    label: str
    level: str | None
    metrics: Metrics


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UsageError(f"charlm plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg, Line2D


def warm_up() -> None:
    """Import matplotlib if it is installed (plot_runs says so where it needs it if not): `charlm plot` does it
    while it holds signals back, since an interrupt inside the import machinery can come out as another error."""
    try:
        _matplotlib()
    except UsageError:
        pass


# Fonts with Chinese characters, tried after matplotlib's own where they are installed (a label may be a
# Chinese run name); matplotlib takes each glyph from the first font of the list that has it.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")


def font_list_cache() -> str:
    """Where matplotlib keeps its list of installed fonts: read, not rebuilt, while its version is the same,
    so a font installed later is found only once the file is gone."""
    import matplotlib

    return str(Path(matplotlib.get_cachedir()) / "fontlist-*.json")


def _font_families() -> list[str]:
    from matplotlib import font_manager, rcParams

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [*rcParams["font.family"], *(name for name in CJK_FONTS if name in installed)]


def _labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a name."""
    names = [Path(p).name or str(p) for p in run_dirs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 180:
        return 1.0, "s"
    if seconds < 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _xy(records: list[dict], x: str, y: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in records
              if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
              and math.isfinite(r[y])]
    return [p[0] / scale for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[Path], out: Path, dpi: int = 100) -> PlotResult:
    """Draw the curves of `run_dirs` into the PNG file `out`; returns what was drawn."""
    if not run_dirs:
        raise UsageError("plot: name at least one run folder")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"plot: --out must name a .png file, got {out}")
    folder = checkpoint_folder_holding(out)
    if folder is not None:  # the next save of that checkpoint replaces the folder, and the picture with it
        raise UsageError(f"plot: --out {out} is inside the checkpoint folder {folder}; write it outside")
    Figure, FigureCanvasAgg, Line2D = _matplotlib()

    curves, skipped = [], []
    absent = next((path for path in run_dirs if not Path(path).exists()), None)
    if absent is not None:
        raise UsageError(f"run folder not found: {absent}")
    named, run_dirs, repeated = run_dirs, [], []
    for path in named:
        run = run_folder_of(Path(path), "plot")  # runs/x/best -> runs/x
        if any(os.path.samefile(run, other) for other in run_dirs):
            repeated.append(str(path))
        else:
            run_dirs.append(run)
    for path, label in zip(run_dirs, _labels(run_dirs)):
        metrics = read_metrics(path)  # UsageError if the folder has no metrics.jsonl
        if not metrics.train_lines and not metrics.val:
            skipped.append(label)
            continue
        curves.append(_Curves(label, run_level(path), metrics))
    if not curves:
        raise UsageError("plot: no run has logged a step yet (metrics.jsonl holds no loss lines)")

    longest = max((r["elapsed"] for c in curves for r in c.metrics.train + c.metrics.val  # the points _xy draws
                   if isinstance(r.get("elapsed"), (int, float)) and math.isfinite(r["elapsed"])), default=0.0)
    scale, unit = _time_unit(float(longest))
    has_bpc = any(c.level == "char" or any("val_bpc" in r for r in c.metrics.val) for c in curves)
    rows = 2 if has_bpc else 1
    width_in, height_in = 12.0, 4.0 * rows + 0.8
    from matplotlib import rc_context

    # matplotlib warns once per glyph that no font has (a Chinese run name without a CJK font): one note
    # from the CLI instead, through glyphs_missing
    with rc_context({"font.family": _font_families()}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _draw(curves, rows, scale, unit, width_in, height_in, dpi, out, Figure, FigureCanvasAgg, Line2D)
    missing = [w for w in caught if "missing from font" in str(w.message)]
    for w in caught:  # anything else matplotlib said goes on as usual
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return PlotResult(str(out), [c.label for c in curves], skipped,
                      int(round(width_in * dpi)), int(round(height_in * dpi)), bool(missing), repeated)


def _periodic_and_whole(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """A run's validation records as (the periodic curve, whole-split points drawn apart). Where the periodic
    checks read a slice of the split (train.eval_tokens), the whole split's loss at the end is another
    measure, often higher: joined to the curve it would look like a last-minute rise."""
    sliced, whole = slice_and_whole_checks(records)
    return (sliced, whole) if sliced and whole else (records, [])


def _slice_parts(records: list[dict]) -> list[list[dict]]:
    """The periodic checks cut where the slice they read changes (train.eval_tokens changed on a resume): two
    slices' losses are not one curve. Records without `val_tokens` (older versions) go with their neighbours."""
    parts: list[list[dict]] = []
    current = None  # the slice of the last part, as far as its records say
    for r in records:
        tokens = r.get("val_tokens", current)
        if not parts or (tokens != current and current is not None):
            parts.append([])
        parts[-1].append(r)
        current = tokens if tokens is not None else current
    return parts


def _draw(curves, rows, scale, unit, width_in, height_in, dpi, out, Figure, FigureCanvasAgg, Line2D) -> None:
    """The two columns (against steps, against time) of loss and bits per character, saved to `out`."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(curves))]

    apart = False  # some run has whole-split points drawn apart from its periodic curve
    for c, colour in zip(curves, colours):
        periodic, whole = _periodic_and_whole(c.metrics.val)
        apart = apart or bool(whole)
        lone = {"marker": "o", "ms": 3} if len(c.metrics.train) == 1 else {}  # a line of one point draws nothing
        for col, (x, xscale) in enumerate((("step", 1.0), ("elapsed", scale))):
            ax = axes[0][col]
            ax.plot(*_xy(c.metrics.train, x, "train_loss", xscale), color=colour, lw=1.4, alpha=0.9, **lone)
            for part in _slice_parts(periodic):
                ax.plot(*_xy(part, x, "val_loss", xscale), color=colour, lw=1.4, ls="--", marker="o", ms=3)
            ax.plot(*_xy(whole, x, "val_loss", xscale), color=colour, ls="none", marker="s", ms=5)
            if rows == 2:
                ax = axes[1][col]
                if c.level == "char":
                    xs, ys = _xy(c.metrics.train, x, "train_loss", xscale)
                    ax.plot(xs, [y / LN2 for y in ys], color=colour, lw=1.4, alpha=0.9, **lone)
                for part in _slice_parts(periodic):
                    ax.plot(*_xy(part, x, "val_bpc", xscale), color=colour, lw=1.4, ls="--", marker="o", ms=3)
                ax.plot(*_xy(whole, x, "val_bpc", xscale), color=colour, ls="none", marker="s", ms=5)

    for r in range(rows):
        for col in range(2):
            ax = axes[r][col]
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("step" if col == 0 else f"wall-clock time ({unit})")
            ax.set_ylabel("loss (nats / token)" if r == 0 else "bits per character")
    axes[0][0].set_title("against steps")
    axes[0][1].set_title("against wall-clock time")

    handles = [Line2D([], [], color=colour, lw=2.5, label=c.label) for c, colour in zip(curves, colours)]
    handles += [Line2D([], [], color="0.3", lw=1.4, label="training"),
                Line2D([], [], color="0.3", lw=1.4, ls="--", marker="o", ms=3,
                       label="validation (periodic: first eval_tokens)" if apart else "validation")]
    if apart:
        handles.append(Line2D([], [], color="0.3", ls="none", marker="s", ms=5, label="validation, whole split"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height_in))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise UsageError(f"plot: cannot write {out}: {exc.strerror or exc}") from None
