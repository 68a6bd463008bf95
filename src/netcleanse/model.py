"""Model files in: :func:`load_model` recognises a file by its content and hands it to the reader of
its format (:mod:`netcleanse.keras`, :mod:`netcleanse.torch_io`, :mod:`netcleanse.onnx_io`), which
returns a :class:`~netcleanse.classifier.Classifier`.

The noun itself, :class:`Classifier` (float NCHW pixels in [0, 1] in, logits out, preprocessing
inside), and the checks of its settings live one level down in :mod:`netcleanse.classifier`, which
the format modules build on; they are re-exported here, so ``from netcleanse.model import
Classifier, load_model`` keeps working.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .archspec import resolve_arch
from .classifier import (Classifier, checked_channels, checked_preprocessing, checked_scale, output_classes,
                         parse_input_shape)
from .errors import NetcleanseError, NetcleanseWarning
from .keras import load_keras, load_keras_archive
from .onnx_io import load_onnx
from .sniff import HDF5_MAGIC, ZIP_MAGIC, is_npz, is_torch_zip, sniff  # noqa: F401 (the magic bytes: re-exported, as before)
from .torch_io import load_safetensors, load_torch

__all__ = ["Classifier", "check_finite", "checked_channels", "checked_preprocessing", "checked_scale", "load_model",
           "output_classes", "parse_input_shape"]


def load_model(path, arch=None, input_scale: float = 1.0, name: str | None = None, *, mean=None, std=None,
               arch_kwargs=None, num_classes: int | None = None, input_shape=None) -> Classifier:
    """Load a classifier from a file into PyTorch.

    Formats: Keras ``.h5`` whole-model files (architecture from the file's ``model_config``) and
    Keras 3 ``.keras`` archives; Keras weights-only ``.h5`` with ``arch``; PyTorch TorchScript
    files; PyTorch ``state_dict`` checkpoints and ``.safetensors`` files with ``arch`` (or
    netcleanse's own ``.pt`` checkpoints, which record their architecture); ONNX models
    (``.onnx``, converted by onnx2torch); netcleanse's guarded-model artefacts. Nothing in the
    file is ever executed: pickles load with ``weights_only=True``, Keras ``Lambda`` layers are
    refused, and no file is read but the one named (see docs/formats.md).

    ``arch``: an architecture spec (:mod:`netcleanse.archspec`: a registered name,
    ``torchvision:NAME``, ``timm:NAME``, ``FILE.py:NAME`` or ``package.module:NAME``; the last two
    run the user's code) with ``arch_kwargs`` (dict or JSON text), ``num_classes`` and
    ``input_shape`` ((C, H, W) or "CxHxW"; also the input shape of an ONNX or TorchScript model
    that does not record one, or of a Keras model whose input size is left open). ``input_scale``, ``mean``, ``std``: the preprocessing the network
    expects (see the module doc); given values win over those a file records (for the scale:
    when not 1).

    The returned module takes float NCHW images in [0, 1] and returns logits (see module doc).
    """
    path = Path(path)
    if not path.exists():
        raise NetcleanseError(f"model file not found: {path}")
    name = name or path.stem
    if path.is_dir():
        raise NetcleanseError(f"{path} is a folder, not a model file")
    if path.stat().st_size == 0:
        raise NetcleanseError(f"model file is empty: {path}")
    checked_scale(input_scale)
    checked_preprocessing(mean, std, None)  # the count per channel is checked once the model is known
    given_shape = None if input_shape is None else parse_input_shape(input_shape)
    if arch is not None:
        arch = resolve_arch(arch, arch_kwargs, num_classes, input_shape)
    elif arch_kwargs or num_classes is not None:
        raise NetcleanseError("--arch-kwargs and --num-classes describe an architecture: give it with --arch")
    kind = sniff(path)
    keras_shape = parse_input_shape(input_shape) if kind in ("hdf5", "keras-archive") and arch is None \
        and input_shape is not None else None
    try:
        if kind == "hdf5":
            model = load_keras(path, arch=arch, input_scale=input_scale, name=name, input_shape=keras_shape)
        elif kind == "keras-archive":
            if arch is not None:
                raise NetcleanseError(f"{path} is a Keras 3 .keras archive, which records its own architecture; "
                                      "drop --arch")
            model = load_keras_archive(path, input_scale=input_scale, name=name, input_shape=keras_shape)
        elif kind == "zip" and is_npz(path):
            raise NetcleanseError(f"{path} is a NumPy .npz of arrays, a data file, not a model")
        elif kind == "zip" and path.suffix.lower() == ".keras" and not is_torch_zip(path):
            # a zip, but no Keras archive (or a truncated one); a PyTorch file loads whatever its name
            raise NetcleanseError(f"{path} is not a readable Keras .keras archive (a zip holding config.json and "
                                  "model.weights.h5); it may be truncated or corrupt")
        elif kind in ("zip", "torch-legacy"):
            model = load_torch(path, arch=arch, input_scale=input_scale, name=name, input_shape=input_shape)
        elif kind == "safetensors":
            if arch is None:
                raise NetcleanseError(f"{path} holds a state_dict (weights only, safetensors); name its "
                                      "architecture with --arch")
            model = load_safetensors(path, arch=arch, input_scale=input_scale, name=name)
        elif path.suffix.lower() == ".onnx":
            model = load_onnx(path, input_scale=input_scale, name=name, input_shape=input_shape)  # a corrupt file says so first
            if arch is not None:
                raise NetcleanseError(f"{path} is an ONNX model, which records its own architecture; drop --arch")
        else:
            raise NetcleanseError(f"{path} is not a model file netcleanse can read (expected a Keras .h5/.keras, "
                                  "a PyTorch .pt/TorchScript, a .safetensors or an .onnx file)")
    except RecursionError:
        raise NetcleanseError(f"{path}: its model description is nested too deeply to be a real model") from None
    except MemoryError:
        raise NetcleanseError(f"{path}: declares a model too large for this machine's memory") from None
    if kind == "hdf5":  # the preprocessing netcleanse's own .h5 export recorded, unless given now
        from .keras.export import recorded_preprocessing
        recorded = recorded_preprocessing(path)
        if recorded is not None:
            if input_scale == 1.0:
                input_scale = model.input_scale = checked_scale(recorded["input_scale"])
            if mean is None and std is None:
                mean, std = recorded["mean"], recorded["std"]
    if given_shape is not None:
        if tuple(model.input_shape) != given_shape:  # a file that records its own
            raise NetcleanseError(f"{path} records its input shape, {'x'.join(map(str, model.input_shape))}; "
                                  f"--input-shape {'x'.join(map(str, given_shape))} does not fit it (drop it)")
        # a size of the user's (a registered architecture's is fixed): the network must run on it
        output_classes(model, given_shape, f"{path} at --input-shape {'x'.join(map(str, given_shape))}")
    if model.num_classes < 1:  # e.g. a Keras Dense(units=0) output: every answer would be an IndexError
        raise NetcleanseError(f"{path}: the model answers {model.num_classes} classes; a classifier needs at least one")
    rescaling = model.net.expects_raw_pixels() if kind in ("hdf5", "keras-archive") and input_scale == 1.0 \
        and hasattr(model.net, "expects_raw_pixels") else None
    if rescaling:
        warnings.warn(f"{path}: the model's first layer rescales by {rescaling}, so it was fed 0..255 pixels; "
                      "netcleanse's pixels are in [0, 1]: give --input-scale 255 (input_scale=255)",
                      NetcleanseWarning, stacklevel=2)
    if model.num_classes == 1:  # a binary sigmoid head: its one score would be read as the only class's logit
        raise NetcleanseError(f"{path}: the model has one output (a binary sigmoid head?); netcleanse needs one "
                              "output per class: give it a 2-way head (logits [0, z] for a sigmoid's z)")
    if mean is not None or std is not None:
        for target in model.parts() if model.poison_label is not None else [model]:  # a guard's parts do it
            target.set_preprocessing(mean=mean, std=std)
    return check_finite(model, path)


def check_finite(model: "Classifier", path) -> "Classifier":
    """``model``, unless one of its weights is NaN or infinite: then a one-line error naming the
    first such parameter (such a model answers NaN, and every verdict on it would be meaningless)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NetcleanseError(f"{path}: {name} holds {bad} NaN or infinite value(s); the model cannot be used")
    return model
