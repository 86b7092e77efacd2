"""Device choice, seeding and CPU threads: a leaf module that everything may import."""

from __future__ import annotations

import ctypes
import sys

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """Map `auto | cpu | cuda | cuda:N` to a torch.device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' was asked for but this machine has no CUDA GPU; use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device '{name}': use auto, cpu or cuda")


def seed_everything(seed: int) -> None:
    """Seed every generator charlm draws from (only torch's: no random, no numpy)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks below `limit_bytes` for reuse instead of handing them back.

    By default glibc serves a large request with a fresh mmap and unmaps it when
    freed, so every training step page-faults its big buffers (activations, the
    logits and their gradients) in again: 160,000 faults a step for a 30,000-word
    vocabulary, about 40% of the step's time on a 2-core CPU. With this setting
    the process keeps its peak memory mapped (as jemalloc or tcmalloc would) and
    reuses it. Returns False where there is no glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, limit_bytes)) and bool(mallopt(m_trim_threshold, limit_bytes))
