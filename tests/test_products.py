"""charlm/products.py: oneDNN's products against torch's, in every layout the models hand them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from charlm import products, runtime
from charlm.products import Repeated, linear, mm, output_linear, weight_grad

needs_onednn = pytest.mark.skipif(not products.ONEDNN, reason="this torch build has no usable oneDNN product")


@pytest.fixture
def small_shapes_too(monkeypatch):
    """oneDNN for any size, the weight gradients too on a Zen 4: the tests' shapes are far below where it pays."""
    for name, value in [("_MIN_WORK", 0), ("_PACK_MIN_WORK", 0), ("_PACK_MIN_BATCH", 1), ("_PACK_MIN_STEPS", 8)]:
        monkeypatch.setattr(products, name, value)
    monkeypatch.setattr(products, "_weight_grads_in_mkl", lambda: False)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_linear_mm_and_weight_grad_match_torch_in_every_layout(small_shapes_too):
    x = _randn(7, 12, seed=0)
    w_plain, w_transposed = _randn(10, 12, seed=2), _randn(12, 10, seed=1).t()
    w_column_slice = _randn(10, 20, seed=3)[:, 4:16]
    b = _randn(10, seed=4)
    assert w_transposed.t().is_contiguous() and not w_column_slice.is_contiguous()
    for w in (w_plain, w_transposed, w_column_slice):
        _close(linear(x, w, b), torch.addmm(b, x, w.t()))
        _close(linear(x[:, ::1], w), x @ w.t())
        _close(mm(x, w.t()), x @ w.t())
    strided_x = _randn(7, 24, seed=5)[:, ::2]  # a non-contiguous first operand is copied, not misread
    _close(linear(strided_x, w_plain), strided_x @ w_plain.t())
    for m in (3, 40):  # fewer and more output rows than inputs
        d = _randn(9, m, seed=6)
        _close(weight_grad(d, _randn(9, 12, seed=7)), d.t() @ _randn(9, 12, seed=7))
        assert weight_grad(d, _randn(9, 12, seed=7)).shape == (m, 12)


@needs_onednn
@pytest.mark.parametrize("n, m, first", [(9, 3, "d"), (9, 40, "d"), (40, 30, "x")])
def test_weight_grad_takes_the_order_that_copies_fewer_values(n, m, first, monkeypatch, small_shapes_too):
    """d^T first copies M x N values; x^T first K x N, then K x M for the transposed result (K = 12 here)."""
    import charlm.products as products

    firsts = []
    real = products.linear
    monkeypatch.setattr(products, "linear", lambda a, w, b=None: firsts.append(a.shape) or real(a, w, b))
    d, x = _randn(n, m, seed=6), _randn(n, 12, seed=7)
    got = weight_grad(d, x)
    _close(got, d.t() @ x)
    assert got.is_contiguous() and firsts == [(m, n) if first == "d" else (12, n)]


_ZEN4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx2 avx512f avx512bw\n"


@pytest.mark.parametrize("info, mkl", [
    (_ZEN4, True),
    (_ZEN4.replace(" avx512f avx512bw", ""), False),  # Zen 3: no AVX-512
    (_ZEN4.replace(": 25", ": 26"), False),  # Zen 5: full-width AVX-512, where oneDNN's were faster
    (_ZEN4.replace("AuthenticAMD", "GenuineIntel").replace(": 25", ": 6"), False),
    ("", False),  # no /proc/cpuinfo
])
def test_weight_grads_go_to_mkl_on_zen4_only(info, mkl, monkeypatch):
    monkeypatch.setattr(runtime, "cpuinfo", lambda: info)
    products._weight_grads_in_mkl.cache_clear()
    try:
        assert products._weight_grads_in_mkl() is mkl
    finally:
        products._weight_grads_in_mkl.cache_clear()


@needs_onednn
def test_weight_grad_on_zen4_is_torchs_product(monkeypatch, small_shapes_too):
    monkeypatch.setattr(products, "_weight_grads_in_mkl", lambda: True)
    monkeypatch.setattr(products, "linear", lambda *args: pytest.fail("oneDNN was called"))
    d, x = _randn(40, 30, seed=6), _randn(40, 12, seed=7)
    got = weight_grad(d, x)
    _close(got, d.t() @ x)
    assert got.shape == (30, 12)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("steps", [1, 64])
def test_repeated_products_match_addmm(onednn, steps, monkeypatch, small_shapes_too):
    if onednn and not products.ONEDNN:
        pytest.skip("no oneDNN product here")
    monkeypatch.setattr(products, "ONEDNN", onednn)
    w = _randn(12, 5, seed=0)
    r = Repeated(w, 4, steps)
    assert (r.packed is not None) == (onednn and steps >= 8)  # blocked layout only where it pays
    h, c, bias = _randn(4, 5, seed=1), _randn(4, 12, seed=2), _randn(12, seed=3)
    _close(r(h), h @ w.t())
    _close(r.plus(c, h), c + h @ w.t())
    out = c.clone()
    assert r.add_to(out, h) is out
    _close(out, c + h @ w.t())
    into = torch.empty(4, 12)
    r.into(into, h, bias)
    _close(into, torch.addmm(bias, h, w.t()))
    _close(r(_randn(7, 5, seed=4)), _randn(7, 5, seed=4) @ w.t())  # another batch size than the hint


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["plain", "column slice", "transposed"])
@pytest.mark.parametrize("out_features", [3, 11])  # fewer / more than the 6 inputs: both orders of weight_grad
def test_output_linear_values_and_gradients_equal_f_linear(bias, layout, out_features, small_shapes_too):
    base = {"plain": _randn(out_features, 6, seed=1), "column slice": _randn(out_features, 10, seed=1)[:, 2:8],
            "transposed": _randn(6, out_features, seed=1).t()}[layout]
    x1 = _randn(2, 3, 6, seed=0).requires_grad_()
    w1 = base.detach().clone().requires_grad_() if layout == "plain" else base.requires_grad_()
    b_full = _randn(2 * out_features, seed=2)
    b1 = b_full[::2].requires_grad_() if bias else None  # a strided bias: oneDNN would misread it as it is
    x2, w2 = x1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    b2 = b1.detach().clone().requires_grad_() if bias else None
    y1, y2 = output_linear(x1, w1, b1), F.linear(x2, w2, b2)
    assert type(y1.grad_fn).__name__ == "ViewBackward0"
    assert type(y1.grad_fn.next_functions[0][0]).__name__ == "_LinearBackward"  # oneDNN's path, not F.linear's
    assert y1.shape == (2, 3, out_features)
    _close(y1, y2)
    g = _randn(2, 6, out_features, seed=3)[:, ::2]  # a non-contiguous gradient from above
    y1.backward(g)
    y2.backward(g)
    _close(x1.grad, x2.grad)
    _close(w1.grad, w2.grad)
    if bias:
        _close(b1.grad, b2.grad)
    with torch.no_grad():
        _close(output_linear(x1, w1, b1), y2)


def test_output_linear_without_onednn_is_f_linear(monkeypatch):
    monkeypatch.setattr(products, "ONEDNN", False)
    x, w = _randn(4, 6, seed=0).requires_grad_(), _randn(5, 6, seed=1)
    y = output_linear(x, w)
    assert type(y.grad_fn).__name__ != "_LinearBackward"
    _close(y, F.linear(x, w))


@needs_onednn
def test_empty_products_stay_with_torch(small_shapes_too):
    # oneDNN refuses a product with no rows or no inner dimension; thresholds of 0 must not send it there
    _close(linear(torch.zeros(0, 5), _randn(4, 5, seed=0)), torch.zeros(0, 4))
    _close(weight_grad(torch.zeros(0, 4), torch.zeros(0, 5)), torch.zeros(4, 5))
    _close(mm(torch.zeros(3, 0), torch.zeros(0, 4)), torch.zeros(3, 4))


@needs_onednn
def test_torch_mkldnn_flag_turns_the_onednn_path_off(monkeypatch, small_shapes_too):
    x, w = _randn(2, 3, seed=0), _randn(4, 3, seed=1)
    assert products._onednn(x, w)
    assert not products._onednn(x.double(), w.double())
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # as RNNLM.step does for one token
    assert not products._onednn(x, w)
    _close(linear(x, w), x @ w.t())


@needs_onednn
def test_small_products_stay_with_torch_where_onednn_costs_more():
    # batch 1 (one line scored at a time): the layout and each call's overhead cost more than they save
    assert Repeated(_randn(768, 256, seed=0), 1, 64).packed is None
    assert Repeated(_randn(768, 256, seed=0), 16, 64).packed is not None  # the default char config
    assert Repeated(_randn(768, 256, seed=0), 16, 8).packed is None       # too few steps to repay it


@pytest.mark.parametrize("rows, steps, shape, copied", [
    (1, 64, (2048, 512), False),   # one line of an LSTM 512 scored: the strided copy costs a dozen steps
    (2, 256, (2048, 512), False),  # nor does it pay back over a long window at this size
    (1, 64, (1024, 256), False),   # an LSTM 256's 1 MiB: not over a short line
    (1, 128, (1024, 256), True),   # ... but over a window of 128 steps or more
    (4, 8, (2048, 512), True),     # four rows or more: from 8 steps, as before
    (32, 64, (12, 5), True),
    (32, 4, (12, 5), False),       # too few steps
])
def test_the_row_major_copy_of_w_is_made_only_where_it_pays(monkeypatch, rows, steps, shape, copied):
    """Catches: Repeated copying W^T into row-major order for a batch of one row (one line scored at a time),
    where the strided copy of an LSTM 512's W_hh took 1.1 ms, more than the window's products gain by it."""
    monkeypatch.setattr(products, "ONEDNN", False)  # the copy is the layout of the non-oneDNN path
    w = _randn(*shape, seed=0)
    r = Repeated(w, rows, steps)
    assert r.packed is None
    assert r.w_t.is_contiguous() == copied
    assert (r.w_t.data_ptr() == w.data_ptr()) == (not copied)  # no copy: the transposed view of W itself
    h = _randn(rows, shape[1], seed=1)
    torch.testing.assert_close(r(h), h @ w.t(), atol=1e-4, rtol=1e-4)  # sums of 512 terms of about 1


def _backend_with(setting: str | None, machine: str | None = None) -> str:
    """products.backend() in a fresh interpreter with CHARLM_ONEDNN set so (None: unset), on `machine`."""
    code = ("import platform, sys\n"
            "if sys.argv[1]: platform.machine = lambda: sys.argv[1]\n"
            "import charlm.products as p; print(p.backend())")
    env = {k: v for k, v in os.environ.items() if k != "CHARLM_ONEDNN"}
    if setting is not None:
        env["CHARLM_ONEDNN"] = setting
    out = subprocess.run([sys.executable, "-c", code, machine or ""], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_environment_variable_and_processor_choose_the_backend():
    works = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert _backend_with("0") == "default"
    assert _backend_with("0", "x86_64") == "default"
    assert _backend_with(None, "arm64") == "default"  # not measured there: off unless asked for
    if works:
        assert _backend_with(None, "x86_64") == "onednn"
        assert _backend_with("1", "arm64") == "onednn"


def test_probe_does_not_touch_the_random_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert products._probe() in (True, False)
    torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)


@needs_onednn
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")  # as export.py does
def test_one_token_steps_and_their_exports_never_use_onednn():
    """RNNLM.step turns oneDNN off, so an exported (traced) step holds no private operator, even where
    its output layer is large enough for oneDNN (2 x 256 by 256 x 20,000: 10M multiply-adds)."""
    from charlm.config import ModelConfig
    from charlm.export import SingleStep
    from charlm.model import build_model

    model = build_model(ModelConfig(cell="gru", impl="custom", embedding_size=8, hidden_size=256), 20_000).eval()
    model.rnn.fast = False  # as export_model does
    example = (torch.zeros(2, dtype=torch.long), torch.zeros(1, 1, 2, 256))
    traced = torch.jit.trace(SingleStep(model), example, check_trace=False)  # a oneDNN call would raise here
    assert "mkldnn" not in str(traced.inlined_graph)

    def onednn_calls(fn) -> int:
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")

    assert onednn_calls(lambda: model.step(torch.zeros(2, dtype=torch.long))) == 0
    # the same output product outside a step does go to oneDNN, so the checks above can fail
    assert onednn_calls(lambda: output_linear(torch.zeros(2, 256), model.decoder.weight)) == 1


@needs_onednn
def test_torch_products_turns_onednn_off_in_its_own_thread_only(small_shapes_too):
    import threading

    x, w = _randn(2, 3, seed=0), _randn(4, 3, seed=1)
    seen = []
    with products.torch_products():
        with products.torch_products():  # nested blocks
            assert not products._onednn(x, w)
        assert not products._onednn(x, w)
        other = threading.Thread(target=lambda: seen.append(products._onednn(x, w)))
        other.start()
        other.join()
    assert seen == [True]
    assert products._onednn(x, w)
    with pytest.raises(ValueError), products.torch_products():
        raise ValueError  # an error inside still closes the block
    assert products._onednn(x, w)


def test_output_linear_gives_the_bias_its_gradient_when_the_weight_is_frozen(monkeypatch):
    """Catches: _Linear.backward asking needs_input_grad[1] (the weight's) for the bias, so a frozen output weight
    left a trainable bias without a gradient."""
    from charlm import products

    if not products.ONEDNN:
        pytest.skip("this torch build has no usable oneDNN product")
    monkeypatch.setattr(products, "_MIN_WORK", 0)
    monkeypatch.setattr(products, "_weight_grads_in_mkl", lambda: False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, generator=gen)  # frozen
    b = torch.randn(5, generator=gen, requires_grad=True)
    y = products.output_linear(x, w, b)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_LinearBackward"  # oneDNN's Function, not F.linear
    g = torch.randn(2, 3, 5, generator=gen)
    y.backward(g)
    assert b.grad is not None and w.grad is None
    torch.testing.assert_close(b.grad, g.sum(dim=(0, 1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)
