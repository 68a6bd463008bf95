"""The rebuilt network: :class:`KerasGraph`, a Keras Sequential or Functional model as a torch
module, and :func:`graph_from_config`."""

from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import NetcleanseError
from ..utils import first_line
from .builders import _IDENTITY_LAYERS, MODEL_CLASSES, TF_OP_CLASSES, _ALIASES, _activation_name, build_layer
from .config import (_entry_name, _has_input_spec, _input_spec, _io_refs, _layer_entries, _node_constants,
                     _node_options, _node_refs, _tf_op_node, check_config)
from .layers import _ACTIVATIONS, KerasMerge
from .slots import Slot, _leaf_slots


#: Final activations left out of the logits: the softmax, and the per-class squashing functions
#: (a sigmoid or tanh per class: the same labels, and a scan needs the unbounded scores before them).
STRIPPED = ("softmax", "sigmoid", "tanh")


class KerasGraph(nn.Module):
    """A Keras Sequential or Functional model, rebuilt as a torch module from its JSON config.

    Every Keras layer becomes a submodule named after it (so weights map by name); the forward
    pass runs the layers' call nodes in topological order. Modules are created on a dry run with
    a zero image, so their sizes come from the graph itself and a config alone suffices to
    rebuild the net (netcleanse ``.pt`` checkpoints store the config, not code).

    Attributes: ``input_shape`` (C, H, W); ``final_activation`` (what the network ends in,
    e.g. "softmax"; a squashing one, :data:`STRIPPED`, is left out of the forward pass, which
    returns logits: the scores before it); ``prune_layer`` (the
    last convolution every path to the output goes through, for fine-pruning; None if none);
    ``model_config`` (the Keras config dict); ``keras_version``. ``image_shape`` (C, H, W) fills
    the input dimensions the config leaves open (a fully convolutional model's None x None).
    """

    def __init__(self, model_config: dict, keras_version: str = "2", strip_final_softmax: bool = True,
                 image_shape: tuple[int, ...] | None = None, nested: bool = False):
        super().__init__()
        self._nested = nested  # inside another model: fed that model's tensors as they are
        self._given_shape = None if image_shape is None else tuple(int(v) for v in image_shape)
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
        self._constants: dict[tuple[str, int], dict[int, float]] = {}  # call node -> its numeric operands
        self._options: dict[tuple[str, int], dict] = {}  # tf.keras operation call -> its other arguments
        if len(self._entries) != len(entries):
            raise NetcleanseError("the model config has two layers with the same name")
        # torch module names cannot hold a dot, Keras layer names can ("mobilenetv2_1.00_224")
        self._torch_names = {n: n.replace(".", "_") for n in self._layer_order}
        if len(set(self._torch_names.values())) != len(self._torch_names):
            raise NetcleanseError("two of the model's layer names differ only in '.' and '_', which netcleanse "
                                  "cannot tell apart")
        if self._class_name == "Sequential":
            self._plan_sequential(entries)
        else:
            self._plan_functional(model_config.get("config") or {})
        self._no_channel_axis = False  # an H x W input (MNIST's Flatten(input_shape=(28, 28))): fed 1 x H x W, squeezed
        self._flat_input = False  # a vector input (an MLP on flattened images): fed the image's H x W x C values
        self.input_shape = self._image_shape()
        self._activations: dict[str, str] = {}
        self._strip = strip_final_softmax
        self._shapes: dict[tuple[str, int], tuple[int, ...]] = {}  # call node -> its output's shape (dry run)
        self._last_node, self.final_activation = None, "linear"  # (the dry run never strips)
        with torch.no_grad():
            out = self._execute(torch.zeros((1,) + self.input_shape), strip=False, build=True)
        self.output_shape = tuple(out.shape[1:])
        self._last_node = self._activation_node()
        self.final_activation = self._final_activation()
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
            # A nested model already owns node 0 (its own input), so a Keras 2 config numbers its calls
            # from 1; Keras 3 (dict-form nodes) numbers them from 0.
            nodes = entry.get("inbound_nodes") or []
            offset = 1 if entry.get("class_name") in MODEL_CLASSES and _has_input_spec(entry) and \
                not (nodes and isinstance(nodes[0], dict)) else 0
            for index, node in enumerate(nodes):
                options = {}
                if entry.get("class_name") in TF_OP_CLASSES:
                    refs, constants, options = _tf_op_node(node)
                else:
                    refs, options = _node_refs(node), _node_options(node, entry.get("class_name"))
                    constants = {} if entry.get("class_name") == "GetItem" else _node_constants(node)
                pending.append((name, index + offset, refs))
                if constants:
                    self._constants[(name, index + offset)] = constants
                if options:
                    self._options[(name, index + offset)] = options
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
        if self._given_shape is not None and len(self._given_shape) == 1:  # a nested model given vectors (a head)
            if len(dims) != 1 or dims[0] not in (None, self._given_shape[0]):
                raise NetcleanseError(f"a nested model takes {_hwc(dims)} but is given vectors of "
                                      f"{self._given_shape[0]}")
            return self._given_shape
        if len(dims) == 1 and not self._nested:  # an MLP on flattened images: the size they were flattened from
            values = None if dims[0] is None else int(dims[0])
            if self._given_shape is None or len(self._given_shape) != 3:
                raise NetcleanseError(f"the model takes vectors of {values or 'any number of'} values (an MLP on "
                                      "flattened images); give the image size they were flattened from with "
                                      "--input-shape CxHxW (e.g. 1x28x28 for 784)")
            c, h, w = self._given_shape
            if values is not None and values != c * h * w:
                raise NetcleanseError(f"the model takes vectors of {values} values, which --input-shape "
                                      f"{c}x{h}x{w} (CxHxW, {c * h * w} values) does not fit")
            self._flat_input = True
            return self._given_shape
        if len(dims) == 2 and not self._nested:  # grey images without a channel axis
            self._no_channel_axis = True
            dims = dims + [1]
        if self._given_shape is not None and len(dims) == 3 and None in dims:  # (a recorded size stays)
            given = (self._given_shape[1], self._given_shape[2], self._given_shape[0])  # H, W, C
            if any(d is not None and int(d) != g for d, g in zip(dims, given)):
                raise NetcleanseError(f"the model's input shape is {_hwc(dims)} (HxWxC), which does not fit "
                                      f"--input-shape {'x'.join(map(str, self._given_shape))} (CxHxW)")
            dims = list(given)
        if len(dims) != 3:
            raise NetcleanseError(f"the model's input shape {_hwc(dims)} is not an HxWxC image")
        if any(d is None for d in dims):
            raise NetcleanseError(f"the model's input shape {_hwc(dims)} (HxWxC) is not a fixed image size; "
                                  "give the size to work at with --input-shape CxHxW")
        height, width, channels = (int(d) for d in dims)
        if min(height, width, channels) <= 0:
            raise NetcleanseError(f"the model's input shape {tuple(dims)} is not a valid image size")
        return channels, height, width

    def _activation_node(self) -> tuple[str, int]:
        """The call that computes the output, looking through layers that do nothing at inference
        (a ``Dropout`` or a linear ``Activation`` after the softmax) and through a ``Flatten`` or
        ``Reshape`` of scores that are one vector already (N x 1 x 1 x K -> N x K): the final
        activation is that call's."""
        refs_of = {(name, index): refs for name, index, refs in self._nodes}
        node = (self._output_ref[0], self._output_ref[1])
        while True:
            entry = self._entries.get(node[0]) or {}
            refs = refs_of.get(node, [])
            class_name = _ALIASES.get(entry.get("class_name"), entry.get("class_name"))
            if len(refs) != 1 or refs[0][0] == self._input_name:  # (a model of augmentation layers only)
                return node
            source = (refs[0][0], refs[0][1])
            shape = self._shapes.get(source)
            passes = class_name in _IDENTITY_LAYERS or \
                (class_name == "Activation" and _activation_name((entry.get("config") or {}).get("activation"),
                                                                 node[0]) == "linear") or \
                (class_name in ("Flatten", "Reshape") and shape is not None and sum(d > 1 for d in shape) <= 1
                 and self._shapes.get(node) == (max(shape, default=1),))
            if not passes:
                return node
            node = source

    def _final_activation(self) -> str:
        name = self._last_node[0]
        entry = self._entries[name]
        class_name = _ALIASES.get(entry["class_name"], entry["class_name"])
        cfg = entry.get("config") or {}
        if class_name in ("Dense", "Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
            return _activation_name(cfg.get("activation"), name)
        if class_name == "Activation":
            return _activation_name(cfg.get("activation"), name)
        if class_name == "Softmax":  # over the scores' axis: -1, or its number (1 for N x K scores)
            axis = cfg.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
            rank = len(self._shapes.get(self._last_node, ())) + 1
            return "softmax" if isinstance(axis, int) and axis in (-1, rank - 1) else "linear"
        if class_name in MODEL_CLASSES:  # a nested model: what its own output is (looked at the same way)
            module = self.module_of(name)
            return module.final_activation if isinstance(module, KerasGraph) else "linear"
        return "linear" if class_name not in ("ReLU", "LeakyReLU", "ELU") else class_name.lower()

    # -- execution --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._execute(x, strip=self._strip)

    def run(self, x: torch.Tensor, strip_final_softmax: bool) -> torch.Tensor:
        """The forward pass, with or without the final softmax."""
        return self._execute(x, strip=strip_final_softmax)

    def _execute(self, x: torch.Tensor, strip: bool, build: bool = False) -> torch.Tensor:
        if self._flat_input:  # flattened as Keras users flatten their N x H x W x C arrays
            x = x.permute(0, 2, 3, 1).flatten(1)
        values = {(self._input_name, 0): x[:, 0] if self._no_channel_axis else x}
        output_node = (self._output_ref[0], self._output_ref[1])
        strip_here = strip and self.final_activation in STRIPPED
        for name, index, refs in self._nodes:
            args = [values[(ref[0], ref[1])] for ref in refs]
            drop_softmax = strip_here and (name, index) == self._last_node
            constants, options = self._constants.get((name, index)), self._options.get((name, index))
            if not build:
                values[(name, index)] = self._call(name, args, drop_softmax, build, constants, options)
                continue
            try:  # the dry run: a config whose layers do not fit together fails here
                values[(name, index)] = self._call(name, args, drop_softmax, build, constants, options)
                self._shapes[(name, index)] = tuple(values[(name, index)].shape[1:])
            except (RuntimeError, ValueError, ZeroDivisionError, TypeError, IndexError) as exc:
                shapes = ", ".join("x".join(map(str, a.shape[1:])) for a in args)
                raise NetcleanseError(f"layer {name!r} cannot be built on its input ({shapes}): "
                                      f"{first_line(exc)}") from None
        return values[output_node]

    def _call(self, name: str, args: list[torch.Tensor], drop_softmax: bool, build: bool,
              constants: dict[int, float] | None = None, options: dict | None = None) -> torch.Tensor:
        entry = self._entries[name]
        class_name = _ALIASES.get(entry["class_name"], entry["class_name"])
        module = self.module_of(name)
        if module is None:
            if not build:
                raise RuntimeError(f"layer {name} was not built")
            try:
                if class_name in MODEL_CLASSES:  # its open input dimensions are those of what it is given
                    fed = tuple(args[0].shape[1:]) if len(args) == 1 and args[0].dim() in (2, 4) else None
                    module = KerasGraph(entry, self.keras_version, strip_final_softmax=False, image_shape=fed,
                                        nested=True)
                    activation = "linear"
                else:
                    module, activation = build_layer(class_name, entry.get("config") or {}, name, args,
                                                     self._keras_major, constants, options)
            except (KeyError, TypeError, IndexError, ValueError) as exc:
                raise NetcleanseError(f"layer {name!r} ({class_name}) has a config netcleanse cannot read "
                                      f"({type(exc).__name__}: {first_line(exc)})") from None
            torch_name = self._torch_names[name]
            if not torch_name or hasattr(self, torch_name) and torch_name not in self._modules:
                raise NetcleanseError(f"layer name {name!r} cannot be used as a torch module name")
            module.eval()  # the dry run has a batch of one: BatchNormalization must use its moving statistics
            self.add_module(torch_name, module)
            self._activations[name] = activation
        if isinstance(module, KerasGraph):
            return module.run(args[0], strip_final_softmax=drop_softmax)
        if drop_softmax and class_name in ("Activation", "Softmax"):
            return args[0]
        if isinstance(module, KerasMerge):
            if len(args) + len(module.constants) < 2:
                raise NetcleanseError(f"merge layer {name!r} needs at least two inputs")
            out = module(*args)
        else:
            if len(args) != 1:
                raise NetcleanseError(f"layer {name!r} ({class_name}) is called on {len(args)} inputs")
            out = module(args[0])
        activation = self._activations[name]
        if activation != "linear" and not (drop_softmax and activation in STRIPPED):
            out = _ACTIVATIONS[activation](out, self._keras_major)
        return out

    # -- structure --------------------------------------------------------------------------

    def keras_layers(self) -> list[tuple[str, nn.Module | None]]:
        """(Keras layer name, module or None) in the config's order, as Keras lists its layers."""
        names = self._layer_order
        if self._class_name == "Sequential":
            names = [n for n in names if self._entries[n].get("class_name") != "InputLayer"]
        return [(n, self.module_of(n)) for n in names]

    def leaf_layers(self) -> dict[str, nn.Module]:
        """Keras layer name -> module of every built layer, those of nested models included."""
        leaves: dict[str, nn.Module] = {}
        for name, module in self.keras_layers():
            inner = module.leaf_layers() if isinstance(module, KerasGraph) else \
                {} if module is None else {name: module}
            if set(inner) & set(leaves):
                raise NetcleanseError(f"layer name {sorted(set(inner) & set(leaves))[0]!r} is used twice in the model")
            leaves.update(inner)
        return leaves

    def module_name(self, name: str) -> str:
        """The torch module name of the Keras layer ``name`` (its dots made underscores)."""
        return self._torch_names.get(name, name)

    def expects_raw_pixels(self) -> str | None:
        """Whether the first layer that acts at inference (past augmentation and dropout layers,
        into a nested base model) rescales the image by 1/255 or by 1/127.5 with offset -1: a network
        that was fed 0..255 pixels, which netcleanse's [0, 1] pixels reach with input scale 255.
        Returns that rescaling in words ("1/255"), else None."""
        from .layers import KerasRescaling
        node = (self._input_name, 0)
        while True:
            consumers = [(name, index) for name, index, refs in self._nodes if any((r[0], r[1]) == node for r in refs)]
            if len(consumers) != 1:
                return None
            node = consumers[0]
            if not self._does_nothing(node[0]):
                break
        module = self.module_of(node[0])
        if isinstance(module, KerasGraph):
            return module.expects_raw_pixels()
        if not isinstance(module, KerasRescaling) or module.per_channel:
            return None
        if abs(module.scale * 255 - 1) < 1e-3 and abs(module.offset) < 1e-6:
            return "1/255"
        if abs(module.scale * 127.5 - 1) < 1e-3 and abs(module.offset + 1) < 1e-3:
            return "1/127.5 with offset -1"
        return None

    def _does_nothing(self, name: str) -> bool:
        """Whether layer ``name`` is the identity at inference (dropout, augmentation, or a nested
        model made of such layers only, as Keras tutorials' ``data_augmentation`` block)."""
        entry = self._entries[name]
        if _ALIASES.get(entry.get("class_name"), entry.get("class_name")) in _IDENTITY_LAYERS:
            return True
        module = self.module_of(name)
        return isinstance(module, KerasGraph) and all(module._does_nothing(n) for n, _, _ in module._nodes)

    def module_of(self, name: str) -> nn.Module | None:
        """The torch module of the Keras layer ``name`` (None before it is built, or for an input)."""
        return self._modules.get(self.module_name(name))

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
            if isinstance(self.module_of(name), nn.Conv2d) and not reaches_without((name, index)):
                return self.module_name(name)
        return None


def _module_slots(module: nn.Module) -> list[tuple[str, Slot]]:
    """(inner Keras layer name or "", slot) for a module; a nested Keras model lists its layers' weights."""
    if isinstance(module, KerasGraph):
        return module.weight_slots()
    return [("", slot) for slot in _leaf_slots(module)]


def check_open_input(graph: KerasGraph, input_shape, path) -> None:
    """Refuse an ``input_shape`` for a Keras model that records its own input size."""
    if input_shape is not None and not graph._flat_input and not any(d is None for d in graph._batch_shape[1:]):
        raise NetcleanseError(f"{path} is a Keras file, which records its input shape; --input-shape is for "
                              "files that do not (TorchScript, ONNX, a Keras model whose input size is left "
                              "open or takes flattened images) and for --arch")


def _hwc(dims) -> str:
    return "x".join("None" if d is None else str(d) for d in dims)


def graph_from_config(config_json: str | dict, keras_version: str = "2",
                      image_shape: tuple[int, int, int] | None = None) -> KerasGraph:
    """Rebuild a :class:`KerasGraph` from a Keras model config (JSON text or parsed);
    ``image_shape`` (C, H, W) fills the input dimensions the config leaves open."""
    if isinstance(config_json, str):
        try:
            config_json = json.loads(config_json)
        except ValueError as exc:
            raise NetcleanseError(f"the Keras model config is not valid JSON ({first_line(exc)})") from None
    if not isinstance(config_json, dict) or str(config_json.get("class_name")) not in MODEL_CLASSES:
        raise NetcleanseError("the Keras config does not describe a Sequential or Functional model")
    try:
        return KerasGraph(config_json, keras_version, image_shape=image_shape)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise NetcleanseError(f"the Keras model config is malformed ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
