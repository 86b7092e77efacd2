"""Device choice, seeding and CPU threads: a leaf module that everything may import."""

from __future__ import annotations

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
