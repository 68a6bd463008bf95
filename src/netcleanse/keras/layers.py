"""Torch layers with Keras semantics (NCHW inside) and Keras's activations by name.

Inside netcleanse image tensors are NCHW; Keras computes NHWC. Every layer here keeps Keras
semantics under that change: ``Flatten`` flattens in Keras's (H, W, C) order so Dense kernels
apply unchanged, ``Concatenate``/``Softmax``/``BatchNormalization`` axes given in Keras
(channels-last) terms are mapped to NCHW. Tensors of rank other than 4 keep Keras's layout."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NetcleanseError


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


class KerasSeparableConv2d(nn.Module):
    """SeparableConv2D: a depthwise convolution (``depth_multiplier`` outputs per input channel, no
    bias), then a 1x1 convolution to ``filters`` channels with the layer's bias."""

    def __init__(self, in_channels, filters, depth_multiplier, kernel_size, stride=1, dilation=1, bias=True,
                 same=False):
        super().__init__()
        self.depthwise = KerasDepthwiseConv2d(in_channels, depth_multiplier, kernel_size, stride, dilation,
                                              bias=False, same=same)
        self.pointwise = nn.Conv2d(in_channels * depth_multiplier, filters, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


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


class KerasResizing(nn.Module):
    """Resizing: bilinear (half-pixel centres, no antialiasing) or nearest to ``size`` (h, w)."""

    def __init__(self, size: tuple[int, int], method: str):
        super().__init__()
        self.size, self.method = size, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "nearest":
            return F.interpolate(x, size=self.size, mode="nearest-exact")
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=False)


class KerasPReLU(nn.Module):
    """PReLU: ``max(x, 0) + alpha * min(x, 0)`` in Keras's layout, ``alpha`` of Keras's shape."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _to_keras_layout(x)
        return _from_keras_layout(torch.relu(y) - self.alpha * torch.relu(-y))


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


class KerasSlice(nn.Module):
    """``x[...]`` of tf.keras (``tf.__operators__.getitem``), computed in Keras's layout: per Keras
    axis in ``picks``, the positions kept (in order; a reversed slice lists them backwards) or the one
    position taken (the axis is then dropped)."""

    def __init__(self, picks: list[tuple[int, list[int] | int]]):
        super().__init__()
        self.picks = [(axis, keep if isinstance(keep, int) else None) for axis, keep in picks]
        for i, (axis, keep) in enumerate(picks):
            if not isinstance(keep, int):
                self.register_buffer(f"keep{i}", torch.tensor(keep, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _to_keras_layout(x)
        for i, (axis, position) in sorted(enumerate(self.picks), key=lambda p: -p[1][0]):  # last axes first
            y = y.select(axis, position) if position is not None else y.index_select(axis, getattr(self, f"keep{i}"))
        return _from_keras_layout(y)


class KerasLayerNorm(nn.Module):
    """LayerNormalization: each sample normalised over the Keras axes ``axes`` (channels-last, batch
    = 0), ``(x - mean) / sqrt(variance + eps) * gamma + beta``, gamma and beta shaped as those axes."""

    def __init__(self, axes: tuple[int, ...], shape: tuple[int, ...], eps: float, center: bool, scale: bool):
        super().__init__()
        self.axes, self.eps = tuple(axes), float(eps)
        self.keras_center, self.keras_scale = center, scale
        self._broadcast = tuple(shape[d] if d in self.axes else 1 for d in range(len(shape)))
        params = tuple(shape[d] for d in self.axes)
        self.weight = nn.Parameter(torch.ones(params), requires_grad=scale)
        self.bias = nn.Parameter(torch.zeros(params), requires_grad=center)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _to_keras_layout(x)
        mean = y.mean(dim=self.axes, keepdim=True)
        var = y.var(dim=self.axes, unbiased=False, keepdim=True)
        y = (y - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.reshape(self._broadcast) + self.bias.reshape(self._broadcast)
        return _from_keras_layout(y)

    def extra_repr(self) -> str:
        return f"axes={self.axes}, eps={self.eps}"


class KerasLayerScale(nn.Module):
    """LayerScale (of Keras's ConvNeXt): every channel (Keras's last axis) times its own weight."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _from_keras_layout(_to_keras_layout(x) * self.weight)


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
    """Add, Subtract, Multiply, Average, Maximum, Minimum and Concatenate, and Keras 3's arithmetic
    operations (``x + 3.0``, ``x * (1 / 6)``, ``x / 6``: Add, Multiply, (True)Divide nodes whose
    operands may be numbers, ``constants``: operand position -> number) and ``ops.stack`` (``stack``)."""

    def __init__(self, op: str, axis: int = -1, constants: dict[int, float] | None = None):
        super().__init__()
        self.op, self.axis = op, axis
        self.constants = dict(constants or {})

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.constants:
            tensors = iter(xs)
            n = len(xs) + len(self.constants)
            like = xs[0]
            xs = tuple(torch.tensor(self.constants[i], dtype=like.dtype, device=like.device)
                       if i in self.constants else next(tensors) for i in range(n))
        if self.op == "concatenate":
            return torch.cat(xs, dim=_torch_axis(self.axis, xs[0].dim()))
        if self.op == "stack":  # on a new axis, in Keras's layout
            return _from_keras_layout(torch.stack([_to_keras_layout(x) for x in xs], dim=self.axis))
        if self.op == "subtract":
            return xs[0] - xs[1]
        if self.op == "divide":
            return xs[0] / xs[1]
        out = xs[0]
        for x in xs[1:]:
            out = {"add": torch.add, "multiply": torch.mul, "average": torch.add,
                   "maximum": torch.maximum, "minimum": torch.minimum}[self.op](out, x)
        return out / len(xs) if self.op == "average" else out

    def extra_repr(self) -> str:
        return self.op + (f", axis={self.axis}" if self.op in ("concatenate", "stack") else "") + \
            (f", constants={self.constants}" if self.constants else "")


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
