"""An adaptive softmax whose output vectors are the input embeddings (tied weights).

The vocabulary is sorted by frequency, so its first ids are the common tokens.
The head is a softmax over the first `cutoffs[0]` tokens plus one entry per
tail cluster; tail cluster i is a softmax over the tokens [cutoffs[i],
cutoffs[i+1]) of its own. A token's probability is exact and sums to one:

    P(w | h) = P_head(w | h)                                  for w in the head
    P(w | h) = P_head(cluster i | h) * P_i(w | h)             for w in cluster i

Every output vector of a word is its embedding row (Press & Wolf's tying,
as in the full softmax); each tail cluster first maps h through a square
projection of its own (started at the identity), so the rarer words can be
scored in a space of their own. Training pays the head for every position
but a tail only for the positions whose target falls in it: with the head at
the 2,000 commonest words of a 14,000-word vocabulary, about a quarter of
the full softmax's work. nn.AdaptiveLogSoftmaxWithLoss (Grave et al., 2017)
is the untied version, which `model.softmax: adaptive` uses without tying.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .products import output_linear


class AdaptiveOutput(NamedTuple):
    output: Tensor  # log-probability of each target (N,)


class TiedAdaptiveSoftmax(nn.Module):
    """forward(h (N, H), targets (N,)) -> AdaptiveOutput; log_prob(h (N, H)) -> (N, V)."""

    def __init__(self, embedding: nn.Parameter, cutoffs: list[int]):
        super().__init__()
        vocab_size, size = embedding.shape
        self.weight = embedding  # the encoder's Parameter itself: saved once, as for a tied full softmax
        self.cutoffs = [*cutoffs, vocab_size]
        self.shortlist = cutoffs[0]
        self.sizes = [b - a for a, b in zip([0, *cutoffs], self.cutoffs)]  # rows of the head, then of each cluster
        self.register_buffer("bounds", torch.tensor(cutoffs), persistent=False)  # for bucketize; not saved
        clusters = len(cutoffs)
        self.bias = nn.Parameter(torch.zeros(vocab_size))             # a bias for every token
        self.cluster_weight = nn.Parameter(torch.empty(clusters, size))
        self.cluster_bias = nn.Parameter(torch.zeros(clusters))
        nn.init.uniform_(self.cluster_weight, -0.1, 0.1)
        self.proj = nn.ParameterList(nn.Parameter(torch.eye(size)) for _ in range(clusters))

    def _parts(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The rows of the weight and bias of the head and of each cluster, as views.

        One `split` rather than a slice per part: the gradient of a slice is a full-size
        (V, H) tensor of zeros with the slice's rows filled in, one per part, while split's
        gradient joins the parts' gradients into one (V, H) tensor. The training step of
        configs/word_wikitext.yaml became 1.05-1.09x faster at V = 13,777 and 1.18x at
        V = 33,278 (medians, two threads; docs/benchmarks.md)."""
        return self.weight.split(self.sizes), self.bias.split(self.sizes)

    def head_log_prob(self, h: Tensor, parts: tuple) -> Tensor:
        """(N, shortlist + clusters): log P of each head token and of each tail cluster; `parts` from _parts()."""
        weights, biases = parts
        # one product with the cluster rows joined to the head's: joining the two products' logits instead
        # hands their gradients back as strided slices, which the backward products copy first (1.4 ms a
        # training step of configs/word_wikitext.yaml, against 0.1 ms for joining the weights)
        logits = output_linear(h, torch.cat([weights[0], self.cluster_weight]),
                               torch.cat([biases[0], self.cluster_bias]))
        return torch.log_softmax(logits.float(), dim=1)

    def tail_log_prob(self, h: Tensor, i: int, parts: tuple) -> Tensor:
        """(N, size of cluster i): log P(w | cluster i, h); `parts` from _parts()."""
        weights, biases = parts
        logits = output_linear(output_linear(h, self.proj[i]), weights[i + 1], biases[i + 1])
        return torch.log_softmax(logits.float(), dim=1)

    def forward(self, h: Tensor, targets: Tensor) -> AdaptiveOutput:
        parts = self._parts()
        head = self.head_log_prob(h, parts)
        c = self.shortlist
        targets = targets.contiguous()  # bucketize warns of a strided one (a (B, 1) batch's, read time-major)
        cluster = torch.bucketize(targets, self.bounds, right=True)
        # head index of each target: the token itself in the shortlist, else its cluster's entry
        head_index = torch.where(cluster == 0, targets, c + cluster - 1)
        out = head.gather(1, head_index.unsqueeze(1)).squeeze(1)
        for i in range(len(self.cutoffs) - 1):
            rows = (cluster == i + 1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            tail = self.tail_log_prob(h.index_select(0, rows), i, parts)
            inside = (targets.index_select(0, rows) - self.cutoffs[i]).unsqueeze(1)
            out = out.index_add(0, rows, tail.gather(1, inside).squeeze(1))
        return AdaptiveOutput(out)

    def log_prob(self, h: Tensor) -> Tensor:
        parts = self._parts()
        head = self.head_log_prob(h, parts)
        c = self.shortlist
        out = [head[:, :c]]
        for i in range(len(self.cutoffs) - 1):
            out.append(head[:, c + i:c + i + 1] + self.tail_log_prob(h, i, parts))
        return torch.cat(out, dim=1)
