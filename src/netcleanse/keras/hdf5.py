"""Reading a Keras ``.h5`` file: its list attributes (chunked or not), its layer groups with their
weights (declared sizes checked before any array is read), its ``model_config`` and version.
Nothing here builds a model; :mod:`.load` does, from what these functions return."""

from __future__ import annotations

import json

import h5py
import numpy as np

from ..errors import NetcleanseError
from ..utils import check_declared_size, first_line, h5_attr_list

# Errors h5py raises on truncated or corrupt files; turned into NetcleanseError at the boundary.
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_attr_list = h5_attr_list  # a Keras list attribute (layer_names, weight_names), chunked or not


def read_weight(dataset: h5py.Dataset, where: str) -> np.ndarray:
    """A weight array as NumPy reads it; bfloat16 weights (which Keras writes as 2-byte opaque
    values: HDF5 has no such type) as float32, exactly (a bfloat16 is a float32's upper half)."""
    array = np.asarray(dataset)
    if array.dtype.kind != "V":
        return array
    if array.dtype.itemsize != 2 or array.dtype.names:
        raise NetcleanseError(f"{where} holds {array.dtype.itemsize}-byte values of a type netcleanse cannot read "
                              "(not a float); save the model in float32 or bfloat16")
    high = np.frombuffer(array.tobytes(), dtype="<u2").astype(np.uint32) << 16
    return high.view(np.float32).reshape(array.shape)


def _file_layers(root: h5py.Group) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """(layer name, [(weight name, array), ...]) for every layer group, in file order."""
    if "layer_names" not in root.attrs and "layer_names0" not in root.attrs:
        raise NetcleanseError("the file has no Keras 'layer_names' attribute; it is not a Keras weights file")
    layers = []
    for layer in _attr_list(root, "layer_names"):
        if layer not in root:
            raise NetcleanseError(f"the file lists layer {layer!r} but holds no group for it")
        group = root[layer]
        weights = []
        for weight_name in _attr_list(group, "weight_names"):
            if weight_name not in group:
                raise NetcleanseError(f"layer {layer!r}: weight {weight_name!r} is listed but missing")
            dataset = group[weight_name]
            check_declared_size(dataset.shape, dataset.dtype, dataset.id.get_storage_size(), "the file",
                                f"layer {layer!r} weight {weight_name!r}")
            weights.append((weight_name, read_weight(dataset, f"layer {layer!r} weight {weight_name!r}")))
        layers.append((layer, weights))
    return layers


def _model_config(h5: h5py.File) -> dict | None:
    if "model_config" not in h5.attrs:
        return None
    raw = h5.attrs["model_config"]
    try:
        config = json.loads(_decode(raw))
    except ValueError as exc:
        raise NetcleanseError(f"the file's model_config is not valid JSON ({first_line(exc)})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise NetcleanseError("the file's model_config is not a Keras model config")
    return config


def _keras_version(h5: h5py.File) -> str:
    return _decode(h5.attrs.get("keras_version", "2"))
