"""Naming a PyTorch architecture: what ``--arch`` (``arch=`` in Python) accepts, and building it.

Forms of an architecture spec:

- ``mnist-cnn``, ``csaw-deepid``: an architecture registered with
  :func:`netcleanse.register_architecture`.
- ``torchvision:NAME`` (e.g. ``torchvision:resnet18``) and ``timm:NAME``: a model of those zoos,
  built with random weights (never downloaded) and the number of classes the weights file has.
  torchvision and timm are optional (``pip install 'netcleanse[zoo]'``) and imported only here.
- ``FILE.py:NAME``: a class (or function returning an ``nn.Module``) defined in the user's own
  Python file. **Naming a file runs it**: the file is executed as a Python module, exactly as
  ``python FILE.py`` would import it. netcleanse never runs code named by a model file, only
  code the user names on the command line or in Python.
- ``package.module:NAME``: the same for an importable module (the current folder is on the
  import path, as with ``python -m``).

``kwargs`` (``--arch-kwargs JSON``) are passed to the class or zoo function. The input shape comes
from ``input_shape`` (``--input-shape CxHxW``), else from the architecture (a registered one,
an ``input_shape`` attribute of a user class or of its module, timm's ``pretrained_cfg``; 3x224x224 for torchvision).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .architectures import get_architecture
from .errors import NetcleanseError
from .classifier import parse_input_shape
from .utils import first_line

ZOOS = ("torchvision", "timm")
# the module name a FILE.py architecture is imported under (never importable elsewhere by that name:
# Ray workers get such modules by value, netcleanse.executor)
USER_MODULE_PREFIX = "netcleanse_user_arch_"
# keyword arguments of zoo constructors that would load weights or configs from elsewhere
# (weights, weights_backbone, pretrained, pretrained_cfg, checkpoint_path, file, url, hf_hub_id, ...)
_FETCHING_WORDS = ("weight", "pretrained", "checkpoint", "path", "file", "url", "hub", "cache")
ZOO_INPUT_SHAPE = (3, 224, 224)


@dataclass
class ArchSpec:
    """A resolved architecture spec (see the module doc); :meth:`build` makes a fresh module."""

    spec: str
    kind: str  # "registered", "torchvision", "timm", "file", "module"
    target: str  # registered name, zoo model name, or the attribute named after the colon
    kwargs: dict = field(default_factory=dict)
    given_shape: tuple[int, int, int] | None = None
    given_classes: int | None = None
    _factory: object = None

    @property
    def runs_user_code(self) -> bool:
        """True for ``FILE.py:NAME`` and ``package.module:NAME`` (code the user named)."""
        return self.kind in ("file", "module")

    @property
    def default_classes(self) -> int | None:
        if self.kind == "registered":
            return get_architecture(self.target).default_classes
        return None

    def build(self, num_classes: int | None = None) -> nn.Module:
        """A new module with random weights; ``num_classes`` (else ``--num-classes``, else the
        architecture's default) for architectures that take one."""
        num_classes = num_classes or self.given_classes
        if self.kind == "registered":
            spec = get_architecture(self.target)
            return spec.build(int(num_classes or spec.default_classes))
        if self.kind == "torchvision":
            models = _import_zoo("torchvision").models
            args = dict(self.kwargs, **({"num_classes": int(num_classes)} if num_classes else {}))
            return _call(lambda: models.get_model(self.target, weights=None, **args), self.spec)
        if self.kind == "timm":
            timm = _import_zoo("timm")
            args = dict(self.kwargs, **({"num_classes": int(num_classes)} if num_classes else {}))
            return _call(lambda: timm.create_model(self.target, pretrained=False, **args), self.spec)
        factory = self._factory
        args = dict(self.kwargs)
        if num_classes and "num_classes" not in args and _accepts(factory, "num_classes"):
            args["num_classes"] = int(num_classes)
        net = _call(lambda: factory(**args), self.spec)
        if not isinstance(net, nn.Module):
            raise NetcleanseError(f"--arch {self.spec}: calling it returned a {type(net).__name__}, "
                                  "not a torch nn.Module")
        return net

    def input_shape(self, net: nn.Module | None = None) -> tuple[int, int, int]:
        """(C, H, W): given, else the architecture's own (see the module doc), else a one-line error; a
        registered architecture's own, and no other."""
        if self.kind == "registered":  # its size is the one it was trained at
            own = get_architecture(self.target).input_shape
            if self.given_shape is not None and tuple(self.given_shape) != tuple(own):
                raise NetcleanseError(f"the registered architecture {self.target!r} takes {'x'.join(map(str, own))}; "
                                      f"--input-shape {'x'.join(map(str, self.given_shape))} does not fit it (drop it)")
            return own
        if self.given_shape is not None:
            return self.given_shape
        if self.kind == "torchvision":
            return ZOO_INPUT_SHAPE
        if self.kind == "timm":
            cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None) or {}
            size = cfg.get("input_size") if isinstance(cfg, dict) else None
            return parse_input_shape(size) if size else ZOO_INPUT_SHAPE
        module = sys.modules.get(getattr(self._factory, "__module__", None) or "")
        for owner in (net, self._factory, module):
            shape = getattr(owner, "input_shape", None)
            if shape is not None:
                try:
                    return parse_input_shape(shape)
                except NetcleanseError:
                    pass
        raise NetcleanseError(f"--arch {self.spec} does not say what input it takes; give --input-shape CxHxW "
                              "(e.g. 3x32x32)")


def _accepts(factory, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call(make, spec: str):
    try:
        return make()
    except NetcleanseError:
        raise
    except Exception as exc:  # the user's (or the zoo's) constructor rejected its arguments
        raise NetcleanseError(f"--arch {spec}: building the model failed ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None


def _import_zoo(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise NetcleanseError(f"--arch {name}:... needs the {name} package, which is not installed "
                              f"(pip install 'netcleanse[zoo]' or pip install {name})") from None
    except Exception as exc:  # installed, but broken (e.g. built for another torch)
        raise NetcleanseError(f"{name} is installed but fails to import ({type(exc).__name__}: "
                              f"{first_line(exc)}); install the {name} release made for torch "
                              f"{_torch_version()}") from None


def _torch_version() -> str:
    import torch
    return torch.__version__


def _load_file(path: Path, spec: str):
    """Execute a user's Python file as a module (the user named it) and return the module."""
    if not path.is_file():
        raise NetcleanseError(f"--arch {spec}: no such Python file {path}")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"{USER_MODULE_PREFIX}{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise NetcleanseError(f"--arch {spec}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        with _on_path(str(path.resolve().parent)):  # the file's sibling imports work, as with `python FILE.py`
            loader_spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - anything the user's file raises, SystemExit included
        del sys.modules[module_name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise NetcleanseError(f"--arch {spec}: running {path} failed ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
    return module


@contextmanager
def _on_path(folder: str):
    """``folder`` first on ``sys.path`` while the block runs (unless it is there already)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_module(name: str, spec: str):
    cwd = os.getcwd()
    try:
        if "" in sys.path:  # the current folder is already searched
            return importlib.import_module(name)
        with _on_path(cwd):
            return importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - ImportError, or anything the module raises
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise NetcleanseError(f"--arch {spec}: importing {name} failed ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None


def absolute_arch(spec: str) -> str:
    """``spec`` with the path of a ``FILE.py:NAME`` made absolute (other specs as they are), so that it
    names the same file from any folder: a Ray worker's, or a later resume's."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    where, _, target = spec.strip().rpartition(":")
    if where in ZOOS or not where.endswith(".py"):
        return spec
    return f"{Path(where).expanduser().resolve()}:{target}"


def resolve_arch(spec: str, kwargs: dict | str | None = None, num_classes: int | None = None,
                 input_shape=None) -> ArchSpec:
    """Resolve an architecture spec (see the module doc) into an :class:`ArchSpec`.

    For ``FILE.py:NAME`` and ``package.module:NAME`` this imports (runs) the named code. ``kwargs``
    may be a dict or JSON text (an object). Every mistake is a one-line :class:`NetcleanseError`.
    """
    if isinstance(spec, ArchSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise NetcleanseError(f"--arch must name an architecture, got {spec!r}")
    spec = spec.strip()
    kwargs = parse_kwargs(kwargs)
    shape = None if input_shape is None else parse_input_shape(input_shape)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise NetcleanseError(f"--num-classes must be a positive integer, got {num_classes!r}")
    if ":" not in spec:
        get_architecture(spec)  # a one-line error naming the known ones
        if kwargs:
            raise NetcleanseError(f"--arch-kwargs does not apply to the registered architecture {spec!r}")
        return ArchSpec(spec, "registered", spec, {}, shape, num_classes)
    where, _, target = spec.partition(":") if spec.partition(":")[0] in ZOOS else spec.rpartition(":")
    if not where or not target:
        raise NetcleanseError(f"--arch {spec}: expected FILE.py:NAME, package.module:NAME, torchvision:NAME "
                              "or timm:NAME")
    if where in ZOOS:
        # a zoo spec may come from a checkpoint (data): nothing in it may fetch or read weights elsewhere
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", target):
            raise NetcleanseError(f"--arch {spec}: {target!r} is not a {where} model name")
        for key in kwargs:
            if any(word in key.lower() for word in _FETCHING_WORDS):
                raise NetcleanseError(f"--arch-kwargs {key!r} is not allowed: the weights come from the model "
                                      "file, and netcleanse never downloads or reads any other")
        return ArchSpec(spec, where, target, kwargs, shape, num_classes)
    if where.endswith(".py"):
        module = _load_file(Path(where).expanduser(), spec)
        kind = "file"
    else:
        module = _import_module(where, spec)
        kind = "module"
    factory = module
    for part in target.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise NetcleanseError(f"--arch {spec}: {where} defines no {target!r}")
    if not callable(factory):
        raise NetcleanseError(f"--arch {spec}: {target!r} is not a class or function")
    return ArchSpec(spec, kind, target, kwargs, shape, num_classes, factory)


def parse_kwargs(value) -> dict:
    """``--arch-kwargs``: a dict, or JSON text holding an object; ``None`` is ``{}``."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    import json
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise NetcleanseError(f"--arch-kwargs must be a JSON object, e.g. '{{\"width\": 64}}' "
                              f"({first_line(exc)})") from None
    if not isinstance(parsed, dict):
        raise NetcleanseError(f"--arch-kwargs must be a JSON object, got {type(parsed).__name__}")
    return parsed
