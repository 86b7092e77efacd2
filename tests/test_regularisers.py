"""Regularisers for small corpora: DropConnect on the recurrent weights (model.weight_drop)
and dropout of whole token types (model.embedding_dropout)."""

from __future__ import annotations

import pytest
import torch

from charlm import cells
from charlm import model as model_module
from charlm.cells import CustomRNN, dropout
from charlm.config import ModelConfig, load_config
from charlm.errors import UsageError
from charlm.model import build_model


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_training_uses_one_dropped_copy_of_w_hh_for_the_whole_window(cell, fast):
    torch.manual_seed(0)
    dropped = CustomRNN(cell, 3, 5, weight_drop=0.5, fast=fast).train()
    plain = CustomRNN(cell, 3, 5, fast=fast).eval()
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 6, 3)

    torch.manual_seed(1)
    out, _ = dropped(x)
    torch.manual_seed(1)  # the same draw: the mask is the first random number the layer takes
    with torch.no_grad():
        plain.weight_hh_l0.copy_(dropout(plain.weight_hh_l0, 0.5, True))
    expected, _ = plain(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)

    out.sum().backward()  # dropped weights get no gradient; the others get theirs, scaled by 1 / (1 - p)
    kept = plain.weight_hh_l0 != 0
    grad = dropped.weight_hh_l0.grad
    assert (grad[~kept] == 0).all() and (~kept).any() and (grad[kept] != 0).any()


@pytest.mark.parametrize("intel", [True, False], ids=["torch-bernoulli", "uniform-draw"])
def test_dropout_keeps_each_value_with_probability_1_minus_p_and_scales_it(intel, monkeypatch):
    """Both ways of drawing the mask (torch's Bernoulli on Intel processors, a uniform draw elsewhere) keep a
    value with probability 1 - p, scale the kept ones by 1 / (1 - p), and pass the gradient through the mask."""
    monkeypatch.setattr(cells, "intel_cpu", lambda: intel)
    torch.manual_seed(0)
    x = torch.full((400, 500), 2.0, requires_grad=True)
    for p in (0.1, 0.5, 0.8):
        y = dropout(x, p, True)
        kept = y != 0
        # 200,000 draws: the kept fraction is within 0.5 % of 1 - p (over 5 standard deviations)
        assert abs(kept.float().mean().item() - (1 - p)) < 5e-3
        torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))
        (grad,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(grad, kept.float() / (1 - p))
    assert dropout(x, 0.5, False) is x and dropout(x, 0.0, True) is x


def test_dropout_of_bfloat16_values_keeps_1_minus_p_of_them(monkeypatch):
    """A bfloat16 uniform draw is too coarse near 1 (it kept 0.898 at p = 0.1): such values take torch's mask."""
    monkeypatch.setattr(cells, "intel_cpu", lambda: False)
    torch.manual_seed(0)
    kept = (dropout(torch.ones(2_000_000, dtype=torch.bfloat16), 0.1, True) != 0).float().mean().item()
    assert abs(kept - 0.9) < 1e-3  # 4.7 standard deviations of 2,000,000 draws


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_evaluation_ignores_weight_drop(cell):
    torch.manual_seed(0)
    dropped = CustomRNN(cell, 3, 5, weight_drop=0.5).eval()
    plain = CustomRNN(cell, 3, 5).eval()
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(dropped(x)[0], plain(x)[0], atol=0, rtol=0)


def test_weight_drop_is_a_setting_of_both_impls():
    for impl in ("custom", "torch"):
        cfg = load_config(overrides=["model.weight_drop=0.3", f"model.impl={impl}"])
        assert cfg.model.weight_drop == 0.3
    with pytest.raises(UsageError, match="weight_drop"):
        load_config(overrides=["model.weight_drop=1.0"])


def test_embedding_dropout_drops_token_types_in_training_only():
    from charlm.config import ModelConfig
    from charlm.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embedding_size=6, hidden_size=6, embedding_dropout=0.5), 20)
    tokens = torch.randint(0, 20, (4, 30))
    seen = []
    emb_in = []
    model.rnn.register_forward_pre_hook(lambda m, args: emb_in.append(args[0].detach()))
    model.train()
    model(tokens)
    x = emb_in[-1]  # what the recurrent layer read: embeddings, some types zeroed, the rest scaled by 2
    raw = model.encoder(tokens).detach()
    for token in tokens.unique():
        where = tokens == token
        rows = x[where]
        dropped = (rows == 0).all(dim=1)
        assert dropped.all() or not dropped.any(), "a type is dropped everywhere in a window or nowhere"
        if not dropped.any():
            torch.testing.assert_close(rows, raw[where] * 2)
        seen.append(bool(dropped.any()))
    assert any(seen) and not all(seen)
    model.eval()
    model(tokens)
    torch.testing.assert_close(emb_in[-1], raw)


def _torch_stack(cell, layers, dropout_p=0.5, weight_drop=0.0):
    cfg = load_config(overrides=[f"model.cell={cell}", "model.impl=torch", f"model.layers={layers}",
                                 f"model.dropout={dropout_p}", f"model.weight_drop={weight_drop}",
                                 "model.embedding_size=6", "model.hidden_size=5"])
    torch.manual_seed(0)
    return build_model(cfg.model, 11)


@pytest.mark.parametrize("given_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_torch_stack_run_layer_by_layer_is_the_stack_itself(cell, given_state, monkeypatch):
    """Without the dropout between them, the layers run one by one (model._layer_by_layer) give the stack's
    outputs, final states and gradients bit for bit; three layers, so that two share the second shell."""
    model = _torch_stack(cell, layers=3)
    monkeypatch.setattr(model_module, "dropout", lambda x, p, training: x)
    x = torch.randn(2, 7, 6, requires_grad=True)
    state = None
    if given_state:
        h = torch.randn(3, 2, 5)
        state = (h, torch.randn(3, 2, 5)) if cell == "lstm" else h
    out, final = model_module._layer_by_layer(model.rnn, model._shells, x, state)
    model.rnn.dropout = 0.0
    expected, expected_final = model.rnn(x, state)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for got, want in zip(final if cell == "lstm" else (final,), expected_final if cell == "lstm" else (expected_final,)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    weights = [x, *model.rnn.parameters()]
    grads = torch.autograd.grad((out ** 2).sum(), weights)
    expected_grads = torch.autograd.grad((expected ** 2).sum(), weights)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("intel", [True, False], ids=["intel", "other"])
def test_a_torch_stack_in_training_drops_between_its_layers_with_charlms_masks_off_intel(intel, monkeypatch):
    model = _torch_stack("lstm", layers=3).train()
    monkeypatch.setattr(cells, "intel_cpu", lambda: intel)
    drops = []
    real = model_module.dropout
    monkeypatch.setattr(model_module, "dropout", lambda x, p, training: drops.append(training) or real(x, p, training))
    tokens = torch.randint(0, 11, (2, 7))
    model(tokens)
    # the embeddings and the output always; the two gaps between three layers only where torch's own are slow
    assert drops == [True] * (2 if intel else 4)
    drops.clear()
    model.eval()
    model(tokens)
    assert drops == [False, False]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_torch_stack_in_training_refuses_a_state_with_other_layers_as_torch_does(cell, monkeypatch):
    model = _torch_stack(cell, layers=2).train()
    monkeypatch.setattr(cells, "intel_cpu", lambda: False)
    tokens = torch.randint(0, 11, (2, 7))
    for layers in (1, 3):
        h = torch.zeros(layers, 2, 5)
        with pytest.raises(RuntimeError, match="Expected hidden"):
            model(tokens, (h, h.clone()) if cell == "lstm" else h)


def test_a_torch_stack_keeps_its_parameters_and_their_names():
    dropped, plain = _torch_stack("gru", layers=2), _torch_stack("gru", layers=2, dropout_p=0.0)
    assert list(dropped.state_dict()) == list(plain.state_dict())
    assert [p.shape for p in dropped.parameters()] == [p.shape for p in plain.parameters()]
    assert plain._shells is None and all(p.is_meta for s in dropped._shells for p in s.parameters())


@pytest.mark.parametrize("intel", [True, False], ids=["intel", "other"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_torch_stack_with_weight_drop_runs_each_layer_on_one_dropped_copy_of_its_w_hh(cell, layers, intel,
                                                                                        monkeypatch):
    """model.weight_drop on nn.RNN / nn.GRU / nn.LSTM: in training each layer's W_hh gets a fresh DropConnect
    mask for the window (the layers run one by one, on any processor); in evaluation the stack is untouched."""
    monkeypatch.setattr(cells, "intel_cpu", lambda: intel)
    model = _torch_stack(cell, layers, dropout_p=0.0, weight_drop=0.5).train()
    masked = _torch_stack(cell, layers, dropout_p=0.0).eval()
    masked.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 11, (3, 8))

    torch.manual_seed(1)
    logits, _ = model(tokens)
    torch.manual_seed(1)  # the same draws, in the same order: layer 0's mask first
    with torch.no_grad():
        for layer in range(layers):
            w = getattr(masked.rnn, f"weight_hh_l{layer}")
            w.copy_(dropout(w, 0.5, True))
    torch.testing.assert_close(logits, masked(tokens)[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(logits, model.eval()(tokens)[0])  # the masks changed the outputs

    model.train()
    torch.manual_seed(1)
    model(tokens)[0].logsumexp(-1).sum().backward()
    for layer in range(layers):  # dropped weights get no gradient; kept ones get theirs
        kept = getattr(masked.rnn, f"weight_hh_l{layer}") != 0
        grad = getattr(model.rnn, f"weight_hh_l{layer}").grad
        assert (~kept).any() and (grad[~kept] == 0).all() and (grad[kept] != 0).any()

    model.eval()
    plain = _torch_stack(cell, layers, dropout_p=0.0).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(tokens)[0], plain(tokens)[0], atol=0, rtol=0)


def _inputs_of_the_recurrent_layer(model):
    """A list that receives what model.rnn's forward reads (the embeddings after their dropout)."""
    seen = []
    model.rnn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


def test_embedding_dropout_keeps_each_token_type_with_probability_1_minus_p_and_scales_it():
    """Catches: the type mask drawn with bernoulli_(p) (keep probability p) or scaled by 1 / p; both pass at the
    p = 0.5 of the other tests, where p = 1 - p."""
    torch.manual_seed(0)
    vocab, p = 2000, 0.25
    model = build_model(ModelConfig(embedding_size=4, hidden_size=4, embedding_dropout=p), vocab).train()
    seen = _inputs_of_the_recurrent_layer(model)
    tokens = torch.arange(vocab).view(2, vocab // 2)  # every type once: 2,000 independent draws
    model(tokens)
    x, raw = seen[-1], model.encoder(tokens).detach()
    dropped = (x == 0).all(dim=-1)
    # kept fraction 0.75 with a standard deviation of 0.0097: 0.04 is over 4 of them
    assert abs((~dropped).float().mean().item() - (1 - p)) < 0.04
    torch.testing.assert_close(x[~dropped], raw[~dropped] / (1 - p))


@pytest.mark.parametrize("dropout, embedding_dropout", [(0.3, 0.0), (0.0, 0.5)], ids=["dropout", "embedding_dropout"])
def test_a_custom_char_model_in_training_drops_its_embeddings_instead_of_looking_up_its_projection(
        dropout, embedding_dropout):
    """Catches: RNNLM._looks_up took the looked-up input projection (read from the undropped embedding table) in
    training with dropout or embedding_dropout set, so a character model's embeddings were never dropped."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell="gru", impl="custom", embedding_size=6, hidden_size=6, dropout=dropout,
                                    embedding_dropout=embedding_dropout), 5)
    seen = _inputs_of_the_recurrent_layer(model)
    tokens = torch.arange(120).remainder(5).view(4, 30)  # 120 tokens for 5 rows: where the lookup pays
    model.eval()(tokens)
    assert seen == []  # evaluation does take the lookup (model.rnn.forward is not called): the regime is right
    model.train()(tokens)
    assert len(seen) == 1, "training must run the layer on the embeddings, after their dropout"
    raw = model.encoder(tokens).detach()
    zeroed = seen[0] == 0
    assert zeroed.any() and not (raw == 0).any()
