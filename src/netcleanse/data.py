"""The dataset noun: :class:`Dataset`, and :func:`load_data` for every format netcleanse reads.

Contract: ``x`` is float32 NCHW with pixels in [0, 1]; ``y`` is int64 labels or None.
Loaders convert on the way in (uint8 -> /255, NHWC -> NCHW), so nothing downstream guesses.

Formats :func:`load_data` reads (chosen by the file's content, not its name):

- CSAW HDF5 (``.h5``): images under ``data`` (or ``x``, ``images``), labels under ``label`` (or ``y``,
  ``labels``), optional.
- NumPy ``.npz``: images under ``x`` (or ``data``, ``images``), labels under ``y`` (or ``label``,
  ``labels``), optional;
  netcleanse also writes ``names`` and ``true_labels`` there and reads them back.
- PNG / JPEG files, lists of them, and folders of them (searched recursively, sorted by path).
  Links are followed; hidden files and folders (``.name``) and ``__MACOSX`` are skipped. A
  file's label is the ``label=N`` in its name (``cl_0_label=43.png``), else the name of the
  outermost integer-named folder on its path below the given folder (``faces/43/a.png``,
  ``faces/43/session2/a.png``, ``data/test/43/a.png``: 43); a set in which some image has no
  label is loaded unlabeled. Pixels are read as stored: an EXIF orientation tag is not applied
  (as Keras's and torchvision's loaders do not), and a warning counts the files that carry one.

Arrays may be N x C x H x W (NCHW) or N x H x W x C (NHWC) with C = 1 or 3, or N x H x W
(one channel); the layout is read from the axis that holds 1 or 3 channels (when both could, the
model's expected shape decides, else NCHW). Pixel scale: uint8 and other integer arrays are
0..255; float arrays are taken as 0..255 when their maximum exceeds 2 (CSAW's own files store
floats 0..255) and divided by 255, else as [0, 1]: a maximum a little above 1 (unclipped
brightness jitter) is clipped to 1 with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import NetcleanseError, NetcleanseWarning
from .sniff import sniff
from .utils import atomic_write, check_declared_size, check_self_contained_h5, first_line


@dataclass
class Dataset:
    x: torch.Tensor
    y: torch.Tensor | None = None
    source: str = "memory"
    names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or self.x.dim() != 4:
            raise NetcleanseError(f"{self.source}: images must be a 4-D NCHW array")
        if self.x.dtype != torch.float32:
            raise NetcleanseError(f"{self.source}: images must be float32 in [0,1], got {self.x.dtype}")
        if self.y is not None:
            if self.y.dim() != 1 or len(self.y) != len(self.x):
                raise NetcleanseError(f"{self.source}: {len(self.x)} images but labels of shape {tuple(self.y.shape)}")
            self.y = self.y.long()
        if self.names is not None and len(self.names) != len(self.x):
            raise NetcleanseError(f"{self.source}: {len(self.x)} images but {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def subset(self, index) -> "Dataset":
        """Rows selected by a slice, a boolean mask or an index tensor."""
        if isinstance(index, slice):
            names = self.names[index] if self.names is not None else None
        else:
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            names = [self.names[i] for i in index.tolist()] if self.names is not None else None
        return Dataset(self.x[index], None if self.y is None else self.y[index], self.source, names, dict(self.info))


# --------------------------------------------------------------------------------------------
# Loading

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# image formats a folder may hold that are not read (a warning names them)
OTHER_IMAGE_SUFFIXES = (".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGE_KEYS = ("data", "x", "images")  # CSAW's names first; .npz files try x, data, images
LABEL_KEYS = ("label", "y", "labels")
# Float arrays whose maximum is above this are taken as 0..255 rather than [0, 1]; up to it, values
# above FLOAT_ONE_TOLERANCE are clipped to 1 with a warning (a [0, 1] set a little overshot).
FLOAT_255_THRESHOLD = 2.0
FLOAT_ONE_TOLERANCE = 1.001
# Rows converted at a time, so a 12k-image float64 file never exists twice in memory.
CHUNK_ROWS = 2048

_LABEL_IN_NAME = re.compile(r"label=([0-9]+)")
_INTEGER_NAME = re.compile(r"[0-9]+")  # ASCII digits ('²'.isdigit() is true, int('²') fails)
_SKIPPED_FOLDERS = ("__MACOSX",)  # macOS zip metadata: '._name' copies of every file
LARGEST_LABEL = 2 ** 31 - 1

Shape = tuple[int, int, int]


def load_data(source, *, expect_shape: Shape | None = None, num_classes: int | None = None,
              label_key: str | None = None, channels: int | None = None) -> Dataset:
    """Load images (and labels, when the source has them) into a :class:`Dataset`.

    ``source`` is a CSAW ``.h5`` file, an ``.npz`` file, a PNG/JPEG file, a folder of images, or a
    list of image files and folders (see the module docstring for the rules of each).
    ``expect_shape`` (C, H, W, or text "CxHxW") and ``num_classes`` are the model's; when given, images of another
    shape and labels outside [0, num_classes) are refused with a clear error. Image files are
    converted to ``channels`` (1: grayscale, 3: RGB), by default the channels of ``expect_shape``.
    ``label_key`` names the labels' key in an ``.h5``/``.npz`` file when it is not a standard one.
    """
    if expect_shape is not None:
        from .classifier import parse_input_shape
        expect_shape = parse_input_shape(expect_shape)  # (C, H, W) or "CxHxW", checked
    if channels is None and expect_shape is not None:
        channels = int(expect_shape[0])
    if channels not in (None, 1, 3):
        raise NetcleanseError(f"images can be loaded with 1 or 3 channels, not {channels}")
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            return load_data(source[0], expect_shape=expect_shape, num_classes=num_classes,
                             label_key=label_key, channels=channels)
        dataset = _load_images(_list_images(source), channels, expect_shape, source="images")
    else:
        path = Path(source)
        if not path.exists():
            raise NetcleanseError(f"data not found: {path}")
        if path.is_dir():
            dataset = _load_images(_folder_images(path), channels, expect_shape, source=str(path))
        else:
            kind = _file_kind(path)
            try:
                if kind == "hdf5":
                    dataset = _load_hdf5(path, expect_shape, label_key)
                elif kind == "npz":
                    dataset = _load_npz(path, expect_shape, label_key)
                else:
                    dataset = _load_images([(path, _label_from_name(path))], channels, expect_shape,
                                           source=str(path))
            except MemoryError:
                raise NetcleanseError(f"{path} holds more data than this machine's memory") from None
            except RecursionError:  # groups nested without end
                raise NetcleanseError(f"{path}: its layout is nested too deeply to be a data file") from None
            if kind in ("hdf5", "npz") and channels == 3 and dataset.x.shape[1] == 1 \
                    and (expect_shape is None or tuple(dataset.x.shape[2:]) == tuple(expect_shape)[1:]):
                # grayscale arrays for a colour model, as grayscale image files are: gray -> RGB loses nothing
                dataset.x = dataset.x.expand(-1, 3, -1, -1).contiguous()
    check_dataset(dataset, expect_shape, num_classes)
    return dataset


def as_dataset(data, what: str = "data") -> Dataset:
    """``data`` if it is a :class:`Dataset`, else a one-line error saying how to make one."""
    if isinstance(data, Dataset):
        return data
    raise NetcleanseError(f"the {what} must be a netcleanse Dataset, got {type(data).__name__}: make one with "
                          "Dataset(x, y) (x: N x C x H x W pixels in [0, 1]; y: labels or None) or "
                          "netcleanse.load_data(path)")


def check_dataset(dataset: Dataset, expect_shape: Shape | None = None, num_classes: int | None = None) -> None:
    """Refuse a dataset a model cannot use: no images, wrong image shape, non-finite pixels,
    labels outside [0, num_classes)."""
    as_dataset(dataset)
    if len(dataset) == 0:
        raise NetcleanseError(f"{dataset.source}: holds no images")
    if expect_shape is not None and dataset.image_shape != tuple(expect_shape):
        raise NetcleanseError(f"{dataset.source}: images are {_chw(dataset.image_shape)} (CxHxW) "
                              f"but the model expects {_chw(expect_shape)}")
    bad_row = _first_nonfinite_row(dataset.x)
    if bad_row is not None:
        raise NetcleanseError(f"{_row_name(dataset, bad_row)}: contains NaN or infinite pixel values")
    if num_classes is not None and dataset.y is not None:
        outside = ((dataset.y < 0) | (dataset.y >= num_classes)).nonzero().flatten()
        if len(outside):
            row = int(outside[0])
            raise NetcleanseError(f"{_row_name(dataset, row)}: label {int(dataset.y[row])} is outside "
                                  f"[0, {num_classes}) for this model ({len(outside)} such labels)")


def label_from_name(path, root=None) -> int | None:
    """The label a file name carries (``label=N``), else its sub-folder's integer name under ``root``."""
    return _label_from_name(Path(path), None if root is None else Path(root))


def _label_from_name(path: Path, root: Path | None = None) -> int | None:
    match = _LABEL_IN_NAME.search(path.stem)
    text = match.group(1) if match else None
    if text is None and root is not None:  # the outermost integer folder below root (ImageFolder's class level)
        text = next((part for part in path.relative_to(root).parts[:-1] if _INTEGER_NAME.fullmatch(part)), None)
    if text is None:
        return None
    if int(text) > LARGEST_LABEL:
        raise NetcleanseError(f"{path}: label {text} (from its {'name' if match else 'folder'}) is not a class index")
    return int(text)


def _chw(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _row_name(dataset: Dataset, row: int) -> str:
    if dataset.names is not None:
        return dataset.names[row]
    return f"{dataset.source} (image {row})"


def _first_nonfinite_row(x) -> int | None:
    for start in range(0, len(x), CHUNK_ROWS):
        chunk = x[start:start + CHUNK_ROWS]
        finite = torch.isfinite(chunk) if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.isfinite(chunk))
        rows = (~finite.reshape(len(chunk), -1).all(dim=1)).nonzero()
        if len(rows):
            return start + int(rows[0])
    return None


def _file_kind(path: Path) -> str:
    """'hdf5', 'npz' or 'image', from the file's first bytes (its suffix only words the errors)."""
    if path.stat().st_size == 0:
        raise NetcleanseError(f"data file is empty: {path}")
    kind = sniff(path)
    if kind == "hdf5":
        return "hdf5"
    if kind in ("zip", "keras-archive"):
        return "npz"
    if kind in ("png", "jpeg"):
        return "image"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise NetcleanseError(f"cannot read image {path}: not a valid PNG/JPEG file")
    if suffix in (".h5", ".hdf5", ".npz"):
        raise NetcleanseError(f"cannot read {path}: not a valid {suffix} file (truncated or corrupt?)")
    raise NetcleanseError(f"{path}: unknown data format; netcleanse reads .h5 (CSAW), .npz, "
                          ".png/.jpg images and folders of images")


# --- arrays (HDF5, npz) ---------------------------------------------------------------------

def _load_hdf5(path: Path, expect_shape, label_key) -> Dataset:
    try:
        h5 = h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as exc:
        raise NetcleanseError(f"cannot read {path}: not a readable HDF5 file ({first_line(exc)})") from None
    try:
        with h5:
            return _read_hdf5(h5, path, expect_shape, label_key)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # h5py on a corrupt file
        raise NetcleanseError(f"cannot read {path}: the HDF5 file is truncated or corrupt "
                              f"({first_line(exc)})") from None


def _read_hdf5(h5, path: Path, expect_shape, label_key) -> Dataset:
    check_self_contained_h5(h5, path)
    if "model_weights" in h5 or "layer_names" in h5.attrs:
        raise NetcleanseError(f"{path} is a Keras model file, not a data file")
    keys = list(h5.keys())
    image_key = _pick_key(keys, IMAGE_KEYS, None, path, "images")
    label_name = _pick_key(keys, LABEL_KEYS, label_key, path, "labels", required=label_key is not None)
    for key in (image_key, label_name, "names", "true_labels"):
        if key in keys and not isinstance(h5[key], h5py.Dataset):
            raise NetcleanseError(f"{path}: {key!r} is an HDF5 group, not an array")
    for key in keys:
        if isinstance(h5[key], h5py.Dataset):
            check_declared_size(h5[key].shape, h5[key].dtype, h5[key].id.get_storage_size(), path, key)
    images, info = _images_to_tensor(h5[image_key], expect_shape, path)
    labels = _labels_to_tensor(h5[label_name][()], len(images), path) if label_name else None
    names = None
    if "names" in h5:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in h5["names"][()]]
    if "true_labels" in h5:
        info["true_labels"] = _labels_to_tensor(h5["true_labels"][()], len(images), path)
    info["format"] = "hdf5"
    return Dataset(images, labels, source=str(path), names=names, info=info)


def _check_npz_member(archive, member: str, path: Path, key: str) -> None:
    """:func:`~netcleanse.utils.check_declared_size` for an .npz member, from its .npy header only."""
    try:
        info = archive.getinfo(member)
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
    except Exception as exc:
        raise NetcleanseError(f"cannot read {path}: corrupt .npz member {member} ({exc})") from None
    check_declared_size(shape, dtype, info.compress_size, path, key)


def _load_npz(path: Path, expect_shape, label_key) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # a zip that is not a valid npz: numpy raises several kinds
        raise NetcleanseError(f"cannot read {path}: not a valid .npz file ({exc})") from None
    with archive:
        if not any(member.endswith(".npy") for member in archive.zip.namelist()):
            raise NetcleanseError(f"{path} is a zip file without NumPy arrays (a PyTorch model?), "
                                  "not an .npz data file")
        keys = list(archive.files)
        for key in keys:
            _check_npz_member(archive.zip, f"{key}.npy", path, key)
        image_key = _pick_key(keys, ("x", "data", "images"), None, path, "images")
        label_name = _pick_key(keys, ("y", "label", "labels"), label_key, path, "labels", required=label_key is not None)
        try:
            array = archive[image_key]
            labels = archive[label_name] if label_name else None
            names = archive["names"] if "names" in keys else None
            true_labels = archive["true_labels"] if "true_labels" in keys else None
        except ValueError as exc:  # object arrays need pickle, which is never allowed
            raise NetcleanseError(f"cannot read {path}: {exc}") from None
        except Exception as exc:
            raise NetcleanseError(f"cannot read {path}: corrupt .npz member ({exc})") from None
    images, info = _images_to_tensor(array, expect_shape, path)
    if labels is not None:
        labels = _labels_to_tensor(labels, len(images), path)
    if true_labels is not None:
        info["true_labels"] = _labels_to_tensor(true_labels, len(images), path)
    info["format"] = "npz"
    return Dataset(images, labels, source=str(path), names=None if names is None else [str(n) for n in names],
                   info=info)


def _pick_key(keys, candidates, chosen, path, what, required=True) -> str | None:
    if chosen is not None:
        if chosen not in keys:
            raise NetcleanseError(f"{path}: no {what} under key {chosen!r}; keys: {', '.join(keys) or 'none'}")
        return chosen
    for key in candidates:
        if key in keys:
            return key
    if required:
        raise NetcleanseError(f"{path}: no {what} found (looked for {' or '.join(map(repr, candidates))}); "
                              f"keys: {', '.join(keys) or 'none'}")
    others = [k for k in keys if k not in (*IMAGE_KEYS, "names", "true_labels")]
    if others:  # labels stored under a name of the file's own, most likely
        warnings.warn(f"{path}: no {what} under {' or '.join(map(repr, candidates))}, so it loads without them; "
                      f"its other keys: {', '.join(others)} (rename the labels' key to {candidates[0]!r}, or in Python "
                      "load_data(..., label_key=KEY))",
                      NetcleanseWarning, stacklevel=3)
    return None


def _channels_last(shape, expect_shape, path) -> bool:
    """Whether an N x A x B x C image array is NHWC, judged by which axis holds 1, 3 or 4 (RGBA) channels."""
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if not (first or last):  # RGBA, read as RGB below (as RGBA image files are)
        first, last = shape[1] == 4, shape[3] == 4
    if first and last and expect_shape is not None:
        return tuple(shape[1:]) != tuple(expect_shape) and (shape[3], shape[1], shape[2]) == tuple(expect_shape)
    if first or last:
        return not first
    raise NetcleanseError(f"{path}: images shaped {tuple(shape)}: cannot tell the channel axis "
                          "(expected 1, 3 or 4 (RGBA) channels first, NCHW, or last, NHWC)")


def _images_to_tensor(array, expect_shape, path) -> tuple[torch.Tensor, dict]:
    """Convert an image array (NumPy or an h5py dataset, read a chunk at a time) to float32 NCHW [0, 1]."""
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    if len(shape) == 3 and expect_shape is not None:
        c, h, w = (int(v) for v in expect_shape)
        if shape in ((h, w, c), (c, h, w)) and (c == 3 or shape == (h, w, c)):  # one image, without its batch axis
            if shape == (c, h, w):  # as well N x H x W, three grayscale images
                warnings.warn(f"{path}: a {_chw(shape)} array is read as one colour image (C x H x W); if it holds "
                              f"three grayscale images, store it as 3 x 1 x {h} x {w}", NetcleanseWarning, stacklevel=3)
            array = np.asarray(array)[None]
            shape = tuple(array.shape)
    if len(shape) not in (3, 4):
        raise NetcleanseError(f"{path}: images must be a N x C x H x W, N x H x W x C or N x H x W array, "
                              f"got shape {shape}")
    if shape[0] == 0:
        raise NetcleanseError(f"{path}: holds no images")
    if 0 in shape[1:]:
        raise NetcleanseError(f"{path}: images of shape {shape[1:]} have an empty side")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or dtype == np.bool_:
        raise NetcleanseError(f"{path}: images must be integers 0..255 or floats, got dtype {dtype}")
    if len(shape) == 3:
        layout, out_shape = "NHW", (shape[0], 1, shape[1], shape[2])
    elif _channels_last(shape, expect_shape, path):
        layout, out_shape = "NHWC", (shape[0], shape[3], shape[1], shape[2])
    else:
        layout, out_shape = "NCHW", shape
    alpha = out_shape[1] == 4 and (expect_shape is None or int(expect_shape[0]) != 4)
    if alpha:  # RGBA: the alpha channel is dropped, as for RGBA image files (PIL's RGBA -> RGB)
        warnings.warn(f"{path}: images have 4 channels, read as RGBA: the alpha channel is dropped",
                      NetcleanseWarning, stacklevel=3)
        out_shape = (out_shape[0], 3, *out_shape[2:])
    out = torch.empty(out_shape, dtype=torch.float32)
    low, high = np.inf, -np.inf
    for start in range(0, shape[0], CHUNK_ROWS):
        chunk = np.asarray(array[start:start + CHUNK_ROWS])
        chunk = chunk[:, None] if layout == "NHW" else chunk.transpose(0, 3, 1, 2) if layout == "NHWC" else chunk
        if alpha:
            chunk = chunk[:, :3]
        if np.issubdtype(dtype, np.floating):
            bad = _first_nonfinite_row(chunk)
            if bad is not None:
                raise NetcleanseError(f"{path} (image {start + bad}): contains NaN or infinite pixel values")
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        out[start:start + len(chunk)] = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
    if low < 0:
        raise NetcleanseError(f"{path}: negative pixel values (min {low:g}); expected [0, 1] or 0..255")
    if high > 255.001:
        raise NetcleanseError(f"{path}: pixel values up to {high:g}; expected [0, 1] or 0..255")
    is_255 = np.issubdtype(dtype, np.integer) or high > FLOAT_255_THRESHOLD
    if is_255:
        out.div_(255.0)
        out.clamp_(0.0, 1.0)
    elif high > FLOAT_ONE_TOLERANCE:
        warnings.warn(f"{path}: float pixels reach {high:g}, a little above 1: read as [0, 1] and clipped to 1 "
                      f"(0..255 data would reach far more than {FLOAT_255_THRESHOLD:g})", NetcleanseWarning, stacklevel=3)
        out.clamp_(0.0, 1.0)
    info = {"layout": layout, "dtype": str(dtype), "scale": 255 if is_255 else 1}
    return out, info


def _labels_to_tensor(labels, n: int, path) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise NetcleanseError(f"{path}: labels must be one integer per image, got shape {labels.shape}")
    if len(labels) != n:
        raise NetcleanseError(f"{path}: {n} images but {len(labels)} labels")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise NetcleanseError(f"{path}: labels must be whole numbers")
    elif not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        raise NetcleanseError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    return torch.from_numpy(labels.astype(np.int64))


# --- image files ----------------------------------------------------------------------------

def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files and folders below ``folder``, links followed (a link back to a folder above it
    ends there: no cycle), hidden ones (``.name``) and ``__MACOSX`` left out."""
    files, folders = [], []
    for top, dirs, names in os.walk(folder, followlinks=True):
        here = Path(top)
        real = os.path.realpath(here)
        above = here.relative_to(folder).parents  # the folders between ``folder`` and this one
        if any(os.path.realpath(folder / part) == real for part in above):
            dirs[:] = []  # a link to a folder it sits in: walked already
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_FOLDERS)
        folders.extend(Path(top) / d for d in dirs)
        files.extend(p for p in (Path(top) / n for n in names if not n.startswith(".")) if p.is_file())
    return files, folders


def _folder_images(folder: Path) -> list[tuple[Path, int | None]]:
    everything, folders = _walk(folder)
    files = sorted((p for p in everything if _is_image_name(p)), key=lambda p: p.relative_to(folder).as_posix())
    others = sorted(p for p in everything if p.suffix.lower() in OTHER_IMAGE_SUFFIXES)
    if others:  # images netcleanse does not read: the set would shrink without a word
        kinds = ", ".join(sorted({p.suffix.lower() for p in others}))
        warnings.warn(f"{folder}: {len(others)} image file(s) of other formats ({kinds}, e.g. {others[0]}) are "
                      "skipped; netcleanse reads .png, .jpg and .jpeg", NetcleanseWarning, stacklevel=2)
    if not files:
        raise NetcleanseError(f"no images (.png, .jpg, .jpeg) in folder {folder}")
    # a label folder left empty (a failed copy) would drop that class without a word
    occupied = {parent for f in files for parent in f.parents}
    empty = sorted(p for p in folders if p not in occupied and _INTEGER_NAME.fullmatch(p.name)
                   and not any(_INTEGER_NAME.fullmatch(q) for q in p.relative_to(folder).parts[:-1]))
    if empty:
        shown = ", ".join(str(p.relative_to(folder)) for p in empty[:5]) + (", ..." if len(empty) > 5 else "")
        warnings.warn(f"{folder}: {len(empty)} label folder(s) hold no images ({shown}); "
                      "those classes are missing from the data", NetcleanseWarning, stacklevel=2)
    items = [(p, _label_from_name(p, folder)) for p in files]
    classes = sorted({p.relative_to(folder).parts[0] for p in files if p.parent != folder})
    if classes and all(label is None for _, label in items):  # ImageFolder's layout, with class names
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        warnings.warn(f"{folder}: its sub-folders ({shown}) are not integer labels, so the images load unlabeled; "
                      "netcleanse reads a label from an integer folder name (the model's class index) or label=N "
                      "in a file name", NetcleanseWarning, stacklevel=2)
    return items


def _list_images(sources) -> list[tuple[Path, int | None]]:
    items = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise NetcleanseError(f"data not found: {path}")
        if path.is_dir():
            items.extend(_folder_images(path))
        elif _file_kind(path) != "image":
            raise NetcleanseError(f"{path} is a dataset file; give one dataset file on its own, "
                                  "not beside other files or images")
        else:
            items.append((path, _label_from_name(path)))
    return items


IMAGE_FORMATS = ("PNG", "JPEG")  # the only decoders opened: PIL's others include EPS, which runs Ghostscript
EXIF_ORIENTATION = 0x0112


def read_image(path, channels: int | None = None) -> np.ndarray:
    """One PNG/JPEG file as a uint8 C x H x W array; grayscale stays 1 channel unless ``channels=3``.
    A file of another format, whatever its name, is refused; pixels are read as stored (an EXIF
    orientation tag is not applied)."""
    return _read_image(Path(path), channels)[0]


def _read_image(path: Path, channels: int | None) -> tuple[np.ndarray, bool]:
    """:func:`read_image`, and whether the file carries an EXIF orientation other than upright."""
    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                width, height = image.size  # from the header: checked before any pixel is decoded
                if width * height > limit:
                    raise NetcleanseError(f"image {path} is {width} x {height} pixels, more than netcleanse reads "
                                          f"({limit:,}; set NETCLEANSE_MAX_IMAGE_PIXELS to change)")
                image.load()
                turned = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
                gray = image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
                wanted = channels or (1 if gray else 3)
                if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scale, do not clip
                    array = np.round(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                    if wanted == 3:
                        array = np.repeat(array[..., None], 3, axis=2)
                else:
                    array = np.asarray(image.convert("L" if wanted == 1 else "RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise NetcleanseError(f"cannot read image {path}: not a valid PNG/JPEG file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NetcleanseError(f"cannot read image {path}: {exc}") from None
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), turned


def max_image_pixels() -> int:
    """The largest image (width x height) netcleanse decodes: 16 megapixels, or
    ``NETCLEANSE_MAX_IMAGE_PIXELS``. Backdoor scans work on images of a few thousand pixels."""
    from .limits import IMAGE_PIXELS
    return IMAGE_PIXELS()


def _load_images(items: list[tuple[Path, int | None]], channels, expect_shape, source: str) -> Dataset:
    from .progress import progress_bar

    arrays, turned = [], []
    with progress_bar(disable=True if len(items) < 2000 else None) as progress:
        task = progress.add_task("reading images", total=len(items))
        for path, _ in items:
            array, rotated = _read_image(path, channels)
            if rotated:
                turned.append(path)
            if expect_shape is not None and array.shape[1:] != tuple(expect_shape)[1:]:
                # (its channels are converted to the model's: the size is what does not fit)
                raise NetcleanseError(f"image {path} is {_chw(array.shape[1:])} (HxW) but the model "
                                      f"expects {_chw(tuple(expect_shape)[1:])} (its input is {_chw(expect_shape)}, CxHxW)"
                                      + ("; it carries an EXIF orientation tag, and its pixels are read as stored, "
                                         "not turned" if rotated else ""))
            if arrays and array.shape[1:] != arrays[0].shape[1:]:
                raise NetcleanseError(f"images differ in size: {items[0][0]} is {_chw(arrays[0].shape)} "
                                      f"but {path} is {_chw(array.shape)}")
            arrays.append(array)
            progress.advance(task)
    if channels is None and len({a.shape[0] for a in arrays}) > 1:
        # A mix of grayscale and color files: gray -> RGB loses nothing.
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    if turned:  # a viewer shows these turned; a model trained through Keras's or torchvision's loaders saw them as stored
        warnings.warn(f"{source}: {len(turned)} of {len(items)} images carry an EXIF orientation tag (e.g. {turned[0]}); "
                      "their pixels are read as stored, not turned as a viewer shows them", NetcleanseWarning, stacklevel=2)
    x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    labels = [label for _, label in items]
    y = torch.tensor(labels, dtype=torch.int64) if all(label is not None for label in labels) else None
    info = {"format": "images", "layout": "NCHW", "dtype": "uint8", "scale": 255}
    if y is None and any(label is not None for label in labels):
        info["unlabeled"] = sum(label is None for label in labels)
        first = next(path for path, label in items if label is None)
        warnings.warn(f"{source}: {info['unlabeled']} of {len(items)} images carry no label (e.g. {first}; "
                      "labels come from label=N in the name or an integer folder), so the set is loaded "
                      "unlabeled", NetcleanseWarning, stacklevel=2)
    return Dataset(x, y, source=source, names=[str(path) for path, _ in items], info=info)


# --------------------------------------------------------------------------------------------
# Saving

def save_data(dataset: Dataset, path, *, overwrite: bool = False) -> Path:
    """Write a dataset to ``.npz`` or CSAW-layout ``.h5`` (chosen by suffix); returns the path.

    Pixels are stored as uint8 0..255 when that is lossless (every image that came from uint8 or
    image files), else as float32: in [0, 1] in ``.npz`` (netcleanse's own contract) and 0..255
    in ``.h5`` (CSAW's convention, whose tools divide by 255). Both layouts are NCHW. Keys:
    ``x``/``y`` (npz) or ``data``/``label`` (h5), plus ``names`` and ``true_labels`` when known.
    The file is written next to its destination and renamed into place, so an interrupted save
    never leaves a half-written file behind.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".h5", ".hdf5"):
        raise NetcleanseError(f"cannot save data as {path}: use a .npz or .h5 file name")
    if path.exists() and not overwrite:
        raise NetcleanseError(f"{path} already exists (--force on the command line, overwrite=True in Python)")
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = dataset.x * 255.0
    whole = torch.round(scaled)
    lossless = bool((scaled - whole).abs().max() <= 1e-3) if len(dataset) else True
    if lossless:
        pixels = whole.to(torch.uint8).numpy()
    else:
        pixels = (scaled if suffix != ".npz" else dataset.x).numpy().astype(np.float32)
    extras = {}
    if dataset.names is not None:
        extras["names"] = np.array(dataset.names, dtype=str)
    if dataset.info.get("true_labels") is not None:
        extras["true_labels"] = np.asarray(dataset.info["true_labels"], dtype=np.int64)
    labels = None if dataset.y is None else dataset.y.numpy().astype(np.int64)
    with atomic_write(path) as temporary:
        if suffix == ".npz":
            with open(temporary, "wb") as f:
                arrays = {"x": pixels, **({"y": labels} if labels is not None else {}), **extras}
                np.savez_compressed(f, **arrays)
        else:
            with h5py.File(temporary, "w") as h5:
                h5.create_dataset("data", data=pixels, compression="gzip", compression_opts=4)
                if labels is not None:
                    h5.create_dataset("label", data=labels)
                if "names" in extras:
                    h5.create_dataset("names", data=np.array(dataset.names, dtype=object),
                                      dtype=h5py.string_dtype())
                if "true_labels" in extras:
                    h5.create_dataset("true_labels", data=extras["true_labels"])
                h5.attrs["layout"] = "NCHW"
                h5.attrs["pixel_range"] = "0..255"
    return path
