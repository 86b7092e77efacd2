"""Generation: start from the state after `<eos>`, feed each sampled token back.

The hidden state is kept from step to step, so every new token costs one cell
step (constant work per token), not a pass over the whole history.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import MAX_SEED
from .errors import UsageError
from .model import RNNLM, map_state
from .score import LOGIT_BUDGET
from .stepper import Stepper
from .tokenizer import EOS_ID, UNK_ID, TextCodec

_UNK_INDEX = torch.tensor([UNK_ID])
# Below this the logits / temperature could overflow float32; 0 is the greedy argmax.
MIN_TEMPERATURE = 1e-6


@dataclass
class Sample:
    text: str             # the prime followed by the generated text (without the final <eos>)
    generated: str        # the generated text alone
    tokens: list[str]     # generated tokens, "<eos>" last if the sample stopped there
    logprob: float        # natural log-probability of the generated tokens under the model (temperature 1)
    stopped_at: str       # "eos" or "max_length"
    prime_unk: int        # tokens of the prime outside the vocabulary


def check_options(max_length: int, temperature: float, top_k: int, top_p: float, num_samples: int,
                  seed: int | None = None) -> None:
    if max_length < 1:
        raise UsageError(f"--max-length must be at least 1, got {max_length}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise UsageError(f"--temperature must be 0 (greedy) or a finite number from {MIN_TEMPERATURE:g} up, "
                         f"got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if not (0 < top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED} (2^63 - 1), got {seed}")


def next_token_distribution(logits: Tensor, temperature: float, top_k: int, top_p: float,
                            allow_unk: bool) -> Tensor:
    """Logits (B, V) -> sampling probabilities (B, V): `<unk>` masked, temperature, top-k, nucleus."""
    logits = logits.float().clone()
    if not allow_unk:
        logits[:, UNK_ID] = -torch.inf
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass
class _Prime:
    text: str                # as typed
    last_line: str           # its last line as typed, where the continuation goes on (word level)
    context: tuple[str, ...]  # that line's words, which the continuation's spacing goes on from: a space after
    # the prime or not, a number cut by it ("at 10" + ":30") written as one, and whether a straight quote opens

    def continued(self, ids: list[int], codec: TextCodec) -> tuple[str, str]:
        """(the prime and the continuation `ids` as one text, the continuation's own text). The prime is as
        typed, which the join cannot see: where the two would read as other tokens ("dogs'" + "bone" as
        "dogs'bone", a quote counted as opening that was typed closing), a space parts them."""
        joined = codec.decode(ids, self.context)
        if self.context and not joined.startswith(" "):
            first = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
            line = joined.split("\n", 1)[0]
            if codec.tokenizer.split(self.last_line + line) != [*self.context, *codec.vocab.decode(first)]:
                joined = " " + joined
        return self.text + joined, joined[1:] if self.context and joined.startswith(" ") else joined


# Tokens are kept in blocks of this many steps (and plain sampling draws its noise a block at a time).
BLOCK_STEPS = 64
# Samples are drawn in groups of at most this many streams: memory stays bounded for any --num-samples
# (the state, the noise and the tokens of one group), and the command prints each group as it is done.
GROUP = 256


def generate(model: RNNLM, codec: TextCodec, prime: str = "", max_length: int = 200, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int | None = None,
             allow_unk: bool = False, device: torch.device | str = "cpu") -> list[Sample]:
    """`num_samples` texts, each stopping at `<eos>` or after `max_length` tokens (see `iter_samples`)."""
    return list(iter_samples(model, codec, prime, max_length, temperature, top_k, top_p, num_samples, seed,
                             allow_unk, device))


def iter_samples(model: RNNLM, codec: TextCodec, prime: str = "", max_length: int = 200, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int | None = None,
                 allow_unk: bool = False, device: torch.device | str = "cpu") -> Iterator[Sample]:
    """The samples one by one, drawn in parallel groups of up to GROUP streams from one random generator."""
    check_options(max_length, temperature, top_k, top_p, num_samples, seed)
    model.eval()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    prime_lines = codec.tokenizer.lines(prime) if prime else []
    prime_ids: list[int] = []
    for i, line in enumerate(prime_lines):
        prime_ids += codec.encode_line(line)
        if i < len(prime_lines) - 1 or prime.endswith("\n"):
            prime_ids.append(EOS_ID)
    # The prime is shown as it was typed (not as its tokens: an unknown character stays itself, not
    # "<unk>"); at word level the tokenizer's spacing rule decides whether a space joins it to the
    # continuation, and how it goes on, from the words of the prime's last line (none after a final newline
    # or space).
    last_line = prime_lines[-1] if prime_lines and not prime.endswith("\n") else ""
    last_words = (codec.tokenizer.split(last_line) if codec.tokenizer.level == "word" and last_line
                  and not last_line[-1].isspace() else [])
    shown = prime[:-1] if prime.endswith("\r") else prime  # a line end the tokenizer drops too ("a\r")
    shown_prime = _Prime(shown, last_line, tuple(last_words))
    prime_unk = sum(1 for i in prime_ids if i == UNK_ID)
    primed = _read_prime(model, prime_ids, device)
    for first in range(0, num_samples, GROUP):
        yield from _group(model, codec, primed, shown_prime, prime_unk, min(GROUP, num_samples - first),
                          max_length, temperature, top_k, top_p, allow_unk, generator, device)


@torch.no_grad()
def _read_prime(model: RNNLM, prime_ids: list[int], device: torch.device | str, window: int = 256):
    """The logits (1, V) after `<eos>` and the prime, and the state there: read once for all the samples (the
    same for each), in windows of at most `window` tokens and LOGIT_BUDGET scores, so that a long prime costs
    memory neither by its length nor by the number of samples."""
    ids = torch.tensor([[EOS_ID] + prime_ids], device=device)
    # without targets even an adaptive softmax gives every position its whole distribution
    steps = max(1, min(window, LOGIT_BUDGET // model.vocab_size))
    state = None
    for begin in range(0, ids.shape[1], steps):
        logits, state = model(ids[:, begin:begin + steps], state)
    return logits[:, -1], state


def _rows(primed, n: int):
    """The prime's logits and state repeated for n samples."""
    logits, state = primed
    return logits.expand(n, -1).contiguous(), map_state(state, lambda s: s.expand(-1, n, -1).contiguous())


@torch.no_grad()
def _group(model: RNNLM, codec: TextCodec, primed, prime: _Prime, prime_unk: int, n: int,
           max_length: int, temperature: float, top_k: int, top_p: float, allow_unk: bool,
           generator: torch.Generator, device: torch.device | str) -> list[Sample]:
    logits, state = _rows(primed, n)  # (n, V), and the state after the prime for each of the n samples
    if top_k == 0 and top_p == 1.0 and not model.adaptive:
        ids, step_logp = _sample_fast(model, logits, state, max_length, temperature, allow_unk, generator)
    else:
        ids, step_logp = _sample_general(model, logits, state, max_length, temperature, top_k, top_p,
                                         allow_unk, generator, device)
    # A sample ends at its first <eos>; what a stream drew after that (while others went on) is dropped.
    is_eos = ids == EOS_ID
    alive = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # no <eos> before this step
    lengths = alive.sum(dim=1)
    logprob = (step_logp.double() * alive).sum(dim=1)
    samples = []
    for b in range(n):
        ids_b = ids[b, : int(lengths[b])].tolist()
        stopped = "eos" if ids_b and ids_b[-1] == EOS_ID else "max_length"
        body = ids_b[:-1] if stopped == "eos" else ids_b
        text, generated = prime.continued(body, codec)
        samples.append(Sample(text, generated, codec.vocab.decode(ids_b),
                              float(logprob[b]), stopped, prime_unk))
    return samples


def _gumbel_noise(steps: int, batch: int, vocab: int, temperature: float, allow_unk: bool,
                  generator: torch.Generator) -> Tensor:
    """Noise whose argmax with the scaled logits is a draw from softmax(logits / T) (the Gumbel-max trick).

    -log E with E ~ Exponential(1) is a standard Gumbel variable, and argmax_i(z_i + g_i) is i with
    probability softmax(z)_i exactly. E is drawn in float64 (an E of exactly 0, an infinite g, has
    probability about 2^-53), g is kept in float32. Temperature 0 takes no noise (the argmax).
    `<unk>` gets -inf unless allowed.
    """
    if temperature == 0:
        noise = torch.zeros(steps, batch, vocab)
    else:
        noise = torch.empty(steps, batch, vocab, dtype=torch.float64).exponential_(generator=generator)
        noise = noise.log_().neg_().float()
    if not allow_unk:
        noise[:, :, UNK_ID] = -torch.inf
    return noise


def _sample_fast(model: RNNLM, logits: Tensor, state, max_length: int, temperature: float, allow_unk: bool,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Plain sampling (no top-k, no nucleus) with `Stepper` and Gumbel noise drawn a block of steps at a time.

    Per token: the cell's fused operations, one product for the logits (written into a block buffer),
    one addition of the noise and an argmax. The log-probabilities of the chosen tokens are taken for
    a whole block at once. Returns ids (B, n) and each step's log-probability (B, n), n <= max_length.
    """
    B, V = logits.shape
    device = logits.device
    stepper = Stepper(model, state)
    block = max(1, min(BLOCK_STEPS, max_length, (1 << 22) // (B * V)))
    buffer = torch.empty(block, B, V, device=device)
    buffer[0].copy_(logits.float())
    rows = buffer.unbind(0)  # views made once
    scores = torch.empty(B, V, device=device)
    scale = 1.0 / temperature if temperature > 0 else 1.0
    blocks: list[Tensor] = []  # the chosen tokens, (steps, B) a block: 8 bytes a token, however long the sample
    logps: list[Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    noise: tuple[Tensor, ...] = ()
    for t in range(max_length):
        i = t % block
        if i == 0:
            noise = _gumbel_noise(block, B, V, temperature, allow_unk, generator).to(device).unbind(0)
            chosen = torch.empty(block, B, dtype=torch.long, device=device)
            blocks.append(chosen)
        token = torch.argmax(torch.add(noise[i], rows[i], alpha=scale, out=scores), dim=1, out=chosen[i])  # (B,)
        if B == 1:
            stop = int(token) == EOS_ID
        else:
            done |= token == EOS_ID
            stop = bool(done.all())
        stop = stop or t == max_length - 1
        if i == block - 1 or stop:  # the model's log-probability (temperature 1) of this block's choices
            blocks[-1] = chosen[:i + 1]
            logps.append(torch.log_softmax(buffer[:i + 1], dim=-1).gather(2, chosen[:i + 1].unsqueeze(2)).squeeze(2))
        if stop:
            break
        stepper.step(token, rows[(i + 1) % block])
    return torch.cat(blocks, dim=0).t().cpu(), torch.cat(logps, dim=0).t().cpu()


def _sample_general(model: RNNLM, logits: Tensor, state, max_length: int, temperature: float, top_k: int,
                    top_p: float, allow_unk: bool, generator: torch.Generator,
                    device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Any decoder and any truncation (top-k, nucleus): `RNNLM.step` and torch.multinomial."""
    B = logits.shape[0]
    tokens: list[Tensor] = []  # the last steps' tokens (B,), joined into one tensor every BLOCK_STEPS steps
    logps: list[Tensor] = []
    blocks: list[tuple[Tensor, Tensor]] = []
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_length):
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # the model's distribution (B, V)
        if temperature == 0:
            masked = logp if allow_unk else logp.index_fill(1, _UNK_INDEX, -torch.inf)
            token = masked.argmax(dim=-1)
        else:
            probs = next_token_distribution(logp, temperature, top_k, top_p, allow_unk)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens.append(token)
        logps.append(logp.gather(1, token.unsqueeze(1)).squeeze(1))
        done |= token == EOS_ID
        stop = bool(done.all())
        if len(tokens) == BLOCK_STEPS or stop or t == max_length - 1:
            blocks.append((torch.stack(tokens, dim=1), torch.stack(logps, dim=1)))
            tokens, logps = [], []
        if stop:
            break
        logits, state = model.step(token.to(device), state)
    return torch.cat([b[0] for b in blocks], dim=1), torch.cat([b[1] for b in blocks], dim=1)
