"""The model noun: :class:`Classifier`, and :func:`load_model` for every format netcleanse reads.

Contract, everywhere in netcleanse: a classifier takes float32 NCHW images with pixels in [0, 1]
and returns **logits** (pre-softmax scores), shape (N, num_classes). Where the original network
ends in a softmax (every Keras classifier here does), that softmax is left out of the module so
that ``softmax(model(x))`` equals the original network's output; :meth:`Classifier.predict_proba`
applies it.

Preprocessing is part of the model: a net trained on other inputs than [0, 1] pixels states how
it wants them, and netcleanse applies that inside :meth:`Classifier.forward`, so that images,
triggers and reports stay in pixel space [0, 1] everywhere. ``input_scale`` covers nets trained on
raw pixels (with ``input_scale=255`` the module multiplies its [0, 1] input by 255 before the
network sees it); ``mean`` and ``std`` (one value per channel) cover normalised inputs, applied
after the scale: the network sees ``(x * input_scale - mean) / std``. torchvision's ImageNet nets,
for instance, take ``mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)`` at ``input_scale=1``.
"""

from __future__ import annotations

import math

from pathlib import Path

import torch
from torch import nn

from .errors import NetcleanseError
from .utils import first_line

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


def checked_channels(values, channels: int | None, what: str) -> tuple[float, ...] | None:
    """``values`` (a sequence of numbers, or text like ``"0.485,0.456,0.406"``) as a tuple of finite
    floats, one per channel (a single value is repeated for every channel), else a one-line error.
    ``None`` stays ``None`` (no normalisation). ``what`` names the setting in the error."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [part for part in values.replace(" ", "").split(",") if part]
    try:
        out = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    except (TypeError, ValueError):
        raise NetcleanseError(f"{what} must be numbers, one per channel (e.g. 0.485,0.456,0.406), "
                              f"got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise NetcleanseError(f"{what} must be finite numbers, one per channel, got {values!r}")
    if channels is not None and len(out) == 1:
        out = out * channels
    if channels is not None and len(out) != channels:
        raise NetcleanseError(f"{what} has {len(out)} values but the model takes {channels} channel(s)")
    return out


def checked_preprocessing(mean, std, channels: int | None) -> tuple[tuple | None, tuple | None]:
    """(mean, std) checked by :func:`checked_channels`; ``std`` must be positive, and giving one
    without the other means mean 0 or std 1."""
    mean, std = checked_channels(mean, channels, "mean"), checked_channels(std, channels, "std")
    if std is not None and min(std) <= 0:
        raise NetcleanseError(f"std must be positive, got {','.join(f'{v:g}' for v in std)}")
    if (mean is None) != (std is None):
        n = len(mean or std)
        mean, std = mean or (0.0,) * n, std or (1.0,) * n
    return mean, std


class Classifier(nn.Module):
    """A network plus what netcleanse needs to know about it.

    Parameters
    ----------
    net: the torch module computing logits from (scaled) NCHW input.
    input_shape: (C, H, W) the network expects.
    num_classes: size of the logit vector.
    input_scale: multiply [0,1] inputs by this before ``net`` (1 or 255 in practice).
    mean, std: per-channel normalisation applied after the scale (``None``: none); see the module doc.
    name: a short name for reports and file names.
    arch: registered architecture name, when the net is one (lets weights be re-exported).
    source: where the model came from (a path), for reports.

    ``poison_label`` is None for an ordinary classifier. A guarded classifier (see
    :mod:`netcleanse.guard`) has ``num_classes = N + 1`` and ``poison_label = N``: the answer it
    gives for inputs it judges poisoned (1283 for the CSAW nets).
    """

    poison_label: int | None = None

    def __init__(self, net: nn.Module, input_shape, num_classes: int, input_scale: float = 1.0,
                 name: str = "model", arch: str | None = None, source: str | None = None,
                 mean=None, std=None):
        super().__init__()
        input_scale = checked_scale(input_scale)
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.input_scale = float(input_scale)
        self.name = name
        self.arch = arch
        self.source = source
        self.arch_kwargs: dict = {}  # the keyword arguments ``arch`` was built with (see archspec)
        self.set_preprocessing(mean=mean, std=std)

    @classmethod
    def wrap(cls, module: nn.Module, input_shape, *, num_classes: int | None = None, input_scale: float = 1.0,
             mean=None, std=None, name: str = "model", source: str | None = None) -> "Classifier":
        """Any torch module returning logits (N, classes) for NCHW input, as a :class:`Classifier`
        that netcleanse scans, repairs and reports on like a loaded model.

        ``input_shape``: (C, H, W), or text "CxHxW". ``num_classes``: found by running one zero
        image through the module when not given. ``input_scale``, ``mean``, ``std``: how the
        module wants its input (see the module doc); netcleanse feeds it [0, 1] pixels through them.
        The module is put in eval mode. Such a model is saved with its weights only: loading it back
        needs the same architecture named again (``load_model(path, arch=...)``)."""
        if not isinstance(module, nn.Module):
            raise NetcleanseError(f"expected a torch nn.Module, got {type(module).__name__}")
        shape = parse_input_shape(input_shape)
        module.eval()
        if num_classes is None:
            num_classes = output_classes(module, shape, name)
        return cls(module, shape, int(num_classes), input_scale=input_scale, name=name, arch=None,
                   source=source, mean=mean, std=std)

    def set_preprocessing(self, input_scale: float | None = None, mean=None, std=None) -> "Classifier":
        """Set the input scale (when given) and the per-channel ``mean``/``std`` (``None``: no
        normalisation); checked (one value per channel, std > 0). Returns the model."""
        if input_scale is not None:
            self.input_scale = checked_scale(input_scale)
        mean, std = checked_preprocessing(mean, std, self.input_shape[0])
        self.mean, self.std = mean, std
        shape = (1, len(mean), 1, 1) if mean is not None else (0,)
        device = next((p.device for p in self.net.parameters()), torch.device("cpu")) \
            if isinstance(self.net, nn.Module) else torch.device("cpu")
        # non-persistent buffers: they follow .to(device) and deepcopy, and stay out of state_dict
        self.register_buffer("_mean", torch.tensor(mean or (), dtype=torch.float32, device=device).reshape(shape),
                             persistent=False)
        self.register_buffer("_std", torch.tensor(std or (), dtype=torch.float32, device=device).reshape(shape),
                             persistent=False)
        return self

    @property
    def preprocessing(self) -> dict:
        """{"input_scale", "mean", "std"}: what :meth:`forward` does to [0, 1] pixels (mean/std None: nothing)."""
        return {"input_scale": self.input_scale, "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    def describe_preprocessing(self) -> str:
        """The preprocessing in words, e.g. "x * 255" or "(x - mean) / std, mean 0.485,0.456,0.406 ..."."""
        scaled = "x" if self.input_scale == 1 else f"x * {self.input_scale:g}"
        if self.mean is None:
            return scaled
        fmt = lambda vs: ",".join(f"{v:g}" for v in vs)  # noqa: E731
        return f"({scaled} - mean) / std, mean {fmt(self.mean)}, std {fmt(self.std)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.mean is not None:
            x = (x - self._mean) / self._std
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


def parse_input_shape(value) -> tuple[int, int, int]:
    """(C, H, W) from a sequence of three positive ints or text "CxHxW" (e.g. "3x224x224"), else a
    one-line error."""
    parts = value.lower().replace(",", "x").split("x") if isinstance(value, str) else value
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) <= 0 or max(shape) > 1 << 14:
        raise NetcleanseError(f"input shape must be CxHxW with positive sizes (e.g. 3x224x224), got {value!r}")
    return shape


@torch.no_grad()
def output_classes(net: nn.Module, input_shape, what: str) -> int:
    """The number of classes of ``net``: the width of its output on one zero image (run in eval mode);
    a one-line error if it fails or does not answer one score per class."""
    was_training = net.training
    net.eval()
    try:
        out = net(torch.zeros((1,) + tuple(input_shape)))
    except Exception as exc:  # any failure of the user's module on a well-formed input
        raise NetcleanseError(f"{what}: the model fails on a {'x'.join(map(str, input_shape))} input "
                              f"({type(exc).__name__}: {first_line(exc)}); check the input shape") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NetcleanseError(f"{what}: the model must return one score per class (N x classes), got {shape}")
    return int(out.shape[1])


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


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
    that does not record one). ``input_scale``, ``mean``, ``std``: the preprocessing the network
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
    if arch is not None:
        from .archspec import resolve_arch
        arch = resolve_arch(arch, arch_kwargs, num_classes, input_shape)
    elif arch_kwargs or num_classes is not None:
        raise NetcleanseError("--arch-kwargs and --num-classes describe an architecture: give it with --arch")
    magic = _magic(path)
    from .torch_io import is_safetensors
    try:
        if magic.startswith(HDF5_MAGIC):
            from .keras import load_keras
            model = load_keras(path, arch=arch, input_scale=input_scale, name=name)
        elif magic.startswith(ZIP_MAGIC) and _is_keras_archive(path):
            from .keras import load_keras_archive
            if arch is not None:
                raise NetcleanseError(f"{path} is a Keras 3 .keras archive, which records its own architecture; "
                                      "drop --arch")
            model = load_keras_archive(path, input_scale=input_scale, name=name)
        elif magic.startswith(ZIP_MAGIC):
            from .torch_io import load_torch
            model = load_torch(path, arch=arch, input_scale=input_scale, name=name, input_shape=input_shape)
        elif is_safetensors(path):
            from .torch_io import load_safetensors
            if arch is None:
                raise NetcleanseError(f"{path} holds a state_dict (weights only, safetensors); name its "
                                      "architecture with --arch")
            model = load_safetensors(path, arch=arch, input_scale=input_scale, name=name)
        elif path.suffix.lower() == ".onnx":
            from .onnx_io import load_onnx
            if arch is not None:
                raise NetcleanseError(f"{path} is an ONNX model, which records its own architecture; drop --arch")
            model = load_onnx(path, input_scale=input_scale, name=name, input_shape=input_shape)
        else:
            raise NetcleanseError(f"{path} is not a model file netcleanse can read (expected a Keras .h5/.keras, "
                                  "a PyTorch .pt/TorchScript, a .safetensors or an .onnx file)")
    except RecursionError:
        raise NetcleanseError(f"{path}: its model description is nested too deeply to be a real model") from None
    except MemoryError:
        raise NetcleanseError(f"{path}: declares a model too large for this machine's memory") from None
    if model.num_classes < 1:  # e.g. a Keras Dense(units=0) output: every answer would be an IndexError
        raise NetcleanseError(f"{path}: the model answers {model.num_classes} classes; a classifier needs at least one")
    if mean is not None or std is not None:
        target = model.net if model.poison_label is not None else model  # a guard's base does the preprocessing
        target.set_preprocessing(mean=mean, std=std)
    return check_finite(model, path)


def _is_keras_archive(path: Path) -> bool:
    """A zip holding ``config.json`` and ``model.weights.h5``: a Keras 3 ``.keras`` file."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return "config.json" in names and "model.weights.h5" in names


def check_finite(model: "Classifier", path) -> "Classifier":
    """``model``, unless one of its weights is NaN or infinite: then a one-line error naming the
    first such parameter (such a model answers NaN, and every verdict on it would be meaningless)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NetcleanseError(f"{path}: {name} holds {bad} NaN or infinite value(s); the model cannot be used")
    return model
