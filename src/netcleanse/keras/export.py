"""Export: a model's weights as a Keras-compatible ``.h5`` (Keras 2 ``save_weights`` layout)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ..classifier import Classifier
from ..errors import NetcleanseError
from ..utils import atomic_write
from .graph import KerasGraph, _module_slots
from .slots import Slot, _leaf_slots

# Keras splits attributes larger than the HDF5 object-header limit into name0, name1, ...
_HDF5_ATTR_LIMIT = 64512

# Version written into exported files: a Keras 2 weights layout that every Keras 2.x, tf-keras
# and Keras 3 reader loads without format conversions.
EXPORT_KERAS_VERSION = "2.2.4"
PREPROCESSING_ATTR = "netcleanse_preprocessing"  # (save_keras_weights)
PLAIN = {"input_scale": 1.0, "mean": None, "std": None}


def _write_attr_list(group: h5py.Group, name: str, values: list[str]) -> None:
    """Write a list attribute as Keras does (bytes; chunked above the HDF5 header limit)."""
    data = np.asarray([v.encode("utf-8") for v in values]) if values else np.asarray([], dtype=np.float64)
    if data.nbytes <= _HDF5_ATTR_LIMIT:
        group.attrs[name] = data
        return
    chunks = 2
    while max(len(c.tobytes()) for c in np.array_split(data, chunks)) > _HDF5_ATTR_LIMIT:
        chunks += 1
    for i, chunk in enumerate(np.array_split(data, chunks)):
        group.attrs[f"{name}{i}"] = chunk


def keras_layer_weights(net: nn.Module) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """(layer name, [(Keras weight name, array), ...]) for a net, in Keras's layer order.

    A :class:`KerasGraph` lists all its Keras layers (weightless ones too, as Keras does); any
    other net lists its weighted leaf modules in definition order, named by module path.
    """
    def arrays(slots: list[tuple[str, Slot]], default_layer: str) -> list[tuple[str, np.ndarray]]:
        out = []
        for inner, (var, tensor, _, to_keras) in slots:
            value = to_keras(tensor.detach().to("cpu", torch.float32)).contiguous().numpy()
            out.append((f"{inner or default_layer}/{var}:0", value))
        return out

    if isinstance(net, KerasGraph):
        layers = []
        for name, module in net.keras_layers():
            slots = [] if module is None else _module_slots(module)
            layers.append((name, arrays([("" if inner == name else inner, s) for inner, s in slots], name)))
        return layers
    layers = []
    for path, module in net.named_modules():
        if path and not list(module.children()):
            slots = _leaf_slots(module)
            if slots:
                layers.append((path, arrays([("", s) for s in slots], path)))
    for path, param in net.named_parameters():
        module_path = path.rsplit(".", 1)[0]
        if not any(module_path == layer for layer, _ in layers):
            raise NetcleanseError(f"cannot export parameter {path!r} to Keras: no Keras layer holds it")
    return layers


def save_keras_weights(model, path) -> Path:
    """Write a model's weights as a Keras ``.h5`` that Keras's ``load_weights`` reads.

    Layout as Keras 2 ``save_weights``: root attributes ``layer_names``, ``backend``,
    ``keras_version``; one group per layer with attribute ``weight_names`` and datasets
    ``<layer>/<layer>/kernel:0`` etc. (conv kernels HWIO, dense kernels (in, out)). A model that
    was rebuilt from a Keras config also gets that config (root ``model_config``, weights under
    ``model_weights``), which makes the file a complete Keras model that netcleanse and
    ``keras.models.load_model`` both read back without naming an architecture.

    The model's preprocessing (input scale, mean/std), which Keras weights cannot hold, is
    recorded in the root attribute ``netcleanse_preprocessing`` (JSON) where it does anything:
    netcleanse applies it when it loads the file again (:func:`recorded_preprocessing`); Keras
    ignores it, so a Keras user feeds the network as its ``.pt`` says (``netcleanse info``).
    """
    path = Path(path)
    if getattr(model, "poison_label", None) is not None:
        raise NetcleanseError("a guarded model has an extra 'poisoned' output that Keras cannot represent; "
                              "save it as .pt instead")
    net = model.net if isinstance(model, Classifier) else model
    if isinstance(net, torch.jit.ScriptModule):
        raise NetcleanseError("a TorchScript model cannot be exported to Keras (its layers are not known)")
    from ..onnx_io import OnnxNet
    if isinstance(net, OnnxNet):  # onnx2torch's graph: no architecture could read such weights back
        raise NetcleanseError("a model read from ONNX has no Keras layout; its .pt holds the weights")
    layers = keras_layer_weights(net)
    if not any(weights for _, weights in layers):
        raise NetcleanseError("the model has no weights to export")
    # A rebuilt Keras model keeps its own version: its config is in that version's dialect.
    version = (net.keras_version if isinstance(net, KerasGraph) else EXPORT_KERAS_VERSION).encode()
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            root = f
            if isinstance(model, Classifier) and model.preprocessing != PLAIN:
                f.attrs[PREPROCESSING_ATTR] = json.dumps(model.preprocessing)
            if isinstance(net, KerasGraph):
                f.attrs["model_config"] = json.dumps(net.model_config).encode("utf-8")
                f.attrs["backend"] = b"tensorflow"
                f.attrs["keras_version"] = version
                root = f.create_group("model_weights")
            _write_attr_list(root, "layer_names", [name for name, _ in layers])
            root.attrs["backend"] = b"tensorflow"
            root.attrs["keras_version"] = version
            for name, weights in layers:
                group = root.create_group(name)
                _write_attr_list(group, "weight_names", [weight_name for weight_name, _ in weights])
                for weight_name, value in weights:
                    group.create_dataset(weight_name, data=value)
    return path


def recorded_preprocessing(path) -> dict | None:
    """The preprocessing :func:`save_keras_weights` recorded in an ``.h5`` ({"input_scale", "mean",
    "std"}), or None where there is none; a malformed record is an error (it came from a file)."""
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(PREPROCESSING_ATTR)
    except OSError:
        return None
    if raw is None:
        return None
    try:
        record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
        scale = float(record["input_scale"])
        mean, std = record.get("mean"), record.get("std")
        return {"input_scale": scale, "mean": None if mean is None else [float(v) for v in mean],
                "std": None if std is None else [float(v) for v in std]}
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        raise NetcleanseError(f"{path}: its recorded preprocessing ({PREPROCESSING_ATTR}) is malformed") from None
