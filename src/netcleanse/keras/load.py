"""Loading a Keras ``.h5`` (whole-model or weights-only) into a :class:`~netcleanse.model.Classifier`."""

from __future__ import annotations

from pathlib import Path

import h5py

from ..archspec import resolve_arch
from ..classifier import Classifier
from ..crosscheck import file_weights
from ..errors import NetcleanseError
from ..utils import check_self_contained_h5, first_line
from .builders import MODEL_CLASSES
from .graph import check_open_input, graph_from_config
from .hdf5 import _H5_ERRORS, _file_layers, _keras_version, _model_config
from .weights import _output_classes, keras_weights_to_module


def input_size_open(path) -> bool | None:
    """Whether the Keras file at ``path`` (``.h5`` or ``.keras``) leaves an input image dimension
    open (a fully convolutional model's None x None), read from its config alone; False for a
    Keras file that records its size or is unreadable (loading it says why); None for a file that
    is not Keras's."""
    import json
    import zipfile

    from .. import limits
    from ..sniff import sniff
    from .archive import _read_member
    try:
        kind = sniff(path)
        if kind == "hdf5":
            with h5py.File(path, "r") as h5:
                config = _model_config(h5)
        elif kind == "keras-archive":
            with zipfile.ZipFile(path) as archive:
                config = json.loads(_read_member(archive, archive.getinfo("config.json"), limits.CONFIG_BYTES(), path))
        else:
            return None
    except OSError:  # a missing file: not known to be Keras's (its row reports it)
        return None
    except (NetcleanseError, ValueError, KeyError, zipfile.BadZipFile, *_H5_ERRORS):
        return False

    def open_dims(node) -> bool:
        if isinstance(node, dict):
            for key in ("batch_input_shape", "batch_shape"):
                shape = node.get(key)
                if isinstance(shape, list) and len(shape) == 4 and None in shape[1:]:
                    return True
            return any(open_dims(v) for v in node.values())
        return isinstance(node, list) and any(open_dims(v) for v in node)
    return open_dims(config)


def load_keras(path, arch: str | None = None, input_scale: float = 1.0, name: str | None = None,
               input_shape: tuple[int, int, int] | None = None) -> Classifier:
    """Load a Keras ``.h5`` into a :class:`Classifier` returning logits (see the module doc).

    Without ``arch`` a whole-model file is rebuilt from its ``model_config``; with ``arch`` the
    file's weights (whole-model or weights-only) go into that registered architecture and any
    ``model_config`` is ignored. A weights-only file needs ``arch``; its number of classes is
    read from the weights. ``input_shape`` (C, H, W) is for a config whose input size is left
    open (a fully convolutional model); a config that records its size is refused one.
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
            if "layer_names" not in weights_root.attrs and "layer_names0" not in weights_root.attrs \
                    and _model_config(h5) is None:
                arrays = sorted(k for k in h5 if isinstance(h5[k], h5py.Dataset))
                what = (f"an HDF5 file of arrays ({', '.join(arrays[:4])}), a data file perhaps (give it as data)"
                        if arrays else "Keras 3's weights alone (load the .keras archive they came from)"
                        if "layers" in h5 and isinstance(h5["layers"], h5py.Group) else "an HDF5 file")
                raise NetcleanseError(f"{path} is {what}, not a Keras model: it has neither a model config nor "
                                      "Keras's layer_names")
            if arch is not None:
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
                from ..architectures import ARCHITECTURES
                raise NetcleanseError(f"{path} holds weights only; name its architecture with --arch (registered: "
                                      f"{', '.join(sorted(ARCHITECTURES))}; or your own module, --arch FILE.py:CLASS)")
            if str(config.get("class_name")) not in MODEL_CLASSES:
                raise NetcleanseError(f"{path}: model class {config.get('class_name')!r} is not a Keras "
                                      "Sequential or Functional model")
            with file_weights(weights_root, config, path):  # layers checked against the file's weights
                graph = graph_from_config(config, _keras_version(h5), input_shape)
                check_open_input(graph, input_shape, path)
            keras_weights_to_module(weights_root, graph)
    except _H5_ERRORS as exc:
        raise NetcleanseError(f"{path}: cannot read the Keras file, it may be truncated or corrupt "
                              f"({first_line(exc)})") from None
    if len(graph.output_shape) != 1:
        raise NetcleanseError(f"{path}: the model's output has shape {graph.output_shape}; "
                              "netcleanse needs one score per class")
    return Classifier(graph.eval(), graph.input_shape, graph.output_shape[0], input_scale=input_scale,
                      name=name or path.stem, arch=None, source=str(path))
