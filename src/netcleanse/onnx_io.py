"""ONNX models into PyTorch, through onnx2torch (optional: ``pip install 'netcleanse[onnx]'``).

An ONNX file is a protobuf graph of standard operators plus tensors: it carries no Python code,
and onnx2torch maps each operator onto torch code of its own. What netcleanse checks before
converting:

- **no other file is read** unless the model keeps tensors in external data files, and then
  only regular files inside the model's own folder (no absolute paths, no ``..``, no links
  leading out), each tensor's offset and length inside its file; ONNX bytes stored in a
  netcleanse checkpoint may not refer to external data at all;
- operators outside the standard domains are refused (onnx2torch has no converter for them);
- the graph has one image input (N x C x H x W, or N x H x W x C which is transposed for the
  network) and one output of one score per class.

A final ``Softmax`` (or per-class ``Sigmoid``/``Tanh``) is removed, also where an ``Identity`` or a
``Flatten`` follows it, so the module returns logits as every netcleanse model does. A graph
exported with a fixed batch of one is run one image at a time; one that takes vectors (an MLP on
flattened images) is given its image size by ``input_shape`` and fed ``x.flatten(1)``. What
``torch.onnx.export``'s default exporter writes and onnx2torch cannot read (``Reshape`` with
``allowzero``, ``Gelu``) is rewritten to equivalent operators first, and a graph of an opset
onnx2torch lacks a converter for is converted to opset 17 or 13.

onnx2torch imports torchvision at import time for two detection operators (NonMaxSuppression,
RoiAlign). Where torchvision is missing or does not import beside this torch, a stand-in that
refuses those two operators is put in its place while onnx2torch is imported, and removed after:
image classifiers never use them.
"""

from __future__ import annotations

import io
import math
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import NetcleanseError
from .classifier import Classifier, parse_input_shape
from .utils import first_line

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise NetcleanseError("reading .onnx models needs the onnx and onnx2torch packages "
                              "(pip install 'netcleanse[onnx]')") from None
    return onnx


def _import_onnx2torch():
    """onnx2torch's ``convert``, importing it with a torchvision stand-in when needed (module doc)."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"].convert
    try:
        import torchvision  # noqa: F401
        stand_in = False
    except Exception:  # missing, or built for another torch ("operator torchvision::nms does not exist")
        stand_in = True
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    if stand_in:
        for key in saved:
            del sys.modules[key]
        vision, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def unavailable(*_args, **_kwargs):
            raise NetcleanseError("this ONNX model uses a detection operator that needs torchvision, "
                                  "which does not import here")

        ops.nms = ops.roi_align = ops.box_convert = unavailable
        vision.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = vision, ops
    try:
        import onnx2torch
    except ImportError:
        raise NetcleanseError("reading .onnx models needs the onnx2torch package "
                              "(pip install 'netcleanse[onnx]')") from None
    finally:
        if stand_in:
            for key in ("torchvision", "torchvision.ops"):
                sys.modules.pop(key, None)
            sys.modules.update(saved)
    return onnx2torch.convert


def _tensors(graph):
    """Every TensorProto of a graph and its subgraphs (initializers and Constant attributes)."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)


def _check_external_data(model, path: Path) -> bool:
    """Refuse external-data references that leave the model's folder or its files' bounds;
    True when the model has any (then they are loaded from that folder)."""
    onnx = _import_onnx()
    folder = path.resolve().parent
    found = False
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name!r} keeps its data in {location!r}"
        if not location or os.path.isabs(location) or ".." in Path(location).parts or "\\" in location:
            raise NetcleanseError(f"{where}, outside the model's folder; refused")
        target = folder / location
        try:
            resolved = target.resolve(strict=True)
        except (OSError, RuntimeError):
            raise NetcleanseError(f"{where}, which does not exist") from None
        if resolved.parent != folder and folder not in resolved.parents or not resolved.is_file():
            raise NetcleanseError(f"{where}, which leads outside the model's folder; refused")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", resolved.stat().st_size))
        except ValueError:
            raise NetcleanseError(f"{where} with an unreadable offset or length") from None
        if offset < 0 or length < 0 or offset + length > resolved.stat().st_size:
            raise NetcleanseError(f"{where} at bytes {offset}..{offset + length}, beyond the file's end; refused")
    return found


def _strip_final_softmax(model) -> str:
    """Remove a Softmax over the classes, or a per-class Sigmoid or Tanh, that produces the graph's
    output (the module then returns logits, as for Keras files), also where an ``Identity`` or a
    ``Flatten`` (of the scores, one vector per image) follows it; returns what the graph ends in."""
    graph = model.graph
    name = graph.output[0].name
    consumer = None  # the node after the activation (None: the activation is the graph's output)
    while True:
        producer = next((node for node in graph.node if name in node.output), None)
        flatten = producer is not None and producer.op_type == "Flatten" and \
            next((a.i for a in producer.attribute if a.name == "axis"), 1) == 1
        if producer is None or not (producer.op_type == "Identity" or flatten):
            break
        consumer, name = producer, producer.input[0]
    if producer is None or producer.op_type not in ("Softmax", "Sigmoid", "Tanh"):
        return producer.op_type if producer is not None else "input"
    if producer.op_type == "Softmax" and next((a.i for a in producer.attribute if a.name == "axis"), -1) not in (-1, 1):
        return "Softmax"
    if sum(name in node.input for node in graph.node) > 1:  # its scores are used elsewhere too
        return producer.op_type
    graph.node.remove(producer)
    if consumer is None:
        graph.output[0].name = producer.input[0]
    else:
        consumer.input[0] = producer.input[0]
    return producer.op_type.lower()


class OnnxNet(nn.Module):
    """A converted ONNX graph, fed NCHW input: transposed to NHWC when the graph wants that,
    flattened (C x H x W order, as ``x.flatten(1)``) when it takes vectors, without its channel axis
    when it takes grey N x H x W images, run one image at a time when the graph was exported with a
    fixed batch of one. Keeps the (softmax-stripped) ONNX bytes, so a netcleanse checkpoint can
    rebuild it."""

    def __init__(self, graph: nn.Module, onnx_bytes: bytes, nhwc: bool, per_sample: bool = False,
                 flat: bool = False, grey: bool = False):
        super().__init__()
        self.graph = graph
        self.onnx_bytes = onnx_bytes
        self.nhwc, self.per_sample, self.flat, self.grey = nhwc, per_sample, flat, grey

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        if self.flat:
            x = x.flatten(1)
        if self.grey:
            x = x[:, 0]
        with warnings.catch_warnings():  # onnx2torch's own (e.g. its Slice's indexing): not the user's concern
            warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch\.")
            if self.per_sample and len(x) != 1:
                return torch.cat([self.graph(x[i:i + 1]) for i in range(len(x))])
            return self.graph(x)


def _graph_input(model):
    """The graph's one image input (initializers listed among the inputs are weights, not inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise NetcleanseError(f"the ONNX model has {len(inputs)} inputs; netcleanse scans models with one image input")
    return inputs[0]


def _input_dims(model) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in _graph_input(model).type.tensor_type.shape.dim]


def _input_layout(model, input_shape) -> tuple[tuple[int, int, int], bool]:
    """(C, H, W) and whether the graph takes NHWC, from the graph's input or ``input_shape``."""
    dims = _input_dims(model)
    nhwc = len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4)
    if len(dims) == 3:  # grey N x H x W images, without a channel axis
        shown = "x".join("?" if d is None or d <= 0 else str(d) for d in dims)
        shape = parse_input_shape(input_shape) if input_shape is not None else \
            (1, dims[1], dims[2]) if all(d is not None and d > 0 for d in dims[1:]) else None
        if shape is None:
            raise NetcleanseError(f"the ONNX model's input is {shown}, grey images of no fixed size; give "
                                  "--input-shape 1xHxW")
        if shape[0] != 1 or any(d is not None and d > 0 and d != k for d, k in zip(dims[1:], shape[1:])):
            raise NetcleanseError(f"the ONNX model's input is {shown} (grey images without a channel axis), which "
                                  f"--input-shape {'x'.join(map(str, shape))} does not fit (1xHxW)")
        return shape, False
    if input_shape is not None:
        shape = parse_input_shape(input_shape)
        if len(dims) == 2 and dims[1] not in (None, 0) and dims[1] != shape[0] * shape[1] * shape[2]:
            raise NetcleanseError(f"the ONNX model takes vectors of {dims[1]} values, which --input-shape "
                                  f"{'x'.join(map(str, shape))} (CxHxW, {shape[0] * shape[1] * shape[2]} values) does not fit")
        if len(dims) == 4:
            def fits(order):  # the graph's fixed dimensions agree with the given shape in this layout
                return all(d is None or d <= 0 or d == shape[k] for d, k in zip(dims[1:], order))
            as_nchw, as_nhwc = fits((0, 1, 2)), fits((1, 2, 0))
            if not (as_nchw or as_nhwc):
                shown = "x".join("?" if d is None else str(d) for d in dims)
                raise NetcleanseError(f"the ONNX model's input is {shown}, which --input-shape "
                                      f"{'x'.join(map(str, shape))} (CxHxW) does not fit")
            return shape, as_nhwc and (nhwc or not as_nchw)
        return shape, False
    if len(dims) != 4 or any(d is None or d <= 0 for d in dims[1:]):
        shown = "x".join("?" if d is None else str(d) for d in dims)
        raise NetcleanseError(f"the ONNX model's input is {shown or 'of unknown shape'}, not a fixed-size image; "
                              "give --input-shape CxHxW")
    return ((dims[3], dims[1], dims[2]) if nhwc else (dims[1], dims[2], dims[3])), nhwc


def _declare_input(model, shape) -> None:
    """Write N x C x H x W (``shape`` from --input-shape) into a graph input that declares no shape at
    all (some tools drop it), as PyTorch's exporter would have: the converter needs the rank."""
    graph_input = _graph_input(model)
    if graph_input.type.tensor_type.HasField("shape"):
        return
    dims = graph_input.type.tensor_type.shape.dim
    dims.add().dim_param = "N"
    for size in shape:
        dims.add().dim_value = int(size)


# onnx2torch 1.5 lacks converters for some operators at the newest opsets (torch.onnx writes
# opset 18-20, e.g. Constant-19) and at the oldest (Upsample-9); ONNX's own version converter
# takes such a graph to one of these, the newest first
ONNX2TORCH_OPSETS = (17, 13)


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _convert_at_other_opset(model, convert):
    """onnx2torch's module for ``model`` converted to one of :data:`ONNX2TORCH_OPSETS`
    (down from a newer opset, or up from an older one), or None."""
    from onnx import version_converter
    opset = _opset(model)
    for target in ONNX2TORCH_OPSETS if opset > ONNX2TORCH_OPSETS[0] else [o for o in ONNX2TORCH_OPSETS if o > opset]:
        try:
            return convert(version_converter.convert_version(model, target))
        except Exception:  # this conversion or the try after it failed: the next, else the first failure
            continue
    return None


def _to_float32(model) -> None:
    """Rewrite, in place, a float16, bfloat16 or float64 graph (a deployment export: ``.half()``, or
    onnxconverter-common's float16 conversion with its Casts) to float32, netcleanse's arithmetic:
    its stored tensors are widened (exactly, for 16-bit floats), its Casts to such a type cast to
    float32, and its declared inputs, outputs and intermediate values become float32."""
    from onnx import TensorProto, numpy_helper
    other = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

    def widened(tensor):
        if tensor.data_type not in other:
            return None
        wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
        return wide

    for tensor in model.graph.initializer:
        wide = widened(tensor)
        if wide is not None:
            tensor.CopyFrom(wide)
    for node in _nodes(model.graph):
        for attribute in node.attribute:
            if attribute.name == "to" and node.op_type == "Cast" and attribute.i in other:
                attribute.i = TensorProto.FLOAT
            elif attribute.HasField("t"):  # Constant's value, ConstantOfShape's fill
                wide = widened(attribute.t)
                if wide is not None:
                    attribute.t.CopyFrom(wide)
    for info in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if info.type.tensor_type.elem_type in other:
            info.type.tensor_type.elem_type = TensorProto.FLOAT


def _nodes(graph):
    """Every node of ``graph`` and of the graphs inside its nodes (If, Loop, Scan branches)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for inner in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _nodes(inner)


def _for_onnx2torch(model) -> None:
    """Rewrite, in place and with the same results, what ``torch.onnx.export``'s default (dynamo)
    exporter writes and onnx2torch 1.5 cannot convert: ``Reshape(allowzero=1)`` (a 0 in the target
    shape then means an empty axis rather than "keep this axis"; both read a shape without zeros the
    same, and an image batch's shapes hold none) and ``Gelu`` (opset 20), spelled out in ``Erf`` or
    ``Tanh`` as its definition."""
    from onnx import helper, numpy_helper
    nodes, constants = [], {}

    def constant(value: float) -> str:
        name = constants.get(value)
        if name is None:
            name = constants[value] = f"netcleanse_gelu_const_{len(constants)}"
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    for node in model.graph.node:
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "allowzero":
                    attribute.i = 0
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, y, tag = node.input[0], node.output[0], f"netcleanse_gelu_{len(nodes)}_{node.name}"
        approximate = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            nodes += [helper.make_node("Mul", [x, x], [tag + "_x2"]),
                      helper.make_node("Mul", [tag + "_x2", x], [tag + "_x3"]),
                      helper.make_node("Mul", [tag + "_x3", constant(0.044715)], [tag + "_c"]),
                      helper.make_node("Add", [x, tag + "_c"], [tag + "_s"]),
                      helper.make_node("Mul", [tag + "_s", constant(math.sqrt(2 / math.pi))], [tag + "_a"]),
                      helper.make_node("Tanh", [tag + "_a"], [tag + "_t"])]
        else:  # 0.5 x (1 + erf(x / sqrt(2)))
            nodes += [helper.make_node("Div", [x, constant(math.sqrt(2))], [tag + "_a"]),
                      helper.make_node("Erf", [tag + "_a"], [tag + "_t"])]
        nodes += [helper.make_node("Add", [tag + "_t", constant(1.0)], [tag + "_u"]),
                  helper.make_node("Mul", [x, tag + "_u"], [tag + "_v"]),
                  helper.make_node("Mul", [tag + "_v", constant(0.5)], [y])]
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def net_from_onnx(model_or_bytes, path, input_shape=None) -> tuple[OnnxNet, tuple[int, int, int]]:
    """Convert a loaded ONNX model (or its bytes) into an :class:`OnnxNet`; returns it and (C, H, W)."""
    onnx = _import_onnx()
    if isinstance(model_or_bytes, (bytes, bytearray)):
        model = onnx.load_model_from_string(bytes(model_or_bytes))
    else:
        model = model_or_bytes
    # load_onnx has read a file's own external data by now (checked by _check_external_data); a tensor
    # still kept elsewhere (a checkpoint's stored ONNX bytes) would make onnx read a file relative to
    # the working directory: refused
    external = next((t for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL), None)
    if external is not None:
        raise NetcleanseError(f"{path}: tensor {external.name!r} of its ONNX model keeps its data in another "
                              "file; refused")
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise NetcleanseError(f"{path}: node {node.name or node.op_type!r} uses operator {node.op_type!r} of "
                                  f"domain {node.domain!r}, which is not standard ONNX; refused")
    if len(model.graph.output) != 1:
        raise NetcleanseError(f"{path}: the ONNX model has {len(model.graph.output)} outputs; netcleanse needs one "
                              "score per class")
    shape, nhwc = _input_layout(model, input_shape)
    _declare_input(model, shape)
    rank = len(_input_dims(model))  # 2: an MLP on flattened images, given its image size by input_shape; 3: grey
    _strip_final_softmax(model)
    _to_float32(model)
    _for_onnx2torch(model)
    convert = _import_onnx2torch()
    with warnings.catch_warnings():  # onnx2torch's own warnings: not the user's concern
        warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch\.")
        try:
            graph = convert(model)
        except NetcleanseError:
            raise
        except Exception as exc:  # NotImplementedError for unknown operators, and the converter's own checks
            graph = _convert_at_other_opset(model, convert)
            if graph is None:
                raise NetcleanseError(f"{path}: onnx2torch cannot convert this model ({type(exc).__name__}: "
                                      f"{first_line(exc)}; opset {_opset(model)})") from None
    net = OnnxNet(graph.eval(), model.SerializeToString(), nhwc, flat=rank == 2, grey=rank == 3)
    return net, shape


def load_onnx(path, input_scale: float = 1.0, name: str | None = None, input_shape=None) -> Classifier:
    """Load an ``.onnx`` image classifier into a :class:`Classifier` returning logits (module doc)."""
    path = Path(path)
    onnx = _import_onnx()
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise NetcleanseError(f"{path} is larger than 2 GiB, the most one ONNX file can hold")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: nothing has run
        raise NetcleanseError(f"{path} is not a readable ONNX model ({first_line(exc)})") from None
    if not model.graph.node:
        raise NetcleanseError(f"{path} is not an ONNX model with a graph")
    if _check_external_data(model, path):
        from onnx.external_data_helper import load_external_data_for_model
        try:
            load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as exc:
            raise NetcleanseError(f"{path}: cannot read its external data ({first_line(exc)})") from None
    net, shape = net_from_onnx(model, path, input_shape)
    classes = _check_outputs(net, shape, path)
    if input_scale == 1.0 and _graph_input(model).type.tensor_type.elem_type == onnx.TensorProto.UINT8:
        input_scale = 255.0  # the graph says it takes 0..255 pixels (a deployment export); none was given
    return Classifier(net, shape, classes, input_scale=input_scale, name=name or path.stem, arch=None,
                      source=str(path))


@torch.no_grad()
def _check_outputs(net: OnnxNet, shape, path) -> int:
    """The number of classes; switches ``net`` to one image at a time if it fails on a batch of two."""
    def run(n):
        out = net(torch.zeros((n,) + tuple(shape)))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
            raise ValueError(f"output {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out

    try:
        one = run(1)
    except Exception as exc:  # the converted graph's failure on a well-formed input
        raise NetcleanseError(f"{path}: the ONNX model fails on a {'x'.join(map(str, shape))} input or does not "
                              f"return one score per class ({type(exc).__name__}: {first_line(exc)})") from None
    try:
        run(2)
    except Exception:  # exported with a fixed batch of one
        net.per_sample = True
    return int(one.shape[1])


def checkpoint_entries(net: OnnxNet) -> dict:
    """What a netcleanse checkpoint stores to rebuild an ONNX net (bytes as a uint8 tensor)."""
    return {"onnx_model": torch.frombuffer(bytearray(net.onnx_bytes), dtype=torch.uint8).clone(),
            "onnx_nhwc": bool(net.nhwc), "onnx_per_sample": bool(net.per_sample)}


def net_from_checkpoint(ckpt: dict, path) -> tuple[OnnxNet, tuple[int, int, int]]:
    """Rebuild the ONNX net of a netcleanse checkpoint (its weights are loaded by the caller)."""
    data = ckpt["onnx_model"]
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise NetcleanseError(f"{path}: the checkpoint's ONNX model is malformed")
    shape = ckpt.get("input_shape")
    net, shape = net_from_onnx(io.BytesIO(data.numpy().tobytes()).getvalue(), path, shape)
    net.per_sample = bool(ckpt.get("onnx_per_sample", False))
    return net, shape
