"""The fast custom cells (cells_fast.py) against the step functions of cells.py and against torch.nn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm import cells, cells_fast, native, products
from charlm.cells import CustomRNN

# (cell, gru_form, nonlinearity): every equation set the custom layer knows
VARIANTS = [("lstm", "classic", "tanh"), ("gru", "classic", "tanh"), ("gru", "torch", "tanh"),
            ("rnn", "classic", "tanh"), ("rnn", "classic", "relu")]
IDS = ["lstm", "gru-classic", "gru-torch", "rnn-tanh", "rnn-relu"]
B, T, E, H = 3, 9, 4, 6  # T >= 8: W_hh prepared once (products.Repeated: oneDNN's layout under the backend
# fixture's 'onednn', else a row-major copy of W^T); T = 1 (below): W_hh as it is


def _pair(cell: str, gru_form: str, nonlinearity: str, layers: int, dropout: float = 0.0, dtype=torch.float32):
    """A reference (step functions) and a fast CustomRNN with the same weights."""
    torch.manual_seed(0)
    ref = CustomRNN(cell, E, H, layers, dropout, nonlinearity, gru_form, fast=False).to(dtype)
    fast = CustomRNN(cell, E, H, layers, dropout, nonlinearity, gru_form, fast=True).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _state(cell: str, layers: int, dtype=torch.float32, requires_grad: bool = True):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(layers, B, H, generator=g, dtype=dtype).requires_grad_(requires_grad)
    if cell == "lstm":
        return h, torch.randn(layers, B, H, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return h


def _as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _run(module: nn.Module, x: torch.Tensor, state):
    """Output, final state and the gradients of a loss that uses all of them, w.r.t. x, state and weights."""
    x = x.clone().requires_grad_(True)
    out, last = module(x, state)
    # a weighted sum with fixed random weights: every output and final state gets its own gradient
    g = torch.Generator().manual_seed(10)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in _as_tuple(last))
    wrt = [x] + [s for s in _as_tuple(state) if s is not None and s.requires_grad] + list(module.parameters())
    return out, last, torch.autograd.grad(loss, wrt)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.fixture(params=["onednn", "default"])
def backend(request, monkeypatch):
    """Run a test with the float32 products through oneDNN (where this torch has it) and through torch's."""
    if request.param == "onednn" and not products.ONEDNN:
        pytest.skip("this torch build has no usable oneDNN product")
    monkeypatch.setattr(products, "ONEDNN", request.param == "onednn")
    if request.param == "onednn":  # these shapes are far below where oneDNN pays: take it anyway
        _everything_through_onednn(monkeypatch)
    return request.param


@pytest.fixture(autouse=True, params=["loops-mkl", "loops-own", "native", "pytorch"])
def elementwise(request, monkeypatch):
    """Every test four times: the whole time loop in native.c (from T = 8; shorter windows and torch's form
    of the GRU step from Python) with MKL's packed product (the classic GRU and the RNN; the LSTM steps)
    and with native.c's own (the LSTM too), the element-wise part of each step in native.c's kernels, and
    as PyTorch operations."""
    if request.param.startswith("loops"):
        found = native.mkl_gemm() if request.param == "loops-mkl" else native.own_gemm()
        if native.kernels() is None or found is None:
            pytest.skip(f"no {request.param[6:]} packed product here: {native.why_not() or 'not in this torch'}")
        monkeypatch.setattr(native, "gemm", lambda: found)
        monkeypatch.setattr(native, "loops", lambda: True)
    if request.param == "native" and native.kernels() is None:
        pytest.skip(f"native kernels {native.why_not()}")
    if request.param == "native":
        monkeypatch.setattr(native, "loops", lambda: False)
    if request.param == "pytorch":
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    return request.param


def _everything_through_onednn(monkeypatch):
    for name, value in [("_MIN_WORK", 0), ("_PACK_MIN_WORK", 0), ("_PACK_MIN_BATCH", 1), ("_PACK_MIN_STEPS", 8)]:
        monkeypatch.setattr(products, name, value)
    monkeypatch.setattr(products, "_weight_grads_in_mkl", lambda: False)  # on a Zen 4 too


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_fast_layer_matches_step_functions(variant, layers, backend):
    ref, fast = _pair(*variant, layers)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(2))
    state = _state(variant[0], layers)
    out_r, last_r, grads_r = _run(ref, x, state)
    out_f, last_f, grads_f = _run(fast, x, state)
    _close(out_f, out_r)
    for a, b in zip(_as_tuple(last_f), _as_tuple(last_r)):
        _close(a, b)
    assert len(grads_f) == len(grads_r)
    for a, b in zip(grads_f, grads_r):
        _close(a, b)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_one_step_window_with_gradients_matches_step_functions(variant, backend):
    # T = 1 with a graph: the weight gradient of steps 2..T is an empty product, which oneDNN refuses.
    ref, fast = _pair(*variant, 2)
    x = torch.randn(B, 1, E, generator=torch.Generator().manual_seed(8))
    state = _state(variant[0], 2)
    out_r, _, grads_r = _run(ref, x, state)
    out_f, _, grads_f = _run(fast, x, state)
    _close(out_f, out_r)
    for a, b in zip(grads_f, grads_r):
        _close(a, b)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_fast_layer_from_zero_state_without_state_gradient(variant, backend):
    # No initial state (zeros, no gradient wanted): the Functions skip dh0 / dc0; weights must not care.
    ref, fast = _pair(*variant, 2)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(3))
    out_r, _, grads_r = _run(ref, x, None)
    out_f, _, grads_f = _run(fast, x, None)
    _close(out_f, out_r)
    for a, b in zip(grads_f, grads_r):
        _close(a, b)


TORCH_MODULES = {"lstm": lambda L, nl: nn.LSTM(E, H, L, batch_first=True),
                 "gru": lambda L, nl: nn.GRU(E, H, L, batch_first=True),
                 "rnn": lambda L, nl: nn.RNN(E, H, L, nonlinearity=nl, batch_first=True)}


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != ("gru", "classic", "tanh")],
                         ids=["lstm", "gru-torch", "rnn-tanh", "rnn-relu"])
def test_fast_layer_matches_torch_nn(variant, layers, backend):
    cell, gru_form, nonlinearity = variant
    _, fast = _pair(cell, gru_form, nonlinearity, layers)
    reference = TORCH_MODULES[cell](layers, nonlinearity)
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(4))
    state = _state(cell, layers)
    out_t, last_t, grads_t = _run(reference, x, state)
    out_f, last_f, grads_f = _run(fast, x, state)
    _close(out_f, out_t)
    for a, b in zip(_as_tuple(last_f), _as_tuple(last_t)):
        _close(a, b)
    names_t = [n for n, _ in reference.named_parameters()]
    names_f = [n for n, _ in fast.named_parameters()]
    assert names_f == names_t
    for a, b in zip(grads_f, grads_t):
        _close(a, b)


def _double(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                       requires_grad=True)


# x (T, B, E) = (8, 2, 2), hidden 3: small enough for finite differences, T >= 8 for the row-major W^T copy
# (float64 never goes to oneDNN)
def _x():
    return _double(8, 2, 2, seed=0)


def test_lstm_function_passes_gradcheck():
    args = (_x(), _double(4 * 3, 2, seed=1), _double(4 * 3, seed=2), _double(2, 3, seed=3), _double(2, 3, seed=4),
            _double(4 * 3, 3, seed=5))
    assert torch.autograd.gradcheck(cells_fast.LSTMLayer.apply, args)


def test_classic_gru_function_passes_gradcheck():
    args = (_x(), _double(3 * 3, 2, seed=1), _double(3 * 3, seed=2), _double(2, 3, seed=3), _double(3 * 3, 3, seed=5))
    assert torch.autograd.gradcheck(cells_fast.GRULayer.apply, args)


def test_torch_form_gru_function_passes_gradcheck():
    args = (_x(), _double(3 * 3, 2, seed=1), _double(3 * 3, seed=2), _double(2, 3, seed=3), _double(3 * 3, 3, seed=5),
            _double(3 * 3, seed=6))
    assert torch.autograd.gradcheck(cells_fast.GRUTorchLayer.apply, args)


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_rnn_function_passes_gradcheck(relu):
    args = (_x(), _double(3, 2, seed=1), _double(3, seed=2), _double(2, 3, seed=3), _double(3, 3, seed=5))
    assert torch.autograd.gradcheck(lambda *a: cells_fast.RNNLayer.apply(*a, relu), args)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_custom_layer_passes_gradcheck_in_float64(variant):
    # The whole layer: input projection, two stacked fast Functions, the initial state.
    _, fast = _pair(*variant, 2, dtype=torch.float64)
    x = _double(B, 3, E, seed=5)
    state = _as_tuple(_state(variant[0], 2, torch.float64))

    def outputs(x, *state):
        out, last = fast(x, state if len(state) == 2 else state[0])
        return (out, *_as_tuple(last))

    assert torch.autograd.gradcheck(outputs, (x, *state))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_inference_without_graph_equals_training_forward(variant, backend):
    # Under no_grad the fast path keeps one-step buffers only; the values must not change.
    _, fast = _pair(*variant, 2)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(6))
    state = _state(variant[0], 2, requires_grad=False)
    out_graph, last_graph = fast(x, state)
    with torch.no_grad():
        out, last = fast(x, state)
    assert out_graph.requires_grad and not out.requires_grad
    _close(out, out_graph.detach(), tol=1e-6)
    for a, b in zip(_as_tuple(last), _as_tuple(last_graph)):
        _close(a, b.detach(), tol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_one_step_at_a_time_equals_the_whole_window(variant, backend):
    # Sampling feeds T = 1 windows and carries the state: the same numbers as one pass.
    _, fast = _pair(*variant, 2)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole, last_whole = fast(x)
        state, steps = None, []
        for t in range(T):
            out, state = fast(x[:, t: t + 1], state)
            steps.append(out)
    _close(torch.cat(steps, dim=1), whole, tol=1e-6)
    for a, b in zip(_as_tuple(state), _as_tuple(last_whole)):
        _close(a, b, tol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_dropout_between_layers_is_applied_to_layer_outputs(variant, monkeypatch):
    # Replace dropout by a fixed mask over (batch, time, feature) so both paths drop the same units;
    # the fast path holds its activations time-major, so its call sees the (T, B, H) transpose.
    mask = (torch.rand(B, T, H, generator=torch.Generator().manual_seed(8)) > 0.5).float() * 2.0
    calls = []

    def fixed_dropout(t, p, training):
        calls.append(tuple(t.shape))
        assert training and p == 0.5
        return t * (mask if t.shape == mask.shape else mask.transpose(0, 1))

    monkeypatch.setattr(cells, "dropout", fixed_dropout)
    ref, fast = _pair(*variant, 3, dropout=0.5)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(9))
    out_r, _, grads_r = _run(ref, x, None)
    out_f, _, grads_f = _run(fast, x, None)
    assert sorted(calls) == sorted([(B, T, H)] * 2 + [(T, B, H)] * 2)  # between layers 1-2 and 2-3, per path
    _close(out_f, out_r)
    for a, b in zip(grads_f, grads_r):
        _close(a, b)
    calls.clear()
    fast.eval()
    fast(x)
    assert calls == []  # no dropout in evaluation


def test_custom_rnn_uses_the_fast_path_by_default():
    layer = CustomRNN("lstm", E, H)
    out, _ = layer(torch.randn(B, T, E))
    assert layer.fast
    assert type(out.grad_fn).__name__ == "TransposeBackward0"
    assert "LSTMLayer" in type(out.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
def test_fast_layer_runs_in_float32_under_autocast(grad):
    # bf16 training autocasts the projections; the fast layer must not mix dtypes in its buffers.
    _, fast = _pair("lstm", "classic", "tanh", 2)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(11))
    with torch.set_grad_enabled(grad):
        expected, _ = fast(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = fast(x)
    assert out.dtype == torch.float32 and c.dtype == torch.float32
    _close(out, expected)
    if grad:
        out.sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fast.parameters())


def _onednn_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::"))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_layers_with_a_c_time_loop_keep_every_product_in_mkl(variant, elementwise, monkeypatch):
    """A GRU or RNN layer whose loop runs in native.c with MKL's product sends none of its products to
    oneDNN, even with oneDNN taking every size; with native.c's own product, and in the other layers,
    they still go there, so the count can tell."""
    if not products.ONEDNN:
        pytest.skip("this torch build has no usable oneDNN product")
    _everything_through_onednn(monkeypatch)
    _, fast = _pair(*variant, 1)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(12), requires_grad=True)

    def step():
        out, _ = fast(x, _state(variant[0], 1))
        out.sum().backward()

    in_c = elementwise == "loops-mkl" and variant != ("gru", "torch", "tanh") and variant[0] != "lstm"
    assert (_onednn_calls(step) == 0) == in_c


def _language_models(cell: str, gru_form: str, nonlinearity: str, layers: int, tie: bool, vocab: int = 7):
    """Two copies of one small language model on the custom cells (embedding E = H when tied)."""
    from charlm.config import ModelConfig
    from charlm.model import build_model

    cfg = ModelConfig(cell=cell, impl="custom", layers=layers, embedding_size=H if tie else E, hidden_size=H,
                      gru_form=gru_form, nonlinearity=nonlinearity, tie_weights=tie)
    torch.manual_seed(5)
    a = build_model(cfg, vocab)
    b = build_model(cfg, vocab)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("given", [True, False], ids=["state", "no-state"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_input_projection_looked_up_equals_the_embedding_path(variant, layers, tie, given, monkeypatch):
    """RNNLM reads the first layer's W_ih e + b from a table of the vocabulary's rows when a window holds
    at least twice as many tokens as the vocabulary: same negative log-likelihoods, final state and
    gradients (the embedding's included) as through the embedding and the projection."""
    looked_up, plain = _language_models(*variant, layers, tie)
    monkeypatch.setattr(plain, "_looks_up", lambda tokens: False)
    gen = torch.Generator().manual_seed(13)
    tokens = torch.randint(0, 7, (B, T), generator=gen)
    targets = torch.randint(0, 7, (B, T), generator=gen)
    state = _state(variant[0], layers) if given else None
    assert looked_up._looks_up(tokens)
    results = []
    for model in (looked_up, plain):
        nll, last = model(tokens, state, targets=targets)
        weights = torch.randn(nll.shape, generator=torch.Generator().manual_seed(14))
        loss = (nll * weights).sum() + sum(s.sum() for s in _as_tuple(last))
        names, params = zip(*model.named_parameters())
        grads = torch.autograd.grad(loss, [*params, *(_as_tuple(state) if given else ())])
        results.append((nll, _as_tuple(last), dict(zip(names + ("h0", "c0"), grads))))
    (nll_a, last_a, grads_a), (nll_b, last_b, grads_b) = results
    _close(nll_a, nll_b)
    for a, b in zip(last_a, last_b):
        _close(a, b)
    assert grads_a.keys() == grads_b.keys() and "encoder.weight" in grads_a
    for name in grads_a:
        _close(grads_a[name], grads_b[name])
    with torch.no_grad():  # evaluation: no graph, the Functions' forward alone
        _close(looked_up.eval()(tokens, state, targets=targets)[0], plain.eval()(tokens, state, targets=targets)[0])


def test_lookup_only_where_the_vocabulary_is_small_and_nothing_is_dropped():
    from charlm.config import ModelConfig
    from charlm.model import build_model

    tokens = torch.zeros(4, 16, dtype=torch.long)  # 64 tokens
    char = build_model(ModelConfig(cell="gru", impl="custom", embedding_size=E, hidden_size=H), 32)
    assert char._looks_up(tokens)
    assert not build_model(ModelConfig(cell="gru", impl="custom", embedding_size=E, hidden_size=H), 33)._looks_up(
        tokens)  # 66 rows cost more than 64 tokens' products
    assert not build_model(ModelConfig(cell="gru", impl="torch", embedding_size=E, hidden_size=H), 32)._looks_up(
        tokens)  # nn.GRU takes embeddings
    dropped = build_model(ModelConfig(cell="gru", impl="custom", embedding_size=E, hidden_size=H, dropout=0.1), 32)
    assert not dropped._looks_up(tokens)       # training: dropout on the embeddings
    assert dropped.eval()._looks_up(tokens)    # evaluation: nothing dropped
    types_dropped = build_model(ModelConfig(cell="gru", impl="custom", embedding_size=E, hidden_size=H,
                                            embedding_dropout=0.1), 32)
    assert not types_dropped._looks_up(tokens) and types_dropped.eval()._looks_up(tokens)
    assert not char._looks_up(tokens.to("meta"))  # not measured off the CPU
    char.rnn.fast = False                      # the step functions, as in sampling's one-token steps
    assert not char._looks_up(tokens)
