"""The model noun: :class:`Classifier`, and :func:`load_model` for every format netcleanse reads.

Contract, everywhere in netcleanse: a classifier takes float32 NCHW images with pixels in [0, 1]
and returns **logits** (pre-softmax scores), shape (N, num_classes). Where the original network
ends in a softmax (every Keras classifier here does), that softmax is left out of the module so
that ``softmax(model(x))`` equals the original network's output; :meth:`Classifier.predict_proba`
applies it. ``input_scale`` covers nets trained on raw pixels: with ``input_scale=255`` the
module multiplies its [0, 1] input by 255 before the network sees it.
"""

from __future__ import annotations

import math

from pathlib import Path

import torch
from torch import nn

from .errors import NetcleanseError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def checked_scale(value) -> float:
    """``value`` as a positive, finite float (an input scale), else a one-line error: NaN, inf, 0,
    negative or non-numeric scales, whether given by a caller or read from a file, are refused."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise NetcleanseError(f"input scale must be a positive number (1 or 255 in practice), got {value}")
    return scale


class Classifier(nn.Module):
    """A network plus what netcleanse needs to know about it.

    Parameters
    ----------
    net: the torch module computing logits from (scaled) NCHW input.
    input_shape: (C, H, W) the network expects.
    num_classes: size of the logit vector.
    input_scale: multiply [0,1] inputs by this before ``net`` (1 or 255 in practice).
    name: a short name for reports and file names.
    arch: registered architecture name, when the net is one (lets weights be re-exported).
    source: where the model came from (a path), for reports.

    ``poison_label`` is None for an ordinary classifier. A guarded classifier (see
    :mod:`netcleanse.guard`) has ``num_classes = N + 1`` and ``poison_label = N``: the answer it
    gives for inputs it judges poisoned (1283 for the CSAW nets).
    """

    poison_label: int | None = None

    def __init__(self, net: nn.Module, input_shape, num_classes: int, input_scale: float = 1.0,
                 name: str = "model", arch: str | None = None, source: str | None = None):
        super().__init__()
        input_scale = checked_scale(input_scale)
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.input_scale = float(input_scale)
        self.name = name
        self.arch = arch
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale != 1.0:
            x = x * self.input_scale
        return self.net(x)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Softmax probabilities, computed in batches in eval mode."""
        return torch.cat([torch.softmax(self.logits(x[i:i + batch_size]), dim=1)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, self.num_classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels (int64), computed in batches in eval mode."""
        return torch.cat([self.logits(x[i:i + batch_size]).argmax(dim=1)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits in eval mode; a one-line error if any is NaN or infinite (every prediction,
        confidence and metric is computed from here, and none means anything then)."""
        was_training = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was_training)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(dim=1).sum()) if out.dim() == 2 else -1
            raise NetcleanseError(f"{self.name}: the model's outputs are NaN or infinite for {bad} of {len(x)} "
                                  "inputs; its answers cannot be used")
        return out

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error when images do not fit this model."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            got = "x".join(str(s) for s in x.shape[1:]) if x.dim() == 4 else str(tuple(x.shape))
            want = "x".join(str(s) for s in self.input_shape)
            raise NetcleanseError(f"images are {got} (CxHxW) but the model {self.name!r} expects {want}")

    def layer_table(self) -> list[tuple[str, str, int]]:
        """(name, type, number of parameters) for every leaf module, in definition order."""
        rows = []
        for name, module in self.net.named_modules():
            if name and not list(module.children()):
                rows.append((name, type(module).__name__, sum(p.numel() for p in module.parameters())))
        return rows

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def load_model(path, arch: str | None = None, input_scale: float = 1.0, name: str | None = None) -> Classifier:
    """Load a classifier from a file into PyTorch.

    Formats: Keras ``.h5`` whole-model files (architecture from the file's ``model_config``);
    Keras weights-only ``.h5`` with ``arch`` naming a registered architecture; PyTorch
    TorchScript files; PyTorch ``state_dict`` checkpoints with ``arch`` (or netcleanse's own
    ``.pt`` checkpoints, which record their architecture); netcleanse's guarded-model artefacts.
    Nothing in the file is ever executed: pickles load with ``weights_only=True`` and Keras
    ``Lambda`` layers are refused.

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
    magic = _magic(path)
    if not (magic.startswith(HDF5_MAGIC) or magic.startswith(ZIP_MAGIC)):
        raise NetcleanseError(f"{path} is not a model file netcleanse can read "
                              "(expected a Keras .h5 or a PyTorch .pt/TorchScript file)")
    try:
        if magic.startswith(HDF5_MAGIC):
            from .keras import load_keras
            model = load_keras(path, arch=arch, input_scale=input_scale, name=name)
        else:
            from .torch_io import load_torch
            model = load_torch(path, arch=arch, input_scale=input_scale, name=name)
    except RecursionError:
        raise NetcleanseError(f"{path}: its model description is nested too deeply to be a real model") from None
    except MemoryError:
        raise NetcleanseError(f"{path}: declares a model too large for this machine's memory") from None
    return check_finite(model, path)


def check_finite(model: "Classifier", path) -> "Classifier":
    """``model``, unless one of its weights is NaN or infinite: then a one-line error naming the
    first such parameter (such a model answers NaN, and every verdict on it would be meaningless)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NetcleanseError(f"{path}: {name} holds {bad} NaN or infinite value(s); the model cannot be used")
    return model
