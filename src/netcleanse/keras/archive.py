"""Keras 3 ``.keras`` archives: read in memory, never extracted, with size limits on every member."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .. import limits
from ..classifier import Classifier
from ..errors import NetcleanseError
from ..utils import check_declared_size, check_self_contained_h5, first_line
from .builders import MODEL_CLASSES
from .graph import check_open_input, graph_from_config
from .hdf5 import _H5_ERRORS
from .weights import _count_datasets, _keras3_weights_to_graph

# limits for the members of a .keras zip (netcleanse.limits; these names are their defaults),
# checked on the sizes its directory declares and again while reading (a lying directory cannot
# make netcleanse read more)
MAX_CONFIG_BYTES = limits.CONFIG_BYTES.default
MAX_WEIGHTS_BYTES = limits.WEIGHTS_BYTES.default
MAX_ARCHIVE_MEMBERS = limits.ARCHIVE_MEMBERS.default


def _read_member(archive, info, limit: int, path: Path) -> bytes:
    """The bytes of one zip member, refused when it declares (or turns out to hold) more than
    ``limit`` bytes, or expands more than :data:`netcleanse.limits.EXPANSION` times."""
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


def load_keras_archive(path, input_scale: float = 1.0, name: str | None = None,
                       input_shape: tuple[int, int, int] | None = None) -> Classifier:
    """Load a Keras 3 ``.keras`` archive into a :class:`Classifier` returning logits.

    The config (``config.json``) is rebuilt as for a whole-model ``.h5`` (Lambda and custom layers
    refused; ``input_shape`` as for :func:`~netcleanse.keras.load_keras`); the weights
    (``model.weights.h5``) are matched to the layers in Keras 3's layout (see the module doc),
    checking every shape. Nothing is extracted to disk or executed."""
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
            if len(infos) > limits.ARCHIVE_MEMBERS():
                raise NetcleanseError(f"{path}: the archive has {len(infos):,} members; refused")
            members = {info.filename: info for info in infos}
            if "config.json" not in members or "model.weights.h5" not in members:
                raise NetcleanseError(f"{path} is not a Keras 3 .keras archive (it needs config.json and "
                                      "model.weights.h5)")
            config_text = _read_member(archive, members["config.json"], limits.CONFIG_BYTES(), path)
            metadata = {}
            if "metadata.json" in members:
                try:
                    metadata = json.loads(_read_member(archive, members["metadata.json"], limits.CONFIG_BYTES(),
                                                       path))
                except ValueError:
                    metadata = {}
            weights = _read_member(archive, members["model.weights.h5"], limits.WEIGHTS_BYTES(), path)
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
    graph = graph_from_config(config, str(version or "3"), input_shape)
    check_open_input(graph, input_shape, path)
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
