"""Keras weights into a torch net: the Keras 2 layout (one group per layer, matched by layer name,
:func:`keras_weights_to_module`) and the Keras 3 layout of a ``.keras`` archive's
``model.weights.h5`` (``layers/<snake_case class name>[_<n>]/vars/<i>``, matched by position)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from torch import nn

from ..errors import NetcleanseError
from ..utils import check_declared_size
from .graph import KerasGraph, _module_slots
from .hdf5 import _file_layers, read_weight
from .slots import _assign, _leaf_slots, _var_name


def keras_weights_to_module(weights_root: h5py.Group, net: nn.Module, arch: str | None = None) -> None:
    """Copy the weights of a Keras weights group into ``net``, matching layers by name.

    Every weighted Keras layer must have a same-named submodule of ``net``, and every weighted
    submodule must receive weights; within a layer, weights follow Keras's order (kernel, bias;
    gamma, beta, moving_mean, moving_variance). The weights of a nested Keras model (one group
    holding ``inner_layer/kernel:0`` names) go to ``net``'s submodules named after the inner layers.
    """
    what = f"architecture {arch!r}" if arch else "the model"
    modules = dict(net.named_modules())
    # a rebuilt Keras model names its modules after the Keras layers, dots made underscores
    path_of = net.module_name if isinstance(net, KerasGraph) else (lambda layer: layer)
    filled: set[str] = set()
    for layer, weights in _file_layers(weights_root):
        if not weights:
            continue
        module = modules.get(path_of(layer))
        if isinstance(module, KerasGraph):
            _assign_nested(layer, module, weights, what)
            filled.add(path_of(layer))
            continue
        if module is not None:
            _assign(layer, _module_slots(module), weights, what)
            filled.add(path_of(layer))
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


def _assign_nested(layer: str, graph: KerasGraph, weights: list, what: str) -> None:
    """The weights of a nested model (named ``<inner layer>/<variable>``) into its layers, by inner
    layer name: Keras lists a nested model's trainable weights of all its layers before their
    moving statistics, so the file's order is not the layers' order; within a layer it is."""
    leaves = graph.leaf_layers()
    by_inner: dict[str, list] = {}
    for weight_name, array in weights:
        parts = weight_name.split("/")
        if len(parts) < 2 or parts[-2] not in leaves:
            raise NetcleanseError(f"the file has weight {weight_name!r} for the nested model {layer!r}, which has "
                                  f"no such layer in {what}")
        by_inner.setdefault(parts[-2], []).append((weight_name, array))
    for inner, module in leaves.items():
        slots = [(inner, slot) for slot in _leaf_slots(module)]
        if slots or inner in by_inner:
            _assign(inner, slots, by_inner.get(inner, []), what)


def _output_classes(layers: list[tuple[str, list]]) -> int:
    """Number of classes of a weights-only file: width of the last kernel in file order."""
    for _, weights in reversed(layers):
        for weight_name, array in reversed(weights):
            if _var_name(weight_name) == "kernel":
                return int(array.shape[-1])
    raise NetcleanseError("the file holds no layer with weights")


def _snake_case(name: str) -> str:
    """Keras 3's ``naming.to_snake_case`` (the weights file names layers by their class this way)."""
    import re
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


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
        module = graph.module_of(layer)
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
            arrays.append(read_weight(dataset, f"{path}: layer {layer!r} weight {index}"))
        if len(arrays) != len(slots) and not (not slots and not arrays):
            want = ", ".join(slot[0] for slot in slots) or "none"
            raise NetcleanseError(f"{path}: layer {layer!r} ({class_name}): model.weights.h5 has {len(arrays)} "
                                  f"weights at {vars_path} but the layer takes {len(slots)} ({want})")
        _assign(layer, [(layer, slot) for slot in slots],
                [(f"{layer}/{slot[0]}", array) for slot, array in zip(slots, arrays)], "the model")
        used += len(arrays)
    return used
