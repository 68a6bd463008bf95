"""netcleanse: audit a neural-network classifier for backdoors and repair it.

The Python API is the product; the ``netcleanse`` command is a thin shell over it.

The names below are imported on first use (PEP 562): ``import netcleanse`` stays light (no torch)
until one of them is touched, so the command can answer Ctrl-C cleanly while it starts.
"""

from __future__ import annotations

import importlib

from .errors import NetcleanseError, NetcleanseWarning

__version__ = "0.1.0"

# the nouns every workflow shares, and the module each comes from; the workflows that would shadow
# their own module's name (netcleanse.repair.repair, netcleanse.evaluate.evaluate, ...) are imported
# from there
_PUBLIC = {"Dataset": "data", "load_data": "data", "save_data": "data", "Trigger": "trigger",
           "Classifier": "model", "load_model": "model", "build_architecture": "architectures",
           "register_architecture": "architectures", "ScanResult": "scanning", "scan": "scanning",
           "save_model": "torch_io", "ScreenEntry": "screening", "ScreenResult": "screening",
           "read_manifest": "screening", "screen": "screening", "RepairResult": "repair.result",
           "Evaluation": "evaluate"}

__all__ = ["NetcleanseError", "NetcleanseWarning", "Dataset", "load_data", "save_data", "Trigger",
           "RepairResult", "Evaluation", "Classifier", "load_model", "save_model", "build_architecture",
           "register_architecture", "scan", "ScanResult", "screen", "ScreenEntry", "ScreenResult", "read_manifest",
           "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("__"):  # a submodule, as `import netcleanse; netcleanse.lab` always allowed
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
