"""Keras config -> torch layer: one builder per Keras layer class, found in :data:`BUILDERS`.

A builder is registered for its Keras class names with :func:`builds` and given a
:class:`LayerCall` (the layer's name, config and the tensor it is first called on); it returns
(module, activation fused after it, "linear" for none). Adding a layer type is one decorated
function here (plus its torch module in :mod:`.layers` and, if it has weights, its slots in
:mod:`.slots`); :data:`SUPPORTED_LAYERS` follows from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import limits
from ..crosscheck import check_layer
from ..errors import NetcleanseError
from .layers import (_ACTIVATIONS, KerasActivation, KerasBatchNorm, KerasConv2d, KerasCropping2d, KerasDense,
                     KerasDepthwiseConv2d, KerasFlatten, KerasGlobalPool2d, KerasLayerNorm, KerasLayerScale,
                     KerasMerge, KerasNormalization, KerasPermute, KerasPool2d, KerasPReLU, KerasReshape,
                     KerasRescaling, KerasResizing, KerasSeparableConv2d, KerasSlice, KerasUpSampling2d, _pair,
                     _to_keras_layout)

MODEL_CLASSES = {"Model", "Functional", "Sequential"}
_IDENTITY_LAYERS = {"Identity", "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                    "ActivityRegularization",
                    # image augmentation, which Keras applies only while training (each checked against
                    # Keras 3.15: its output at inference is its input)
                    "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
                    "RandomBrightness", "RandomHeight", "RandomWidth", "RandomGrayscale", "RandomColorJitter",
                    "RandomHue", "RandomSaturation", "RandomSharpness", "RandomColorDegeneration",
                    "RandomPosterization", "RandomShear", "RandomErasing", "RandomGaussianBlur", "RandomPerspective",
                    "RandomInvert", "RandomElasticTransform", "RandAugment", "AugMix", "CutMix", "MixUp"}
_MERGES = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply", "Average": "average",
           "Maximum": "maximum", "Minimum": "minimum", "Concatenate": "concatenate",
           # Keras 3 operations on tensors (``x / 6``), which its configs list among the layers
           "Divide": "divide", "TrueDivide": "divide"}
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


# the default of the most weights one layer of a config may declare (limits.LAYER_WEIGHTS)
MAX_LAYER_WEIGHTS = limits.LAYER_WEIGHTS.default


def _check_layer_size(name: str, weights: int, kernel: tuple | None = None) -> None:
    """At most :data:`netcleanse.limits.LAYER_WEIGHTS` per layer, checked before it is allocated; a
    ``kernel`` (Keras layout) is also checked against the file's weights (:mod:`netcleanse.crosscheck`)."""
    if weights > limits.LAYER_WEIGHTS():
        raise NetcleanseError(f"layer {name!r} declares {weights:,} weights (more than {limits.LAYER_WEIGHTS():,}; "
                              f"{limits.LAYER_WEIGHTS.hint}); refused")
    check_layer(name, weights, kernel)


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


@dataclass
class LayerCall:
    """What a builder is given: one Keras layer of a config and the tensor it is first called on."""

    class_name: str
    cfg: dict
    name: str
    x: torch.Tensor
    keras_major: int
    # numbers among the operands of a Keras 3 operation node (``x + 3.0``): operand position -> value
    constants: dict[int, float] | None = None
    # a tf.keras operation's other arguments, as data (``bias``, ``slice_spec``; :data:`TF_OPS`)
    options: dict | None = None

    @property
    def rank(self) -> int:
        return self.x.dim()

    @property
    def channels(self) -> int:
        """The size of Keras's channel (last) axis: dim 1 of an NCHW image tensor, else the last."""
        return int(self.x.shape[1] if self.rank == 4 else self.x.shape[-1])

    def image_input(self) -> None:
        if self.rank != 4:
            raise NetcleanseError(f"layer {self.name!r} ({self.class_name}) expects an image tensor, "
                                  f"got rank {self.rank}")

    def activation(self) -> str:
        """The activation fused into the layer (``activation`` in its config)."""
        return _activation_name(self.cfg.get("activation"), self.name)

    def padding(self) -> str:
        return _padding(self.cfg, self.name)


Builder = Callable[[LayerCall], "tuple[nn.Module, str]"]
BUILDERS: dict[str, Builder] = {}


def builds(*class_names: str) -> Callable[[Builder], Builder]:
    """Register the decorated function as the builder of these Keras layer classes."""
    def register(builder: Builder) -> Builder:
        for class_name in class_names:
            BUILDERS[class_name] = builder
        return builder
    return register


def build_layer(class_name: str, cfg: dict, name: str, inputs: list[torch.Tensor],
                keras_major: int, constants: dict[int, float] | None = None,
                options: dict | None = None) -> tuple[nn.Module, str]:
    """A torch module for one Keras layer, given the tensors it is first called on (and the
    numbers among its operands, for a Keras 3 operation such as ``x + 3.0``).

    Returns (module, fused activation name applied after it, "linear" for none).
    """
    if constants and class_name not in _MERGES and class_name not in TF_OP_CLASSES:
        raise NetcleanseError(f"layer {name!r} ({class_name}) is called on a constant; netcleanse only "
                              "rebuilds arithmetic (Add, Subtract, Multiply, Divide) with constants")
    call = LayerCall(class_name, cfg, name, inputs[0], keras_major, constants, options)
    builder = BUILDERS.get(class_name)
    if builder is None:
        raise NetcleanseError(f"layer {name!r} has class {class_name!r}, which netcleanse cannot rebuild")
    return builder(call)


@builds("Conv2D")
def _conv2d(c: LayerCall):
    c.image_input()
    cfg, x = c.cfg, c.x
    kernel, strides, dilation = _pair(cfg["kernel_size"]), _pair(cfg.get("strides", 1)), \
        _pair(cfg.get("dilation_rate", 1))
    groups = int(cfg.get("groups", 1))
    _check_layer_size(c.name, int(x.shape[1]) * int(cfg["filters"]) * kernel[0] * kernel[1] // max(groups, 1),
                      (*kernel, int(x.shape[1]) // max(groups, 1), int(cfg["filters"])))
    module = KerasConv2d(x.shape[1], int(cfg["filters"]), kernel, strides, dilation, groups,
                         bool(cfg.get("use_bias", True)), same=c.padding() == "same")
    return module, c.activation()


@builds("DepthwiseConv2D")
def _depthwise_conv2d(c: LayerCall):
    c.image_input()
    cfg = c.cfg
    kernel = _pair(cfg["kernel_size"])
    _check_layer_size(c.name, int(c.x.shape[1]) * int(cfg.get("depth_multiplier", 1)) * kernel[0] * kernel[1],
                      (*kernel, int(c.x.shape[1]), int(cfg.get("depth_multiplier", 1))))
    module = KerasDepthwiseConv2d(c.x.shape[1], int(cfg.get("depth_multiplier", 1)), _pair(cfg["kernel_size"]),
                                  _pair(cfg.get("strides", 1)), _pair(cfg.get("dilation_rate", 1)),
                                  bool(cfg.get("use_bias", True)), same=c.padding() == "same")
    return module, c.activation()


@builds("SeparableConv2D")
def _separable_conv2d(c: LayerCall):
    c.image_input()
    cfg = c.cfg
    kernel, mult, filters = _pair(cfg["kernel_size"]), int(cfg.get("depth_multiplier", 1)), int(cfg["filters"])
    cin = int(c.x.shape[1])
    _check_layer_size(c.name, cin * mult * (kernel[0] * kernel[1] + filters), (*kernel, cin, mult))
    module = KerasSeparableConv2d(cin, filters, mult, kernel, _pair(cfg.get("strides", 1)),
                                  _pair(cfg.get("dilation_rate", 1)), bool(cfg.get("use_bias", True)),
                                  same=c.padding() == "same")
    return module, c.activation()


@builds("Dense")
def _dense(c: LayerCall):
    in_features = c.channels
    _check_layer_size(c.name, int(in_features) * int(c.cfg["units"]), (int(in_features), int(c.cfg["units"])))
    return KerasDense(in_features, int(c.cfg["units"]), bool(c.cfg.get("use_bias", True))), c.activation()


@builds("MaxPooling2D", "AveragePooling2D")
def _pool2d(c: LayerCall):
    c.image_input()
    pool = _pair(c.cfg.get("pool_size", 2))
    strides = _pair(c.cfg["strides"]) if c.cfg.get("strides") is not None else pool
    kind = "max" if c.class_name == "MaxPooling2D" else "avg"
    return KerasPool2d(kind, pool, strides, c.padding() == "same"), "linear"


@builds("GlobalAveragePooling2D", "GlobalMaxPooling2D")
def _global_pool2d(c: LayerCall):
    c.image_input()
    kind = "max" if c.class_name == "GlobalMaxPooling2D" else "avg"
    return KerasGlobalPool2d(kind, bool(c.cfg.get("keepdims", False))), "linear"


@builds("Flatten")
def _flatten(c: LayerCall):
    return KerasFlatten(), "linear"


@builds("Reshape")
def _reshape(c: LayerCall):
    return KerasReshape(c.cfg["target_shape"]), "linear"


@builds("Permute")
def _permute(c: LayerCall):
    return KerasPermute(c.cfg["dims"]), "linear"


@builds(*_IDENTITY_LAYERS)
def _identity_layer(c: LayerCall):
    return nn.Identity(), "linear"  # only active while training in Keras


@builds(*_MERGES)
def _merge(c: LayerCall):
    y = (c.options or {}).get("y")  # Keras 3 arithmetic with one number per channel (``x - mean``)
    if y is not None:
        return _channel_arithmetic(c, _MERGES[c.class_name], y), "linear"
    return KerasMerge(_MERGES[c.class_name], int(c.cfg.get("axis", -1)), c.constants), "linear"


@builds("Stack")
def _stack(c: LayerCall):
    """Keras 3's ``ops.stack`` (as ``preprocess_input`` writes it): tensors stacked on a new axis."""
    return KerasMerge("stack", int(c.cfg.get("axis", 0))), "linear"


@builds("GetItem")
def _get_item(c: LayerCall):
    """Keras 3's ``x[...]`` (a GetItem operation), as tf.keras's slicing (:func:`_slice_picks`)."""
    return KerasSlice(_slice_picks(c, (c.options or {}).get("slice_spec"))), "linear"


# tf.keras TFOpLambda / SlicingOpLambda layers: a TensorFlow operation recorded by its name
# (``config["function"]``, never code) with its arguments as data in the call node. Rebuilt:
# elementwise arithmetic (with a number or a second tensor), activations, ``tf.nn.bias_add`` with a
# vector of numbers and slicing ``x[...]`` (what keras.applications' ``preprocess_input`` writes in
# caffe mode); any other operation is refused by check_config.
TF_OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")
TF_OPS: dict[str, tuple[str, str]] = {
    **{f: ("merge", "Add") for f in ("math.add", "__operators__.add")},
    **{f: ("merge", "Subtract") for f in ("math.subtract", "__operators__.sub")},
    **{f: ("merge", "Multiply") for f in ("math.multiply", "__operators__.mul")},
    **{f: ("merge", "Divide") for f in ("math.truediv", "math.divide", "__operators__.truediv")},
    **{f: ("activation", "relu") for f in ("nn.relu", "math.relu")},
    "nn.relu6": ("activation", "relu6"),
    **{f: ("activation", "sigmoid") for f in ("math.sigmoid", "nn.sigmoid")},
    **{f: ("activation", "tanh") for f in ("math.tanh", "nn.tanh")},
    **{f: ("activation", "silu") for f in ("nn.silu", "nn.swish")},
    "nn.bias_add": ("bias_add", ""),
    "__operators__.getitem": ("slice", ""),
}


def tf_op_kind(class_name: str, function: str) -> str | None:
    """What netcleanse rebuilds a tf.keras operation layer as ("merge", "activation", "bias_add",
    "slice"), or None: slicing is a ``SlicingOpLambda``, every other operation a ``TFOpLambda``."""
    kind = TF_OPS.get(function, (None,))[0]
    return kind if kind is not None and (class_name == "SlicingOpLambda") == (kind == "slice") else None


# the arguments each kind of operation may carry besides its tensors (anything else is refused)
_TF_OP_ARGUMENTS = {"merge": {"y"}, "activation": set(), "bias_add": {"bias", "data_format"}, "slice": {"slice_spec"}}


@builds(*TF_OP_CLASSES)
def _tf_op(c: LayerCall):
    function = str(c.cfg.get("function"))
    kind, what = TF_OPS[function]
    if tf_op_kind(c.class_name, function) is None:
        raise NetcleanseError(f"layer {c.name!r} is a tf.keras {c.class_name} layer of tf.{function}, "
                              "which netcleanse does not rebuild")
    options = c.options or {}
    unknown = sorted(set(options) - _TF_OP_ARGUMENTS[kind])
    if unknown:
        raise NetcleanseError(f"layer {c.name!r} (tf.{function}) has an argument netcleanse does not rebuild: "
                              f"{unknown[0]!r}")
    if kind == "merge" and "y" in options:
        return _channel_arithmetic(c, _MERGES[what], options["y"]), "linear"
    if kind == "merge":
        return KerasMerge(_MERGES[what], constants=c.constants), "linear"
    if c.constants:
        raise NetcleanseError(f"layer {c.name!r} (tf.{function}) is called on a constant")
    if kind == "bias_add":
        return _bias_add(c, options), "linear"
    if kind == "slice":
        return KerasSlice(_slice_picks(c, options.get("slice_spec"))), "linear"
    return KerasActivation(what, c.keras_major), "linear"


def _bias_add(c: LayerCall, options: dict) -> nn.Module:
    """``tf.nn.bias_add(x, bias)``: a vector of numbers added along the channel (last) axis."""
    bias, data_format = options.get("bias"), options.get("data_format")
    if data_format not in (None, "NHWC", "N...C"):
        raise NetcleanseError(f"layer {c.name!r} (tf.nn.bias_add) adds along the channels-first axis "
                              f"(data_format {data_format!r}); netcleanse rebuilds channels-last only")
    if not isinstance(bias, list) or not bias or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bias):
        raise NetcleanseError(f"layer {c.name!r} (tf.nn.bias_add) adds something else than a list of numbers "
                              "(a tensor operand is not rebuilt)")
    if len(bias) != c.channels:
        raise NetcleanseError(f"layer {c.name!r} (tf.nn.bias_add) adds {len(bias)} values to {c.channels} channels")
    return KerasRescaling([1.0] * len(bias), [float(v) for v in bias])


def _channel_arithmetic(c: LayerCall, op: str, y: list[float]) -> nn.Module:
    """``x + y``, ``x - y``, ``x * y`` or ``x / y`` (``op`` as :data:`_MERGES` names it) with ``y``
    one number per channel (last axis), as a per-channel scale and offset."""
    where = f"layer {c.name!r} ({c.cfg.get('function') or c.class_name})"
    if op not in ("add", "subtract", "multiply", "divide"):
        raise NetcleanseError(f"{where} has a constant tensor operand")
    if len(y) != c.channels:
        raise NetcleanseError(f"{where} has {len(y)} values for {c.channels} channels")
    if op == "divide" and not all(y):
        raise NetcleanseError(f"{where} divides by 0")
    ones, zeros = [1.0] * len(y), [0.0] * len(y)
    scale, offset = {"add": (ones, y), "subtract": (ones, [-v for v in y]), "multiply": (y, zeros),
                     "divide": ([1.0 / v for v in y], zeros)}[op]
    return KerasRescaling(scale, offset)


def _slice_picks(c: LayerCall, spec) -> list[tuple[int, list[int] | int]]:
    """``x[spec]`` (tf.__operators__.getitem, the spec as tf.keras records it: ``{"class_name":
    "__ellipsis__"}``, ``{"start", "stop", "step"}`` slices and integer positions) as, per Keras axis
    it changes, the positions it keeps (a list, in order: negative steps reverse) or the one
    position it takes (an int: the axis is dropped). The batch axis must be kept whole."""
    where = f"layer {c.name!r} (x[...])"
    if not isinstance(spec, list):
        spec = [spec]
    shape = tuple(_to_keras_layout(c.x).shape)
    ellipses = [i for i, s in enumerate(spec) if isinstance(s, dict) and s.get("class_name") == "__ellipsis__"]
    if len(ellipses) > 1 or len(spec) - len(ellipses) > len(shape):
        raise NetcleanseError(f"{where} indexes {len(spec)} axes of a rank-{len(shape)} tensor")
    if ellipses:
        i = ellipses[0]
        spec = spec[:i] + [{"start": None, "stop": None, "step": None}] * (len(shape) - len(spec) + 1) + spec[i + 1:]
    picks = []
    for axis, item in enumerate(spec):
        n = shape[axis]
        if isinstance(item, int) and not isinstance(item, bool):
            if not -n <= item < n or axis == 0:
                raise NetcleanseError(f"{where} takes position {item} of axis {axis} (size {n})")
            picks.append((axis, item % n))
            continue
        parts = [item.get(k) for k in ("start", "stop", "step")] if isinstance(item, dict) and \
            set(item) == {"start", "stop", "step"} else None
        if parts is None or not all(p is None or isinstance(p, int) and not isinstance(p, bool) for p in parts):
            raise NetcleanseError(f"{where}: index {str(item)[:60]} is not a slice of numbers, an integer or ...; "
                                  "netcleanse rebuilds only those")
        if parts[2] == 0:
            raise NetcleanseError(f"{where} has a slice step of 0")
        keep = list(range(n))[slice(*parts)]
        if keep == list(range(n)):
            continue
        if axis == 0:
            raise NetcleanseError(f"{where} slices the batch axis")
        if not keep:
            raise NetcleanseError(f"{where} keeps nothing of axis {axis}")
        picks.append((axis, keep))
    return picks


@builds("Activation")
def _activation_layer(c: LayerCall):
    return KerasActivation(c.activation(), c.keras_major), "linear"


@builds("ReLU")
def _relu(c: LayerCall):
    max_value = c.cfg.get("max_value")
    return KerasActivation("relu", c.keras_major, max_value=None if max_value is None else float(max_value),
                           negative_slope=float(c.cfg.get("negative_slope", 0.0)),
                           threshold=float(c.cfg.get("threshold", 0.0))), "linear"


@builds("LeakyReLU")
def _leaky_relu(c: LayerCall):
    slope = c.cfg.get("negative_slope", c.cfg.get("alpha", 0.3))
    return KerasActivation("leaky_relu", c.keras_major, negative_slope=float(slope)), "linear"


@builds("ELU")
def _elu(c: LayerCall):
    return KerasActivation("elu", c.keras_major, alpha=float(c.cfg.get("alpha", 1.0))), "linear"


@builds("ThresholdedReLU")
def _thresholded_relu(c: LayerCall):
    return KerasActivation("thresholded_relu", c.keras_major, theta=float(c.cfg.get("theta", 1.0))), "linear"


@builds("Softmax")
def _softmax_layer(c: LayerCall):
    axis = c.cfg.get("axis", -1)
    if isinstance(axis, list):
        if len(axis) != 1:
            raise NetcleanseError(f"layer {c.name!r}: softmax over several axes is not supported")
        axis = axis[0]
    return KerasActivation("softmax", c.keras_major, axis=int(axis)), "linear"


@builds("BatchNormalization")
def _batch_norm(c: LayerCall):
    cfg, rank = c.cfg, c.rank
    axis = cfg.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int) or axis % rank != rank - 1:
        raise NetcleanseError(f"layer {c.name!r}: BatchNormalization over axis {axis} is not supported "
                              "(only the channel axis, -1)")
    return KerasBatchNorm(c.channels, float(cfg.get("epsilon", 1e-3)), float(cfg.get("momentum", 0.99)),
                          bool(cfg.get("center", True)), bool(cfg.get("scale", True))), "linear"


@builds("LayerNormalization")
def _layer_norm(c: LayerCall):
    cfg, rank = c.cfg, c.rank
    if cfg.get("rms_scaling"):
        raise NetcleanseError(f"layer {c.name!r}: LayerNormalization with rms_scaling is not supported")
    axis = cfg.get("axis", -1)
    axes = tuple(sorted({int(a) % rank for a in (axis if isinstance(axis, list) else [axis])}))
    if not axes or 0 in axes:
        raise NetcleanseError(f"layer {c.name!r}: LayerNormalization over the batch axis is not supported")
    shape = tuple(_to_keras_layout(c.x).shape)
    _check_layer_size(c.name, 2 * int(np.prod([shape[d] for d in axes], dtype=object)))
    return KerasLayerNorm(axes, shape, float(cfg.get("epsilon", 1e-3)), bool(cfg.get("center", True)),
                          bool(cfg.get("scale", True))), "linear"


@builds("LayerScale")
def _layer_scale(c: LayerCall):
    channels = c.channels
    if int(c.cfg.get("projection_dim", channels)) != channels:
        raise NetcleanseError(f"layer {c.name!r}: LayerScale of {c.cfg.get('projection_dim')} channels on a "
                              f"tensor of {channels}")
    _check_layer_size(c.name, channels)
    return KerasLayerScale(channels), "linear"


@builds("PReLU")
def _prelu(c: LayerCall):
    """PReLU: ``max(x, 0) + alpha * min(x, 0)``, ``alpha`` shaped as the input (Keras layout, batch
    left out) with size 1 along ``shared_axes``."""
    shape = list(_to_keras_layout(c.x).shape[1:])
    shared = c.cfg.get("shared_axes") or []
    for axis in (shared if isinstance(shared, list) else [shared]):
        if not isinstance(axis, int) or not 1 <= axis <= len(shape):
            raise NetcleanseError(f"layer {c.name!r}: PReLU shares axis {axis!r} of a rank-{len(shape) + 1} tensor")
        shape[axis - 1] = 1
    _check_layer_size(c.name, int(np.prod(shape)))
    return KerasPReLU(tuple(shape)), "linear"


@builds("Resizing")
def _resizing(c: LayerCall):
    """Resizing to ``height`` x ``width``, bilinear or nearest (pixel centres at half-pixel offsets,
    no antialiasing: Keras's defaults); cropping or padding to the aspect ratio is refused."""
    c.image_input()
    cfg = c.cfg
    method = str(cfg.get("interpolation", "bilinear"))
    if method not in ("bilinear", "nearest"):
        raise NetcleanseError(f"layer {c.name!r}: Resizing with {method!r} interpolation is not supported "
                              "(bilinear, nearest)")
    for flag in ("crop_to_aspect_ratio", "pad_to_aspect_ratio", "antialias"):
        if cfg.get(flag):
            raise NetcleanseError(f"layer {c.name!r}: Resizing with {flag} is not supported")
    size = (int(cfg["height"]), int(cfg["width"]))
    if min(size) < 1 or size[0] * size[1] * c.channels > limits.INPUT_VALUES():
        raise NetcleanseError(f"layer {c.name!r}: Resizing to {size[0]}x{size[1]} refused")
    return KerasResizing(size, method), "linear"


@builds("CenterCrop")
def _center_crop(c: LayerCall):
    """CenterCrop to ``height`` x ``width`` of an image at least that large (Keras resizes smaller
    ones; not rebuilt)."""
    c.image_input()
    height, width = int(c.cfg["height"]), int(c.cfg["width"])
    h, w = int(c.x.shape[2]), int(c.x.shape[3])
    if not (0 < height <= h and 0 < width <= w):
        raise NetcleanseError(f"layer {c.name!r}: CenterCrop to {height}x{width} of a {h}x{w} image is not "
                              "supported (only crops of a larger image)")
    top, left = (h - height) // 2, (w - width) // 2
    return KerasCropping2d(top, h - height - top, left, w - width - left), "linear"


@builds("ZeroPadding2D")
def _zero_padding2d(c: LayerCall):
    c.image_input()
    (top, bottom), (left, right) = _pad_spec(c.cfg.get("padding", 1))
    return nn.ZeroPad2d((left, right, top, bottom)), "linear"


@builds("Cropping2D")
def _cropping2d(c: LayerCall):
    c.image_input()
    (top, bottom), (left, right) = _pad_spec(c.cfg.get("cropping", 0))
    return KerasCropping2d(top, bottom, left, right), "linear"


@builds("UpSampling2D")
def _upsampling2d(c: LayerCall):
    c.image_input()
    if c.cfg.get("interpolation", "nearest") != "nearest":
        raise NetcleanseError(f"layer {c.name!r}: UpSampling2D interpolation "
                              f"{c.cfg.get('interpolation')!r} is not supported (only 'nearest')")
    return KerasUpSampling2d(_pair(c.cfg.get("size", 2))), "linear"


@builds("Rescaling")
def _rescaling(c: LayerCall):
    scale, offset = _config_array(c.cfg.get("scale", 1.0)), _config_array(c.cfg.get("offset", 0.0))
    for value in (scale, offset):
        if isinstance(value, list) and np.asarray(value).ndim != 1:
            raise NetcleanseError(f"layer {c.name!r}: Rescaling by a {np.asarray(value).ndim}-d array is not "
                                  "supported (only a number or one value per channel)")
    return KerasRescaling(scale, offset), "linear"


@builds("Normalization")
def _normalization(c: LayerCall):
    cfg, rank, name = c.cfg, c.rank, c.name
    axis = cfg.get("axis", -1)
    axes = [] if axis is None else [axis] if isinstance(axis, int) else list(axis)
    keep = tuple(sorted(int(a) % rank for a in axes))
    if any(a == 0 for a in keep):
        raise NetcleanseError(f"layer {name!r}: Normalization over the batch axis is not supported")
    shape = tuple(_to_keras_layout(c.x).shape)
    mean, variance = _config_array(cfg.get("mean")), _config_array(cfg.get("variance"))
    if (mean is None) != (variance is None):
        raise NetcleanseError(f"layer {name!r}: Normalization config gives mean or variance, not both")
    _check_layer_size(name, int(np.prod([shape[d] for d in keep], dtype=object)))
    return KerasNormalization(keep, shape, bool(cfg.get("invert", False)), mean, variance), "linear"


SUPPORTED_LAYERS = frozenset({"InputLayer"} | set(BUILDERS) | MODEL_CLASSES | set(_ALIASES))
