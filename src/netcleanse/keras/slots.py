"""Weight slots: where each Keras weight of a torch module lives, and how it converts.

Keras stores conv kernels HWIO, depthwise kernels (kh, kw, in, multiplier) and dense kernels
(in, out); torch wants OIHW, (in * multiplier, 1, kh, kw) and (out, in). A slot is
(Keras variable name, torch tensor, to_torch, to_keras); :func:`_assign` copies one file layer's
weights into its slots, checking names and shapes."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NetcleanseError
from .layers import (KerasDepthwiseConv2d, KerasLayerNorm, KerasLayerScale, KerasNormalization, KerasPReLU,
                     KerasSeparableConv2d)


def _var_name(weight_name: str) -> str:
    """'conv_1/kernel:0' -> 'kernel' (Keras 3 writes 'conv_1/kernel' without the ':0')."""
    return weight_name.split("/")[-1].split(":")[0]


def _conv_to_torch(k: np.ndarray) -> torch.Tensor:  # HWIO -> OIHW
    return torch.from_numpy(np.ascontiguousarray(k)).permute(3, 2, 0, 1)


def _conv_to_keras(w: torch.Tensor) -> torch.Tensor:  # OIHW -> HWIO
    return w.permute(2, 3, 1, 0)


def _depthwise_to_torch(k: np.ndarray) -> torch.Tensor:
    # Keras (kh, kw, in, multiplier); output channel c*multiplier + m, as torch groups=in.
    kh, kw, cin, mult = k.shape
    return torch.from_numpy(np.ascontiguousarray(k)).reshape(kh, kw, cin * mult).permute(2, 0, 1).unsqueeze(1)


def _depthwise_slot(module: KerasDepthwiseConv2d) -> "Slot":
    mult = module.depth_multiplier
    return ("depthwise_kernel", module.weight, _depthwise_to_torch,
            lambda w, m=mult: w.squeeze(1).permute(1, 2, 0).reshape(w.shape[2], w.shape[3], -1, m))


# other names a file may give a variable: Keras 3's legacy .h5 writer calls DepthwiseConv2D's
# depthwise kernel "kernel"
_VAR_ALIASES = {"depthwise_kernel": ("kernel",)}


def _names_match(file_name: str, var: str) -> bool:
    """Whether a file's variable name is the slot's: equal, an alias, or (for a weight Keras made
    without a name, as LayerScale's) "variable" with Keras's counter ("variable_3", tf's "Variable")."""
    if file_name == var or file_name in _VAR_ALIASES.get(var, ()):
        return True
    return var == "variable" and file_name.lower().split("_")[0] == "variable"


def _identity(t):
    # np.array, not np.ascontiguousarray: the latter turns a 0-d weight (Normalization's count) into 1-d
    return t if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t))


Slot = tuple[str, torch.Tensor, Callable, Callable]  # (Keras var name, torch tensor, to_torch, to_keras)


def _leaf_slots(module: nn.Module) -> list[Slot]:
    """The Keras weights of one leaf module, in Keras's order."""
    slots: list[Slot] = []
    if isinstance(module, KerasSeparableConv2d):
        slots += [_depthwise_slot(module.depthwise),
                  ("pointwise_kernel", module.pointwise.weight, _conv_to_torch, _conv_to_keras)]
        module = module.pointwise  # its bias is the layer's
    elif isinstance(module, KerasDepthwiseConv2d):
        slots.append(_depthwise_slot(module))
    elif isinstance(module, nn.Conv2d):
        slots.append(("kernel", module.weight, _conv_to_torch, _conv_to_keras))
    elif isinstance(module, nn.Linear):
        slots.append(("kernel", module.weight, lambda k: _identity(k).t(), lambda w: w.t()))
    elif isinstance(module, KerasNormalization):
        if module.in_config:
            return slots
        return [("mean", module.mean, _identity, _identity), ("variance", module.variance, _identity, _identity),
                ("count", module.count, _identity, lambda t: t.to(torch.int64))]
    elif isinstance(module, KerasLayerScale):
        return [("variable", module.weight, _identity, _identity)]
    elif isinstance(module, KerasPReLU):
        return [("alpha", module.alpha, _identity, _identity)]
    elif isinstance(module, KerasLayerNorm):
        return ([("gamma", module.weight, _identity, _identity)] if module.keras_scale else []) + \
            ([("beta", module.bias, _identity, _identity)] if module.keras_center else [])
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
            if not _names_match(_var_name(weight_name), var):
                raise NetcleanseError(f"{where}: file weight {weight_name!r} where {what} expects {var!r}")
            expected = tuple(to_keras(tensor.detach()).shape)
            if tuple(array.shape) != expected:
                raise NetcleanseError(f"{where}: file weight {weight_name!r} has shape {array.shape} but "
                                      f"{what} needs {expected}")
            tensor.copy_(to_torch(array.astype(np.float32, copy=False)))
