"""Small shared helpers: seeding and device selection."""

from __future__ import annotations

import random

import numpy as np
import torch

from .errors import NetcleanseError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same, for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise NetcleanseError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise NetcleanseError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)
