"""PyTorch model files: loading TorchScript and state_dicts, and saving netcleanse checkpoints.

Formats read by :func:`load_torch`:

- **netcleanse checkpoints** (``.pt`` written by :func:`save_model`): a plain dict, loaded with
  ``torch.load(weights_only=True)`` so no pickled code runs::

      {"format": "netcleanse", "version": 1, "kind": "classifier" | "guarded",
       "arch": str | None, "num_classes": int, "input_shape": [C, H, W], "input_scale": float,
       "mean": [float] | None, "std": [float] | None,   # absent in older checkpoints: none
       "arch_kwargs": {...},                            # only when the architecture took some
       "name": str, "source": str | None, "state_dict": {...},
       "keras_config": str, "keras_version": str,   # only for nets rebuilt from Keras
       "onnx_model": uint8 tensor, "onnx_nhwc": bool, "onnx_per_sample": bool}  # only for ONNX nets

  A net with a registered or zoo architecture (``torchvision:NAME``, ``timm:NAME``) is rebuilt
  from ``arch``; one rebuilt from a whole Keras file (no registered architecture) from its Keras
  ``model_config`` JSON, which is data, not code; one converted from ONNX from the ONNX model
  it stores (also data, converted again by onnx2torch). A net whose ``arch`` is the user's own code
  (``FILE.py:NAME``, ``package.module:NAME``) is never rebuilt from what the checkpoint says:
  the user names the architecture again (``arch``), so only code the user named runs. Kind
  "guarded" (a :class:`netcleanse.guarded.GuardedClassifier`: its base and repaired models are
  nested classifier checkpoints, its trigger filter lists of numbers) is read by
  :func:`guarded_from_checkpoint`.
- **plain state_dicts** (also the ``state_dict`` / ``model_state_dict`` / ``model`` / ``net``
  entry of a training checkpoint dict: PyTorch's examples, BackdoorBench's ``attack_result.pt``,
  the pytorch-cifar layout) for an architecture named with ``arch`` (any form of
  :mod:`netcleanse.archspec`); a prefix every key carries (``net.``: a netcleanse Classifier's
  own keys, ``module.``: DataParallel, ``_orig_mod.``: ``torch.compile``, ``model.``: Lightning)
  is removed where that makes the keys fit the architecture; BatchNorm's ``num_batches_tracked``
  counters may be missing (old files, converters), as ``load_state_dict`` allows; the number of
  classes is read from the weights.
- **safetensors** files (``.safetensors``) holding a state_dict, read by the ``safetensors``
  library (a JSON header and raw tensor bytes: nothing in the file can run), treated as above.
- **TorchScript** files (``torch.jit.save``). A TorchScript file is a program by nature: its
  TorchScript graph is what runs when the model is called (no Python pickles are executed).
  Its input shape comes from ``arch`` or from a ``netcleanse.json`` extra file
  (``{"input_shape": [C, H, W], "input_scale": 1}``), which :func:`save_model` writes; the number
  of classes is found by running one zero image through it.

:func:`save_model` picks the format from the suffix: ``.pt``/``.pth`` -> netcleanse checkpoint (a
TorchScript net is saved as TorchScript with the extra file), ``.h5`` -> Keras weights export
(:func:`netcleanse.keras.save_keras_weights`). Saving overwrites an existing file (the CLI guards).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .archspec import ArchSpec, ZOOS, resolve_arch
from .errors import NetcleanseError
from .classifier import Classifier, checked_preprocessing, checked_scale, output_classes, parse_input_shape
from .sniff import is_safetensors, sniff  # noqa: F401 (is_safetensors lived here)
from .guarded import Disagreement, GuardedClassifier, TriggerFilter, output_linear
from .utils import atomic_write, first_line

FORMAT = "netcleanse"
VERSION = 1
EXTRA_FILE = "netcleanse.json"


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry code/ and constants.pkl; torch.save archives only data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise NetcleanseError(f"{path} is not a readable PyTorch file ({first_line(exc)})") from None
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_safetensors(path, arch=None, input_scale: float = 1.0, name: str | None = None) -> Classifier:
    """A state_dict in a ``.safetensors`` file, loaded into the architecture ``arch`` (any form of
    :mod:`netcleanse.archspec`, or an :class:`~netcleanse.archspec.ArchSpec`)."""
    path = Path(path)
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise NetcleanseError(f"{path} is a safetensors file; reading it needs the safetensors package "
                              "(pip install safetensors)") from None
    try:
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NetcleanseError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    except MemoryError:
        raise NetcleanseError(f"{path} declares tensors too large for this machine's memory") from None
    return _from_state_dict(state_dict, path, arch, input_scale, name or path.stem)


def load_torch(path, arch=None, input_scale: float = 1.0, name: str | None = None,
               input_shape=None) -> Classifier:
    """Load a PyTorch file (see the module doc) into a :class:`Classifier` returning logits.

    ``arch``: an architecture spec (:func:`netcleanse.archspec.resolve_arch`) or a resolved
    :class:`~netcleanse.archspec.ArchSpec`. ``input_scale``: a netcleanse checkpoint or
    TorchScript extra file records its own; it is used unless a value other than 1 is passed here.
    ``input_shape``: the input of a TorchScript file that does not record it.
    """
    path = Path(path)
    name = name or path.stem
    if sniff(path) == "zip" and _is_torchscript(path):  # (else a legacy, pre-1.6 torch.save pickle)
        if arch is None and input_shape is not None:
            arch = ArchSpec("(given input shape)", "none", "", given_shape=parse_input_shape(input_shape))
        return _load_torchscript(path, arch, input_scale, name)
    try:
        obj = load_weights_only(path)
    except pickle.UnpicklingError as exc:
        raise NetcleanseError(f"{path} holds pickled Python objects (e.g. a whole nn.Module), not just weights, "
                              "and netcleanse never unpickles code; save the model's state_dict "
                              "(torch.save(model.state_dict(), PATH)) and name its class with --arch FILE.py:CLASS") from None
    except MemoryError:
        raise NetcleanseError(f"{path} declares tensors too large for this machine's memory") from None
    except Exception as exc:  # weights_only: nothing ran, so any other failure is a corrupt file
        raise NetcleanseError(f"{path} is not a readable PyTorch file, it may be truncated or corrupt "
                              f"({first_line(exc)})") from None
    try:
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            return from_checkpoint(obj, path, arch, input_scale, name)
        return _from_state_dict(obj, path, arch, input_scale, name)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:  # fields of the wrong kind
        raise NetcleanseError(f"{path}: the checkpoint's fields are malformed ({first_line(exc)})") from None


def _numpy_global(name: str):
    """The NumPy object a pickle names, where it is one that only builds arrays, dtypes and scalars
    from data (an array's elements go through the same restricted unpickler); else None."""
    import importlib

    module, _, attr = name.rpartition(".")
    allowed = (name in ("numpy.ndarray", "numpy.dtype") or attr in ("_reconstruct", "scalar")
               and module in ("numpy.core.multiarray", "numpy._core.multiarray")
               or module == "numpy.dtypes" and attr.endswith("DType") and attr != "ObjectDType")
    if not allowed:
        return None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def load_weights_only(path: Path):
    """``torch.load`` with ``weights_only=True``; a file that also holds NumPy arrays beside its
    weights (BackdoorBench's ``attack_result.pt`` keeps poisoned-index arrays there) is read with
    NumPy's array, dtype and scalar builders allowed, and nothing else."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        names = _unsafe_globals(path)
        allowed = [_numpy_global(n) for n in names]
        if not names or any(obj is None for obj in allowed):
            raise
        import numpy.dtypes  # the dtype classes arrays are rebuilt with (not listed before they are met)
        allowed += [_numpy_global(f"numpy.dtypes.{n}") for n in dir(numpy.dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals([obj for obj in allowed if obj is not None]):
            return torch.load(path, weights_only=True, map_location="cpu")


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a ``torch.save`` file names that ``weights_only`` does not allow, read from its
    pickle without running it: torch's own reader for the zip format; for the legacy (pre-1.6)
    format, whose object pickle follows three small ones (magic number, protocol, system info),
    the same listing of that pickle (torch's reader takes zip files only)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):
        pass
    import pickletools

    from torch import _weights_only_unpickler as unpickler
    with open(path, "rb") as f:
        for _ in range(3):
            for _op in pickletools.genops(f):  # (genops stops at each pickle's STOP)
                pass
        names = unpickler.get_globals_in_pkl(f)
    safe = set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    return sorted(n for n in names if n not in safe)


def _scale(recorded, given: float):
    return given if given != 1.0 or recorded is None else recorded


def from_checkpoint(ckpt: dict, path: Path, arch: str | None, input_scale: float, name: str) -> Classifier:
    """A Classifier from a netcleanse checkpoint dict already read with ``weights_only=True``
    (also used for the models nested inside a guarded checkpoint)."""
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise NetcleanseError(f"{path} is a netcleanse checkpoint of version {version}; this netcleanse reads "
                              f"version {VERSION} and older")
    kind = ckpt.get("kind")
    if kind == "guarded":
        model = guarded_from_checkpoint(ckpt, path, arch)
    elif kind == "classifier":
        model = _classifier_from_checkpoint(ckpt, path, arch)
    else:
        raise NetcleanseError(f"{path}: unknown netcleanse checkpoint kind {kind!r}")
    if kind == "guarded":  # its parts apply their own recorded scale; one given here replaces it
        for part in model.parts() if input_scale != 1.0 else ():
            part.input_scale = checked_scale(input_scale)
    else:
        model.input_scale = checked_scale(_scale(ckpt.get("input_scale"), input_scale))
    if kind == "classifier" and (ckpt.get("mean") is not None or ckpt.get("std") is not None):
        model.set_preprocessing(mean=ckpt.get("mean"), std=ckpt.get("std"))
    model.name = name
    model.source = str(path)
    return model.eval()


def is_user_code(arch) -> bool:
    """True for an architecture spec naming the user's own code (``FILE.py:NAME``, ``module:NAME``)."""
    if isinstance(arch, ArchSpec):
        return arch.runs_user_code
    return isinstance(arch, str) and ":" in arch and arch.partition(":")[0] not in ZOOS


def _classifier_from_checkpoint(ckpt: dict, path: Path, arch) -> Classifier:
    state_dict = ckpt.get("state_dict")
    if not isinstance(state_dict, dict):
        raise NetcleanseError(f"{path}: the checkpoint has no state_dict")
    recorded_arch = ckpt.get("arch")
    given = arch.spec if isinstance(arch, ArchSpec) else arch
    if is_user_code(recorded_arch):
        # code named by a file is never run: the user names the architecture again
        if given is None:
            raise NetcleanseError(f"{path} holds the weights of {recorded_arch!r}, the user's own code, which "
                                  f"netcleanse does not run on a file's word; name it with --arch {recorded_arch}")
        if not is_user_code(given):
            raise NetcleanseError(f"{path} records architecture {recorded_arch!r}, not {given!r}")
        recorded_arch = None
    elif given is not None and recorded_arch is not None and given != recorded_arch:
        raise NetcleanseError(f"{path} records architecture {recorded_arch!r}, not {given!r}")
    if ckpt.get("onnx_model") is not None and recorded_arch is None and given is None:
        from .onnx_io import net_from_checkpoint
        net, shape = net_from_checkpoint(ckpt, path)
        _load_state(net, state_dict, path, "the ONNX model stored in the checkpoint")
        return Classifier(net, shape, int(ckpt.get("num_classes")), arch=None)
    if ckpt.get("keras_config") is not None and recorded_arch is None and given is None:
        from .keras import graph_from_config
        shape = ckpt.get("input_shape")  # fills a fully convolutional config's open input size
        shape = tuple(shape) if isinstance(shape, list) and len(shape) == 3 else None
        net = graph_from_config(ckpt["keras_config"], str(ckpt.get("keras_version", "2")), shape)
        _load_state(net, state_dict, path, "the Keras model stored in the checkpoint")
        return Classifier(net, net.input_shape, net.output_shape[0], arch=None)
    if recorded_arch is None and arch is None:
        raise NetcleanseError(f"{path}: the checkpoint records no architecture; name it with --arch")
    if arch is None or (isinstance(arch, str) and arch == recorded_arch):
        kwargs = ckpt.get("arch_kwargs") or {}
        shape = ckpt.get("input_shape") if ":" in str(recorded_arch) else None
        arch = resolve_arch(recorded_arch, kwargs, input_shape=shape)
    recorded_shape = ckpt.get("input_shape")
    recorded_shape = tuple(recorded_shape) if isinstance(recorded_shape, list) and len(recorded_shape) == 3 else None
    try:
        return from_arch(arch, state_dict, path, ckpt.get("num_classes"), recorded_shape)
    except NetcleanseError as exc:
        recorded_kwargs = ckpt.get("arch_kwargs")
        if recorded_kwargs and isinstance(recorded_kwargs, dict) and not resolve_arch(arch).kwargs:
            raise NetcleanseError(f"{exc} (the checkpoint records --arch-kwargs '{json.dumps(recorded_kwargs)}': "
                                  "give them with the architecture)") from None
        raise


def from_arch(arch, state_dict: dict, path, num_classes=None, fallback_shape=None) -> Classifier:
    """A Classifier of architecture ``arch`` (a spec or :class:`~netcleanse.archspec.ArchSpec`)
    holding ``state_dict``, which must fit it exactly (names and shapes).

    For registered and zoo architectures the number of classes comes from the weights (a recorded
    ``num_classes`` must agree, checked before building, so a checkpoint declaring a billion
    classes never allocates them); for the user's own code the module is built as named and its
    number of classes is the width of its output. ``fallback_shape``: the input shape to use when
    neither the spec nor the architecture gives one (a checkpoint's record)."""
    spec = resolve_arch(arch)
    path = Path(path)
    what = f"architecture {spec.spec!r}"
    if spec.runs_user_code:
        net = spec.build()
        state_dict = _aligned(state_dict, net.state_dict())
        _load_state(net, state_dict, path, what)
        shape = spec.given_shape or (parse_input_shape(fallback_shape) if fallback_shape else spec.input_shape(net))
        found = output_classes(net, shape, str(path))
        if num_classes is not None and num_classes != found:
            raise NetcleanseError(f"{path} records {num_classes} classes but the model answers {found}")
        if spec.given_classes is not None and spec.given_classes != found:  # a factory without num_classes
            raise NetcleanseError(f"--num-classes {spec.given_classes}, but {spec.spec} answers {found} classes "
                                  "(it takes no num_classes argument, or ignores it): drop --num-classes")
    else:
        template = spec.build(spec.given_classes or spec.default_classes)
        state_dict = _aligned(state_dict, template.state_dict())
        found = _classes_from_state_dict(template, state_dict, path, spec.spec)
        if num_classes is not None and num_classes != found:
            raise NetcleanseError(f"{path} records {num_classes} classes but its weights have {found}")
        net = template if _classes_from_state_dict(template, template.state_dict(), path, spec.spec) == found \
            else spec.build(found)
        _load_state(net, state_dict, path, what)
        shape = spec.input_shape(net)
    model = Classifier(net, shape, int(found), arch=spec.spec)
    model.arch_kwargs = dict(spec.kwargs)
    return model


def _classes_from_state_dict(template: nn.Module, state_dict: dict, path: Path, arch: str) -> int:
    """Number of classes: rows of the architecture's last weight matrix, as found in the file."""
    last = [k for k, v in template.state_dict().items() if k.endswith("weight") and v.dim() >= 2]
    if not last or last[-1] not in state_dict:
        raise NetcleanseError(f"{path}: the weights do not fit architecture {arch!r} "
                              f"(no {last[-1] if last else 'output'!r} entry)")
    return int(state_dict[last[-1]].shape[0])


def _load_state(net: nn.Module, state_dict: dict, path: Path, what: str) -> None:
    own = net.state_dict()
    # BatchNorm's counter of batches seen (unused in eval): absent from old files, as torch allows
    state_dict = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in state_dict},
                  **state_dict}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise NetcleanseError(f"{path}: the weights do not fit {what} ({'; '.join(parts)})")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[key].shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise NetcleanseError(f"{path}: weight {key!r} has shape {shape} but {what} needs "
                                  f"{tuple(own[key].shape)}")
    net.load_state_dict(state_dict)
    net.eval()


#: Prefixes a wrapper adds to every key: a netcleanse Classifier, DataParallel, torch.compile, Lightning.
WRAPPER_PREFIXES = ("net.", "module.", "_orig_mod.", "model.")


def _aligned(state_dict: dict, own: dict) -> dict:
    """``state_dict`` with the wrapper prefixes every key carries removed, as long as each removal
    makes more of the architecture's keys (``own``) found (a class whose one child is ``self.net``
    keeps its ``net.``)."""
    def fit(candidate):
        return sum(k in candidate for k in own)
    while state_dict:
        stripped = next(({k[len(p):]: v for k, v in state_dict.items()} for p in WRAPPER_PREFIXES
                         if all(k.startswith(p) for k in state_dict)
                         and fit({k[len(p):] for k in state_dict}) > fit(state_dict)), None)
        if stripped is None:
            return state_dict
        state_dict = stripped
    return state_dict


def _from_state_dict(obj, path: Path, arch, input_scale: float, name: str) -> Classifier:
    top = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items()):
        keys = [str(k) for k in top][:8] if isinstance(top, dict) else []
        raise NetcleanseError(f"{path} is neither a state_dict, a netcleanse checkpoint nor a TorchScript file"
                              + (f" (a dict of {', '.join(keys)}{', ...' if len(top) > 8 else ''}: none of them "
                                 "a dict of tensors)" if keys else ""))
    if arch is None:
        raise NetcleanseError(f"{path} holds a state_dict (weights only); name its architecture with --arch")
    model = from_arch(arch, dict(obj), path)
    model.input_scale, model.name, model.source = checked_scale(input_scale), name, str(path)
    return model.eval()


def _load_torchscript(path: Path, arch, input_scale: float, name: str) -> Classifier:
    extra = {EXTRA_FILE: ""}
    try:
        net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # a corrupt archive fails in many ways; none of its code has run
        raise NetcleanseError(f"{path} is not a loadable TorchScript file ({first_line(exc)})") from None
    info = {}
    if extra[EXTRA_FILE]:
        try:
            info = json.loads(extra[EXTRA_FILE])
        except ValueError:
            raise NetcleanseError(f"{path}: its {EXTRA_FILE} extra file is not valid JSON") from None
    if isinstance(arch, ArchSpec) and arch.given_shape is not None:
        input_shape = arch.given_shape
    elif arch is not None:
        input_shape = resolve_arch(arch).input_shape()
    elif isinstance(info.get("input_shape"), list) and len(info["input_shape"]) == 3:
        input_shape = tuple(int(s) for s in info["input_shape"])
    else:
        raise NetcleanseError(f"{path} is a TorchScript file that does not record its input shape; give it with "
                              f"--input-shape CxHxW or an architecture with --arch (or store {EXTRA_FILE} in it)")
    scale = checked_scale(_scale(info.get("input_scale"), input_scale))
    mean, std = checked_preprocessing(info.get("mean"), info.get("std"), input_shape[0])
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros((1,) + tuple(input_shape)))
    except Exception as exc:  # any failure of the scripted program on a well-formed input
        raise NetcleanseError(f"{path}: the TorchScript model fails on a {'x'.join(map(str, input_shape))} "
                              f"input ({first_line(exc)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise NetcleanseError(f"{path}: the TorchScript model must return one score per class (N x classes)")
    return Classifier(net, input_shape, int(out.shape[1]), input_scale=scale, name=name, arch=None,
                      source=str(path), mean=mean, std=std)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def checkpoint(model: Classifier) -> dict:
    """The netcleanse checkpoint dict of an ordinary (unguarded) classifier."""
    from .keras import KerasGraph
    net = model.net
    ckpt = {"format": FORMAT, "version": VERSION, "kind": "classifier", "arch": model.arch,
            "num_classes": model.num_classes, "input_shape": list(model.input_shape),
            "input_scale": model.input_scale, "name": model.name, "source": model.source,
            "state_dict": {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}}
    if getattr(model, "mean", None) is not None:
        ckpt["mean"], ckpt["std"] = list(model.mean), list(model.std)
    if getattr(model, "arch_kwargs", None):
        ckpt["arch_kwargs"] = dict(model.arch_kwargs)
    if model.arch is None:
        from .onnx_io import OnnxNet
        if isinstance(net, OnnxNet):
            from .onnx_io import checkpoint_entries
            ckpt.update(checkpoint_entries(net))
            return ckpt
        if not isinstance(net, KerasGraph):
            if isinstance(net, torch.jit.ScriptModule) or type(net).__module__.startswith("torch.fx"):
                raise NetcleanseError(f"cannot save model {model.name!r} as a checkpoint: it has no named "
                                      "architecture and was not built from a Keras config, so it could not be "
                                      "rebuilt")
            # a module wrapped from Python: its weights only; loading names the architecture again
            ckpt["module_class"] = f"{type(net).__module__}.{type(net).__qualname__}"
            return ckpt
        ckpt["keras_config"] = json.dumps(net.model_config)
        ckpt["keras_version"] = net.keras_version
    return ckpt


def save_model(model: Classifier, path) -> Path:
    """Save a classifier by suffix: ``.pt``/``.pth`` checkpoint (or TorchScript), ``.h5`` Keras weights."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".h5":
        from .keras import save_keras_weights
        return save_keras_weights(model, path)
    if suffix not in (".pt", ".pth"):
        raise NetcleanseError(f"cannot save a model as {path.name!r}: use a .pt (PyTorch) or .h5 (Keras) file name")
    with atomic_write(path) as tmp:
        if isinstance(model.net, torch.jit.ScriptModule) and model.poison_label is None:
            info = {"input_shape": list(model.input_shape), "input_scale": model.input_scale, "name": model.name,
                    **({"mean": list(model.mean), "std": list(model.std)} if model.mean is not None else {})}
            torch.jit.save(model.net, str(tmp), _extra_files={EXTRA_FILE: json.dumps(info)})
        else:
            if model.poison_label is not None:
                ckpt = {"format": FORMAT, "version": VERSION, **guard_checkpoint(model), "kind": "guarded"}
            else:
                ckpt = checkpoint(model)
            torch.save(ckpt, tmp)
    return path


# --------------------------------------------------------------------------------------------
# Guarded checkpoints
# --------------------------------------------------------------------------------------------

def guard_checkpoint(model: GuardedClassifier) -> dict:
    """The checkpoint entries of a guarded classifier (tensors, numbers, strings, lists, dicts only)."""
    if not isinstance(model, GuardedClassifier):
        raise NetcleanseError(f"model {model.name!r} is not a guarded classifier")
    ckpt = {"kind": "guarded", "arch": None, "num_classes": model.num_classes,
            "input_shape": list(model.input_shape), "input_scale": 1.0, "name": model.name,
            "source": model.source, "poison_label": model.poison_label, "guard": model.detector.kind,
            "base": checkpoint(model.base), "settings": dict(getattr(model, "settings", {}))}
    if isinstance(model.detector, Disagreement):
        ckpt["repaired"] = checkpoint(model.detector.repaired)
    else:
        ckpt.update(labels=model.detector.labels, neurons=model.detector.neurons,
                    thresholds=model.detector.thresholds)
    return ckpt


def _guarded_part(ckpt, what: str, path, arch) -> Classifier:
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "classifier":
        raise NetcleanseError(f"guarded checkpoint: its {what} model is missing or not a classifier")
    # (messages name the guarded file, which is what the user gave; the part keeps its own source)
    part = from_checkpoint(ckpt, Path(f"{path} ({what} model)") if path is not None else Path(what), arch, 1.0,
                           str(ckpt.get("name", what)))
    part.source = str(ckpt.get("source") or what)
    return part


def guarded_from_checkpoint(ckpt: dict, path=None, arch=None) -> GuardedClassifier:
    """Rebuild a guarded classifier from :func:`guard_checkpoint`'s dict; ``arch``: the base model's
    architecture where the checkpoint cannot name it (the user's own code, or a wrapped module),
    as for an ordinary checkpoint (a disagreement guard's repaired model is of the same architecture)."""
    base = _guarded_part(ckpt.get("base"), "base", path, arch)
    kind = ckpt.get("guard")
    if kind == "disagree":
        guarded = GuardedClassifier(base, Disagreement(_guarded_part(ckpt.get("repaired"), "repaired", path, arch)))
    elif kind == "filter":
        try:
            labels, neurons = [int(t) for t in ckpt["labels"]], [[int(c) for c in n] for n in ckpt["neurons"]]
            width = output_linear(base).in_features
            # indices come from the file: checked against the network before any is used
            if any(not 0 <= t < base.num_classes for t in labels) or \
                    any(not 0 <= c < width for cells in neurons for c in cells):
                raise ValueError
            detector = TriggerFilter(base.num_classes, labels, neurons, list(ckpt["thresholds"]))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError):
            raise NetcleanseError("guarded checkpoint: its trigger filter is incomplete or corrupt") from None
        guarded = GuardedClassifier(base, detector)
    else:
        raise NetcleanseError(f"guarded checkpoint: unknown guard kind {kind!r}")
    guarded.settings = dict(ckpt.get("settings") or {})
    return guarded.eval()
