"""Small shared helpers: seeding and device selection."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import NetcleanseError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same, for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one
    step, so a crash or Ctrl-C never leaves a half-written result. Write errors become a one-line
    :class:`NetcleanseError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")  # keeps the suffix numpy wants
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise NetcleanseError(f"cannot write {path} ({first_line(exc)})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise NetcleanseError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise NetcleanseError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)
