"""charlm plot: the PNG is written, has the promised size and is not blank; a clear error without matplotlib."""

import builtins

import pytest
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import load_config
from charlm.train import train


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
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("charlm: error: charlm plot needs matplotlib, which is not installed: "
                                     "pip install 'charlm[plot]'")



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
