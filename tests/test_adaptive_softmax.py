"""The adaptive softmax output layer: exact probabilities, cheaper training, the same interfaces."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from charlm.adaptive import TiedAdaptiveSoftmax
from charlm.checkpoint import load_run
from charlm.config import ModelConfig, load_config
from charlm.errors import UsageError
from charlm.model import build_model, check_new_model
from charlm.sample import generate
from charlm.score import score_sentences
from charlm.tokenizer import EOS_ID, TextCodec, Tokenizer, Vocabulary
from charlm.train import train


def adaptive_model(cell="lstm", impl="torch", seed=0, tied=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, impl=impl, layers=1, embedding_size=6 if tied else 4, hidden_size=6,
                      softmax="adaptive", adaptive_cutoffs="3,5", adaptive_div=2.0, tie_weights=tied, device="cpu")
    model = build_model(cfg, 7)  # <unk>, <eos>, a..e: a head of 3 ids and two tail clusters
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.8)
    return model.eval()


def codec():
    return TextCodec(Tokenizer("char"), Vocabulary(["<unk>", "<eos>", "a", "b", "c", "d", "e"]))


@pytest.mark.parametrize("tied", [False, True])
def test_adaptive_model_builds_clusters_and_returns_log_probabilities(tied):
    model = adaptive_model(tied=tied)
    assert isinstance(model.decoder, TiedAdaptiveSoftmax if tied else torch.nn.AdaptiveLogSoftmaxWithLoss)
    x = torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        scores, _ = model(x)
        nll, _ = model(x, targets=x)
    assert torch.allclose(scores.exp().sum(-1), torch.ones(2, 5), atol=1e-5)  # already normalised
    gathered = -torch.log_softmax(scores, -1).gather(2, x.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(nll, gathered, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,tied", [("torch", False), ("custom", False), ("torch", True), ("custom", True)])
def test_adaptive_scores_sum_to_one(impl, tied):
    model = adaptive_model(impl=impl, tied=tied)
    with torch.no_grad():
        (model.decoder.bias if tied else model.decoder.head.bias)[EOS_ID] -= 0.5
    L = 3
    strings = ["".join(s) for n in range(L + 1) for s in itertools.product("abcde", repeat=n)]
    p_stopped = math.fsum(math.exp(s.logprob) for s in score_sentences(model, codec(), strings))
    longer = torch.tensor(list(itertools.product(range(2, 7), repeat=L + 1)))
    inputs = torch.cat([torch.full((len(longer), 1), EOS_ID), longer[:, :-1]], dim=1)
    with torch.no_grad():
        nll, _ = model(inputs, targets=longer)
    # strings over a..e only; <unk> continuations are counted through its own probability below
    unk_mass = 0.0
    for n in range(L + 1):
        prefixes = list(itertools.product(range(2, 7), repeat=n))
        for prefix in prefixes:
            ids = torch.tensor([[EOS_ID, *prefix]])
            with torch.no_grad():
                scores, _ = model(ids)
            logp_prefix = sum(float(torch.log_softmax(scores[0, t], -1)[tok]) for t, tok in enumerate(prefix))
            unk_mass += math.exp(logp_prefix + float(scores[0, -1, 0]))
    p_longer = float((-nll.double().sum(1)).exp().sum())
    assert p_stopped + p_longer + unk_mass == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_adaptive_sampling_and_scoring_agree_on_a_sample(tied):
    model = adaptive_model(tied=tied)
    samples = generate(model, codec(), max_length=50, seed=3, num_samples=20)
    finished = [s for s in samples if s.stopped_at == "eos"]
    assert finished
    scored = score_sentences(model, codec(), [s.text for s in finished])
    assert [r.logprob for r in scored] == pytest.approx([s.logprob for s in finished], abs=1e-4)


def test_tied_adaptive_softmax_scores_with_the_embedding_rows():
    model = adaptive_model(tied=True)
    assert model.decoder.weight is model.encoder.weight
    names = [name for name, _ in model.named_parameters()]
    assert "decoder.weight" not in names  # one parameter, listed once (under the encoder)
    h = torch.randn(5, 6)
    with torch.no_grad():  # the head: plain tied logits over the shortlist, then the cluster entries
        head = torch.log_softmax(torch.cat([h @ model.encoder.weight[:3].t() + model.decoder.bias[:3],
                                            h @ model.decoder.cluster_weight.t() + model.decoder.cluster_bias],
                                           dim=1), dim=1)
        full = model.decoder.log_prob(h)
        tail = torch.log_softmax(h @ model.decoder.proj[0].t() @ model.encoder.weight[3:5].t()
                                 + model.decoder.bias[3:5], dim=1)
    torch.testing.assert_close(full[:, :3], head[:, :3])
    torch.testing.assert_close(full[:, 3:5], head[:, 3:4] + tail)
    # a gradient through a tail cluster reaches the shared embedding rows of that cluster only
    model.zero_grad()
    model.decoder(h, torch.tensor([3, 4, 3, 4, 3])).output.sum().backward()
    grad = model.encoder.weight.grad
    assert grad[3:5].abs().sum() > 0 and grad[5:].abs().sum() == 0


def test_adaptive_softmax_needs_tied_sizes_and_increasing_cutoffs():
    with pytest.raises(UsageError, match="tie_weights"):
        load_config(overrides=["model.softmax=adaptive", "model.tie_weights=true", "model.embedding_size=64"])
    with pytest.raises(UsageError, match="increasing"):
        load_config(overrides=["model.softmax=adaptive", "model.adaptive_cutoffs=10,5"])


def test_an_untied_tail_cluster_of_zero_width_is_refused():
    """hidden 16, div 4, three tail clusters: widths 4, 1 and 0; the last would score its words uniformly."""
    cfg = ModelConfig(hidden_size=16, embedding_size=16, softmax="adaptive", adaptive_cutoffs="8,25,50",
                      adaptive_div=4.0, tie_weights=False)
    with pytest.raises(UsageError, match="tail cluster 3 .* 0 wide"):
        check_new_model(cfg, 80)
    check_new_model(cfg, 40)  # the cutoff 50 is past the vocabulary: two clusters, 4 and 1 wide
    check_new_model(ModelConfig(**{**cfg.__dict__, "adaptive_div": 2.0}), 80)
    check_new_model(ModelConfig(**{**cfg.__dict__, "tie_weights": True}), 80)
    with pytest.warns(UserWarning, match="zero-element"):  # torch's only sign of the empty projection
        build_model(cfg, 80)  # a run saved before the check still loads

@pytest.mark.parametrize("tied", [False, True])
def test_an_adaptive_run_trains_saves_and_reloads(tmp_path, tied):
    corpus = tmp_path / "c.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    corpus.write_text("".join(" ".join(words[(i + j) % 12] for j in range(6)) + "\n" for i in range(200)))
    cfg = load_config(overrides=["data.level=word", "model.softmax=adaptive", "model.adaptive_cutoffs=4,8",
                                 f"model.embedding_size={16 if tied else 8}", "model.hidden_size=16",
                                 f"model.tie_weights={str(tied).lower()}", "model.device=cpu",
                                 "train.batch_size=4", "train.seq_len=8", "train.max_steps=150", "train.lr=0.02",
                                 "train.eval_interval=0", "data.val_fraction=0.1"])
    result = train(cfg, corpus, tmp_path / "run", show_progress=False, cache_dir=tmp_path / "cache")
    assert result.val_loss < 1.0  # a cyclic text: far below the uniform log(15) = 2.7
    model, loaded_codec, _ = load_run(tmp_path / "run")
    assert model.adaptive
    line = "beta gamma delta epsilon zeta eta"  # a line of the corpus: only its first word is a guess
    (a,) = score_sentences(model, loaded_codec, [line])
    model2, _, _ = load_run(tmp_path / "run")
    (b,) = score_sentences(model2, loaded_codec, [line])
    assert a.logprob == b.logprob
    assert a.logprob > 7 * math.log(1 / 15)  # better than uniform over the 15 ids


def test_each_tail_cluster_projects_h_with_its_own_matrix():
    """Catches: tail_log_prob uses proj[0] for every cluster (still normalised, so sum-to-one tests pass)."""
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", impl="torch", layers=1, embedding_size=6, hidden_size=6, softmax="adaptive",
                      adaptive_cutoffs="3,5", adaptive_div=2.0, tie_weights=True, device="cpu")
    model = build_model(cfg, 7).eval()  # a head of 3 ids, clusters [3, 5) and [5, 7)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.8)
    dec, w = model.decoder, model.encoder.weight
    assert not torch.equal(dec.proj[0], dec.proj[1])
    h = torch.randn(5, 6)
    with torch.no_grad():
        head = torch.log_softmax(torch.cat([h @ w[:3].t() + dec.bias[:3],
                                            h @ dec.cluster_weight.t() + dec.cluster_bias], dim=1), dim=1)
        full = dec.log_prob(h)
        for i, (a, b) in enumerate([(3, 5), (5, 7)]):
            tail = torch.log_softmax(h @ dec.proj[i].t() @ w[a:b].t() + dec.bias[a:b], dim=1)
            torch.testing.assert_close(full[:, a:b], head[:, 3 + i:4 + i] + tail)
        targets = torch.tensor([5, 6, 3, 0, 6])
        torch.testing.assert_close(dec(h, targets).output, full.gather(1, targets.unsqueeze(1)).squeeze(1))


@pytest.mark.parametrize("tied", [False, True])
def test_a_tail_cluster_no_target_falls_in_gets_zero_gradients_and_the_loss_is_unchanged(tied, monkeypatch):
    """Catches: a skipped cluster's weights left without a gradient (None). Under torchrun that happened on
    one rank only and DistributedDataParallel's reductions fell out of step; the zeros keep the ranks in step
    and one process training as several do. Ids 0-2 are the head, 3-4 cluster 1, 5-6 cluster 2."""
    model = adaptive_model(tied=tied).train()
    tails = model.decoder.proj if tied else model.decoder.tail
    x = torch.tensor([[1, 2, 2, 1]])
    for targets, idle in ((torch.tensor([[2, 1, 3, 4]]), {1}), (torch.tensor([[2, 1, 0, 2]]), {0, 1}),
                          (torch.tensor([[3, 5, 1, 6]]), set())):
        model.zero_grad(set_to_none=True)
        nll, _ = model(x, targets=targets)
        with monkeypatch.context() as m:
            m.setattr(type(model), "_idle_tail_parameters", lambda self, targets: [], raising=False)
            assert torch.equal(nll, model(x, targets=targets)[0])  # the same losses as without the zero term
        nll.mean().backward()
        for i, tail in enumerate(tails):
            for p in [tail] if tied else list(tail.parameters()):
                assert p.grad is not None, (i, targets)
                assert (not p.grad.any()) == (i in idle), (i, targets)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_the_zero_gradient_term_takes_a_zero_wide_tail_of_an_older_run():
    """Catches: the term indexing each idle weight's first value, an IndexError for the 0-wide tail
    projection that an older untied run may hold (new runs are refused one; old ones still load and resume)."""
    torch.manual_seed(0)
    cfg = ModelConfig(cell="gru", impl="torch", embedding_size=4, hidden_size=6, softmax="adaptive",
                      adaptive_cutoffs="3,5", adaptive_div=8.0, device="cpu")
    model = build_model(cfg, 7).train()
    assert any(p.numel() == 0 for p in model.decoder.tail.parameters())
    nll, _ = model(torch.tensor([[1, 2, 2]]), targets=torch.tensor([[2, 1, 0]]))  # every cluster idle
    nll.mean().backward()
    assert all(p.grad is not None for p in model.decoder.tail.parameters())
