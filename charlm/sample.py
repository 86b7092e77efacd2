"""Generation: start from the state after `<eos>`, feed each sampled token back.

The hidden state is kept from step to step, so every new token costs one cell
step (constant work per token), not a pass over the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UsageError
from .model import RNNLM
from .tokenizer import EOS_ID, UNK_ID, TextCodec

_UNK_INDEX = torch.tensor([UNK_ID])


@dataclass
class Sample:
    text: str             # the prime followed by the generated text (without the final <eos>)
    generated: str        # the generated text alone
    tokens: list[str]     # generated tokens, "<eos>" last if the sample stopped there
    logprob: float        # natural log-probability of the generated tokens under the model (temperature 1)
    stopped_at: str       # "eos" or "max_length"
    prime_unk: int        # tokens of the prime outside the vocabulary


def check_options(max_length: int, temperature: float, top_k: int, top_p: float, num_samples: int) -> None:
    if max_length < 1:
        raise UsageError(f"--max-length must be at least 1, got {max_length}")
    if not (temperature >= 0):
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if not (0 < top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")


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


@torch.no_grad()
def generate(model: RNNLM, codec: TextCodec, prime: str = "", max_length: int = 200, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int | None = None,
             allow_unk: bool = False, device: torch.device | str = "cpu") -> list[Sample]:
    """`num_samples` texts generated in parallel, each stopping at `<eos>` or after `max_length` tokens."""
    check_options(max_length, temperature, top_k, top_p, num_samples)
    model.eval()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    prime_lines = codec.tokenizer.lines(prime) if prime else []
    prime_ids: list[int] = []
    for i, line in enumerate(prime_lines):
        prime_ids += codec.encode_line(line)
        if i < len(prime_lines) - 1 or prime.endswith("\n"):
            prime_ids.append(EOS_ID)
    start = torch.tensor([[EOS_ID] + prime_ids] * num_samples, device=device)  # (B, 1 + P)
    logits, state = model(start)
    logits = logits[:, -1]  # (B, V)
    out = torch.zeros(num_samples, max_length, dtype=torch.long)
    logprob = torch.zeros(num_samples, dtype=torch.float64)
    done = torch.zeros(num_samples, dtype=torch.bool)
    lengths = torch.full((num_samples,), max_length)
    plain = top_k == 0 and top_p == 1.0  # the common case needs no sorting or top-k
    for t in range(max_length):
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # the model's distribution (B, V)
        if temperature == 0:
            masked = logp if allow_unk else logp.index_fill(1, _UNK_INDEX, -torch.inf)
            token = masked.argmax(dim=-1)
        else:
            if plain:  # multinomial takes unnormalised weights: softmax(logits / T) up to a constant
                probs = (logp / temperature).exp_() if temperature != 1.0 else logp.exp()
                if not allow_unk:
                    probs[:, UNK_ID] = 0.0
            else:
                probs = next_token_distribution(logp, temperature, top_k, top_p, allow_unk)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        step_logp = logp.gather(1, token.unsqueeze(1)).squeeze(1)
        logprob += step_logp.double().masked_fill_(done, 0.0)
        out[:, t] = token
        ended = (~done) & (token == EOS_ID)
        lengths[ended] = t + 1
        done |= ended
        if bool(done.all()):
            break
        logits, state = model.step(token.to(device), state)
    samples = []
    for b in range(num_samples):
        ids = out[b, : int(lengths[b])].tolist()
        stopped = "eos" if ids and ids[-1] == EOS_ID else "max_length"
        body = ids[:-1] if stopped == "eos" else ids
        generated = codec.decode(body)
        prime_text = codec.decode(prime_ids)
        joiner = "" if (not prime_text or prime_text.endswith("\n") or codec.tokenizer.level == "char"
                        or not generated) else " "
        samples.append(Sample(prime_text + joiner + generated, generated, codec.vocab.decode(ids),
                              float(logprob[b]), stopped, sum(1 for i in prime_ids if i == UNK_ID)))
    return samples
