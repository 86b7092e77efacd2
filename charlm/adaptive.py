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
from torch.nn import functional as F


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
        self.register_buffer("bounds", torch.tensor(cutoffs), persistent=False)  # for bucketize; not saved
        clusters = len(cutoffs)
        self.bias = nn.Parameter(torch.zeros(vocab_size))             # a bias for every token
        self.cluster_weight = nn.Parameter(torch.empty(clusters, size))
        self.cluster_bias = nn.Parameter(torch.zeros(clusters))
        nn.init.uniform_(self.cluster_weight, -0.1, 0.1)
        self.proj = nn.ParameterList(nn.Parameter(torch.eye(size)) for _ in range(clusters))

    def head_log_prob(self, h: Tensor) -> Tensor:
        """(N, shortlist + clusters): log P of each head token and of each tail cluster."""
        c = self.shortlist
        logits = torch.cat([F.linear(h, self.weight[:c], self.bias[:c]),
                            F.linear(h, self.cluster_weight, self.cluster_bias)], dim=1)
        return torch.log_softmax(logits.float(), dim=1)

    def tail_log_prob(self, h: Tensor, i: int) -> Tensor:
        """(N, size of cluster i): log P(w | cluster i, h)."""
        lo, hi = self.cutoffs[i], self.cutoffs[i + 1]
        logits = F.linear(F.linear(h, self.proj[i]), self.weight[lo:hi], self.bias[lo:hi])
        return torch.log_softmax(logits.float(), dim=1)

    def forward(self, h: Tensor, targets: Tensor) -> AdaptiveOutput:
        head = self.head_log_prob(h)
        c = self.shortlist
        cluster = torch.bucketize(targets, self.bounds, right=True)
        # head index of each target: the token itself in the shortlist, else its cluster's entry
        head_index = torch.where(cluster == 0, targets, c + cluster - 1)
        out = head.gather(1, head_index.unsqueeze(1)).squeeze(1)
        for i in range(len(self.cutoffs) - 1):
            rows = (cluster == i + 1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            tail = self.tail_log_prob(h.index_select(0, rows), i)
            inside = (targets.index_select(0, rows) - self.cutoffs[i]).unsqueeze(1)
            out = out.index_add(0, rows, tail.gather(1, inside).squeeze(1))
        return AdaptiveOutput(out)

    def log_prob(self, h: Tensor) -> Tensor:
        head = self.head_log_prob(h)
        c = self.shortlist
        parts = [head[:, :c]]
        for i in range(len(self.cutoffs) - 1):
            parts.append(head[:, c + i:c + i + 1] + self.tail_log_prob(h, i))
        return torch.cat(parts, dim=1)
