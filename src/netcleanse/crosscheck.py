"""A Keras whole-model file's config checked against the weights the same file declares, before
any layer is allocated.

A config says how large each layer is; nothing forces it to agree with the weights stored beside
it, and every layer is allocated (and initialised) before the weights are copied in. So, while
:func:`netcleanse.keras.load_keras` rebuilds a config, each Dense, Conv2D or DepthwiseConv2D layer
is checked, before it is allocated, against what the file declares (dataset shapes, read from the
HDF5 headers only; no weight is read):

- its kernel must have the shape of the kernel the file stores for that layer (when the file
  stores one under the layer's name; a file that stores none fails later, when weights are copied);
- all kernels so far must add up to no more values than all the weights the file declares;
- and the file's declared weights as a whole must be backed by its size (at most
  :data:`netcleanse.limits.EXPANSION` times the file's bytes, beyond
  :data:`netcleanse.limits.SMALL_ARRAY_BYTES`), as each array already is.

So a small file cannot make netcleanse allocate more than the weights it declares, and those
only as much as its bytes can hold. ``.keras`` archives are checked when their weights are read.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from . import limits
from .errors import NetcleanseError
from .utils import h5_attr_list

_ACTIVE: ContextVar["FileWeights | None"] = ContextVar("netcleanse_file_weights", default=None)
_MODEL_CLASSES = ("Model", "Functional", "Sequential")


def _nested_models(config) -> set[str]:
    """Names of the nested models of a Keras config (their file groups hold <inner layer>/<var>)."""
    found: set[str] = set()
    inner = config.get("config") if isinstance(config, dict) else None
    layers = inner if isinstance(inner, list) else inner.get("layers") if isinstance(inner, dict) else None
    for entry in layers if isinstance(layers, list) else []:
        if isinstance(entry, dict) and entry.get("class_name") in _MODEL_CLASSES:
            name = entry.get("name") or (entry.get("config") or {}).get("name")
            found.add(str(name))
            found |= _nested_models(entry)
    return found


def _attr_list(group, name: str) -> list[str]:
    return h5_attr_list(group, name, errors="replace")


class FileWeights:
    """What a Keras weights group declares: each layer's kernel shape and the total of values."""

    def __init__(self, root, config: dict, path):
        import h5py

        self.path = path
        self.kernels: dict[str, tuple[int, ...]] = {}
        self.total = 0  # values the file declares, over all its weights
        self.asked = 0  # kernel values the config has declared so far
        nested, ambiguous, declared_bytes = _nested_models(config), set(), 0
        for layer in _attr_list(root, "layer_names"):
            group = root.get(layer) if layer in root else None
            if not isinstance(group, h5py.Group):
                continue
            for weight_name in _attr_list(group, "weight_names"):
                dataset = group.get(weight_name) if weight_name in group else None
                if not isinstance(dataset, h5py.Dataset):
                    continue
                size = int(np.prod([int(n) for n in dataset.shape], dtype=object))
                self.total += size
                declared_bytes += size * dataset.dtype.itemsize
                if weight_name.split("/")[-1].split(":")[0] not in ("kernel", "depthwise_kernel"):
                    continue
                parts = weight_name.split("/")
                owner = parts[-2] if layer in nested and len(parts) > 1 else layer
                if owner in self.kernels:
                    ambiguous.add(owner)
                self.kernels[owner] = tuple(int(n) for n in dataset.shape)
        for owner in ambiguous:
            del self.kernels[owner]
        stored = Path(path).stat().st_size if Path(path).is_file() else 0
        if declared_bytes > limits.SMALL_ARRAY_BYTES() and declared_bytes > limits.EXPANSION() * max(stored, 1):
            raise NetcleanseError(f"{path}: its weights group declares {declared_bytes:,} bytes but the file stores "
                                  f"only {stored:,} bytes; refused ({limits.EXPANSION.hint})")

    def check(self, name: str, weights: int, kernel: tuple[int, ...]) -> None:
        declared = self.kernels.get(name)
        if declared is not None and declared != tuple(int(n) for n in kernel):
            raise NetcleanseError(f"{self.path}: layer {name!r}: the config declares a kernel of shape "
                                  f"{tuple(int(n) for n in kernel)} but the file stores one of shape {declared}; "
                                  "refused")
        self.asked += int(weights)
        if self.asked > self.total:
            raise NetcleanseError(f"{self.path}: the config's layers up to {name!r} declare {self.asked:,} weights "
                                  f"but the file holds only {self.total:,}; refused")


@contextmanager
def file_weights(root, config: dict, path):
    """While the block runs (the config being rebuilt), layers are checked against ``root``'s weights."""
    token = _ACTIVE.set(FileWeights(root, config, path))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def check_layer(name: str, weights: int, kernel: tuple[int, ...] | None) -> None:
    """Called by the Keras layer builder before it allocates a layer with ``kernel`` (Keras layout);
    does nothing outside :func:`file_weights` or for layers without a kernel."""
    state = _ACTIVE.get()
    if state is not None and kernel is not None:
        state.check(name, weights, kernel)
