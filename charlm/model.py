"""The language model: Embedding -> stacked recurrent layers -> dropout -> Linear.

`build_model` is the factory: `impl: torch` takes nn.RNN / nn.GRU / nn.LSTM,
`impl: custom` takes `cells.CustomRNN`; both have the same parameter names and
the same forward interface, so the rest of charlm never asks which it holds.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Callable, Union

import torch
from torch import Tensor, nn

from .adaptive import TiedAdaptiveSoftmax
from .cells import CustomRNN, dropout, uniform_masks
from .config import ModelConfig
from .errors import UsageError
from .products import output_linear

State = Union[Tensor, tuple[Tensor, Tensor]]


class RNNLM(nn.Module):
    """forward(tokens (B, T), state) -> (logits (B, T, V), state);
    forward(tokens, state, targets (B, T)) -> (negative log-likelihood of each target (B, T), state).

    "Logits" are scores whose log_softmax is the model's log-probability: with
    the adaptive softmax they are the log-probabilities themselves. Training and
    evaluation pass `targets`, which the adaptive softmax answers without
    computing the whole distribution.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.encoder = nn.Embedding(vocab_size, cfg.embedding_size)
        between = cfg.dropout if cfg.layers > 1 else 0.0
        self._shells = None  # one-layer copies of a torch stack with dropout between its layers or on W_hh
        if cfg.impl == "custom":
            self.rnn = CustomRNN(cfg.cell, cfg.embedding_size, cfg.hidden_size, cfg.layers, between,
                                 cfg.nonlinearity, cfg.gru_form, weight_drop=cfg.weight_drop)
        else:
            self.rnn = _torch_rnn(cfg, cfg.embedding_size, cfg.layers, between)
            if between > 0 or cfg.weight_drop > 0:
                # one-layer modules of the same kind, for _layer_by_layer (dropout between the layers, or
                # on W_hh); a tuple, so not registered: the parameters stay the stack's own, and the
                # shells, made on the meta device, allocate none
                self._shells = (_torch_rnn(cfg, cfg.embedding_size, 1, 0.0, "meta"),
                                _torch_rnn(cfg, cfg.hidden_size, 1, 0.0, "meta"))
                for shell in self._shells:
                    # On CUDA, a module given new weights (functional_call) re-flattens them for cuDNN, which
                    # moves the tensors it was given, the stack's own parameters, into a new buffer at every
                    # call: the shells leave them where they are, as AWD-LSTM's WeightDrop does.
                    shell.flatten_parameters = _leave_weights_in_place
        cutoffs = adaptive_cutoffs(cfg, vocab_size)
        if cfg.softmax == "adaptive" and cutoffs and cfg.tie_weights:
            self.decoder = TiedAdaptiveSoftmax(self.encoder.weight, cutoffs)
        elif cfg.softmax == "adaptive" and cutoffs:
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden_size, vocab_size, cutoffs,
                                                         div_value=cfg.adaptive_div, head_bias=True)
        else:  # a vocabulary smaller than the first cutoff needs no clusters
            self.decoder = nn.Linear(cfg.hidden_size, vocab_size)
        self.adaptive = isinstance(self.decoder, (nn.AdaptiveLogSoftmaxWithLoss, TiedAdaptiveSoftmax))
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if cfg.tie_weights and not self.adaptive:
            self.decoder.weight = self.encoder.weight  # Press & Wolf (2017), "Using the Output Embedding..."

    def forward(self, tokens: Tensor, state: State | None = None,
                targets: Tensor | None = None) -> tuple[Tensor, State]:
        if self._looks_up(tokens):
            out, state = self.rnn.forward_tokens(tokens, self.encoder.weight, state)  # (B, T, H)
        else:
            emb = self.encoder(tokens)  # (B, T, E)
            p = self.cfg.embedding_dropout
            if p > 0 and self.training:  # one draw per token type: every occurrence of a dropped type is zeroed
                keep = torch.empty(self.vocab_size, device=emb.device).bernoulli_(1 - p).div_(1 - p)
                emb = emb * keep[tokens].unsqueeze(-1).to(emb.dtype)
            emb = dropout(emb, self.cfg.dropout, self.training)
            if self.training and self._shells is not None and (self.cfg.weight_drop > 0 or uniform_masks(emb)):
                out, state = _layer_by_layer(self.rnn, self._shells, emb, state, self.cfg.weight_drop)
            else:
                out, state = self.rnn(emb, state)  # (B, T, H)
        out = dropout(out, self.cfg.dropout, self.training)
        B, T, H = out.shape
        if targets is None:
            if self.adaptive:
                return self.decoder.log_prob(out.reshape(B * T, H)).view(B, T, -1), state  # (B, T, V)
            return output_linear(out, self.decoder.weight, self.decoder.bias), state  # (B, T, V)
        if T > 1 and B > 1 and out.transpose(0, 1).is_contiguous():
            # the custom layers work time-major and hand back a (B, T, H) view of (T, B, H): the loss taken
            # in that order spares a copy of the outputs, and of their gradient
            return self._nll(out.transpose(0, 1), targets.t()).t(), state
        return self._nll(out, targets), state

    def _nll(self, out: Tensor, targets: Tensor) -> Tensor:
        """-log p of each target: out (X, Y, H) and targets (X, Y) -> (X, Y)."""
        X, Y, H = out.shape
        if self.adaptive:
            # float32 in: under CUDA's bf16 autocast cuDNN hands back bf16 outputs, and nn.AdaptiveLogSoftmaxWithLoss
            # fills a buffer made like its input (bf16) with its tails' float32 log-probabilities (reasoned from
            # its code by a review; tests/test_cuda.py checks it where a GPU is lent). A no-op in float32.
            nll = -self.decoder(out.reshape(X * Y, H).float(), targets.reshape(-1)).output.view(X, Y)
            if self.training and torch.is_grad_enabled():
                # A tail cluster that no target falls in is skipped, which left its weights without a gradient:
                # under DistributedDataParallel, on one rank only, and its reductions fell out of step (gloo
                # aborted the job). Such a cluster's weights join the graph with a zero weight: a gradient of
                # zeros where it was None, in one process as under torchrun, so that the two still train
                # alike (find_unused_parameters would leave them None, at the price of a warning on every run).
                idle = self._idle_tail_parameters(targets)
                if idle:
                    nll = nll + 0.0 * sum(p.reshape(-1)[:1].sum() for p in idle)  # [:1]: a 0-wide tail
            return nll
        logits = output_linear(out, self.decoder.weight, self.decoder.bias)
        return nn.functional.cross_entropy(logits.float().reshape(X * Y, -1), targets.reshape(-1),
                                           reduction="none").view(X, Y)

    def _idle_tail_parameters(self, targets: Tensor) -> list[nn.Parameter]:
        """The weights of the adaptive softmax's tail clusters that no target falls in."""
        cutoffs = self.decoder.cutoffs  # [head end, ..., vocabulary size], in both forms
        tails = self.decoder.proj if isinstance(self.decoder, TiedAdaptiveSoftmax) else self.decoder.tail
        bounds = getattr(self, "_tail_bounds", None)
        if bounds is None or bounds.device != targets.device:  # made once, not copied to the device every step
            bounds = self._tail_bounds = torch.tensor(cutoffs[:-1], device=targets.device)
        counts = torch.bucketize(targets.reshape(-1), bounds, right=True).bincount(
            minlength=len(cutoffs)).tolist()  # [head, cluster 1, ...]
        return [p for i, tail in enumerate(tails) if counts[i + 1] == 0
                for p in ([tail] if isinstance(tail, nn.Parameter) else tail.parameters())]

    def _looks_up(self, tokens: Tensor) -> bool:
        """The custom layers' first input projection read from a table of the vocabulary's rows
        (CustomRNN.forward_tokens): their fast path, nothing dropped from the embeddings, and at least
        twice as many tokens as the vocabulary has rows, so that the table costs less than the products it
        replaces (a character model's training windows, evaluation and batched scoring; not a word model's).
        On the CPU only, where it was measured: on a GPU the products are cheap, and the gradient's
        scatter into a few rows would be many colliding atomic additions."""
        dropping = self.training and (self.cfg.dropout > 0 or self.cfg.embedding_dropout > 0)
        return (isinstance(self.rnn, CustomRNN) and self.rnn.fast and not dropping
                and tokens.device.type == "cpu" and 2 * self.vocab_size <= tokens.numel())

    def step(self, token: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """One token per stream (B,) -> logits (B, V): constant work per generated token."""
        with _without_onednn(), _step_functions(self.rnn):
            logits, state = self.forward(token.unsqueeze(1), state)
        return logits[:, 0], state

    @property
    def output_width(self) -> int:
        """Scores held for every position read: the vocabulary, or for an adaptive softmax its head (its frequent
        tokens and one per cluster), since a cluster's are computed only for the targets that fall in it."""
        if self.adaptive:
            return int(self.decoder.cutoffs[0]) + len(self.decoder.cutoffs) - 1
        return self.vocab_size

    @property
    def position_width(self) -> int:
        """Floats a forward pass without gradients holds at most for each position of a window: a recurrent
        layer's gate pre-activations (the whole window's, computed before its time loop), its input and its output;
        then the last layer's output, the scores and their log-softmax. At character level the gates fill the
        memory, not the scores (4 x 256 floats against 2 x 66 for the GRU of the shipped config)."""
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[self.cfg.cell]
        hidden, into = self.cfg.hidden_size, max(self.cfg.embedding_size, self.cfg.hidden_size)
        return max((gates + 1) * hidden + into, hidden + 2 * self.output_width)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        h = torch.zeros(self.cfg.layers, batch_size, self.cfg.hidden_size, device=device)
        return (h, h.clone()) if self.cfg.cell == "lstm" else h


def adaptive_cutoffs(cfg: ModelConfig, vocab_size: int) -> list[int]:
    """The cutoffs of the adaptive softmax that fall inside the vocabulary."""
    return [int(c) for c in cfg.adaptive_cutoffs.split(",") if 0 < int(c) < vocab_size - 1]


def check_new_model(cfg: ModelConfig, vocab_size: int) -> None:
    """What a new run must not build (runs saved before this check still load): an untied adaptive softmax
    whose tail cluster k maps h through hidden_size // adaptive_div^k = 0 dimensions, so that the cluster's
    distribution is uniform whatever the context."""
    if cfg.softmax != "adaptive" or cfg.tie_weights:
        return
    for k in range(1, len(adaptive_cutoffs(cfg, vocab_size)) + 1):
        width = int(cfg.hidden_size // (cfg.adaptive_div ** k))
        if width < 1:
            raise UsageError(f"model.adaptive_div {cfg.adaptive_div:g}: tail cluster {k} of the adaptive softmax "
                             f"would be {cfg.hidden_size} // {cfg.adaptive_div:g}^{k} = 0 wide and could not tell "
                             f"its words apart; lower adaptive_div, list fewer adaptive_cutoffs, or tie_weights")


def _torch_rnn(cfg: ModelConfig, input_size: int, layers: int, between: float, device: str | None = None) -> nn.RNNBase:
    """nn.RNN / nn.GRU / nn.LSTM (batch first) for the config's cell."""
    if cfg.cell == "rnn":
        return nn.RNN(input_size, cfg.hidden_size, layers, nonlinearity=cfg.nonlinearity, dropout=between,
                      batch_first=True, device=device)
    module = nn.LSTM if cfg.cell == "lstm" else nn.GRU
    return module(input_size, cfg.hidden_size, layers, dropout=between, batch_first=True, device=device)


def _layer_by_layer(rnn: nn.RNNBase, shells: tuple[nn.RNNBase, nn.RNNBase], x: Tensor,
                    state: State | None, weight_drop: float = 0.0) -> tuple[Tensor, State]:
    """rnn(x, state) in training, one layer at a time, with `cells.dropout` between the layers and, with
    weight_drop, on a DropConnect copy of each layer's W_hh (one mask per window, as AWD-LSTM's WeightDrop).

    nn.RNN / nn.GRU / nn.LSTM draw the mask between their layers inside torch's call, one value at a time
    on a CPU that is not Intel's (cells.dropout): 2.4 ms of the word config's 70 ms training step on the
    Zen 4 host of 2026-12-06; and their kernels read W_hh as it is, with no place for a mask. Each layer
    here is the one-layer shell (the first takes the embeddings, the second any later layer) run on that
    layer's own parameters through torch.func.functional_call, so the gradients reach the stack's
    parameters; torch runs a stack's layers one by one on the CPU anyway. Forward hooks on the stack itself
    do not run here.
    """
    lstm = isinstance(rnn, nn.LSTM)
    if state is not None and any(s.dim() != 3 or s.shape[0] != rnn.num_layers
                                 for s in (state if lstm else (state,))):
        return rnn(x, state)  # torch's own message for a state that does not fit the stack
    finals = []
    for layer in range(rnn.num_layers):
        weights = {f"{name}_l0": getattr(rnn, f"{name}_l{layer}")
                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        if weight_drop > 0:  # DropConnect: one mask on W_hh for the whole window
            weights["weight_hh_l0"] = dropout(weights["weight_hh_l0"], weight_drop, True)
        if state is None:
            initial = None
        else:
            initial = tuple(s[layer:layer + 1] for s in state) if lstm else state[layer:layer + 1]
        with _quiet_weight_compaction(x.is_cuda):
            x, final = torch.func.functional_call(shells[min(layer, 1)], weights, (x, initial))
        finals.append(final)
        if layer < rnn.num_layers - 1:
            x = dropout(x, rnn.dropout, True)
    if lstm:
        return x, (torch.cat([h for h, _ in finals]), torch.cat([c for _, c in finals]))
    return x, torch.cat(finals)


def _leave_weights_in_place() -> None:
    """The shells' flatten_parameters (see RNNLM.__init__)."""


@contextmanager
def _quiet_weight_compaction(cuda: bool):
    """On CUDA, cuDNN copies a shell's weights (left in place) into one block at each call and warns that it
    does; the CPU's path is left as it is."""
    if not cuda:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
        yield


@contextmanager
def _step_functions(rnn: nn.Module):
    """The custom layers' fast path sets up a whole-sequence autograd Function and its buffers, which
    for a single time step costs more than the step: one-token steps run the cell functions directly."""
    fast = getattr(rnn, "fast", None)
    if fast:
        rnn.fast = False
    try:
        yield
    finally:
        if fast:
            rnn.fast = True


@contextmanager
def _without_onednn():
    """nn.LSTM / nn.GRU / nn.RNN on a CPU run through oneDNN, which re-lays out the weights on every
    call: for one time step that costs more than the step (LSTM 512: 1.2 ms a token against 0.6 ms
    on torch's own kernels). Turned off for the duration of one step."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def build_model(cfg: ModelConfig, vocab_size: int) -> RNNLM:
    return RNNLM(cfg, vocab_size)


def map_state(state, fn):
    """`fn` applied to a recurrent state: (layers, B, H), or each of the LSTM's pair (h, c); None stays None."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return tuple(fn(s) for s in state)
    return fn(state)


def detach_state(state: State | None) -> State | None:
    """Cut the graph between windows of truncated BPTT, keeping the values."""
    return map_state(state, Tensor.detach)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding / decoder weight counts once)."""
    return sum(p.numel() for p in model.parameters())


class EvaluationStopped(Exception):
    """`stream_nll` was asked to stop (a signal arrived) before it read the whole split."""


MAX_LOG_PERPLEXITY = 700  # a float64 overflows past e ** 709.78


def perplexity(loss: float) -> float:
    """e ** loss (nats per token), capped at e ** MAX_LOG_PERPLEXITY: a diverged model's figure stays a float
    instead of raising."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


# Floats a `stream_nll` window holds at once (2^27, 512 MiB), counted by RNNLM.position_width: its scores, their
# log-softmax, and a layer's gates and states. Beyond it the streams are read in shorter windows, and beyond one
# step of them in groups of rows. Training's validation does not reach it with the shipped configs, nor with a
# full softmax over 13,777 words at their 10 streams (2^25.7), so such runs read their split as before. Counting
# scores alone, `charlm eval --streams 1000` at that vocabulary took 1.9 GB (7.1 GB before any budget), and
# `--streams 8000` of the character-level GRU 256 took 10.1 GB, all of it gates and states.
STREAM_LOGIT_BUDGET = 1 << 27


@torch.no_grad()
def stream_nll(model: RNNLM, rows: Tensor, mask: Tensor, window: int = 256,
               device: torch.device | str = "cpu",
               should_stop: Callable[[], bool] | None = None,
               budget: int = STREAM_LOGIT_BUDGET) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and target count of streams read left to right.

    rows (S, L) and mask (S, L) come from `data.eval_streams`; the state is
    carried from window to window, so the result does not depend on `window`
    (up to float rounding). At most `budget` floats (`position_width` a position read) are held at once:
    windows shrink, and rows are read in groups, where all S rows would hold more.
    `should_stop` is asked before each window; when it says yes, EvaluationStopped is raised.
    """
    was_training = model.training
    model.eval()
    width = model.position_width
    steps = max(1, min(window, budget // (rows.shape[0] * width)))
    group = max(1, min(rows.shape[0], budget // (steps * width)))
    total, count = 0.0, 0
    try:
        for first in range(0, rows.shape[0], group):
            part, part_mask, state = rows[first:first + group], mask[first:first + group], None
            for start in range(0, rows.shape[1] - 1, steps):
                if should_stop is not None and should_stop():
                    raise EvaluationStopped
                end = min(start + steps, rows.shape[1] - 1)
                x = part[:, start:end].long().to(device)
                y = part[:, start + 1:end + 1].long().to(device)
                m = part_mask[:, start + 1:end + 1].to(device)
                nll, state = model(x, state, targets=y)
                total += float((nll.float() * m).sum(dtype=torch.float64))
                count += int(m.sum())
    finally:
        model.train(was_training)
    return total, count
