"""Keras ``.h5`` files into PyTorch and back, without TensorFlow.

Three kinds of Keras file are read:

- **Whole-model files** (root attribute ``model_config``, weights under ``model_weights``): the
  JSON config is parsed and an equivalent torch graph, :class:`KerasGraph`, is built from it.
  Sequential and Functional ("Model") configs of Keras 2.x, tf-keras and Keras 3 (dict-form
  ``inbound_nodes``) are understood, nested models included. Only the layer types listed in
  :data:`SUPPORTED_LAYERS` are built; a ``Lambda`` layer (serialized Python bytecode), a custom
  or unknown layer class is refused with an error naming the layer. Nothing from the file is
  ever executed: the config is read as JSON data and mapped onto torch code written here.
- **Weights-only files** (root attribute ``layer_names``, one group per layer, as written by
  Keras ``save_weights``): loaded into a registered architecture (``arch``) whose submodules
  carry the Keras layer names. Given ``arch``, a whole-model file is loaded this way too: its
  ``model_config`` is then ignored and only its weights are used.
- **Keras 3 ``.keras`` archives** (a zip holding ``config.json``, ``metadata.json`` and
  ``model.weights.h5``): the config is rebuilt as above; the weights file's layout is Keras 3's
  (``layers/<snake_case class name>[_<n>]/vars/<i>``, nested models below their own
  ``layers/``), read by :func:`load_keras_archive`. The archive is read in memory, never
  extracted, with the size limits of :func:`netcleanse.utils.check_declared_size`; an HDF5 file
  inside it that refers to other files is refused, as for ``.h5``.

Layout: inside netcleanse image tensors are NCHW; Keras computes NHWC. Every layer here keeps
Keras semantics under that change: ``Flatten`` flattens in Keras's (H, W, C) order so Dense
kernels apply unchanged, ``Concatenate``/``Softmax``/``BatchNormalization`` axes given in Keras
(channels-last) terms are mapped to NCHW. Tensors of rank other than 4 keep Keras's layout.
Keras stores conv kernels HWIO and dense kernels (in, out); torch wants OIHW and (out, in).

Output contract: the module returns **logits**. When the network ends in a softmax (a final
Dense/Conv2D with ``activation="softmax"``, an ``Activation("softmax")`` or a ``Softmax`` layer,
also inside a nested final model) that softmax is left out, so ``softmax(module(x))`` equals
Keras's output. A network whose output is not a softmax is returned as it is (its output then
is whatever Keras's was; :attr:`KerasGraph.final_activation` says what it ends in).

Export: :func:`save_keras_weights` writes a Keras-compatible ``.h5`` with the same layer and
dataset names (``<layer>/<layer>/kernel:0``, ``bias:0``, BatchNormalization ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``), so a repaired model can go back to a Keras user.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NetcleanseError
from ..model import Classifier
from ..utils import atomic_write, check_declared_size, check_self_contained_h5, first_line

# Errors h5py raises on truncated or corrupt files; turned into NetcleanseError at the boundary.
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)

# Keras splits attributes larger than the HDF5 object-header limit into name0, name1, ...
_HDF5_ATTR_LIMIT = 64512

# Version written into exported files: a Keras 2 weights layout that every Keras 2.x, tf-keras
# and Keras 3 reader loads without format conversions.
EXPORT_KERAS_VERSION = "2.2.4"


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------

def _attr_list(group: h5py.Group, name: str) -> list[str]:
    """A Keras list attribute (``layer_names``, ``weight_names``), chunked or not, as strings."""
    if name in group.attrs:
        return [_decode(v) for v in np.asarray(group.attrs[name]).ravel()]
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        values += [_decode(v) for v in np.asarray(group.attrs[f"{name}{chunk}"]).ravel()]
        chunk += 1
    return values


def _var_name(weight_name: str) -> str:
    """'conv_1/kernel:0' -> 'kernel' (Keras 3 writes 'conv_1/kernel' without the ':0')."""
    return weight_name.split("/")[-1].split(":")[0]


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
            weights.append((weight_name, np.asarray(dataset)))
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


# --------------------------------------------------------------------------------------------
# Weight slots: where each Keras weight of a torch module lives, and how it converts
# --------------------------------------------------------------------------------------------

def _conv_to_torch(k: np.ndarray) -> torch.Tensor:  # HWIO -> OIHW
    return torch.from_numpy(np.ascontiguousarray(k)).permute(3, 2, 0, 1)


def _conv_to_keras(w: torch.Tensor) -> torch.Tensor:  # OIHW -> HWIO
    return w.permute(2, 3, 1, 0)


def _depthwise_to_torch(k: np.ndarray) -> torch.Tensor:
    # Keras (kh, kw, in, multiplier); output channel c*multiplier + m, as torch groups=in.
    kh, kw, cin, mult = k.shape
    return torch.from_numpy(np.ascontiguousarray(k)).reshape(kh, kw, cin * mult).permute(2, 0, 1).unsqueeze(1)


def _identity(t):
    # np.array, not np.ascontiguousarray: the latter turns a 0-d weight (Normalization's count) into 1-d
    return t if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t))


Slot = tuple[str, torch.Tensor, Callable, Callable]  # (Keras var name, torch tensor, to_torch, to_keras)


def _leaf_slots(module: nn.Module) -> list[Slot]:
    """The Keras weights of one leaf module, in Keras's order."""
    slots: list[Slot] = []
    if isinstance(module, KerasDepthwiseConv2d):
        mult = module.depth_multiplier
        slots.append(("depthwise_kernel", module.weight, _depthwise_to_torch,
                      lambda w, m=mult: w.squeeze(1).permute(1, 2, 0).reshape(w.shape[2], w.shape[3], -1, m)))
    elif isinstance(module, nn.Conv2d):
        slots.append(("kernel", module.weight, _conv_to_torch, _conv_to_keras))
    elif isinstance(module, nn.Linear):
        slots.append(("kernel", module.weight, lambda k: _identity(k).t(), lambda w: w.t()))
    elif isinstance(module, KerasNormalization):
        if module.in_config:
            return slots
        return [("mean", module.mean, _identity, _identity), ("variance", module.variance, _identity, _identity),
                ("count", module.count, _identity, lambda t: t.to(torch.int64))]
    elif isinstance(module, _BatchNorm):
        if getattr(module, "keras_scale", True):
            slots.append(("gamma", module.weight, _identity, _identity))
        if getattr(module, "keras_center", True):
            slots.append(("beta", module.bias, _identity, _identity))
        slots.append(("moving_mean", module.running_mean, _identity, _identity))
        slots.append(("moving_variance", module.running_var, _identity, _identity))
        return slots
    elif any(True for _ in module.parameters(recurse=False)):
        raise NetcleanseError(f"no Keras weight mapping for a torch {type(module).__name__} layer")
    else:
        return slots
    if module.bias is not None:
        slots.append(("bias", module.bias, _identity, _identity))
    return slots


def _module_slots(module: nn.Module) -> list[tuple[str, Slot]]:
    """(inner Keras layer name or "", slot) for a module; a nested Keras model lists its layers' weights."""
    if isinstance(module, KerasGraph):
        return module.weight_slots()
    return [("", slot) for slot in _leaf_slots(module)]


def _assign(layer: str, slots: list[tuple[str, Slot]], weights: list[tuple[str, np.ndarray]],
            what: str = "the model") -> None:
    """Copy one file layer group's weights into its slots, in order, checking names and shapes."""
    if len(slots) != len(weights):
        want = ", ".join(f"{inner + '/' if inner else ''}{s[0]}" for inner, s in slots) or "none"
        raise NetcleanseError(f"layer {layer!r}: the file has {len(weights)} weights but {what} expects "
                              f"{len(slots)} ({want})")
    with torch.no_grad():
        for (inner, (var, tensor, to_torch, to_keras)), (weight_name, array) in zip(slots, weights):
            where = f"layer {layer!r}" + (f" (inner layer {inner!r})" if inner and inner != layer else "")
            if _var_name(weight_name) != var:
                raise NetcleanseError(f"{where}: file weight {weight_name!r} where {what} expects {var!r}")
            expected = tuple(to_keras(tensor.detach()).shape)
            if tuple(array.shape) != expected:
                raise NetcleanseError(f"{where}: file weight {weight_name!r} has shape {array.shape} but "
                                      f"{what} needs {expected}")
            tensor.copy_(to_torch(array.astype(np.float32, copy=False)))


def keras_weights_to_module(weights_root: h5py.Group, net: nn.Module, arch: str | None = None) -> None:
    """Copy the weights of a Keras weights group into ``net``, matching layers by name.

    Every weighted Keras layer must have a same-named submodule of ``net``, and every weighted
    submodule must receive weights; within a layer, weights follow Keras's order (kernel, bias;
    gamma, beta, moving_mean, moving_variance). The weights of a nested Keras model (one group
    holding ``inner_layer/kernel:0`` names) go to ``net``'s submodules named after the inner layers.
    """
    what = f"architecture {arch!r}" if arch else "the model"
    modules = dict(net.named_modules())
    filled: set[str] = set()
    for layer, weights in _file_layers(weights_root):
        if not weights:
            continue
        module = modules.get(layer)
        if module is not None:
            _assign(layer, _module_slots(module), weights, what)
            filled.add(layer)
            continue
        by_inner: dict[str, list] = {}
        for weight_name, array in weights:
            parts = weight_name.split("/")
            by_inner.setdefault(parts[-2] if len(parts) > 1 else "", []).append((weight_name, array))
        if not all(inner in modules for inner in by_inner):
            raise NetcleanseError(f"the file has weights for layer {layer!r}, which {what} does not have")
        for inner, inner_weights in by_inner.items():
            _assign(inner, _module_slots(modules[inner]), inner_weights, what)
            filled.add(inner)
    for path, module in modules.items():
        if path and not list(module.children()) and _leaf_slots(module) and path not in filled \
                and not any(path.startswith(done + ".") for done in filled):
            raise NetcleanseError(f"{what} has layer {path!r} but the file holds no weights for it")


def _output_classes(layers: list[tuple[str, list]]) -> int:
    """Number of classes of a weights-only file: width of the last kernel in file order."""
    for _, weights in reversed(layers):
        for weight_name, array in reversed(weights):
            if _var_name(weight_name) == "kernel":
                return int(array.shape[-1])
    raise NetcleanseError("the file holds no layer with weights")


# --------------------------------------------------------------------------------------------
# Torch layers with Keras semantics (NCHW inside)
# --------------------------------------------------------------------------------------------

def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise NetcleanseError(f"expected a 2-d size, got {value}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'same' padding along one axis: the odd pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _tf_same_pad(x: torch.Tensor, kernel, stride, dilation=(1, 1), value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pads(x.shape[2], kernel[0], stride[0], dilation[0])
    left, right = _same_pads(x.shape[3], kernel[1], stride[1], dilation[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class KerasConv2d(nn.Conv2d):
    """Conv2D with Keras 'valid' or TensorFlow 'same' padding (asymmetric when it must be)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=True,
                 same=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias)
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _tf_same_pad(x, self.kernel_size, self.stride, self.dilation)
        return super().forward(x)


class KerasDepthwiseConv2d(KerasConv2d):
    """DepthwiseConv2D: one group per input channel, ``depth_multiplier`` outputs each."""

    def __init__(self, in_channels, depth_multiplier, kernel_size, stride=1, dilation=1, bias=True, same=False):
        super().__init__(in_channels, in_channels * depth_multiplier, kernel_size, stride, dilation,
                         groups=in_channels, bias=bias, same=same)
        self.depth_multiplier = depth_multiplier


class KerasDense(nn.Linear):
    """Dense: on image tensors it acts on the channel axis, as Keras does on NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class KerasBatchNorm(_BatchNorm):
    """BatchNormalization over the channel axis; ``center``/``scale`` off means beta=0/gamma=1."""

    def __init__(self, num_features: int, eps: float, momentum: float, center: bool, scale: bool):
        super().__init__(num_features, eps=eps, momentum=1.0 - momentum, affine=True, track_running_stats=True)
        self.keras_center, self.keras_scale = center, scale
        self.bias.requires_grad_(center)
        self.weight.requires_grad_(scale)

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"BatchNormalization needs at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() in (2, 4):
            return super().forward(x)
        return super().forward(x.movedim(-1, 1)).movedim(1, -1)


def _to_keras_layout(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _from_keras_layout(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


def _torch_axis(axis: int, rank: int) -> int:
    """A Keras axis (channels-last, batch = 0) as the axis of netcleanse's tensor."""
    axis = axis % rank
    if rank != 4:
        return axis
    return {0: 0, 1: 2, 2: 3, 3: 1}[axis]


class KerasFlatten(nn.Module):
    """Flatten in Keras's (H, W, C) order, so Dense kernels from Keras apply unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_keras_layout(x).flatten(1)


class KerasReshape(nn.Module):
    def __init__(self, target_shape):
        super().__init__()
        self.target_shape = tuple(int(s) for s in target_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _from_keras_layout(_to_keras_layout(x).reshape(x.shape[0], *self.target_shape))

    def extra_repr(self) -> str:
        return f"target_shape={self.target_shape}"


class KerasPermute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = (0,) + tuple(int(d) for d in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _from_keras_layout(_to_keras_layout(x).permute(*self.dims))


class KerasPool2d(nn.Module):
    """MaxPooling2D / AveragePooling2D with 'valid' or TF 'same' padding (pads never count)."""

    def __init__(self, kind: str, pool_size, strides, same: bool):
        super().__init__()
        self.kind, self.pool_size, self.strides, self.same = kind, pool_size, strides, same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            if self.same:
                x = _tf_same_pad(x, self.pool_size, self.strides, value=float("-inf"))
            return F.max_pool2d(x, self.pool_size, self.strides)
        if not self.same:
            return F.avg_pool2d(x, self.pool_size, self.strides)
        summed = F.avg_pool2d(_tf_same_pad(x, self.pool_size, self.strides), self.pool_size, self.strides)
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        counted = F.avg_pool2d(_tf_same_pad(ones, self.pool_size, self.strides), self.pool_size, self.strides)
        return summed / counted

    def extra_repr(self) -> str:
        return f"{self.kind}, pool_size={self.pool_size}, strides={self.strides}, same={self.same}"


class KerasGlobalPool2d(nn.Module):
    def __init__(self, kind: str, keepdims: bool):
        super().__init__()
        self.kind, self.keepdims = kind, keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return x.amax(dim=(2, 3), keepdim=self.keepdims)
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class KerasCropping2d(nn.Module):
    def __init__(self, top, bottom, left, right):
        super().__init__()
        self.crop = (top, bottom, left, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.crop
        return x[:, :, top:x.shape[2] - bottom, left:x.shape[3] - right]


class KerasUpSampling2d(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.size[0], dim=2).repeat_interleave(self.size[1], dim=3)


class KerasRescaling(nn.Module):
    """Rescaling: ``x * scale + offset``; a per-channel scale or offset (a list in the config)
    broadcasts against the last axis in Keras's layout (the channels of an image)."""

    def __init__(self, scale, offset):
        super().__init__()
        self.per_channel = isinstance(scale, list) or isinstance(offset, list)
        if self.per_channel:
            self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
            self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))
        else:
            self.scale, self.offset = float(scale), float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return x * self.scale + self.offset
        return _from_keras_layout(_to_keras_layout(x) * self.scale + self.offset)


class KerasNormalization(nn.Module):
    """Normalization (Keras preprocessing layer): ``(x - mean) / max(sqrt(variance), 1e-7)``, or
    ``mean + x * max(sqrt(variance), 1e-7)`` with ``invert``, computed in Keras's layout.

    ``keep``: the kept axes (Keras axes of the input, batch = 0); ``mean``/``variance`` have one value
    per position along them. Values given in the config are constants; otherwise they are the
    layer's weights (``mean``, ``variance``, ``count``, as ``adapt()`` stored them)."""

    EPSILON = 1e-7  # keras.backend.epsilon()

    def __init__(self, keep: tuple[int, ...], input_shape: tuple[int, ...], invert: bool,
                 mean=None, variance=None):
        super().__init__()
        self.keep, self.invert = tuple(keep), bool(invert)
        self.in_config = mean is not None
        shape = tuple(int(input_shape[d]) for d in self.keep)
        self._broadcast = tuple(int(input_shape[d]) if d in self.keep else 1 for d in range(len(input_shape)))
        if self.in_config:
            mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32))
            var_t = torch.as_tensor(np.asarray(variance, dtype=np.float32))
            self.register_buffer("mean", _align(mean_t, self.keep, self._broadcast))
            self.register_buffer("variance", _align(var_t, self.keep, self._broadcast))
        else:
            self.register_buffer("mean", torch.zeros(shape))
            self.register_buffer("variance", torch.ones(shape))
            self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _to_keras_layout(x)
        mean = self.mean.reshape(self._broadcast)
        std = self.variance.reshape(self._broadcast).sqrt().clamp_min(self.EPSILON)
        y = mean + y * std if self.invert else (y - mean) / std
        return _from_keras_layout(y)

    def extra_repr(self) -> str:
        return f"keep_axes={self.keep}, invert={self.invert}"


def _align(value: torch.Tensor, keep: tuple[int, ...], broadcast: tuple[int, ...]) -> torch.Tensor:
    """A config mean/variance as Keras broadcasts it: a scalar everywhere; otherwise its dimensions
    aligned right to left with the kept axes."""
    if value.dim() == 0:
        return value.expand(broadcast).clone()
    expanded = [1] * len(broadcast)
    for i in range(1, value.dim() + 1):
        expanded[keep[-i]] = value.shape[-i]
    return value.reshape(expanded).expand(broadcast).clone()


class KerasMerge(nn.Module):
    """Add, Subtract, Multiply, Average, Maximum, Minimum and Concatenate."""

    def __init__(self, op: str, axis: int = -1):
        super().__init__()
        self.op, self.axis = op, axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.op == "concatenate":
            return torch.cat(xs, dim=_torch_axis(self.axis, xs[0].dim()))
        if self.op == "subtract":
            return xs[0] - xs[1]
        out = xs[0]
        for x in xs[1:]:
            out = {"add": torch.add, "multiply": torch.mul, "average": torch.add,
                   "maximum": torch.maximum, "minimum": torch.minimum}[self.op](out, x)
        return out / len(xs) if self.op == "average" else out

    def extra_repr(self) -> str:
        return self.op + (f", axis={self.axis}" if self.op == "concatenate" else "")


class KerasActivation(nn.Module):
    """A Keras activation by name (Activation, ReLU, LeakyReLU, ELU, Softmax, ... layers)."""

    def __init__(self, name: str, keras_major: int = 2, **params):
        super().__init__()
        if name not in _ACTIVATIONS:
            raise NetcleanseError(f"unsupported activation {name!r}")
        self.name, self.keras_major, self.params = name, keras_major, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTIVATIONS[self.name](x, self.keras_major, **self.params)

    def extra_repr(self) -> str:
        return ", ".join([self.name] + [f"{k}={v}" for k, v in self.params.items()])


def _keras_relu(x, _major, max_value=None, negative_slope=0.0, threshold=0.0):
    # keras.backend.relu: x above the threshold (clipped to max_value), slope*(x - threshold) below.
    positive = x * (x > threshold) if threshold != 0 else F.relu(x)
    if max_value is not None:
        positive = positive.clamp(0, max_value)
    if negative_slope:
        positive = positive - negative_slope * F.relu(threshold - x)
    return positive


def _softmax(x, _major, axis=-1):
    return torch.softmax(x, dim=_torch_axis(axis, x.dim()))


def _hard_sigmoid(x, major):
    # Keras 2: clip(0.2 x + 0.5, 0, 1); Keras 3: relu6(x + 3) / 6.
    return (0.2 * x + 0.5).clamp(0, 1) if major < 3 else F.relu6(x + 3) / 6


_ACTIVATIONS: dict[str, Callable] = {
    "linear": lambda x, _m: x,
    "relu": _keras_relu,
    "relu6": lambda x, _m: F.relu6(x),
    "sigmoid": lambda x, _m: torch.sigmoid(x),
    "tanh": lambda x, _m: torch.tanh(x),
    "softmax": _softmax,
    "log_softmax": lambda x, _m, axis=-1: torch.log_softmax(x, dim=_torch_axis(axis, x.dim())),
    "elu": lambda x, _m, alpha=1.0: F.elu(x, alpha),
    "selu": lambda x, _m: F.selu(x),
    "softplus": lambda x, _m: F.softplus(x),
    "softsign": lambda x, _m: F.softsign(x),
    "exponential": lambda x, _m: torch.exp(x),
    "swish": lambda x, _m: F.silu(x),
    "silu": lambda x, _m: F.silu(x),
    "gelu": lambda x, _m: F.gelu(x),
    "mish": lambda x, _m: F.mish(x),
    "hard_sigmoid": _hard_sigmoid,
    "hard_silu": lambda x, _m: x * F.relu6(x + 3) / 6,
    "hard_swish": lambda x, _m: x * F.relu6(x + 3) / 6,
    "leaky_relu": lambda x, _m, negative_slope=0.2: F.leaky_relu(x, negative_slope),
    "thresholded_relu": lambda x, _m, theta=1.0: x * (x > theta),
}


# --------------------------------------------------------------------------------------------
# Keras config -> layer builders
# --------------------------------------------------------------------------------------------

MODEL_CLASSES = {"Model", "Functional", "Sequential"}
_IDENTITY_LAYERS = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                    "ActivityRegularization"}
_MERGES = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply", "Average": "average",
           "Maximum": "maximum", "Minimum": "minimum", "Concatenate": "concatenate"}
_ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D",
            "GlobalAvgPool2D": "GlobalAveragePooling2D", "GlobalMaxPool2D": "GlobalMaxPooling2D"}


def _activation_name(value, layer: str) -> str:
    """An activation from a config: a name, or tf-keras/Keras 3's dict for a built-in function."""
    if value is None:
        return "linear"
    if isinstance(value, dict):
        module = str(value.get("module") or "keras")
        name = value.get("config")
        if value.get("class_name") != "function" or not module.startswith(("keras", "tf_keras")) \
                or not isinstance(name, str):
            raise NetcleanseError(f"layer {layer!r} uses a custom activation ({value.get('class_name')}); "
                                  "netcleanse only rebuilds built-in Keras activations")
        value = name
    if not isinstance(value, str) or value not in _ACTIVATIONS:
        raise NetcleanseError(f"layer {layer!r} uses activation {value!r}, which netcleanse does not support")
    return value


# the most weights one layer of a config may declare (2^28: 1 GiB of float32; VGG-16's largest
# layer has 1.03e8), checked before the layer is allocated
MAX_LAYER_WEIGHTS = 1 << 28


def _check_layer_size(name: str, weights: int) -> None:
    if weights > MAX_LAYER_WEIGHTS:
        raise NetcleanseError(f"layer {name!r} declares {weights:,} weights (more than {MAX_LAYER_WEIGHTS:,}); refused")


def _build_layer(class_name: str, cfg: dict, name: str, inputs: list[torch.Tensor],
                 keras_major: int) -> tuple[nn.Module, str]:
    """A torch module for one Keras layer, given the tensors it is first called on.

    Returns (module, fused activation name applied after it, "linear" for none).
    """
    x = inputs[0]
    rank = x.dim()

    def image_input():
        if rank != 4:
            raise NetcleanseError(f"layer {name!r} ({class_name}) expects an image tensor, got rank {rank}")

    if class_name == "Conv2D":
        image_input()
        kernel, strides, dilation = _pair(cfg["kernel_size"]), _pair(cfg.get("strides", 1)), \
            _pair(cfg.get("dilation_rate", 1))
        groups = int(cfg.get("groups", 1))
        _check_layer_size(name, int(x.shape[1]) * int(cfg["filters"]) * kernel[0] * kernel[1] // max(groups, 1))
        module = KerasConv2d(x.shape[1], int(cfg["filters"]), kernel, strides, dilation, groups,
                             bool(cfg.get("use_bias", True)), same=_padding(cfg, name) == "same")
        return module, _activation_name(cfg.get("activation"), name)
    if class_name == "DepthwiseConv2D":
        image_input()
        module = KerasDepthwiseConv2d(x.shape[1], int(cfg.get("depth_multiplier", 1)), _pair(cfg["kernel_size"]),
                                      _pair(cfg.get("strides", 1)), _pair(cfg.get("dilation_rate", 1)),
                                      bool(cfg.get("use_bias", True)), same=_padding(cfg, name) == "same")
        return module, _activation_name(cfg.get("activation"), name)
    if class_name == "Dense":
        in_features = x.shape[1] if rank == 4 else x.shape[-1]
        _check_layer_size(name, int(in_features) * int(cfg["units"]))
        return KerasDense(in_features, int(cfg["units"]), bool(cfg.get("use_bias", True))), \
            _activation_name(cfg.get("activation"), name)
    if class_name in ("MaxPooling2D", "AveragePooling2D"):
        image_input()
        pool = _pair(cfg.get("pool_size", 2))
        strides = _pair(cfg["strides"]) if cfg.get("strides") is not None else pool
        kind = "max" if class_name == "MaxPooling2D" else "avg"
        return KerasPool2d(kind, pool, strides, _padding(cfg, name) == "same"), "linear"
    if class_name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        image_input()
        kind = "max" if class_name == "GlobalMaxPooling2D" else "avg"
        return KerasGlobalPool2d(kind, bool(cfg.get("keepdims", False))), "linear"
    if class_name == "Flatten":
        return KerasFlatten(), "linear"
    if class_name == "Reshape":
        return KerasReshape(cfg["target_shape"]), "linear"
    if class_name == "Permute":
        return KerasPermute(cfg["dims"]), "linear"
    if class_name in _IDENTITY_LAYERS:
        return nn.Identity(), "linear"  # only active while training in Keras
    if class_name in _MERGES:
        return KerasMerge(_MERGES[class_name], int(cfg.get("axis", -1))), "linear"
    if class_name == "Activation":
        return KerasActivation(_activation_name(cfg.get("activation"), name), keras_major), "linear"
    if class_name == "ReLU":
        max_value = cfg.get("max_value")
        return KerasActivation("relu", keras_major, max_value=None if max_value is None else float(max_value),
                               negative_slope=float(cfg.get("negative_slope", 0.0)),
                               threshold=float(cfg.get("threshold", 0.0))), "linear"
    if class_name == "LeakyReLU":
        slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
        return KerasActivation("leaky_relu", keras_major, negative_slope=float(slope)), "linear"
    if class_name == "ELU":
        return KerasActivation("elu", keras_major, alpha=float(cfg.get("alpha", 1.0))), "linear"
    if class_name == "ThresholdedReLU":
        return KerasActivation("thresholded_relu", keras_major, theta=float(cfg.get("theta", 1.0))), "linear"
    if class_name == "Softmax":
        axis = cfg.get("axis", -1)
        if isinstance(axis, list):
            if len(axis) != 1:
                raise NetcleanseError(f"layer {name!r}: softmax over several axes is not supported")
            axis = axis[0]
        return KerasActivation("softmax", keras_major, axis=int(axis)), "linear"
    if class_name == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int) or axis % rank != rank - 1:
            raise NetcleanseError(f"layer {name!r}: BatchNormalization over axis {axis} is not supported "
                                  "(only the channel axis, -1)")
        channels = x.shape[1] if rank == 4 else x.shape[-1]
        return KerasBatchNorm(channels, float(cfg.get("epsilon", 1e-3)), float(cfg.get("momentum", 0.99)),
                              bool(cfg.get("center", True)), bool(cfg.get("scale", True))), "linear"
    if class_name == "ZeroPadding2D":
        image_input()
        (top, bottom), (left, right) = _pad_spec(cfg.get("padding", 1))
        return nn.ZeroPad2d((left, right, top, bottom)), "linear"
    if class_name == "Cropping2D":
        image_input()
        (top, bottom), (left, right) = _pad_spec(cfg.get("cropping", 0))
        return KerasCropping2d(top, bottom, left, right), "linear"
    if class_name == "UpSampling2D":
        image_input()
        if cfg.get("interpolation", "nearest") != "nearest":
            raise NetcleanseError(f"layer {name!r}: UpSampling2D interpolation "
                                  f"{cfg.get('interpolation')!r} is not supported (only 'nearest')")
        return KerasUpSampling2d(_pair(cfg.get("size", 2))), "linear"
    if class_name == "Rescaling":
        scale, offset = _config_array(cfg.get("scale", 1.0)), _config_array(cfg.get("offset", 0.0))
        for value in (scale, offset):
            if isinstance(value, list) and np.asarray(value).ndim != 1:
                raise NetcleanseError(f"layer {name!r}: Rescaling by a {np.asarray(value).ndim}-d array is not "
                                      "supported (only a number or one value per channel)")
        return KerasRescaling(scale, offset), "linear"
    if class_name == "Normalization":
        axis = cfg.get("axis", -1)
        axes = [] if axis is None else [axis] if isinstance(axis, int) else list(axis)
        keep = tuple(sorted(int(a) % rank for a in axes))
        if any(a == 0 for a in keep):
            raise NetcleanseError(f"layer {name!r}: Normalization over the batch axis is not supported")
        shape = tuple(_to_keras_layout(x).shape)
        mean, variance = _config_array(cfg.get("mean")), _config_array(cfg.get("variance"))
        if (mean is None) != (variance is None):
            raise NetcleanseError(f"layer {name!r}: Normalization config gives mean or variance, not both")
        _check_layer_size(name, int(np.prod([shape[d] for d in keep], dtype=object)))
        return KerasNormalization(keep, shape, bool(cfg.get("invert", False)), mean, variance), "linear"
    raise NetcleanseError(f"layer {name!r} has class {class_name!r}, which netcleanse cannot rebuild")


def _config_array(value):
    """A number or (nested) list from a config; Keras 3 writes arrays as {"class_name": "__numpy__",
    "config": {"value": ...}}. ``None`` stays ``None``."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("value")
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, list):
        array = np.asarray(value, dtype=np.float64)
        if not np.isfinite(array).all():
            raise NetcleanseError("a preprocessing layer's config holds NaN or infinite values")
        return array.tolist()
    raise NetcleanseError(f"a preprocessing layer's config holds {type(value).__name__} where numbers belong")


# the largest input a Keras config may declare per image (16 megapixels x 3 channels)
MAX_INPUT_VALUES = 48_000_000
SUPPORTED_LAYERS = frozenset({"InputLayer", "Conv2D", "DepthwiseConv2D", "Dense", "MaxPooling2D",
                              "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten",
                              "Reshape", "Permute", "Activation", "ReLU", "LeakyReLU", "ELU", "ThresholdedReLU",
                              "Softmax", "BatchNormalization", "ZeroPadding2D", "Cropping2D", "UpSampling2D",
                              "Rescaling", "Normalization"}
                             | _IDENTITY_LAYERS | set(_MERGES) | MODEL_CLASSES | set(_ALIASES))


def _padding(cfg: dict, name: str) -> str:
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("valid", "same"):
        raise NetcleanseError(f"layer {name!r}: padding {padding!r} is not supported")
    return padding


def _pad_spec(value) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras padding/cropping: n, (h, w) or ((top, bottom), (left, right))."""
    if isinstance(value, (int, float)):
        return (int(value), int(value)), (int(value), int(value))
    first, second = value
    rows = (int(first), int(first)) if isinstance(first, (int, float)) else (int(first[0]), int(first[1]))
    cols = (int(second), int(second)) if isinstance(second, (int, float)) else (int(second[0]), int(second[1]))
    return rows, cols


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------

def _layer_entries(model_config: dict) -> list[dict]:
    config = model_config.get("config")
    if isinstance(config, list):  # Keras <= 2.2.2 Sequential: the config is the layer list
        return config
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise NetcleanseError(f"the {model_config.get('class_name')} config has no layer list")
    return config["layers"]


def _entry_name(entry: dict) -> str:
    name = entry.get("name") or (entry.get("config") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise NetcleanseError(f"a {entry.get('class_name')} layer in the config has no name")
    return name


def check_config(model_config: dict) -> None:
    """Refuse, before building anything, a config with a Lambda, custom or unsupported layer.

    A Lambda layer is reported first wherever it is: it carries serialized Python code.
    """
    problems: list[tuple[int, str]] = []

    def walk(config: dict) -> None:
        for entry in _layer_entries(config):
            if not isinstance(entry, dict):
                raise NetcleanseError("the model config has a layer that is not a JSON object")
            class_name, name = str(entry.get("class_name")), _entry_name(entry)
            module = str(entry.get("module") or "keras")
            registered = entry.get("registered_name")
            cfg = entry.get("config") or {}
            if class_name == "Lambda" or class_name == "TFOpLambda" or class_name == "SlicingOpLambda":
                problems.append((0, f"layer {name!r} is a Keras {class_name} layer (serialized Python code); "
                                    "netcleanse refuses to run code from a model file"))
            elif not module.startswith(("keras", "tf_keras", "tensorflow")) or \
                    (registered not in (None, class_name) and not str(registered).startswith("keras")):
                problems.append((1, f"layer {name!r} has custom class {registered or class_name!r} "
                                    f"(module {module!r}); netcleanse only rebuilds built-in Keras layers"))
            elif class_name not in SUPPORTED_LAYERS:
                problems.append((1, f"layer {name!r} has class {class_name!r}, which netcleanse cannot rebuild"))
            elif isinstance(cfg, dict) and cfg.get("data_format") == "channels_first":
                problems.append((2, f"layer {name!r} ({class_name}) uses data_format='channels_first', "
                                    "which netcleanse does not support"))
            elif class_name in MODEL_CLASSES:
                walk(entry)

    walk(model_config)
    if problems:
        problems.sort(key=lambda p: p[0])
        more = f" (and {len(problems) - 1} more unsupported layer(s))" if len(problems) > 1 else ""
        raise NetcleanseError(problems[0][1] + more)


def _input_spec(entry: dict) -> tuple | None:
    cfg = entry.get("config") or {}
    shape = cfg.get("batch_input_shape", cfg.get("batch_shape"))
    if shape is None and cfg.get("input_shape") is not None:
        shape = [None] + list(cfg["input_shape"])
    if shape is not None:
        try:
            size = int(np.prod([int(n) for n in list(shape)[1:] if n is not None], dtype=object))
        except (TypeError, ValueError):
            raise NetcleanseError(f"input layer {entry.get('name')!r} has an unreadable shape {shape!r}") from None
        if size > MAX_INPUT_VALUES:
            raise NetcleanseError(f"input layer {entry.get('name')!r} declares {size:,} values per image "
                                  f"(more than {MAX_INPUT_VALUES:,}); refused")
    return None if shape is None else tuple(shape)


def _node_refs(node) -> list[tuple[str, int, int]]:
    """The (layer, node index, tensor index) inputs of one inbound node, in either dialect."""
    if isinstance(node, dict):  # Keras 3: {"args": [...keras tensors...], "kwargs": {...}}
        refs: list[tuple[str, int, int]] = []

        def walk(obj):
            if isinstance(obj, dict):
                if obj.get("class_name") == "__keras_tensor__":
                    history = obj["config"]["keras_history"]
                    refs.append((str(history[0]), int(history[1]), int(history[2])))
                else:
                    for value in obj.values():
                        walk(value)
            elif isinstance(obj, list):
                for value in obj:
                    walk(value)

        walk(node.get("args", []))
        return refs
    if node and isinstance(node[0], str):  # a single reference, not a list of them
        node = [node]
    return [(str(ref[0]), int(ref[1]), int(ref[2])) for ref in node]


def _io_refs(value) -> list[tuple[str, int, int]]:
    if not value:
        return []
    if isinstance(value[0], str):
        value = [value]
    return [(str(v[0]), int(v[1]), int(v[2])) for v in value]


class KerasGraph(nn.Module):
    """A Keras Sequential or Functional model, rebuilt as a torch module from its JSON config.

    Every Keras layer becomes a submodule named after it (so weights map by name); the forward
    pass runs the layers' call nodes in topological order. Modules are created on a dry run with
    a zero image, so their sizes come from the graph itself and a config alone suffices to
    rebuild the net (netcleanse ``.pt`` checkpoints store the config, not code).

    Attributes: ``input_shape`` (C, H, W); ``final_activation`` (what the network ends in,
    e.g. "softmax", which the forward pass leaves out: it returns logits); ``prune_layer`` (the
    last convolution every path to the output goes through, for fine-pruning; None if none);
    ``model_config`` (the Keras config dict); ``keras_version``.
    """

    def __init__(self, model_config: dict, keras_version: str = "2", strip_final_softmax: bool = True):
        super().__init__()
        check_config(model_config)
        self.model_config = model_config
        self.keras_version = str(keras_version)
        try:
            self._keras_major = int(self.keras_version.split(".")[0])
        except ValueError:
            self._keras_major = 2
        self._class_name = model_config["class_name"]
        entries = _layer_entries(model_config)
        self._entries = {_entry_name(e): e for e in entries}
        self._layer_order = [_entry_name(e) for e in entries]
        if len(self._entries) != len(entries):
            raise NetcleanseError("the model config has two layers with the same name")
        if self._class_name == "Sequential":
            self._plan_sequential(entries)
        else:
            self._plan_functional(model_config.get("config") or {})
        self.input_shape = self._image_shape()
        self._activations: dict[str, str] = {}
        self._strip = strip_final_softmax
        self.final_activation = self._final_activation()
        with torch.no_grad():
            out = self._execute(torch.zeros((1,) + self.input_shape), strip=False, build=True)
        self.output_shape = tuple(out.shape[1:])
        self.prune_layer = self._dominating_conv()

    # -- planning ---------------------------------------------------------------------------

    def _plan_sequential(self, entries: list[dict]) -> None:
        layers = [e for e in entries if e.get("class_name") != "InputLayer"]
        if not layers:
            raise NetcleanseError("the Sequential model has no layers")
        spec = next((s for s in (_input_spec(e) for e in entries[:1] + layers[:1]) if s is not None), None)
        config = self.model_config.get("config")
        if spec is None and isinstance(config, dict) and config.get("build_input_shape") is not None:
            spec = tuple(config["build_input_shape"])
        self._input_name, self._batch_shape = "__input__", spec
        previous = (self._input_name, 0, 0)
        self._nodes = []
        for entry in layers:
            name = _entry_name(entry)
            self._nodes.append((name, 0, [previous]))
            previous = (name, 0, 0)
        self._output_ref = previous

    def _plan_functional(self, config: dict) -> None:
        inputs, outputs = _io_refs(config.get("input_layers")), _io_refs(config.get("output_layers"))
        if len(inputs) != 1 or len(outputs) != 1:
            raise NetcleanseError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                                  "netcleanse handles image classifiers with one input and one output")
        self._input_name = inputs[0][0]
        if self._input_name not in self._entries:
            raise NetcleanseError(f"the model's input layer {self._input_name!r} is not in its layer list")
        self._batch_shape = _input_spec(self._entries[self._input_name])
        pending = []
        for name in self._layer_order:
            entry = self._entries[name]
            if entry.get("class_name") == "InputLayer":
                continue
            # A nested model already owns node 0 (its own input), so the config numbers its calls from 1.
            offset = 1 if entry.get("class_name") in MODEL_CLASSES and _has_input_spec(entry) else 0
            for index, node in enumerate(entry.get("inbound_nodes") or []):
                pending.append((name, index + offset, _node_refs(node)))
        # Topological order of call nodes (config order is usually one already).
        done = {(self._input_name, 0)}
        self._nodes = []
        while pending:
            ready = [n for n in pending if all((ref[0], ref[1]) in done for ref in n[2])]
            if not ready:
                missing = next(ref for n in pending for ref in n[2] if (ref[0], ref[1]) not in done)
                raise NetcleanseError(f"layer {pending[0][0]!r} takes input from {missing[0]!r} "
                                      f"(node {missing[1]}), which the model never computes")
            for node in ready:
                if any(ref[2] != 0 for ref in node[2]):
                    raise NetcleanseError(f"layer {node[0]!r} uses a second output of a layer; not supported")
                self._nodes.append(node)
                done.add((node[0], node[1]))
            pending = [n for n in pending if n not in ready]
        self._output_ref = outputs[0]
        if (self._output_ref[0], self._output_ref[1]) not in done:
            raise NetcleanseError(f"the model's output layer {self._output_ref[0]!r} is never computed")

    def _image_shape(self) -> tuple[int, int, int]:
        shape = self._batch_shape
        if shape is None:
            raise NetcleanseError("the model config does not record its input shape")
        dims = list(shape[1:])
        if len(dims) != 3 or any(d is None for d in dims):
            raise NetcleanseError(f"the model's input shape {tuple(dims)} is not a fixed HxWxC image; "
                                  "netcleanse needs a fixed image size")
        height, width, channels = (int(d) for d in dims)
        if min(height, width, channels) <= 0:
            raise NetcleanseError(f"the model's input shape {tuple(dims)} is not a valid image size")
        return channels, height, width

    def _final_activation(self) -> str:
        name = self._output_ref[0]
        entry = self._entries[name]
        class_name = _ALIASES.get(entry["class_name"], entry["class_name"])
        cfg = entry.get("config") or {}
        if class_name in ("Dense", "Conv2D", "DepthwiseConv2D"):
            return _activation_name(cfg.get("activation"), name)
        if class_name == "Activation":
            return _activation_name(cfg.get("activation"), name)
        if class_name == "Softmax" and cfg.get("axis", -1) in (-1, [-1]):
            return "softmax"
        if class_name in MODEL_CLASSES:
            return KerasGraph._peek_final(entry)
        return "linear" if class_name not in ("ReLU", "LeakyReLU", "ELU") else class_name.lower()

    @staticmethod
    def _peek_final(entry: dict) -> str:
        config = entry.get("config") or {}
        if entry["class_name"] == "Sequential":
            layers = [e for e in _layer_entries(entry) if e.get("class_name") != "InputLayer"]
            last = layers[-1] if layers else None
        else:
            outputs = _io_refs(config.get("output_layers"))
            last = next((e for e in _layer_entries(entry) if outputs and _entry_name(e) == outputs[0][0]), None)
        if last is None:
            return "linear"
        class_name = _ALIASES.get(last["class_name"], last["class_name"])
        cfg = last.get("config") or {}
        if class_name in ("Dense", "Conv2D", "DepthwiseConv2D", "Activation"):
            return _activation_name(cfg.get("activation"), _entry_name(last))
        if class_name == "Softmax":
            return "softmax"
        if class_name in MODEL_CLASSES:
            return KerasGraph._peek_final(last)
        return "linear"

    # -- execution --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._execute(x, strip=self._strip)

    def run(self, x: torch.Tensor, strip_final_softmax: bool) -> torch.Tensor:
        """The forward pass, with or without the final softmax."""
        return self._execute(x, strip=strip_final_softmax)

    def _execute(self, x: torch.Tensor, strip: bool, build: bool = False) -> torch.Tensor:
        values = {(self._input_name, 0): x}
        output_node = (self._output_ref[0], self._output_ref[1])
        strip_here = strip and self.final_activation == "softmax"
        for name, index, refs in self._nodes:
            args = [values[(ref[0], ref[1])] for ref in refs]
            drop_softmax = strip_here and (name, index) == output_node
            if not build:
                values[(name, index)] = self._call(name, args, drop_softmax, build)
                continue
            try:  # the dry run: a config whose layers do not fit together fails here
                values[(name, index)] = self._call(name, args, drop_softmax, build)
            except (RuntimeError, ValueError, ZeroDivisionError, TypeError, IndexError) as exc:
                shapes = ", ".join("x".join(map(str, a.shape[1:])) for a in args)
                raise NetcleanseError(f"layer {name!r} cannot be built on its input ({shapes}): "
                                      f"{first_line(exc)}") from None
        return values[output_node]

    def _call(self, name: str, args: list[torch.Tensor], drop_softmax: bool, build: bool) -> torch.Tensor:
        entry = self._entries[name]
        class_name = _ALIASES.get(entry["class_name"], entry["class_name"])
        module = self._modules.get(name)
        if module is None:
            if not build:
                raise RuntimeError(f"layer {name} was not built")
            try:
                if class_name in MODEL_CLASSES:
                    module, activation = KerasGraph(entry, self.keras_version, strip_final_softmax=False), "linear"
                else:
                    module, activation = _build_layer(class_name, entry.get("config") or {}, name, args,
                                                      self._keras_major)
            except (KeyError, TypeError, IndexError, ValueError) as exc:
                raise NetcleanseError(f"layer {name!r} ({class_name}) has a config netcleanse cannot read "
                                      f"({type(exc).__name__}: {first_line(exc)})") from None
            if "." in name or hasattr(self, name) and name not in self._modules:
                raise NetcleanseError(f"layer name {name!r} cannot be used as a torch module name")
            module.eval()  # the dry run has a batch of one: BatchNormalization must use its moving statistics
            self.add_module(name, module)
            self._activations[name] = activation
        if isinstance(module, KerasGraph):
            return module.run(args[0], strip_final_softmax=drop_softmax)
        if drop_softmax and class_name in ("Activation", "Softmax"):
            return args[0]
        if isinstance(module, KerasMerge):
            if len(args) < 2:
                raise NetcleanseError(f"merge layer {name!r} needs at least two inputs")
            out = module(*args)
        else:
            if len(args) != 1:
                raise NetcleanseError(f"layer {name!r} ({class_name}) is called on {len(args)} inputs")
            out = module(args[0])
        activation = self._activations[name]
        if activation != "linear" and not (drop_softmax and activation == "softmax"):
            out = _ACTIVATIONS[activation](out, self._keras_major)
        return out

    # -- structure --------------------------------------------------------------------------

    def keras_layers(self) -> list[tuple[str, nn.Module | None]]:
        """(Keras layer name, module or None) in the config's order, as Keras lists its layers."""
        names = self._layer_order
        if self._class_name == "Sequential":
            names = [n for n in names if self._entries[n].get("class_name") != "InputLayer"]
        return [(n, self._modules.get(n)) for n in names]

    def weight_slots(self) -> list[tuple[str, Slot]]:
        """(inner layer name, slot) of every weight, in Keras's order for this model."""
        slots = []
        for name, module in self.keras_layers():
            if module is None:
                continue
            if isinstance(module, KerasGraph):
                slots += module.weight_slots()
            else:
                slots += [(name, slot) for slot in _leaf_slots(module)]
        return slots

    def _dominating_conv(self) -> str | None:
        """The last Conv2D that every path from the input to the output passes through."""
        consumers: dict[tuple, list[tuple]] = {}
        for name, index, refs in self._nodes:
            for ref in refs:
                consumers.setdefault((ref[0], ref[1]), []).append((name, index))
        start, goal = (self._input_name, 0), (self._output_ref[0], self._output_ref[1])

        def reaches_without(blocked: tuple) -> bool:
            seen, stack = {start}, [start]
            while stack:
                node = stack.pop()
                if node == goal:
                    return True
                for nxt in consumers.get(node, []):
                    if nxt != blocked and nxt not in seen:
                        seen.add(nxt)
                        stack.append(nxt)
            return False

        for name, index, _ in reversed(self._nodes):
            if isinstance(self._modules.get(name), nn.Conv2d) and not reaches_without((name, index)):
                return name
        return None


def _has_input_spec(entry: dict) -> bool:
    layers = _layer_entries(entry)
    return bool(layers) and (layers[0].get("class_name") == "InputLayer" or _input_spec(layers[0]) is not None)


def graph_from_config(config_json: str | dict, keras_version: str = "2") -> KerasGraph:
    """Rebuild a :class:`KerasGraph` from a Keras model config (JSON text or parsed)."""
    if isinstance(config_json, str):
        try:
            config_json = json.loads(config_json)
        except ValueError as exc:
            raise NetcleanseError(f"the Keras model config is not valid JSON ({first_line(exc)})") from None
    if not isinstance(config_json, dict) or str(config_json.get("class_name")) not in MODEL_CLASSES:
        raise NetcleanseError("the Keras config does not describe a Sequential or Functional model")
    try:
        return KerasGraph(config_json, keras_version)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise NetcleanseError(f"the Keras model config is malformed ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_keras(path, arch: str | None = None, input_scale: float = 1.0, name: str | None = None) -> Classifier:
    """Load a Keras ``.h5`` into a :class:`Classifier` returning logits (see the module doc).

    Without ``arch`` a whole-model file is rebuilt from its ``model_config``; with ``arch`` the
    file's weights (whole-model or weights-only) go into that registered architecture and any
    ``model_config`` is ignored. A weights-only file needs ``arch``; its number of classes is
    read from the weights.
    """
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except _H5_ERRORS as exc:
        raise NetcleanseError(f"{path} is not a readable HDF5 file ({first_line(exc)})") from None
    try:
        with h5:
            check_self_contained_h5(h5, path)
            weights_root = h5["model_weights"] if "model_weights" in h5 else h5
            if arch is not None:
                from ..archspec import resolve_arch
                spec = resolve_arch(arch)
                layers_in_file = _file_layers(weights_root)
                num_classes = _output_classes(layers_in_file)
                net = spec.build(num_classes)
                keras_weights_to_module(weights_root, net, spec.spec)
                model = Classifier(net.eval(), spec.input_shape(net), num_classes, input_scale=input_scale,
                                   name=name or path.stem, arch=spec.spec, source=str(path))
                model.arch_kwargs = dict(spec.kwargs)
                return model
            config = _model_config(h5)
            if config is None:
                raise NetcleanseError(f"{path} holds weights only; name its architecture with --arch "
                                      "(e.g. --arch csaw-deepid)")
            if str(config.get("class_name")) not in MODEL_CLASSES:
                raise NetcleanseError(f"{path}: model class {config.get('class_name')!r} is not a Keras "
                                      "Sequential or Functional model")
            graph = graph_from_config(config, _keras_version(h5))
            keras_weights_to_module(weights_root, graph)
    except _H5_ERRORS as exc:
        raise NetcleanseError(f"{path}: cannot read the Keras file, it may be truncated or corrupt "
                              f"({first_line(exc)})") from None
    if len(graph.output_shape) != 1:
        raise NetcleanseError(f"{path}: the model's output has shape {graph.output_shape}; "
                              "netcleanse needs one score per class")
    return Classifier(graph.eval(), graph.input_shape, graph.output_shape[0], input_scale=input_scale,
                      name=name or path.stem, arch=None, source=str(path))


# --------------------------------------------------------------------------------------------
# Keras 3 .keras archives
# --------------------------------------------------------------------------------------------

# limits for the members of a .keras zip, checked on the sizes its directory declares and again
# while reading (a lying directory cannot make netcleanse read more)
MAX_CONFIG_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 8 << 30
MAX_ARCHIVE_MEMBERS = 100_000


def _snake_case(name: str) -> str:
    """Keras 3's ``naming.to_snake_case`` (the weights file names layers by their class this way)."""
    import re
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _read_member(archive, info, limit: int, path: Path) -> bytes:
    """The bytes of one zip member, refused when it declares (or turns out to hold) more than
    ``limit`` bytes, or expands more than :data:`netcleanse.utils.MAX_EXPANSION` times."""
    if info.file_size > limit:
        raise NetcleanseError(f"{path}: {info.filename} declares {info.file_size:,} bytes (more than "
                              f"{limit:,}); refused")
    check_declared_size((info.file_size,), np.uint8, info.compress_size, path, info.filename)
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise NetcleanseError(f"{path}: {info.filename} holds {len(data):,} bytes but declares "
                              f"{info.file_size:,}; refused")
    return data


def load_keras_archive(path, input_scale: float = 1.0, name: str | None = None) -> Classifier:
    """Load a Keras 3 ``.keras`` archive into a :class:`Classifier` returning logits.

    The config (``config.json``) is rebuilt as for a whole-model ``.h5`` (Lambda and custom layers
    refused); the weights (``model.weights.h5``) are matched to the layers in Keras 3's layout (see
    the module doc), checking every shape. Nothing is extracted to disk or executed."""
    import io
    import zipfile
    import zlib

    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise NetcleanseError(f"{path} is not a readable .keras archive ({first_line(exc)})") from None
    try:
        with archive:
            infos = archive.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise NetcleanseError(f"{path}: the archive has {len(infos):,} members; refused")
            members = {info.filename: info for info in infos}
            if "config.json" not in members or "model.weights.h5" not in members:
                raise NetcleanseError(f"{path} is not a Keras 3 .keras archive (it needs config.json and "
                                      "model.weights.h5)")
            config_text = _read_member(archive, members["config.json"], MAX_CONFIG_BYTES, path)
            metadata = {}
            if "metadata.json" in members:
                try:
                    metadata = json.loads(_read_member(archive, members["metadata.json"], MAX_CONFIG_BYTES, path))
                except ValueError:
                    metadata = {}
            weights = _read_member(archive, members["model.weights.h5"], MAX_WEIGHTS_BYTES, path)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError, ValueError) as exc:
        raise NetcleanseError(f"{path}: cannot read the .keras archive, it may be truncated or corrupt "
                              f"({first_line(exc)})") from None
    try:
        config = json.loads(config_text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NetcleanseError(f"{path}: its config.json is not valid JSON ({first_line(exc)})") from None
    if not isinstance(config, dict) or str(config.get("class_name")) not in MODEL_CLASSES:
        raise NetcleanseError(f"{path}: its config.json does not describe a Keras Sequential or Functional "
                              "model (a subclassed model is Python code, which netcleanse does not run)")
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    graph = graph_from_config(config, str(version or "3"))
    try:
        with h5py.File(io.BytesIO(weights), "r") as h5:
            check_self_contained_h5(h5, path)
            used = _keras3_weights_to_graph(graph, h5, "layers" if "layers" in h5 else
                                            "_layer_checkpoint_dependencies", path)
            stored = _count_datasets(h5)
    except _H5_ERRORS as exc:
        raise NetcleanseError(f"{path}: cannot read its model.weights.h5, it may be truncated or corrupt "
                              f"({first_line(exc)})") from None
    if used != stored:
        raise NetcleanseError(f"{path}: model.weights.h5 holds {stored} weights but the model's layers take "
                              f"{used}; it does not belong to this config")
    if len(graph.output_shape) != 1:
        raise NetcleanseError(f"{path}: the model's output has shape {graph.output_shape}; "
                              "netcleanse needs one score per class")
    return Classifier(graph.eval(), graph.input_shape, graph.output_shape[0], input_scale=input_scale,
                      name=name or path.stem, arch=None, source=str(path))


def _count_datasets(h5: h5py.Group) -> int:
    """Weights stored under ``layers`` (or its tf-keras 2.13 name); optimizer state is not counted."""
    count = 0

    def visit(_name, item):
        nonlocal count
        count += isinstance(item, h5py.Dataset)

    for top in ("layers", "_layer_checkpoint_dependencies"):
        if top in h5:
            h5[top].visititems(visit)
    return count


def _keras3_weights_to_graph(graph: "KerasGraph", h5: h5py.Group, where: str, path: Path) -> int:
    """Copy Keras 3 weights (``<where>/<snake class>[_n]/vars/<i>``) into ``graph``; returns how
    many datasets were used."""
    used, seen = 0, {}
    for layer in graph._layer_order:
        class_name = str(graph._entries[layer].get("class_name"))
        key = _snake_case(class_name)
        count = seen.get(key)
        seen[key] = 0 if count is None else count + 1
        key = key if count is None else f"{key}_{count + 1}"
        module = graph._modules.get(layer)
        group_path = f"{where}/{key}"
        if isinstance(module, KerasGraph):
            inner = h5[group_path] if group_path in h5 else None
            if inner is None:
                raise NetcleanseError(f"{path}: model.weights.h5 holds nothing for the nested model {layer!r}")
            inner_where = "layers" if "layers" in inner else "_layer_checkpoint_dependencies"
            used += _keras3_weights_to_graph(module, inner, inner_where, path)
            continue
        slots = _leaf_slots(module) if module is not None else []
        vars_path = f"{group_path}/vars"
        group = h5[vars_path] if vars_path in h5 else {}
        arrays = []
        for index in range(len(group)):
            if str(index) not in group:
                raise NetcleanseError(f"{path}: layer {layer!r}: weight {index} is missing from model.weights.h5")
            dataset = group[str(index)]
            check_declared_size(dataset.shape, dataset.dtype, dataset.id.get_storage_size(), path,
                                f"layer {layer!r} weight {index}")
            arrays.append(np.asarray(dataset))
        if len(arrays) != len(slots) and not (not slots and not arrays):
            want = ", ".join(slot[0] for slot in slots) or "none"
            raise NetcleanseError(f"{path}: layer {layer!r} ({class_name}): model.weights.h5 has {len(arrays)} "
                                  f"weights at {vars_path} but the layer takes {len(slots)} ({want})")
        _assign(layer, [(layer, slot) for slot in slots],
                [(f"{layer}/{slot[0]}", array) for slot, array in zip(slots, arrays)], "the model")
        used += len(arrays)
    return used


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

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
    """
    path = Path(path)
    if getattr(model, "poison_label", None) is not None:
        raise NetcleanseError("a guarded model has an extra 'poisoned' output that Keras cannot represent; "
                              "save it as .pt instead")
    net = model.net if isinstance(model, Classifier) else model
    if isinstance(net, torch.jit.ScriptModule):
        raise NetcleanseError("a TorchScript model cannot be exported to Keras (its layers are not known)")
    layers = keras_layer_weights(net)
    if not any(weights for _, weights in layers):
        raise NetcleanseError("the model has no weights to export")
    # A rebuilt Keras model keeps its own version: its config is in that version's dialect.
    version = (net.keras_version if isinstance(net, KerasGraph) else EXPORT_KERAS_VERSION).encode()
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            root = f
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
