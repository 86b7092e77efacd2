"""The training loop: it learns, it writes a complete run folder, it stops where told, it resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from charlm.config import Config
from charlm.errors import UsageError
from charlm import train as train_module
from charlm.model import RNNLM
from charlm.tokenizer import EOS_ID
from charlm.train import Progress, learning_rate, train
from conftest import TINY_TEXT, tiny_config

REPEATED = "hello world, the cat sat.\n" * 30


@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_training_memorises_a_repeated_text(write_corpus, tmp_path, cell, impl):
    corpus = write_corpus(REPEATED)
    cfg = tiny_config(model__cell=cell, model__impl=impl, train__max_steps=100, train__lr=0.02,
                      train__schedule="constant", train__seq_len=32, train__eval_interval=0,
                      train__log_interval=10)
    result = train(cfg, corpus, out=tmp_path / "run", show_progress=False)
    assert result.steps == 100 and result.stopped_by == "max_steps"
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])["train_loss"]
    assert first > 1.0                  # it started from ignorance (ln 13 ≈ 2.6 nats for 13 symbols) ...
    assert result.train_loss < 0.1      # ... and ended knowing the text by heart
    assert result.val_loss < 0.1        # the held-out copies of the line, read from a fresh state


def test_run_folder_holds_config_vocab_metrics_and_two_checkpoints(tiny_run):
    run_dir, result = tiny_run["run_dir"], tiny_run["result"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "vocab.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    steps = [r for r in records if "train_loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert all(r["tokens_per_second"] > 0 and r["lr"] > 0 for r in steps)
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    # at the interval; the one at step 20 read the whole split, so the final evaluation is not run again
    assert [r["step"] for r in evals] == [10, 20]
    assert result.val_loss == evals[-1]["val_loss"]
    assert records[-1]["steps"] == result.steps == 20
    for name in ("last", "best"):
        folder = run_dir / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert {"model.safetensors", "config.yaml", "vocab.json"} <= set(manifest["files"])
        assert all((folder / f).is_file() for f in manifest["files"])
    assert (run_dir / "last" / "trainer.pt").is_file()
    assert not (run_dir / "best" / "trainer.pt").exists()
    state = torch.load(run_dir / "last" / "trainer.pt", weights_only=True)  # plain values and tensors only
    assert state["progress"]["step"] == 20
    assert not list(run_dir.glob(".tmp-*"))


@pytest.mark.parametrize("eval_tokens,scored,steps", [
    (8, [8, 8, None], [10, 20, 20]),  # the slice at the last step, then the whole split once
    (10 ** 6, [10 ** 6, 10 ** 6], [10, 20]),  # a "slice" longer than the split is the whole split
])
def test_the_last_step_is_evaluated_once_on_each_part(write_corpus, tmp_path, monkeypatch, eval_tokens, scored,
                                                      steps):
    """The periodic check at the last step is not repeated by the final evaluation: the whole split is read
    once, and the slice that selects the best checkpoint once."""
    import charlm.train as train_module

    calls = []

    def counting(model, ids, streams, device, max_tokens=None, *args, **kwargs):
        calls.append(max_tokens)
        return evaluate(model, ids, streams, device, max_tokens, *args, **kwargs)

    evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", counting)
    result = train(tiny_config(train__eval_tokens=eval_tokens), write_corpus(TINY_TEXT), out=tmp_path / "run",
                   show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    assert calls == scored and [r["step"] for r in evals] == steps
    assert result.val_loss == evals[-1]["val_loss"]


def test_training_lowers_the_validation_loss(tiny_run):
    result = tiny_run["result"]
    vocab = json.loads((tiny_run["run_dir"] / "vocab.json").read_text())["tokens"]
    assert result.val_loss < math.log(len(vocab))  # better than a uniform guess
    assert result.best_val_loss <= result.val_loss + 1e-12


def test_char_level_bits_per_char_is_the_loss_in_bits(tiny_run):
    result = tiny_run["result"]
    assert result.val_bits_per_char == pytest.approx(result.val_loss / math.log(2), rel=1e-9)
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss), rel=1e-9)


def test_best_checkpoint_holds_the_lowest_validation_loss(tiny_run):
    run_dir = tiny_run["run_dir"]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in evals if "val_loss" in r and "event" not in r]
    best = json.loads((run_dir / "best" / "manifest.json").read_text())
    assert best["val_loss"] == min(losses)


def test_max_epochs_stops_after_whole_passes(write_corpus, tmp_path):
    cfg = tiny_config(train__max_steps=None, train__max_epochs=2, data__val_fraction=0.0)
    result = train(cfg, write_corpus(TINY_TEXT), out=tmp_path / "run", show_progress=False)
    assert result.stopped_by == "max_epochs"
    assert result.epochs == pytest.approx(2.0)
    assert result.val_loss is None
    assert (tmp_path / "run" / "best" / "manifest.json").is_file()  # without validation, best is the last


def test_max_time_stops_cleanly_and_saves(write_corpus, tmp_path):
    cfg = tiny_config(train__max_steps=None, train__max_time=0.2)
    result = train(cfg, write_corpus(TINY_TEXT), out=tmp_path / "run", show_progress=False)
    assert result.stopped_by == "max_time"
    assert result.steps >= 1 and result.val_loss is not None
    assert (tmp_path / "run" / "last" / "manifest.json").is_file()


def test_resume_continues_exactly_where_the_run_stopped(write_corpus, tmp_path):
    """10 steps + 10 resumed steps give the same weights as 20 steps in one go (dropout draws included)."""
    corpus = write_corpus(TINY_TEXT)
    fields = dict(model__dropout=0.2, model__layers=2, train__schedule="constant", train__eval_interval=5)
    straight = train(tiny_config(train__max_steps=20, **fields), corpus, out=tmp_path / "a", show_progress=False)
    train(tiny_config(train__max_steps=10, **fields), corpus, out=tmp_path / "b", show_progress=False)
    resumed = train(tiny_config(train__max_steps=20, **fields), None, resume=tmp_path / "b", show_progress=False)
    assert resumed.steps == straight.steps == 20
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r and "event" not in r]
    assert steps == [5, 10, 15, 20]  # the log continues, without repeated lines


def test_resume_refuses_a_changed_model(tiny_run, tmp_path):
    with pytest.raises(UsageError, match="model.hidden_size"):
        train(tiny_config(model__hidden_size=64), None, resume=tiny_run["run_dir"], show_progress=False)


def test_resume_refuses_another_corpus(tiny_run, write_corpus, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], copy)
    other = write_corpus(TINY_TEXT.upper())
    with pytest.raises(UsageError, match="SHA-256"):
        train(tiny_config(train__max_steps=30), other, resume=copy, show_progress=False)


def test_an_existing_run_folder_is_not_overwritten(tiny_run):
    before = (tiny_run["run_dir"] / "last" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        train(tiny_config(), tiny_run["corpus"], out=tiny_run["run_dir"], show_progress=False)
    assert (tiny_run["run_dir"] / "last" / "model.safetensors").read_bytes() == before


def test_a_corpus_too_short_for_one_window_is_a_usage_error(write_corpus, tmp_path):
    with pytest.raises(UsageError, match="too short"):
        train(tiny_config(), write_corpus("ab\n"), out=tmp_path / "run", show_progress=False)


def test_missing_corpus_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        train(tiny_config(), tmp_path / "missing.txt", out=tmp_path / "run", show_progress=False)
    with pytest.raises(UsageError, match="no corpus"):
        train(tiny_config(), None, out=tmp_path / "run", show_progress=False)


def test_learning_rate_warms_up_then_follows_the_cosine():
    cfg = Config()
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.final_lr_fraction = 1.0, 10, 110, 0.1
    assert learning_rate(cfg, Progress(step=0), 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, Progress(step=9), 9 / 110) == pytest.approx(1.0)
    assert learning_rate(cfg, Progress(step=10), 10 / 110) == pytest.approx(1.0)
    assert learning_rate(cfg, Progress(step=60), 60 / 110) == pytest.approx(0.55)
    assert learning_rate(cfg, Progress(step=110), 1.0) == pytest.approx(0.1)
    cfg.train.schedule = "constant"
    assert learning_rate(cfg, Progress(step=60, plateau_scale=0.5), 60 / 110) == pytest.approx(0.5)


def test_learning_rate_warms_up_then_decays_linearly():
    cfg = Config()
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.final_lr_fraction = 1.0, 10, 110, 0.1
    cfg.train.schedule = "linear"
    assert learning_rate(cfg, Progress(step=0), 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, Progress(step=10), 10 / 110) == pytest.approx(1.0)
    assert learning_rate(cfg, Progress(step=35), 35 / 110) == pytest.approx(0.775)  # a quarter of the way down
    assert learning_rate(cfg, Progress(step=60), 60 / 110) == pytest.approx(0.55)
    assert learning_rate(cfg, Progress(step=110), 1.0) == pytest.approx(0.1)
    cfg.train.max_steps, cfg.train.max_time = None, 100.0  # over a time budget: no warm-up share to skip
    assert learning_rate(cfg, Progress(step=50), 0.25) == pytest.approx(0.775)


@pytest.mark.parametrize("level", ["char", "word"])
def test_chinese_and_emoji_corpus_trains_samples_and_scores(write_corpus, tmp_path, level):
    from charlm.checkpoint import load_run
    from charlm.sample import generate
    from charlm.score import score_sentences

    text = "我爱北京天安门 😀\n北京欢迎你，朋友 🐍\nthe cat sat 北京\n" * 20
    cfg = tiny_config(data__level=level, train__max_steps=30, train__seq_len=8)
    result = train(cfg, write_corpus(text), out=tmp_path / "run", show_progress=False)
    assert math.isfinite(result.val_loss)
    model, codec, _ = load_run(tmp_path / "run")
    assert codec.tokenizer.level == level and "北" in codec.vocab.tokens and "😀" in codec.vocab.tokens
    (score,) = score_sentences(model, codec, ["北京欢迎你 😀"])
    assert score.oov == 0 and math.isfinite(score.logprob)
    samples = generate(model, codec, max_length=20, num_samples=3, seed=0)
    assert all("<unk>" not in s.tokens for s in samples)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_beta2_reaches_the_adam_optimizers(optimizer):
    from charlm.model import build_model
    from charlm.train import _make_optimizer

    cfg = tiny_config(train__optimizer=optimizer, train__beta2=0.99)
    opt = _make_optimizer(cfg, build_model(cfg.model, 7))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_the_gradient_norm_is_clipped_to_train_clip(write_corpus, tmp_path):
    # With plain SGD at lr 1 and a tiny clip, the second update moves the weights by exactly lr * clip.
    corpus = write_corpus(TINY_TEXT)
    fields = dict(train__optimizer="sgd", train__lr=1.0, train__clip=1e-3, train__schedule="constant",
                  train__eval_interval=0, data__val_fraction=0.0)
    for steps in (1, 2):
        train(tiny_config(train__max_steps=steps, **fields), corpus, out=tmp_path / f"r{steps}", show_progress=False)
    a, b = (load_file(str(tmp_path / f"r{s}" / "last" / "model.safetensors")) for s in (1, 2))
    moved = math.sqrt(sum(float(((b[k] - a[k]).double() ** 2).sum()) for k in a))
    assert moved == pytest.approx(1.0 * 1e-3, rel=1e-3)


def test_the_state_is_carried_from_window_to_window_and_reset_at_each_epoch(write_corpus, tmp_path, monkeypatch):
    seen = []  # (state given, state returned) of each training window
    firsts = []  # each training window's first input token of every row
    forward = RNNLM.forward

    def recording(self, tokens, state=None, targets=None):
        out, new = forward(self, tokens, state, targets)
        if self.training:
            seen.append((None if state is None else state[0].detach().clone(), new[0].detach().clone()))
            firsts.append(tokens[:, 0].clone())
        return out, new

    monkeypatch.setattr(RNNLM, "forward", recording)
    cfg = tiny_config(train__max_epochs=2, train__max_steps=None, train__eval_interval=0, model__cell="lstm")
    B, k = cfg.train.batch_size, cfg.train.fresh_streams
    assert k > 0  # the default adds fresh rows after the B streams
    result = train(cfg, write_corpus(TINY_TEXT), out=tmp_path / "run", show_progress=False)
    assert result.stopped_by == "max_epochs"
    per_epoch = len(seen) // 2
    assert len(seen) == 2 * per_epoch and per_epoch >= 2
    for i, (given, new) in enumerate(seen):
        assert new.shape[1] == B + k
        if i % per_epoch == 0:
            assert given is None, f"window {i} starts an epoch: from a zero state"
        else:
            assert torch.equal(given[:, :B], seen[i - 1][1][:, :B]), f"window {i} starts where window {i - 1} ended"
            assert not given[:, B:].any(), f"window {i}: the fresh rows start from a zero state"
        assert (firsts[i][B:] == EOS_ID).all(), f"window {i}: the fresh rows start at a line, after <eos>"


def test_fresh_rows_come_from_the_line_starts_that_the_token_cache_recorded(write_corpus, tmp_path, monkeypatch):
    """Catches: a run scanning its whole memory-mapped token file for line starts at its start (all of the file
    in memory: a 1 GB corpus peaked at 1.7 GB) where the token cache recorded them; and recorded starts that
    draw other lines than the scan did: a run trains to the same weights, bit for bit, either way."""
    corpus, given = write_corpus(TINY_TEXT + "\n\na last line without its end"), []
    scan = train_module.line_starts

    def recording(ids, seq_len, known=None):
        given.append(known)
        return scan(ids, seq_len, known)

    monkeypatch.setattr(train_module, "line_starts", recording)
    train(tiny_config(train__max_steps=6), corpus, out=tmp_path / "recorded", show_progress=False)
    assert len(given) == 1 and given[0] is not None and len(given[0]) > 0
    monkeypatch.setattr(train_module, "line_starts", lambda ids, seq_len, known=None: scan(ids.clone(), seq_len))
    train(tiny_config(train__max_steps=6), corpus, out=tmp_path / "scanned", show_progress=False)
    a = load_file(str(tmp_path / "recorded" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "scanned" / "last" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_best_holds_the_lowest_of_scripted_validations_and_plateau_cuts_the_rate(write_corpus, tmp_path, monkeypatch):
    # A loss that falls and then rises, so that best/ must stay at step 2 while later checks overwrite last/.
    losses = iter([3.0, 1.0, 2.0, 2.5, 2.6, 2.7])
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: next(losses))
    train(tiny_config(train__max_steps=5, train__eval_interval=1, train__log_interval=1, train__schedule="plateau",
                      train__plateau_patience=0, train__plateau_factor=0.5, train__lr=0.01),
          write_corpus(TINY_TEXT), out=tmp_path / "run", show_progress=False)
    best = json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())
    assert best["step"] == 2 and best["val_loss"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.0025])


def test_the_budget_used_is_that_of_the_limit_nearest_its_end():
    """Catches: fraction_done took the smallest fraction, so with max_steps and max_time both set the cosine
    decayed on the budget that was not going to stop the run."""
    from charlm.train import Progress, fraction_done
    from conftest import tiny_config

    both = tiny_config(train__max_steps=100, train__max_time=50.0)
    assert fraction_done(both, Progress(step=10, elapsed=25.0), 4) == pytest.approx(0.5)    # time decides
    assert fraction_done(both, Progress(step=80, elapsed=5.0), 4) == pytest.approx(0.8)     # steps decide
    epochs = tiny_config(train__max_steps=1000, train__max_epochs=2)
    assert fraction_done(epochs, Progress(step=10, epoch=1, window=2), 4) == pytest.approx(0.75)
    one_epoch = tiny_config(train__max_steps=None, train__max_time=None, train__max_epochs=None)
    assert fraction_done(one_epoch, Progress(epoch=0, window=1), 4) == pytest.approx(0.25)  # no limit: one epoch


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_the_optimizer_is_the_one_named_with_its_weight_decay(name, kind):
    """Catches: 'adam' built AdamW (decoupled decay, another update), and SGD built without weight_decay."""
    from charlm.model import build_model
    from charlm.train import _make_optimizer
    from conftest import tiny_config

    cfg = tiny_config(train__optimizer=name, train__weight_decay=0.01, train__lr=0.5)
    opt = _make_optimizer(cfg, build_model(cfg.model, 7))
    assert type(opt) is kind
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.01 and group["lr"] == 0.5
    if name == "sgd":
        assert group["momentum"] == cfg.train.momentum


def test_the_eval_tokens_slice_scores_exactly_that_many_targets():
    """Catches: evaluate() cut the split at max_tokens ids (max_tokens - 1 targets) instead of max_tokens + 1."""
    from charlm.data import eval_streams
    from charlm.model import stream_nll
    from charlm.train import evaluate
    from conftest import random_model

    model = random_model("gru", vocab_size=4)
    ids = torch.tensor([1, 2, 3, 2, 2, 1, 3, 3, 2, 1, 2, 3, 1, 2, 2, 3, 1])
    total, count = stream_nll(model, *eval_streams(ids[:9], 1))
    assert count == 8
    assert evaluate(model, ids, 1, "cpu", max_tokens=8) == pytest.approx(total / 8, rel=1e-6)
    whole, n = stream_nll(model, *eval_streams(ids, 1))
    assert evaluate(model, ids, 1, "cpu", max_tokens=100) == pytest.approx(whole / n, rel=1e-6)
