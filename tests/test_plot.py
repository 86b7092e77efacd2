"""charlm plot: the PNG is written, has the promised size and is not blank; a clear error without matplotlib."""

import json
import math
import warnings

import pytest
from typer.testing import CliRunner

from charlm import plot as plot_mod
from charlm.cli import app
from charlm.config import load_config
from charlm.errors import UsageError
from charlm.train import train
from conftest import block_import


def make_run(tmp_path, name, *settings, steps=8):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        text = "\n".join(f"line {i % 7} of a small corpus, said the cat" for i in range(150))
        corpus.write_text(text + "\n", encoding="utf-8")
    overrides = ["model.hidden_size=16", "model.embedding_size=8", "train.batch_size=2", "train.seq_len=8",
                 "train.eval_interval=4", "train.log_interval=2", "model.device=cpu", *settings]
    cfg = load_config(overrides=overrides, extra={"train.max_steps": steps})
    train(cfg, corpus, out=tmp_path / name, show_progress=False)
    return tmp_path / name


def test_plot_writes_a_png_of_the_stated_size_that_is_not_blank(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    runs = [make_run(tmp_path, "lstm"), make_run(tmp_path, "gru", "model.cell=gru")]
    out = tmp_path / "figs" / "curves.png"
    result = CliRunner().invoke(app, ["plot", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 runs" in result.stdout
    pixels = imread(str(out))  # (height, width, channels), floats in [0, 1]
    assert pixels.shape[0] == 880 and pixels.shape[1] == 1200  # two rows of panels: loss and bits per char
    assert pixels[..., :3].std() > 0.05  # curves, axes and text, not a blank canvas
    # both runs' colours are drawn: matplotlib's first two cycle colours C0 (blue) and C1 (orange)
    rgb = (pixels[..., :3] * 255).round()
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (abs(rgb - colour).sum(axis=-1) < 30).sum() > 200


def test_a_picture_that_replaces_an_earlier_one_gets_a_note_and_a_refused_plot_touches_nothing(tmp_path):
    """Catches: `charlm plot` (whose --out defaults to curves.png) writing over the figure of an earlier
    comparison without a word."""
    pytest.importorskip("matplotlib")
    run, out = make_run(tmp_path, "lstm"), tmp_path / "curves.png"
    first = CliRunner().invoke(app, ["plot", str(run), "--out", str(out)])
    assert first.exit_code == 0 and first.stderr == "", first.output
    second = CliRunner().invoke(app, ["plot", str(run), "--out", str(out)])
    assert second.exit_code == 0 and second.stdout.startswith(f"wrote {out} ")
    assert second.stderr == f"charlm: note: {out} was there before and is replaced (--out FILE writes another)\n"
    out.write_bytes(b"an earlier figure")
    refused = CliRunner().invoke(app, ["plot", str(tmp_path / "absent"), "--out", str(out)])
    assert refused.exit_code == 2 and "replaced" not in refused.stderr and out.read_bytes() == b"an earlier figure"


def test_plot_leaves_out_runs_without_steps_and_refuses_when_none_has_any(tmp_path):
    pytest.importorskip("matplotlib")
    good = make_run(tmp_path, "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n', encoding="utf-8")
    runner = CliRunner()
    ok = runner.invoke(app, ["plot", str(good), str(empty), "--out", str(tmp_path / "a.png")])
    assert ok.exit_code == 0 and "1 run" in ok.stdout
    assert "empty: no steps logged yet" in ok.stderr
    none = runner.invoke(app, ["plot", str(empty), "--out", str(tmp_path / "b.png")])
    assert none.exit_code == 2 and "no run has logged a step" in none.stderr
    assert not (tmp_path / "b.png").exists()


def test_plot_refuses_a_folder_that_is_not_a_run_and_a_non_png_name(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "a.png")])
    assert missing.exit_code == 2 and "no metrics.jsonl" in missing.stderr
    gone = runner.invoke(app, ["plot", str(tmp_path / "nosuch"), "--out", str(tmp_path / "a.png")])
    assert gone.exit_code == 2 and "run folder not found" in gone.stderr
    wrong = runner.invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "a.pdf")])
    assert wrong.exit_code == 2 and ".png" in wrong.stderr


def test_a_chinese_run_name_is_drawn_with_a_cjk_font_or_gets_one_note(tmp_path):
    """matplotlib's own font has no Chinese characters: an installed CJK font is used where there is one;
    without, the CLI says so in one note instead of matplotlib's warning for every missing glyph."""
    pytest.importorskip("matplotlib")
    from charlm.plot import CJK_FONTS, _font_families

    make_run(tmp_path, "中文运行")
    make_run(tmp_path, "plain")
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "中文运行"), str(tmp_path / "plain"),
                                      "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    if any(name in _font_families() for name in CJK_FONTS):
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith("charlm: note: no installed font has some characters")


def test_plot_refuses_to_draw_into_a_checkpoint_folder(tmp_path):
    """The next save of that checkpoint would replace the folder, and the picture with it."""
    run = make_run(tmp_path, "a")
    inside = CliRunner().invoke(app, ["plot", str(run), "--out", str(run / "last" / "c.png")])
    assert inside.exit_code == 2 and "inside the checkpoint folder" in inside.stderr, inside.output
    assert not (run / "last" / "c.png").exists()


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "elapsed": 0.1, "train_loss": 2.0}\n', encoding="utf-8")
    block_import(monkeypatch, "matplotlib")
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("charlm: error: charlm plot needs matplotlib, which is not installed: "
                                     "pip install 'matplotlib>=3.7'")



def test_plot_takes_a_checkpoint_folder_for_its_run(tmp_path):
    """As every command that takes a run folder, plot takes runs/x/best, and draws the run x."""
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, "lstm")
    for name in ("best", "last"):
        result = CliRunner().invoke(app, ["plot", str(run / name), "--out", str(tmp_path / f"{name}.png")])
        assert result.exit_code == 0, result.output
        assert "1 run" in result.stdout and (tmp_path / f"{name}.png").stat().st_size > 0


def test_two_runs_of_the_same_name_are_labelled_by_their_paths(tmp_path):
    """Catches: _labels always the folder name, so two runs called 'run' got one label, and no way to tell
    their curves apart."""
    pytest.importorskip("matplotlib")
    import shutil

    from charlm.config import load_config
    from charlm.plot import plot_runs
    from charlm.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i % 7} of a small corpus" for i in range(120)) + "\n", encoding="utf-8")
    cfg = load_config(overrides=["model.hidden_size=8", "model.embedding_size=4", "train.batch_size=2",
                                 "train.seq_len=8", "train.eval_interval=2", "train.log_interval=1",
                                 "model.device=cpu", "train.max_steps=2"])
    train(cfg, corpus, out=tmp_path / "a" / "run", show_progress=False)
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "other")
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "other"]
    result = plot_runs(runs, tmp_path / "curves.png")
    assert result.runs == [str(runs[0]), str(runs[1]), "other"]


def test_a_whole_split_point_after_slice_checks_is_drawn_apart_from_the_periodic_curve():
    from charlm.plot import _periodic_and_whole

    sliced = [{"step": 1, "val_loss": 1.5, "val_slice": True}, {"step": 2, "val_loss": 1.4, "val_slice": True}]
    final = {"step": 2, "val_loss": 1.48, "val_slice": False}
    assert _periodic_and_whole(sliced + [final]) == (sliced, [final])
    whole = [{"step": 1, "val_loss": 1.5, "val_slice": False}, {"step": 2, "val_loss": 1.45, "val_slice": False}]
    assert _periodic_and_whole(whole) == (whole, [])
    older = [{"step": 1, "val_loss": 1.5}, {"step": 2, "val_loss": 1.43}, {"step": 2, "val_loss": 1.48}]
    assert _periodic_and_whole(older) == (older, [])  # written before the key: drawn as it always was
    resumed = older + [{"step": 3, "val_loss": 1.41, "val_slice": True}, final | {"step": 3}]
    assert _periodic_and_whole(resumed) == (resumed[:4], [final | {"step": 3}])
    unsliced = older + [final | {"step": 3}]  # an older run that read the whole split, resumed: one curve
    assert _periodic_and_whole(unsliced) == (unsliced, [])


def test_a_run_with_one_training_record_draws_it_as_a_point(tmp_path, monkeypatch):
    """Catches: a training curve of one record drawn as a line without a marker, which shows nothing (a short
    run logs once)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from charlm.config import load_config
    from charlm.plot import plot_runs
    from charlm.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i % 7} of a small corpus" for i in range(120)) + "\n", encoding="utf-8")
    cfg = load_config(overrides=["model.hidden_size=8", "model.embedding_size=4", "train.batch_size=2",
                                 "train.seq_len=8", "train.log_interval=2", "model.device=cpu", "train.max_steps=3"])
    train(cfg, corpus, out=tmp_path / "run", show_progress=False)
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    plot_runs([tmp_path / "run"], tmp_path / "curves.png")
    (fig,) = figures
    train_lines = [line for ax in fig.axes for line in ax.get_lines()
                   if line.get_linestyle() == "-" and len(line.get_xdata()) == 1]
    assert len(train_lines) == 4  # loss and bits per character, against steps and against time
    assert all(line.get_marker() not in (None, "None", "", " ") for line in train_lines)


def hand_made_run(folder, level, records):
    """A run folder with only what plot reads: config.yaml (for the level) and metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"data: {{level: {level}}}\n", encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def record_figures(monkeypatch):
    """The matplotlib Figures plot_runs makes, kept for the test to read the drawn lines from."""
    Figure, FigureCanvasAgg, Line2D = plot_mod._matplotlib()
    made = []

    class Recorded(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(plot_mod, "_matplotlib", lambda: (Recorded, FigureCanvasAgg, Line2D))
    return made


# Kills plot.py:96 (time divided -> multiplied by the unit), plot.py:125 (the unit chosen from the shortest
# time, not the longest) and plot.py:95 (non-finite losses kept as points).
def test_plot_draws_the_logged_points_against_steps_and_minutes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    figures = record_figures(monkeypatch)
    run = hand_made_run(tmp_path / "r", "char", [
        {"step": 2, "elapsed": 100.0, "train_loss": 2.0},
        {"step": 2, "elapsed": 100.0, "val_loss": float("nan"), "val_bpc": float("nan")},
        {"step": 4, "elapsed": 600.0, "train_loss": 1.5},
        {"step": 4, "elapsed": 600.0, "val_loss": 1.4, "val_bpc": 2.0},
    ])
    plot_mod.plot_runs([run], tmp_path / "c.png")
    (fig,) = figures
    steps, minutes = fig.axes[0], fig.axes[1]
    train, val = steps.lines[0], steps.lines[1]
    assert list(train.get_xdata()) == [2, 4] and list(train.get_ydata()) == [2.0, 1.5]
    assert list(val.get_xdata()) == [4] and list(val.get_ydata()) == [1.4]  # the NaN check is left out
    assert minutes.get_xlabel() == "wall-clock time (min)"
    assert list(minutes.lines[0].get_xdata()) == pytest.approx([100 / 60, 10.0])


# Kills plot.py:85 (`seconds < 180` moved: a two-minute run drawn in minutes) and the other thresholds.
def test_the_time_axis_unit_follows_the_length_of_the_run():
    assert plot_mod._time_unit(120) == (1.0, "s")
    assert plot_mod._time_unit(600) == (60.0, "min")
    assert plot_mod._time_unit(4 * 3600) == (3600.0, "h")


# Kills plot.py:128 (`rows = 2 if has_bpc else 1` -> `rows = 2`: an empty bits-per-character row).
def test_a_word_run_without_bits_per_character_gets_one_row(tmp_path):
    pytest.importorskip("matplotlib")
    run = hand_made_run(tmp_path / "w", "word", [{"step": 2, "elapsed": 1.0, "train_loss": 5.0},
                                                 {"step": 2, "elapsed": 1.0, "val_loss": 5.5}])
    result = plot_mod.plot_runs([run], tmp_path / "w.png")
    assert (result.width, result.height) == (1200, 480)


# Kills plot.py:127 (a char run without val_bpc no longer gets the bits-per-character row of its training loss).
def test_a_char_run_gets_a_bits_per_character_row_from_its_training_loss(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    figures = record_figures(monkeypatch)
    run = hand_made_run(tmp_path / "c", "char", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}])
    result = plot_mod.plot_runs([run], tmp_path / "c.png")
    assert result.height == 880
    bits = figures[0].axes[2].lines[0]
    assert list(bits.get_ydata()) == pytest.approx([2.0 / math.log(2)])


# Kills plot.py:118 (a run with validation lines but no training line yet skipped as "no steps logged").
def test_a_run_that_has_logged_only_validation_lines_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    run = hand_made_run(tmp_path / "v", "char", [{"step": 10, "elapsed": 1.0, "val_loss": 2.5, "val_bpc": 3.6}])
    result = plot_mod.plot_runs([run], tmp_path / "v.png")
    assert result.runs == ["v"] and result.skipped == []


# Kills plot.py:104 (the suffix compared without .lower(): "curves.PNG" refused).
def test_plot_accepts_an_upper_case_png_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    run = hand_made_run(tmp_path / "r", "char", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}])
    plot_mod.plot_runs([run], tmp_path / "curves.PNG")
    assert (tmp_path / "curves.PNG").stat().st_size > 0


# Kills plot.py:198 (OSError no longer turned into a UsageError: a traceback when --out cannot be written).
def test_plot_to_a_place_that_cannot_be_written_is_a_usage_error(tmp_path):
    pytest.importorskip("matplotlib")
    run = hand_made_run(tmp_path / "r", "char", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}])
    (tmp_path / "file.txt").write_text("a file, not a folder", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot write"):
        plot_mod.plot_runs([run], tmp_path / "file.txt" / "c.png")


# Kills plot.py:137 (every warning taken for a missing glyph: others swallowed and glyphs_missing set).
def test_other_matplotlib_warnings_pass_through_and_are_not_called_missing_glyphs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = hand_made_run(tmp_path / "r", "char", [{"step": 2, "elapsed": 1.0, "train_loss": 2.0}])
    real_draw = plot_mod._draw

    def draw_and_warn(*args):
        warnings.warn("tight_layout not applied", UserWarning)
        real_draw(*args)
    monkeypatch.setattr(plot_mod, "_draw", draw_and_warn)
    with pytest.warns(UserWarning, match="tight_layout not applied"):
        result = plot_mod.plot_runs([run], tmp_path / "c.png")
    assert result.glyphs_missing is False


def test_a_time_that_is_not_a_number_is_left_out_rather_than_failing(tmp_path):
    """Catches: the time unit chosen over every record's elapsed, so a damaged line ("2.0" as text, or
    Infinity) made plot fail with a TypeError while runs coped with the same file."""
    pytest.importorskip("matplotlib")
    run = hand_made_run(tmp_path / "r", "char", [{"step": 1, "elapsed": 1.0, "train_loss": 2.0},
                                                 {"step": 2, "elapsed": "2.0", "train_loss": 1.9},
                                                 {"step": 3, "elapsed": float("inf"), "train_loss": 1.8}])
    result = plot_mod.plot_runs([run], tmp_path / "c.png")
    assert result.runs == ["r"] and (tmp_path / "c.png").stat().st_size > 0


def test_checks_on_two_slice_sizes_are_two_curves(tmp_path, monkeypatch):
    """Catches: a resume that changed train.eval_tokens joining the two slices' losses into one dashed curve
    (records before val_tokens was written join their neighbours)."""
    pytest.importorskip("matplotlib")
    figures = record_figures(monkeypatch)
    run = hand_made_run(tmp_path / "r", "word", [
        {"step": 1, "elapsed": 1.0, "train_loss": 5.0},
        {"step": 1, "elapsed": 1.0, "val_loss": 5.5, "val_slice": True},
        {"step": 2, "elapsed": 2.0, "val_loss": 5.3, "val_slice": True, "val_tokens": 5},
        {"step": 3, "elapsed": 3.0, "val_loss": 5.8, "val_slice": True, "val_tokens": 50},
        {"step": 4, "elapsed": 4.0, "val_loss": 5.6, "val_slice": True, "val_tokens": 50},
        {"step": 4, "elapsed": 4.0, "val_loss": 5.9, "val_slice": False, "val_tokens": None}])
    plot_mod.plot_runs([run], tmp_path / "c.png")
    steps = figures[0].axes[0]
    dashed = [list(line.get_xdata()) for line in steps.lines if line.get_linestyle() == "--"]
    assert dashed == [[1, 2], [3, 4]]


def test_a_run_named_twice_is_drawn_once_with_a_note(tmp_path):
    """Catches: `charlm plot runs/x runs/x/best` drawing two identical curves under one label ("2 runs")."""
    pytest.importorskip("matplotlib")
    run, out = make_run(tmp_path, "lstm"), tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", str(run), str(run / "best"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "(1200x" in result.stdout and "1 run)" in result.stdout
    assert result.stderr == f"charlm: note: {run / 'best'}: the same run as a folder named before it, drawn once\n"


def long_log(lines: int) -> list[dict]:
    """The training lines of a long run (a falling, noisy loss) with a validation line after every 100."""
    import random

    rng = random.Random(0)
    records = []
    for i in range(1, lines + 1):
        records.append({"step": 20 * i, "elapsed": round(0.05 * i, 3),
                        "train_loss": 1.2 + 2 * math.exp(-i / 500) + rng.gauss(0, 0.05)})
        if i % 100 == 0:
            records.append({"step": 20 * i, "elapsed": round(0.05 * i + 0.01, 3),
                            "val_loss": 1.3 + 2 * math.exp(-i / 500), "val_bpc": 2.0})
    return records


def test_a_long_log_is_drawn_from_a_bounded_number_of_points_that_keep_its_ends_and_extremes(tmp_path,
                                                                                           monkeypatch):
    """Catches: every one of a long run's training lines drawn (100,000 points a curve for 2,000,000 steps
    logged every 20: seconds of drawing and a gigabyte). The first and last points, the lowest and highest
    loss and every validation point are still drawn, in every panel."""
    pytest.importorskip("matplotlib")
    figures = record_figures(monkeypatch)
    records = long_log(20_000)
    train = [r for r in records if "train_loss" in r]
    run = hand_made_run(tmp_path / "r", "char", records)
    plot_mod.plot_runs([run], tmp_path / "c.png")
    (fig,) = figures
    for ax, x, scale in ((fig.axes[0], "step", 1), (fig.axes[1], "elapsed", 60), (fig.axes[2], "step", 1)):
        curve, checks = ax.lines[0], ax.lines[1]
        xs = list(curve.get_xdata())
        assert len(xs) <= 4_096  # 4 * runs.CURVE_STRETCHES
        assert xs[0] == pytest.approx(train[0][x] / scale) and xs[-1] == pytest.approx(train[-1][x] / scale)
        assert len(checks.get_xdata()) == 200
    losses = [r["train_loss"] for r in train]
    drawn = list(fig.axes[0].lines[0].get_ydata())
    assert (min(drawn), max(drawn)) == (min(losses), max(losses))
    assert max(fig.axes[2].lines[0].get_ydata()) == pytest.approx(max(losses) / math.log(2))


def test_the_training_curve_of_a_long_log_covers_the_pixels_that_every_line_would(tmp_path, monkeypatch):
    """What is drawn of a long log looks as every line would: the curve drawn by plot and the same panel
    redrawn through all the training lines differ in a few pixels of its edge (a mean per stretch of lines,
    which smooths away the band of the noise, differs in most of them)."""
    pytest.importorskip("matplotlib")
    import numpy as np

    figures = record_figures(monkeypatch)
    records = long_log(20_000)
    train = [r for r in records if "train_loss" in r]
    run = hand_made_run(tmp_path / "r", "word", records)
    plot_mod.plot_runs([run], tmp_path / "c.png")
    (fig,) = figures

    def pixels():
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)

    drawn = pixels()
    fig.axes[0].lines[0].set_data([r["step"] for r in train], [r["train_loss"] for r in train])
    every_line = pixels()
    red, green, blue = every_line[..., 0], every_line[..., 1], every_line[..., 2]
    curve = (blue > red + 60) & (blue > green + 20)  # the run's colour, C0 (31, 119, 180), where it is solid
    differ = np.abs(drawn - every_line).sum(axis=-1) > 60
    assert curve.sum() > 5_000 and differ.sum() < 0.05 * curve.sum(), (differ.sum(), curve.sum())
