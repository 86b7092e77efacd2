"""native.c's fused step kernels: their values, their use by the custom cells, and the fallback without them."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from charlm import cells_fast, native

needs_native = pytest.mark.skipif(native.kernels() is None, reason=f"native kernels {native.why_not()}")


@needs_native
def test_sigmoid_and_tanh_match_torch_over_the_whole_float_range():
    # Through the LSTM's forward kernel with a zero recurrent term and c<t-1> = 0: the gates hold σ(z)
    # (Γu, Γf, Γo) and tanh(z) (c~), and tanh_c holds tanh(σ(z) tanh(z)).
    z = torch.cat([torch.linspace(-100, 100, 20001), torch.linspace(-1e-3, 1e-3, 2001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, float("inf"), float("-inf")])])
    H = z.numel()
    gates = z.repeat(4).view(1, 4 * H)
    c, tanh_c, h = torch.empty(1, H), torch.empty(1, H), torch.empty(1, H)
    native.lstm_forward(gates, torch.zeros(1, 4 * H), torch.zeros(1, H), c, tanh_c, h)
    u, f, ct, o = gates.view(4, H)
    for got in (u, f, o):
        torch.testing.assert_close(got, torch.sigmoid(z), atol=2e-7, rtol=0)
    torch.testing.assert_close(ct, torch.tanh(z), atol=2e-7, rtol=0)
    small = z.abs() < 1e-3  # near 0 tanh is as accurate relatively as absolutely
    torch.testing.assert_close(ct[small], torch.tanh(z[small]), atol=1e-12, rtol=1e-6)
    torch.testing.assert_close(tanh_c[0], torch.tanh(torch.sigmoid(z) * torch.tanh(z)), atol=2e-7, rtol=0)


@needs_native
def test_nan_propagates_through_the_kernels():
    gates = torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])
    c, tanh_c, h = torch.empty(1, 1), torch.empty(1, 1), torch.empty(1, 1)
    native.lstm_forward(gates, torch.zeros(1, 4), torch.zeros(1, 1), c, tanh_c, h)
    assert torch.isnan(gates[0, 0]) and torch.isnan(c).all() and torch.isnan(h).all()


def _lstm_and_gru_layers(x, h0, c0, weights):
    """Outputs and gradients of a custom LSTM layer and a classic GRU layer (cells_fast), float32."""
    results = []
    for cell, (w_ih, bias, w_hh) in weights.items():
        params = [t.clone().requires_grad_(True) for t in (x, w_ih, bias, h0, c0, w_hh)]
        xs, w_i, b, h, c, w_h = params
        if cell == "lstm":
            hs, c_last = cells_fast.lstm_layer(xs, w_i, b, h, c, w_h)
            loss = (hs * torch.linspace(-1, 1, hs.numel()).view(hs.shape)).sum() + (c_last * 0.5).sum()
        else:
            hs = cells_fast.gru_layer(xs, w_i, b, h, w_h)
            loss = (hs * torch.linspace(-1, 1, hs.numel()).view(hs.shape)).sum()
        grads = torch.autograd.grad(loss, [p for p in params if cell == "lstm" or p is not c])
        results.append((hs.detach(), *grads))
    return results


def _inputs(seed: int, T: int, B: int, E: int, H: int, scale: float):
    """x, h0, c0 and the (w_ih, bias, w_hh) of an LSTM and a GRU layer, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    x, h0, c0 = (torch.randn(*s, generator=g) for s in ((T, B, E), (B, H), (B, H)))
    weights = {cell: (torch.randn(k * H, E, generator=g) * scale, torch.randn(k * H, generator=g) * 0.1,
                      torch.randn(k * H, H, generator=g) * scale) for cell, k in (("lstm", 4), ("gru", 3))}
    return x, h0, c0, weights


def _assert_same(results, expected):
    for a, b in zip(results, expected):
        for got, want in zip(a, b):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


STEP_KERNELS = ("lstm_forward", "lstm_backward", "gru_gates", "gru_state", "gru_backward_state",
                "gru_backward_reset")
LOOPS = ("gru_forward_loop", "gru_backward_loop")
LSTM_LOOPS = ("lstm_forward_loop", "lstm_backward_loop")  # own product; MKL's split, H <= 256
LSTM_STEP_KERNELS = ("lstm_forward", "lstm_backward")  # else the LSTM steps from Python, each step in C


def _recording(monkeypatch, names):
    calls = []
    for name in names:
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    return calls


@needs_native
def test_layers_give_the_same_values_and_gradients_with_and_without_the_kernels(monkeypatch):
    x, h0, c0, weights = _inputs(0, T=20, B=5, E=7, H=16, scale=0.3)
    calls = _recording(monkeypatch, STEP_KERNELS + LOOPS + LSTM_LOOPS)
    results = {}
    if native.loops():  # a window of 20 steps: the GRU's whole loop in C, forward and backward
        results["loops"] = _lstm_and_gru_layers(x, h0, c0, weights)
        assert set(calls) == set(LOOPS + (LSTM_LOOPS if native.lstm_loops(5, 16) else LSTM_STEP_KERNELS))
        calls.clear()
    monkeypatch.setattr(native, "loops", lambda: False)  # each step's element-wise part in C
    results["steps"] = _lstm_and_gru_layers(x, h0, c0, weights)
    assert set(calls) == set(STEP_KERNELS)
    calls.clear()
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    results["pytorch"] = _lstm_and_gru_layers(x, h0, c0, weights)
    assert not calls
    for form in results:
        _assert_same(results[form], results["pytorch"])


def _layer_weights(cell, weights, H):
    """(w_ih, bias, w_hh) of one layer of `cell` from _inputs' weights; an RNN takes one gate's worth of
    the GRU's rows."""
    if cell != "rnn":
        return weights[cell]
    w_ih, bias, w_hh = (w[:H] for w in weights["gru"])
    return w_ih, bias, w_hh[:, :H]


@pytest.mark.skipif(not native.loops(), reason="native time loops off")
@pytest.mark.parametrize("relu", [False, True])
def test_the_rnn_loop_in_c_gives_the_pytorch_form_values_and_gradients(monkeypatch, relu):
    x, h0, _, weights = _inputs(4, T=20, B=5, E=7, H=16, scale=0.3)
    w_ih, bias, w_hh = _layer_weights("rnn", weights, 16)

    def run():
        params = [t.clone().requires_grad_(True) for t in (x, w_ih, bias, h0, w_hh)]
        hs = cells_fast.rnn_layer(*params, relu=relu)
        loss = (hs * torch.linspace(-1, 1, hs.numel()).view(hs.shape)).sum()
        return (hs.detach(), *torch.autograd.grad(loss, params))

    calls = _recording(monkeypatch, ("rnn_forward_loop", "rnn_backward_loop"))
    looped = run()
    assert calls == ["rnn_forward_loop", "rnn_backward_loop"]
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    _assert_same([looped], [run()])


def _split_layer(cell, x, h0, c0, weights, relu=False):
    """One cells_fast layer's outputs and the gradients of all its inputs, from an output gradient laid out
    batch-major (rows T * H apart within a step), as a batch-first model's loss hands it back."""
    T, B, H = x.shape[0], x.shape[1], h0.shape[1]
    g = torch.Generator().manual_seed(11)
    grad_hs = (torch.randn(B, T, H, generator=g) * 0.3).transpose(0, 1)
    w_ih, bias, w_hh = weights
    if cell == "lstm":
        params = [t.clone().requires_grad_(True) for t in (x, w_ih, bias, h0, c0, w_hh)]
        outputs, grads = cells_fast.lstm_layer(*params), (grad_hs, torch.randn(B, H, generator=g) * 0.3)
    else:
        params = [t.clone().requires_grad_(True) for t in (x, w_ih, bias, h0, w_hh)]
        layer = cells_fast.gru_layer if cell == "gru" else partial(cells_fast.rnn_layer, relu=relu)
        outputs, grads = (layer(*params),), (grad_hs,)
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, params, grads))


@pytest.mark.skipif(not native.loops(), reason="native time loops off")
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("cell, relu", [("gru", False), ("lstm", False), ("rnn", False), ("rnn", True)])
@pytest.mark.parametrize("T, H", [(20, 16), (64, 128)])  # the larger one keeps the threads busy together
def test_a_loop_split_into_blocks_of_rows_gives_the_same_values_and_gradients(monkeypatch, parts, cell, relu, T, H):
    # 17 rows: blocks of 8 and 9 (or 5, 6, 6), each run through the window by a thread of its own
    if native.openmp_threads() == 0:
        pytest.skip("a build without OpenMP runs every loop unsplit")
    x, h0, c0, weights = _inputs(5, T=T, B=17, E=7, H=H, scale=0.3 if H == 16 else 0.1)
    w = _layer_weights(cell, weights, H)
    blocks, seen, b_strides = parts, [], []
    monkeypatch.setattr(native, "loop_parts", lambda B: (seen.append(B), blocks)[1])
    monkeypatch.setattr(native, "lstm_loops", lambda B, H: True)  # also with MKL's product, and unsplit
    names = (f"{cell}_forward_loop", f"{cell}_backward_loop")
    forward, backward = (getattr(native, n) for n in names)
    monkeypatch.setattr(native, names[0], lambda *a: (seen.append("forward"), forward(*a))[1])
    # the gradient's rows reach the C loop T * H apart (grad_hs is the backward wrappers' second tensor)
    monkeypatch.setattr(native, names[1], lambda *a: (b_strides.append(a[2 if cell == "gru" else 1].stride(1)),
                                                      backward(*a))[1])

    def inference():  # one step of Γr * h<t-1> kept (GRU), two of c<t> (LSTM)
        with torch.no_grad():
            if cell == "lstm":
                return list(cells_fast.lstm_layer(x, w[0], w[1], h0, c0, w[2]))
            if cell == "gru":
                return [cells_fast.gru_layer(x, w[0], w[1], h0, w[2])]
            return [cells_fast.rnn_layer(x, w[0], w[1], h0, w[2], relu=relu)]

    split, split_inferred = _split_layer(cell, x, h0, c0, w, relu), inference()
    assert seen == [17, "forward", 17, 17, "forward"] and b_strides == [T * H]
    blocks = 1
    whole, whole_inferred = _split_layer(cell, x, h0, c0, w, relu), inference()
    # the same kernels and products row by row: what a block of rows gets is what it gets in the whole batch
    for got, want in zip(split + split_inferred, whole + whole_inferred):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # inference keeps less of the window, and gives what the training forward gives
    for got, want in zip(whole_inferred, whole):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if H == 16:  # and the C loop is the PyTorch form's (over the larger window a relu may switch on rounding)
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
        _assert_same([whole], [_split_layer(cell, x, h0, c0, w, relu)])


@pytest.mark.skipif(not native.loops(), reason="native time loops off")
def test_loop_parts_gives_one_block_per_thread_of_eight_rows_or_more_with_mkl():
    threads = native.openmp_threads()
    expected = threads if threads > 1 and native.gemm_is_mkl() else 1
    assert native._fewer_rows_agree()  # MKL 2024.2, PyTorch 2.13's: a block of rows of a packed W as in the whole
    assert native.loop_parts(8 * max(threads, 1)) == expected
    assert native.loop_parts(8 * max(threads, 1) - 1) == 1
    assert native.loop_parts(1) == 1


@pytest.mark.skipif(not native.loops(), reason="native time loops off")
def test_a_short_window_steps_from_python(monkeypatch):
    # Below native.LOOP_MIN_STEPS, laying W_hh out for MKL would cost more than the loop saves.
    x, h0, c0, weights = _inputs(1, T=native.LOOP_MIN_STEPS - 1, B=2, E=3, H=4, scale=0.5)
    calls = _recording(monkeypatch, STEP_KERNELS + LOOPS + LSTM_LOOPS)
    short = _lstm_and_gru_layers(x, h0, c0, weights)
    assert set(calls) == set(STEP_KERNELS)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    _assert_same(short, _lstm_and_gru_layers(x, h0, c0, weights))


@needs_native
def test_without_mkl_the_loops_wait_for_charlm_native_loops(monkeypatch):
    # A torch without MKL (an ARM build) or whose MKL product failed its self-test: the loops would take
    # native.c's own product, not measured there against the per-step form, so only on request.
    monkeypatch.setattr(native, "mkl_gemm", lambda: None)
    monkeypatch.setattr(native, "_mkl_at_half_width", lambda: False)
    native.loops.cache_clear()
    try:
        assert native.gemm() is native.own_gemm() is not None and not native.gemm_is_mkl()
        assert not native.loops()
        assert native.status() == ("on (per step: no MKL packed product in this torch; "
                                   "CHARLM_NATIVE=loops takes charlm's own)")
        x, h0, c0, weights = _inputs(2, T=12, B=3, E=4, H=5, scale=0.5)
        calls = _recording(monkeypatch, STEP_KERNELS + LOOPS + LSTM_LOOPS)
        stepped = _lstm_and_gru_layers(x, h0, c0, weights)
        assert set(calls) == set(STEP_KERNELS)
        calls.clear()
        monkeypatch.setenv("CHARLM_NATIVE", "loops")
        native.loops.cache_clear()
        assert native.loops() and native.lstm_loops(3, 5)
        _assert_same(_lstm_and_gru_layers(x, h0, c0, weights), stepped)
        assert set(calls) == set(LOOPS + LSTM_LOOPS)
        monkeypatch.setattr(native, "own_gemm", lambda: None)  # and if the own product failed its test too
        native.loops.cache_clear()
        assert not native.loops()
        assert native.status() == "on (per step: no packed product agreed with torch's)"
    finally:
        native.loops.cache_clear()


@needs_native
def test_amd_processors_with_avx512_take_the_own_product(monkeypatch):
    # MKL keeps to its AVX2 kernels there; elsewhere it is MKL's (where this torch has it)
    monkeypatch.setattr(native, "loops", lambda: True)
    monkeypatch.setattr(native, "_mkl_at_half_width", lambda: True)
    assert native.gemm() is native.own_gemm() is not None and not native.gemm_is_mkl()
    # the own product: the LSTM's loop, unsplit too and at any size
    assert native.lstm_loops(1, 256) and native.lstm_loops(64, 256) and native.lstm_loops(64, 512)
    monkeypatch.setattr(native, "_mkl_at_half_width", lambda: False)
    assert native.gemm() is (native.mkl_gemm() or native.own_gemm())
    assert native.gemm_is_mkl() == (native.mkl_gemm() is not None)
    # with MKL's, the LSTM's loop only where it is split by rows and W_hh holds 1 MiB or less
    no_mkl = native.mkl_gemm() is None
    assert native.lstm_loops(1, 256) == no_mkl
    assert native.lstm_loops(64, 256) == (no_mkl or native.loop_parts(64) > 1)
    assert native.lstm_loops(64, 512) == no_mkl
    monkeypatch.setattr(native, "loop_parts", lambda B: 2)
    assert native.lstm_loops(16, 256) and native.lstm_loops(16, 257) == no_mkl


def _packed_products():
    return [pytest.param(name, marks=pytest.mark.skipif(found is None, reason=f"no {name} packed product"))
            for name, found in (("mkl", native.mkl_gemm()), ("own", native.own_gemm()))]


@pytest.mark.parametrize("which", _packed_products())
@pytest.mark.parametrize("transposed", [False, True])
def test_packed_weights_multiply_as_torch_does(transposed, which):
    # The loops multiply by W_hh^T forward (a transposed view) and by W_hh backward (row-major).
    found = native.mkl_gemm() if which == "mkl" else native.own_gemm()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 7, generator=g)
    b = w.t() if transposed else w
    a = torch.randn(4, b.shape[0], generator=g)
    assert torch.allclose(native.product(a, native.Packed(b, 4, found), found), a @ b, atol=1e-5)


@pytest.mark.skipif(native.own_gemm() is None, reason="native kernels off")
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (16, 33), (32, 64), (48, 16), (100, 257), (512, 256)])
def test_own_product_over_every_tile_edge(m, n, k):
    # Rows: every short block (1, 2, 3-4, 5-8) and several blocks; columns: less than a panel, a panel
    # or more of 8, 16 or 32 columns, and a last panel cut short; C written (beta 0) and added to (beta 1).
    found = native.own_gemm()
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, a = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    for b in (w.t(), w.t().contiguous()):  # as the loops pass W_hh^T (a view) and W_hh (row-major)
        packed = native.Packed(b, m, found)
        full = torch.randn(m, n + 3, generator=g)
        c = full[:, :n]  # rows apart from each other (ldc = n + 3), with three columns that must stay
        want = (a.double() @ b.double()).float()
        for beta in (0.0, 1.0):
            start = full.clone()
            found[2](101, 111, 151, m, n, k, a.data_ptr(), k, packed.address, n, beta, c.data_ptr(), n + 3)
            torch.testing.assert_close(c, want + beta * start[:, :n], atol=1e-5 * k ** 0.5, rtol=1e-5)
            assert torch.equal(full[:, n:], start[:, n:])
            full.copy_(start)


@needs_native
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layout", ["batch-major", "expanded"])
def test_backward_takes_a_gradient_of_any_layout(layout, cell):
    # The model hands the layer a gradient laid out (B, T, H), time-major only as a view; a sum's is expanded
    g = torch.Generator().manual_seed(3)
    T, B, E, H = 6, 4, 3, 8
    k = 4 if cell == "lstm" else 3
    x = torch.randn(T, B, E, generator=g, requires_grad=True)
    w_ih, w_hh = torch.randn(k * H, E, generator=g), torch.randn(k * H, H, generator=g)
    bias, h0, c0 = torch.randn(k * H, generator=g), torch.zeros(B, H), torch.zeros(B, H)

    def layer(x):
        return cells_fast.lstm_layer(x, w_ih, bias, h0, c0, w_hh)[0] if cell == "lstm" else \
            cells_fast.gru_layer(x, w_ih, bias, h0, w_hh)

    grad = (torch.randn(B, T, H, generator=g).transpose(0, 1) if layout == "batch-major"
            else torch.ones(1, 1, 1).expand(T, B, H))
    (d_x,) = torch.autograd.grad(layer(x), x, grad)
    x_ref = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(layer(x_ref), x_ref, grad.contiguous())
    torch.testing.assert_close(d_x, want, atol=1e-5, rtol=1e-5)


def _status_in_fresh_process(tmp_path, **env) -> list[str]:
    """native.status() and an LSTM layer's output sum in a new interpreter with this environment."""
    code = ("import torch\nfrom charlm import native, cells_fast\n"
            "print(native.status())\n"
            "x = torch.ones(9, 2, 3); w = torch.full((8, 3), 0.1); u = torch.full((8, 2), 0.1)\n"
            "hs, c = cells_fast.lstm_layer(x, w, torch.zeros(8), torch.zeros(2, 2), torch.zeros(2, 2), u)\n"
            "print(round(float(hs.sum()), 5))\n")
    environment = {**os.environ, "CHARLM_CACHE_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("env, reason", [
    ({"CC": os.path.join(os.sep, "no", "such", "cc")}, "off (no C compiler found; set CC)"),
    ({"CC": "false"}, "off (false failed"),
    ({"CHARLM_NATIVE": "0"}, "off (CHARLM_NATIVE=0)"),
])
def test_without_the_kernels_the_cells_fall_back_to_pytorch(tmp_path, env, reason):
    status, total = _status_in_fresh_process(tmp_path, **env)
    assert status.startswith(reason)
    assert not list(tmp_path.glob("native-*.so"))
    if native.kernels() is not None:  # the same numbers with the kernels, to the printed digits
        assert _status_in_fresh_process(tmp_path / "with")[1] == total


@needs_native
def test_charlm_native_steps_keeps_the_per_step_kernels(tmp_path):
    status, total = _status_in_fresh_process(tmp_path, CHARLM_NATIVE="steps")
    assert status == "on (per step: CHARLM_NATIVE=steps)"
    looped = _status_in_fresh_process(tmp_path, CHARLM_NATIVE="loops")
    product = "MKL" if native.gemm_is_mkl() else "charlm"
    assert looped[0] == (f"on (time loops, {product}'s product)" if native.gemm() is not None else status)
    assert looped[1] == total  # the same numbers, to the printed digits


@needs_native
def test_the_library_is_built_once_and_then_reused(tmp_path):
    assert _status_in_fresh_process(tmp_path)[0].startswith("on")
    (built,) = tmp_path.glob("native-*.so")
    stamp = built.stat().st_mtime_ns
    assert _status_in_fresh_process(tmp_path)[0].startswith("on")
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # nothing rebuilt, no partial file left
    assert built.stat().st_mtime_ns == stamp


@needs_native
def test_an_unwritable_cache_folder_builds_in_a_temporary_one(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _status_in_fresh_process(tmp_path, CHARLM_CACHE_DIR=str(blocker / "cache"))[0].startswith("on")


@needs_native
def test_rows_split_among_threads_give_the_same_values(monkeypatch):
    # At B x H >= 4096 a library built with OpenMP splits the rows among torch's threads
    # (the rest of the suite runs on one thread, where every loop runs whole).
    x, h0, c0, weights = _inputs(5, T=5, B=16, E=8, H=256, scale=0.1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if native.openmp_threads() != 2:
            pytest.skip(f"the library splits rows among {native.openmp_threads()} threads (0: built without OpenMP)")
        split = _lstm_and_gru_layers(x, h0, c0, weights)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    _assert_same(split, _lstm_and_gru_layers(x, h0, c0, weights))


def _layer_or_error(cell, x, h0, c0, weights):
    """The layer's output without autograd, or the type of the error it raised."""
    w_ih, bias, w_hh = weights[cell]
    try:
        with torch.no_grad():
            if cell == "lstm":
                return cells_fast.lstm_layer(x, w_ih, bias, h0, c0, w_hh)[0]
            return cells_fast.gru_layer(x, w_ih, bias, h0, w_hh)
    except RuntimeError as exc:
        return type(exc)


@needs_native
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("state_batch", [1, 3, 16])
def test_a_state_of_another_batch_size_gets_what_the_pytorch_form_gives(monkeypatch, cell, state_batch):
    # The C loops would read and write past a smaller or larger state's rows: such a state goes to the
    # PyTorch form, which broadcasts a batch of 1 and refuses the rest
    x, _, _, weights = _inputs(6, T=4, B=8, E=3, H=5, scale=0.3)
    h0, c0 = torch.randn(state_batch, 5), torch.randn(state_batch, 5)
    got = _layer_or_error(cell, x, h0, c0, weights)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    want = _layer_or_error(cell, x, h0, c0, weights)
    if isinstance(want, type):
        assert got is want
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no POSIX owners and modes here")
def test_a_cache_folder_other_users_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a library there could have been put by anyone: it is built in a private folder
    assert _status_in_fresh_process(tmp_path, CHARLM_CACHE_DIR=str(shared))[0].startswith("on")
    assert not list(shared.iterdir())


def test_where_a_c_compiler_is_found_the_kernels_build_and_pass_their_self_test():
    """Every other test of native.c is skipped when the library is off, so a native.c that no longer compiles,
    or whose kernel fails the self-test (mutant: a wrong factor in dΓf-pre), left the whole suite green."""
    import os

    from charlm import native

    if native._compiler() is None or os.environ.get("CHARLM_NATIVE", "").strip() == "0":
        pytest.skip("no C compiler here, or the kernels turned off by CHARLM_NATIVE=0")
    assert native.kernels() is not None, native.why_not()
    assert native.status().startswith("on")
