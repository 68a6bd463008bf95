"""The model noun: :class:`Classifier`, and the checks of its settings (scale, mean/std, input shape).

Reading model files is :mod:`netcleanse.model` (:func:`~netcleanse.model.load_model`), one level up,
over the format modules, which build Classifiers from this module.

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
import warnings

import numpy as np
import torch
from torch import nn

from .errors import NetcleanseError, NetcleanseWarning
from .utils import first_line, module_device


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


PIXEL_SLACK = 1e-3  # float pixels this far outside [0, 1] are rounding, not another range


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
        # the net's mode is the model's (a wrapped net in eval mode must not be put back in train
        # mode after each prediction: dropout on, BatchNorm statistics updated by plain calls)
        self.training = net.training

    @classmethod
    def wrap(cls, module: nn.Module, input_shape, *, num_classes: int | None = None, input_scale: float = 1.0,
             mean=None, std=None, name: str = "model", source: str | None = None) -> "Classifier":
        """Any torch module returning logits (N, classes) for NCHW input, as a :class:`Classifier`
        that netcleanse scans, repairs and reports on like a loaded model.

        ``input_shape``: (C, H, W), or text "CxHxW". ``num_classes``: the width of the module's output
        on one zero image (run to check the output: a ``num_classes`` given must agree); one score
        per class, at least two; float32 weights. ``input_scale``, ``mean``, ``std``: how the
        module wants its input (see the module doc); netcleanse feeds it [0, 1] pixels through them.
        The module is put in eval mode. Such a model is saved with its weights only: loading it back
        needs the same architecture named again (``load_model(path, arch=...)``)."""
        if not isinstance(module, nn.Module):
            raise NetcleanseError(f"expected a torch nn.Module, got {type(module).__name__}")
        shape = parse_input_shape(input_shape)
        kinds = {p.dtype for p in module.parameters() if p.is_floating_point()} - {torch.float32}
        if kinds:
            raise NetcleanseError(f"{name}: the module's weights are {sorted(map(str, kinds))[0].replace('torch.', '')}; "
                                  "netcleanse computes in float32: give it module.float()")
        module.eval()
        width = output_classes(module, shape, name)  # run even when num_classes is given: the output is checked
        if num_classes is not None and int(num_classes) != width:
            raise NetcleanseError(f"{name}: num_classes is {num_classes} but the module answers {width} scores")
        if width == 1:  # a binary sigmoid head, as load_model refuses it
            raise NetcleanseError(f"{name}: the model has one output (a binary sigmoid head?); netcleanse needs one "
                                  "output per class: give it a 2-way head (logits [0, z] for a sigmoid's z)")
        return cls(module, shape, width, input_scale=input_scale, name=name, arch=None,
                   source=source, mean=mean, std=std)

    def set_preprocessing(self, input_scale: float | None = None, mean=None, std=None) -> "Classifier":
        """Set the input scale (when given) and the per-channel ``mean``/``std`` (``None``: no
        normalisation); checked (one value per channel, std > 0). Returns the model."""
        if input_scale is not None:
            self.input_scale = checked_scale(input_scale)
        mean, std = checked_preprocessing(mean, std, self.input_shape[0])
        self.mean, self.std = mean, std
        shape = (1, len(mean), 1, 1) if mean is not None else (0,)
        device = module_device(self.net) if isinstance(self.net, nn.Module) else torch.device("cpu")
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

    def _images(self, x) -> torch.Tensor:
        """``x`` as an N x C x H x W float tensor that fits this model, else a one-line error: pixels
        in [0, 1]; integer images (uint8) are 0..255 and divided by 255, as :func:`netcleanse.load_data`
        reads them; float pixels that look like 0..255 are refused (they would be fed as they are,
        and every answer would be wrong), others outside [0, 1] warned about."""
        if isinstance(x, np.ndarray):
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                    or x.dtype == np.bool_):
                raise NetcleanseError(f"images must be numbers, got a NumPy array of {x.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise NetcleanseError(f"images must be a tensor (N x C x H x W, pixels in [0, 1]), got {type(x).__name__}")
        self.check_input(x)
        if not x.is_floating_point():
            if x.dtype != torch.bool and len(x) and (int(x.min()) < 0 or int(x.max()) > 255):
                raise NetcleanseError(f"integer images must be 0..255, got values from {int(x.min())} to {int(x.max())}")
            return x.float() if x.dtype == torch.bool else x.float() / 255
        if len(x):
            low, high = float(x.min()), float(x.max())
            if not (math.isfinite(low) and math.isfinite(high)):
                raise NetcleanseError("images hold NaN or infinite pixels")
            if low >= -PIXEL_SLACK and high > 2:  # 0..255 pixels as floats: every answer would be wrong
                raise NetcleanseError(f"pixels must be in [0, 1], got values from {low:g} to {high:g}: divide "
                                      "0..255 images by 255 (the model's input_scale does the rest)")
            if not (low >= -PIXEL_SLACK and high <= 1 + PIXEL_SLACK):
                warnings.warn(f"pixels outside [0, 1] (from {low:g} to {high:g}): a netcleanse model takes [0, 1] "
                              "pixels and applies its own preprocessing (input_scale, mean/std); already "
                              "normalised images would be normalised twice", NetcleanseWarning, stacklevel=3)
        return x if x.dtype == torch.float32 else x.float()  # (float64 arrays: the model's float32)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Softmax probabilities, computed in batches in eval mode on the model's device; a CPU tensor.
        ``batch_size``: images per pass (default: :func:`netcleanse.passes.forward_batch`)."""
        x = self._images(x)
        dev = module_device(self)
        batch_size = self.pass_size(len(x), dev, batch_size)
        return torch.cat([torch.softmax(self.logits(x[i:i + batch_size].to(dev)), dim=1).cpu()
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, self.num_classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Predicted labels (int64), computed in batches in eval mode on the model's device; a CPU tensor.
        ``batch_size``: images per pass (default: :func:`netcleanse.passes.forward_batch`)."""
        x = self._images(x)
        dev = module_device(self)
        batch_size = self.pass_size(len(x), dev, batch_size)
        return torch.cat([self.logits(x[i:i + batch_size].to(dev)).argmax(dim=1).cpu()
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)

    def pass_size(self, n: int, device, batch_size: int | None = None) -> int:
        """How many of ``n`` images one forward pass on ``device`` takes: ``batch_size`` when given
        (checked), else at most 512 and no more than the memory budget allows
        (:func:`netcleanse.passes.forward_batch`, measured once per model, input and device)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise NetcleanseError(f"batch_size must be a positive integer, got {batch_size!r}")
        from .passes import forward_batch
        was_training = self.training
        self.eval()  # measured as the passes run
        try:
            return forward_batch(self, self.input_shape, n, device, batch_size)
        finally:
            self.train(was_training)

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
        if x.dim() == 4 and tuple(x.shape[1:]) == self.input_shape:
            return
        want = "x".join(str(s) for s in self.input_shape)
        shape = "x".join(str(s) for s in x.shape)
        c, h, w = self.input_shape
        if tuple(x.shape) == self.input_shape:
            hint = ": one image without the batch axis (give x[None])"
        elif x.dim() == 4 and tuple(x.shape[1:]) == (h, w, c):
            hint = ": channels last (N x H x W x C); give x.permute(0, 3, 1, 2) (NumPy: x.transpose(0, 3, 1, 2))"
        else:
            hint = ""
        raise NetcleanseError(f"images are {shape} but the model {self.name!r} expects Nx{want} (N x C x H x W){hint}")

    def layer_table(self) -> list[tuple[str, str, int]]:
        """(name, type, number of parameters) for every leaf module, in definition order; an empty
        container (a ResNet's identity shortcut written as ``nn.Sequential()``) is not a layer."""
        rows = []
        empty = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
        for name, module in self.net.named_modules():
            if name and not list(module.children()) and not isinstance(module, empty):
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
        raise NetcleanseError(f"input shape must be CxHxW with positive sizes of at most {1 << 14} "
                              f"(e.g. 3x224x224), got {value!r}")
    return shape


@torch.no_grad()
def as_classifier(model, what: str = "model") -> "Classifier":
    """``model`` if it is a :class:`Classifier`, else a one-line error saying how to make one."""
    if isinstance(model, Classifier):
        return model
    how = ("wrap it: Classifier.wrap(module, input_shape)" if isinstance(model, nn.Module)
           else "load one with netcleanse.load_model(path) or wrap a module with Classifier.wrap(module, input_shape)")
    raise NetcleanseError(f"the {what} must be a netcleanse Classifier, got {type(model).__name__}: {how}")


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
        hint = ("; for a model that also returns features, name a subclass whose forward returns only the "
                "logits (e.g. `return super().forward(x)[0]`)" if isinstance(out, (tuple, list, dict)) else "")
        raise NetcleanseError(f"{what}: the model must return one score per class (N x classes), got {shape}{hint}")
    return int(out.shape[1])
