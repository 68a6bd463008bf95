"""What a file is, from its first bytes: the one sniffer for model and data files.

Formats are recognised by content, never by suffix (a suffix only words the error when the content
is not recognised): HDF5 (Keras ``.h5``, CSAW data), zip (Keras 3 ``.keras`` archives, which hold
``config.json`` and ``model.weights.h5``; PyTorch ``.pt`` and TorchScript; ``.npz``), safetensors
(an 8-byte little-endian header length, then a JSON object), PNG, JPEG, and PyTorch's legacy
(before 1.6) ``torch.save`` format (a pickle opening with torch's magic number). ONNX files (protocol
buffers) have no magic bytes; :func:`netcleanse.model.load_model` takes them by suffix once
nothing else matched.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# pickle protocol 2, then torch's magic number 0x1950a86a20f9469cfc6c as a 10-byte long
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

KINDS = ("hdf5", "keras-archive", "zip", "torch-legacy", "safetensors", "png", "jpeg", "unknown")


def head(path, n: int = 9) -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter)."""
    with open(path, "rb") as f:
        return f.read(n)


def sniff(path) -> str:
    """One of :data:`KINDS` for the file at ``path``, from its first bytes (and, for a zip, whether
    its directory names the two members of a Keras 3 archive). Nothing in the file is run."""
    path = Path(path)
    magic = head(path, len(TORCH_LEGACY_MAGIC))
    if magic.startswith(TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if magic.startswith(HDF5_MAGIC):
        return "hdf5"
    if magic.startswith(ZIP_MAGIC):
        return "keras-archive" if is_keras_archive(path) else "zip"
    if magic.startswith(PNG_MAGIC):
        return "png"
    if magic.startswith(JPEG_MAGIC):
        return "jpeg"
    if is_safetensors(path):
        return "safetensors"
    return "unknown"


def zip_names(path: Path) -> list[str]:
    """The member names of a zip file; [] when it is not a readable zip (its own reader words the
    error)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError):
        return []


def is_keras_archive(path: Path) -> bool:
    """A zip holding ``config.json`` and ``model.weights.h5``: a Keras 3 ``.keras`` file."""
    names = set(zip_names(path))
    return "config.json" in names and "model.weights.h5" in names


def is_torch_zip(path: Path) -> bool:
    """A zip holding ``<name>/data.pkl``: what ``torch.save`` (and TorchScript) write."""
    return any(name.count("/") == 1 and name.endswith("/data.pkl") for name in zip_names(path))


def is_npz(path: Path) -> bool:
    """A zip whose every member is a ``.npy`` array: NumPy's ``.npz`` (data, not a model)."""
    names = zip_names(path)
    return bool(names) and all(name.endswith(".npy") for name in names)


def is_safetensors(path: Path) -> bool:
    """True when ``path`` starts like a safetensors file: an 8-byte little-endian header length,
    then a JSON object."""
    path = Path(path)
    head_bytes = head(path)
    if len(head_bytes) < 9 or head_bytes[8:9] != b"{":
        return False
    size = int.from_bytes(head_bytes[:8], "little")
    return 2 <= size <= path.stat().st_size - 8
