"""The CUDA path, where the machine has a GPU. CI has none, so there every test here skips; nothing else in
the suite needs CUDA. CHARLM_TEST_DEVICE=cpu runs these tests on the CPU instead, to check the tests
themselves on a machine without a GPU (the bf16 one keeps to CUDA)."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from charlm.cells import CustomRNN, dropout
from charlm.checkpoint import load_run
from charlm.config import ModelConfig
from charlm.model import build_model
from charlm.score import score_sentences
from charlm.train import train
from conftest import TINY_TEXT, char_codec, random_model, tiny_config
from test_cells import VARIANTS  # (cell, CustomRNN options, the torch.nn module of the same equations)

DEVICE = os.environ.get("CHARLM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (CHARLM_TEST_DEVICE=cpu runs these on the CPU)")


@pytest.fixture(autouse=True)
def _full_float32_products():
    """TF32 keeps 10 bits of a product's inputs' mantissas: the 1e-5 parity asks for float32's 23."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_custom_cells_on_the_device_match_torch_nn_there(variant, layers):
    # a window of 12 steps and 9 rows: the custom layers' fast path (cells_fast) against cuDNN's
    cell, options, make_torch = VARIANTS[variant]
    E, H, B, T = 5, 16, 9, 12
    g = torch.Generator().manual_seed(layers)
    torch.manual_seed(layers)
    reference = make_torch(E, H, layers).to(DEVICE)
    custom = CustomRNN(cell, E, H, layers, **options).to(DEVICE)
    custom.load_state_dict(reference.state_dict())
    x = torch.randn(B, T, E, generator=g).to(DEVICE)
    states = [torch.randn(layers, B, H, generator=g).to(DEVICE) for _ in range(2 if cell == "lstm" else 1)]
    out_weight = torch.randn(B, T, H, generator=g).to(DEVICE)
    results = []
    for module in (reference, custom):
        xi = x.clone().requires_grad_(True)
        si = [s.clone().requires_grad_(True) for s in states]
        out, final = module(xi, tuple(si) if cell == "lstm" else si[0])
        finals = list(final) if cell == "lstm" else [final]
        loss = (out * out_weight).sum() + sum((f * (k + 2)).sum() for k, f in enumerate(finals))
        loss.backward()
        assert out.device.type == torch.device(DEVICE).type
        results.append([out.detach(), *[f.detach() for f in finals], xi.grad, *[s.grad for s in si],
                        *[p.grad for _, p in sorted(module.named_parameters())]])
    assert len(results[0]) == len(results[1])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gru_form", ["classic", "torch"])
def test_the_custom_models_gradients_on_the_device_are_the_cpu_ones(gru_form):
    # the classic GRU (the default config's) has no torch.nn twin: the CPU's values are its reference
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell="gru", impl="custom", layers=2, embedding_size=4, hidden_size=16,
                                    device="cpu", gru_form=gru_form), vocab_size=7)
    tokens = torch.randint(0, 7, (9, 12), generator=torch.Generator().manual_seed(3))
    results = []
    for device in ("cpu", DEVICE):
        model.to(device).train()
        model.zero_grad()
        nll, _ = model(tokens.to(device), targets=tokens.roll(-1, 1).to(device))
        nll.mean().backward()
        results.append([nll.detach().cpu(), *[p.grad.cpu() for _, p in sorted(model.named_parameters())]])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["custom", "torch"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_scores_on_the_device_are_the_cpu_scores(cell, impl):
    model = random_model(cell, impl, vocab_size=6)
    codec = char_codec("abcd")
    lines = ["abcd" * 5, "a", "", "dcba dcba", "bad cab" * 3]
    on_cpu = score_sentences(model, codec, lines, batch_size=2)
    on_device = score_sentences(model.to(DEVICE), codec, lines, batch_size=2, device=DEVICE)
    for a, b in zip(on_device, on_cpu):
        assert a.tokens == b.tokens
        assert math.isclose(a.logprob, b.logprob, rel_tol=1e-5, abs_tol=1e-4)
        assert all(math.isclose(p, q, abs_tol=1e-5) for p, q in zip(a.token_logprobs, b.token_logprobs))


def test_a_run_trained_on_the_device_loads_and_scores_on_the_cpu(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    cfg = tiny_config(model__device=DEVICE, model__cell="gru", model__impl="custom", train__max_steps=30)
    result = train(cfg, corpus, out=tmp_path / "run", show_progress=False)
    assert result.steps == 30 and result.val_loss is not None and math.isfinite(result.val_loss)
    model, codec, saved = load_run(tmp_path / "run", device="cpu")
    assert saved.cfg.model.device == DEVICE and next(model.parameters()).device.type == "cpu"
    scores = score_sentences(model, codec, ["the cat sat on the mat.", "zzzz"])
    # trained on the first line's text, the model finds it far likelier per token than unseen letters
    assert scores[0].perplexity < scores[1].perplexity


@pytest.mark.skipif(DEVICE is None or not DEVICE.startswith("cuda"), reason="bf16 autocast is for CUDA only")
@pytest.mark.parametrize("cell, impl", [("gru", "custom"), ("lstm", "torch")])  # the default's cells, and cuDNN's
def test_bf16_training_on_cuda_learns_and_keeps_float32_weights(tmp_path, cell, impl):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(model__device=DEVICE, model__cell=cell, model__impl=impl, train__max_steps=60,
                          train__precision=precision)
        result = train(cfg, corpus, out=tmp_path / precision, show_progress=False)
        losses[precision] = result.val_loss
        _, _, saved = load_run(tmp_path / precision)
        assert all(t.dtype == torch.float32 for t in saved.tensors.values())
    assert math.isfinite(losses["bf16"])
    # bf16's products round to 8 bits of mantissa: close to fp32's loss, not equal to it
    assert losses["bf16"] < losses["fp32"] + 0.1


@pytest.mark.skipif(DEVICE is None or not DEVICE.startswith("cuda"), reason="bf16 autocast is for CUDA only")
@pytest.mark.parametrize("tie", [False, True])
def test_bf16_training_with_an_adaptive_softmax_on_cuda(tmp_path, tie):
    """cuDNN's bf16 outputs into the adaptive softmax, untied (torch's module) and tied (charlm's)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    cfg = tiny_config(model__device=DEVICE, model__cell="lstm", model__impl="torch", data__level="word",
                      model__softmax="adaptive", model__adaptive_cutoffs="4,8", model__tie_weights=tie,
                      model__embedding_size=16, model__hidden_size=16, train__max_steps=30, train__precision="bf16")
    result = train(cfg, corpus, out=tmp_path / "run", show_progress=False)
    assert result.val_loss is not None and math.isfinite(result.val_loss)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_torch_stack_with_weight_drop_trains_on_the_device_on_masked_weights(cell):
    """model.weight_drop on cuDNN's stack: each layer runs on a DropConnect copy of its W_hh, the same
    outputs as the stack given that copy, and the dropped weights get no gradient."""
    cfg = ModelConfig(cell=cell, impl="torch", layers=2, embedding_size=6, hidden_size=8, weight_drop=0.5)
    torch.manual_seed(0)
    model = build_model(cfg, 11).to(DEVICE).train()
    masked = build_model(ModelConfig(cell=cell, impl="torch", layers=2, embedding_size=6, hidden_size=8),
                         11).to(DEVICE).eval()
    masked.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 11, (3, 9), device=DEVICE)
    where = [p.data_ptr() for p in model.rnn.parameters()]  # cuDNN's one block, after .to(DEVICE)
    torch.manual_seed(1)
    logits, _ = model(tokens)
    # the stack's own weights were not moved (a re-flattening would have put them in new buffers) ...
    assert [p.data_ptr() for p in model.rnn.parameters()] == where
    with warnings.catch_warnings():  # ... so evaluation still finds them in one block
        warnings.simplefilter("error")
        model.eval()(tokens)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in range(2):
            w = getattr(masked.rnn, f"weight_hh_l{layer}")
            w.copy_(dropout(w, 0.5, True))  # charlm's draw: torch's on CUDA
    torch.testing.assert_close(logits, masked(tokens)[0], atol=1e-5, rtol=1e-5)
    logits.logsumexp(-1).sum().backward()
    for layer in range(2):
        dropped = getattr(masked.rnn, f"weight_hh_l{layer}") == 0
        grad = getattr(model.rnn, f"weight_hh_l{layer}").grad
        assert dropped.any() and (grad[dropped] == 0).all() and (grad[~dropped] != 0).any()
