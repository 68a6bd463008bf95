"""Small shared helpers: seeding, device selection, atomic file writes, checks of untrusted files."""

from __future__ import annotations

import itertools
import json
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


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (an error if the file is unreadable or holds another JSON value)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NetcleanseError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise NetcleanseError(f"{path} does not hold a JSON object")
    return value


def write_json_atomic(path, obj, indent: int | None = None) -> None:
    """Write ``obj`` as JSON (UTF-8, ``indent`` as in :func:`json.dumps`, one trailing newline) to
    ``path`` through :func:`atomic_write`: the old file stays whole until the new one is complete."""
    text = json.dumps(obj, indent=indent) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_npz_atomic(path, **arrays) -> None:
    """Write ``arrays`` with :func:`numpy.savez` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)


def file_stem(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` and leading dots
    dropped ("model" if nothing is left): a plain name inside its folder, never ``..``, ``.`` or a hidden file."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "model"


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting ("cpu" or "cuda"); a one-line error for another
    name or for "cuda" on a machine without a CUDA device. Every command's ``--device`` and every
    API function's ``device=`` is checked here."""
    if name == "cuda" and not torch.cuda.is_available():
        raise NetcleanseError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise NetcleanseError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter (or buffer); the CPU if it has none."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def on_device(module: torch.nn.Module, device: str = "cpu"):
    """Run the block with ``module`` moved to ``device`` (checked by :func:`resolve_device`), and
    move it back to where it was afterwards (also on an error), so what the caller holds, and what
    it saves, stays where it was (on the CPU, as every model netcleanse loads or builds). Yields the
    torch device; the block moves its inputs there and brings its results back with ``.cpu()``.
    Nested blocks on the same device move nothing."""
    dev = resolve_device(device)
    home = module_device(module)
    module.to(dev)
    try:
        yield dev
    finally:
        module.to(home)


def h5_attr_list(group, name: str, errors: str = "strict") -> list[str]:
    """A Keras list attribute of an HDF5 group (``layer_names``, ``weight_names``) as strings, whether
    stored whole or, when too long for one attribute, in chunks ``name0``, ``name1``, ... (Keras's
    layout). ``errors``: how undecodable bytes are treated (``str.decode``)."""
    def decode(value) -> str:
        return value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)
    if name in group.attrs:
        return [decode(v) for v in np.asarray(group.attrs[name]).ravel()]
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        values += [decode(v) for v in np.asarray(group.attrs[f"{name}{chunk}"]).ravel()]
        chunk += 1
    return values


def check_self_contained_h5(h5, path) -> None:
    """Refuse an HDF5 file that would make a reader read anything but itself: external links,
    datasets stored in external files, virtual datasets (which map other files). A model or data
    file is untrusted; reading it must never read another file on this machine.

    Also refused here, as every dataset is visited before anything is read: a dataset split into
    more chunks than :data:`netcleanse.limits.CHUNKS` (HDF5 visits every chunk, stored or not: a
    2 KB file declaring 64 million one-byte chunks takes minutes to read)."""
    import h5py

    from . import limits

    def walk(group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            where = f"{prefix}/{name}"
            if isinstance(link, h5py.ExternalLink):
                raise NetcleanseError(f"{path}: {where} links to another file ({link.filename}); refused")
            if isinstance(link, h5py.SoftLink):
                continue  # a path inside this file; its target is checked where it stands
            item = group.get(name)
            if isinstance(item, h5py.Group):
                walk(item, where)
            elif isinstance(item, h5py.Dataset) and (item.external or item.is_virtual):
                raise NetcleanseError(f"{path}: dataset {where} keeps its data in another file; refused")
            elif isinstance(item, h5py.Dataset) and item.chunks:
                chunks = int(np.prod([-(-int(n) // int(c)) for n, c in zip(item.shape, item.chunks)], dtype=object))
                if chunks > limits.CHUNKS():
                    raise NetcleanseError(f"{path}: dataset {where} is split into {chunks:,} chunks (more than "
                                          f"{limits.CHUNKS():,}; {limits.CHUNKS.hint}); refused")

    walk(h5, "")


def check_declared_size(shape, dtype, stored: int, path, key: str) -> None:
    """Refuse an array whose declared size its file cannot back: more than
    :data:`netcleanse.limits.EXPANSION` times the bytes it stores (compression), unless it is at most
    :data:`netcleanse.limits.SMALL_ARRAY_BYTES`; checked before anything is allocated."""
    from . import limits
    declared = int(np.prod([int(n) for n in shape], dtype=object)) * np.dtype(dtype).itemsize
    if declared > limits.SMALL_ARRAY_BYTES() and declared > limits.EXPANSION() * max(int(stored), 1):
        raise NetcleanseError(f"{path}: {key} declares {tuple(int(n) for n in shape)} ({declared:,} bytes) but the "
                              f"file stores only {int(stored):,} bytes of it; refused "
                              f"({limits.EXPANSION.hint})")


def check_out_dir(out, force: bool) -> Path:
    """``out`` as a Path; refuse a non-empty folder (or a file) unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NetcleanseError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NetcleanseError(f"{out} is not empty; choose another folder or pass --force to overwrite")
    return out


def spreadsheet_safe(value) -> str:
    """A CSV cell that a spreadsheet shows as text: a cell starting with ``= + - @`` (or a tab or
    carriage return) is a formula to Excel and LibreOffice, so a model or image named
    ``=HYPERLINK(...)`` could run one when screen.csv or a predictions file is opened; such cells
    get a leading apostrophe (OWASP's advice)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
