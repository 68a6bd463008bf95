"""Keras ``.h5`` files into PyTorch, without TensorFlow.

Weights-only files (``layer_names`` attribute, one group per layer) are loaded into a registered
architecture whose submodules carry the Keras layer names. Keras stores conv kernels HWIO and
dense kernels (in, out); torch wants OIHW and (out, in).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from .architectures import get_architecture
from .errors import NetcleanseError
from .model import Classifier


def _decode(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _layer_weights(group: h5py.Group) -> dict[str, np.ndarray]:
    """Map 'kernel'/'bias'/... to arrays for one Keras layer group (any nesting depth)."""
    names = [_decode(n) for n in group.attrs.get("weight_names", [])]
    out = {}
    for full in names:
        short = full.split("/")[-1].split(":")[0]
        out[short] = np.asarray(group[full])
    return out


def keras_weights_to_module(weights_root: h5py.Group, net: nn.Module) -> None:
    """Copy weights from a Keras weights group into ``net``'s Keras-named Conv2d/Linear layers."""
    layer_names = [_decode(n) for n in weights_root.attrs.get("layer_names", [])]
    modules = dict(net.named_modules())
    for layer in layer_names:
        weights = _layer_weights(weights_root[layer])
        if not weights:
            continue
        module = modules.get(layer)
        if module is None:
            raise NetcleanseError(f"the file has weights for layer {layer!r}, which the architecture lacks")
        kernel = weights.get("kernel")
        if isinstance(module, nn.Conv2d):
            kernel = torch.from_numpy(kernel).permute(3, 2, 0, 1)
        elif isinstance(module, nn.Linear):
            kernel = torch.from_numpy(kernel).t()
        else:
            raise NetcleanseError(f"layer {layer!r}: no Keras weight mapping for {type(module).__name__}")
        if tuple(kernel.shape) != tuple(module.weight.shape):
            raise NetcleanseError(f"layer {layer!r}: file kernel {tuple(kernel.shape)} does not fit "
                                  f"architecture {tuple(module.weight.shape)}")
        with torch.no_grad():
            module.weight.copy_(kernel)
            if module.bias is not None and "bias" in weights:
                module.bias.copy_(torch.from_numpy(weights["bias"]))


def _output_classes(weights_root: h5py.Group) -> int:
    """Number of classes: width of the last layer that has a kernel."""
    layer_names = [_decode(n) for n in weights_root.attrs.get("layer_names", [])]
    for layer in reversed(layer_names):
        weights = _layer_weights(weights_root[layer])
        if "kernel" in weights:
            return int(weights["kernel"].shape[-1])
    raise NetcleanseError("the file holds no layer with weights")


def load_keras(path, arch: str | None = None, input_scale: float = 1.0, name: str | None = None) -> Classifier:
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise NetcleanseError(f"{path} is not a readable HDF5 file ({exc})") from None
    with h5:
        weights_root = h5["model_weights"] if "model_weights" in h5 else h5
        if arch is None:
            raise NetcleanseError(f"{path} holds weights only; name its architecture with --arch "
                                  "(e.g. --arch csaw-deepid)")
        spec = get_architecture(arch)
        num_classes = _output_classes(weights_root)
        net = spec.build(num_classes)
        keras_weights_to_module(weights_root, net)
    return Classifier(net.eval(), spec.input_shape, num_classes, input_scale=input_scale,
                      name=name or path.stem, arch=arch, source=str(path))
