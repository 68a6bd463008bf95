"""netcleanse: audit a neural-network classifier for backdoors and repair it.

The Python API is the product; the ``netcleanse`` command is a thin shell over it.
"""

from .errors import NetcleanseError
from .model import Classifier, load_model
from .architectures import build_architecture, register_architecture
from .scanning import ScanResult, scan
from .torch_io import save_model
from .screening import ScreenEntry, ScreenResult, read_manifest, screen

__version__ = "0.1.0"

__all__ = ["NetcleanseError", "Classifier", "load_model", "save_model", "build_architecture",
           "register_architecture", "scan", "ScanResult", "screen", "ScreenEntry", "ScreenResult", "read_manifest",
           "__version__"]
