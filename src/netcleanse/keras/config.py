"""Reading a Keras model config (JSON data, never code): its layer entries and names, the input
spec (size-checked), the call nodes in either dialect (Keras 2 lists, Keras 3 dicts), and
:func:`check_config`, which refuses a Lambda, custom or unsupported layer before anything is built."""

from __future__ import annotations

import numpy as np

from .. import limits
from ..errors import NetcleanseError
from .builders import MODEL_CLASSES, SUPPORTED_LAYERS, TF_OP_CLASSES, tf_op_kind

# the default of the largest input a Keras config may declare per image (limits.INPUT_VALUES)
MAX_INPUT_VALUES = limits.INPUT_VALUES.default


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
            if class_name == "Lambda":
                problems.append((0, f"layer {name!r} is a Keras {class_name} layer (serialized Python code); "
                                    "netcleanse refuses to run code from a model file"))
            elif class_name in TF_OP_CLASSES and tf_op_kind(class_name, str(cfg.get("function"))):
                pass  # a TensorFlow operation named in the config (no code), rebuilt from its name
            elif class_name in TF_OP_CLASSES:
                function = str(cfg.get("function", "?"))[:80]
                problems.append((0, f"layer {name!r} is a tf.keras {class_name} layer (a TensorFlow operation "
                                    f"named {function!r}), which netcleanse does not rebuild (it rebuilds "
                                    "elementwise arithmetic and activations: tf.math.add/subtract/multiply/"
                                    "truediv, tf.nn.relu, sigmoid, tanh, ...; tf.nn.bias_add and slicing "
                                    "x[...])"))
            elif not module.startswith(("keras", "tf_keras", "tensorflow")) or \
                    (registered not in (None, class_name) and not str(registered).startswith("keras")):
                problems.append((1, f"layer {name!r} has custom class {registered or class_name!r} "
                                    f"(module {module!r}); netcleanse only rebuilds built-in Keras layers"))
            elif class_name not in SUPPORTED_LAYERS:
                problems.append((1, f"layer {name!r} has class {class_name!r}, which netcleanse cannot rebuild"))
            elif isinstance(cfg, dict) and _quantized(cfg.get("dtype")):
                problems.append((2, f"layer {name!r} ({class_name}) is quantized ({_quantized(cfg.get('dtype'))}: "
                                    "integer weights and scales), which netcleanse does not rebuild; give the "
                                    "model before model.quantize()"))
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


def _quantized(dtype) -> str | None:
    """The quantization a Keras 3 layer's dtype policy names (``model.quantize("int8")`` writes a
    ``QuantizedDTypePolicy`` of mode "int8", or a policy named "int8_from_float32"), else None."""
    if isinstance(dtype, dict):
        config = dtype.get("config") if isinstance(dtype.get("config"), dict) else {}
        if "Quantized" in str(dtype.get("class_name")) or config.get("mode"):
            return str(config.get("mode") or dtype.get("class_name"))
        dtype = config.get("name")
    if isinstance(dtype, str) and "_from_" in dtype:  # "int8_from_float32", "float8_from_bfloat16"
        return dtype.split("_from_")[0]
    return None


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
        if size > limits.INPUT_VALUES():
            raise NetcleanseError(f"input layer {entry.get('name')!r} declares {size:,} values per image "
                                  f"(more than {limits.INPUT_VALUES():,}; {limits.INPUT_VALUES.hint}); refused")
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


def _node_constants(node) -> dict[int, float]:
    """The numbers among a Keras 3 node's operands (position -> value), as in an operation such as
    ``x + 3.0`` (args ``[tensor, 3.0]``; a constant tensor of one value counts as that number);
    empty for layer calls and Keras 2 nodes."""
    if not isinstance(node, dict):
        return {}
    args = node.get("args", [])
    if len(args) == 1 and isinstance(args[0], list):
        args = args[0]
    out = {}
    for i, a in enumerate(args):
        tensor = _constant_tensor(a)
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            out[i] = float(a)
        elif tensor is not None and tensor.size == 1:
            out[i] = float(tensor.reshape(-1)[0])
    return out


def _constant_tensor(arg) -> np.ndarray | None:
    """A Keras 3 operand ``{"class_name": "__tensor__", "config": {"value": [...]}}`` as an array of
    numbers, or the same with ``"__numpy__"`` (a NumPy array in the model's code: ``x -
    np.array(mean)``); None for anything else; a value that is not a box of numbers is refused."""
    if not (isinstance(arg, dict) and arg.get("class_name") in ("__tensor__", "__numpy__")):
        return None
    value = (arg.get("config") or {}).get("value")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise NetcleanseError(f"a constant tensor operand {str(value)[:40]!r} is not a box of numbers") from None
    if array.size > limits.INPUT_VALUES():
        raise NetcleanseError(f"a constant tensor operand has {array.size:,} values; refused")
    return array


def _node_options(node, class_name: str) -> dict:
    """A Keras 3 operation node's arguments besides its tensors and numbers, in the form the tf.keras
    operations record them (:func:`_tf_op_node`): ``slice_spec`` of a ``GetItem`` (``x[...]``) and
    ``y``, one number per channel, of arithmetic with a constant tensor (``x - mean``, ``x / std``)."""
    if not isinstance(node, dict):
        return {}
    args = node.get("args", [])
    if class_name == "GetItem":
        if len(args) != 2:
            raise NetcleanseError("a GetItem call does not have a tensor and an index")
        spec = args[1] if isinstance(args[1], list) else [args[1]]

        def item(s):
            if isinstance(s, dict) and s.get("class_name") == "__slice__":
                cfg = s.get("config") or {}
                return {k: cfg.get(k) for k in ("start", "stop", "step")}
            if isinstance(s, dict) and s.get("class_name") == "__ellipsis__":
                return {"class_name": "__ellipsis__"}
            return s
        return {"slice_spec": [item(s) for s in spec]}
    tensors = [(i, _constant_tensor(a)) for i, a in enumerate(args)]
    vectors = [(i, t) for i, t in tensors if t is not None and t.size > 1]
    if not vectors:
        return {}
    position, tensor = vectors[0]
    if len(vectors) > 1 or len(args) != 2 or any(n != 1 for n in tensor.shape[:-1]):
        raise NetcleanseError(f"a {class_name} operation has a constant tensor operand of shape "
                              f"{list(tensor.shape)}; netcleanse rebuilds numbers and one number per channel")
    if position == 0 and class_name not in ("Add", "Multiply"):
        raise NetcleanseError(f"a {class_name} operation has its constant tensor first; netcleanse rebuilds "
                              "tensor - constant and tensor / constant only")
    return {"y": [float(v) for v in tensor.reshape(-1)]}


def _tf_op_node(node) -> tuple[list[tuple[str, int, int]], dict[int, float], dict]:
    """The operands of one call of a tf.keras ``TFOpLambda`` or ``SlicingOpLambda`` (Keras 2 form
    ``[[layer, node, tensor, {"y": operand, ...}]]``): the tensor references (the first operand, then
    ``y`` when it is one), the numbers among the operands (position -> value: ``{1: y}`` for ``x *
    0.5``) and the operation's other arguments as the config records them (data: ``bias``,
    ``data_format``, ``slice_spec``)."""
    if isinstance(node, dict) or not node:
        raise NetcleanseError("a TFOpLambda call is not in tf.keras's form")
    first = node[0] if isinstance(node[0], list) else node
    refs = [(str(first[0]), int(first[1]), int(first[2]))]
    kwargs = first[3] if len(first) > 3 and isinstance(first[3], dict) else {}
    y, constants = kwargs.get("y"), {}
    options = {k: v for k, v in kwargs.items() if k not in ("y", "name")}
    if isinstance(y, list) and len(y) >= 3 and isinstance(y[0], str):
        refs.append((str(y[0]), int(y[1]), int(y[2])))
    elif isinstance(y, (int, float)) and not isinstance(y, bool):
        constants[1] = float(y)
    elif isinstance(y, list) and y and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in y):
        options["y"] = [float(v) for v in y]  # one number per channel (``x / std`` in preprocess_input)
    elif y is not None:
        raise NetcleanseError(f"a TFOpLambda operand {str(y)[:40]!r} is neither a tensor, a number nor a list "
                              "of numbers")
    return refs, constants, options


def _io_refs(value) -> list[tuple[str, int, int]]:
    if not value:
        return []
    if isinstance(value, dict):  # Keras 3 named inputs/outputs ({"a": [layer, node, tensor], ...})
        value = list(value.values())
    if isinstance(value[0], str):
        value = [value]
    return [(str(v[0]), int(v[1]), int(v[2])) for v in value]


def _has_input_spec(entry: dict) -> bool:
    layers = _layer_entries(entry)
    return bool(layers) and (layers[0].get("class_name") == "InputLayer" or _input_spec(layers[0]) is not None)
