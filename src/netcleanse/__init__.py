"""netcleanse: audit a neural-network classifier for backdoors and repair it.

The Python API is the product; the ``netcleanse`` command is a thin shell over it.
"""

from .errors import NetcleanseError, NetcleanseWarning
from .data import Dataset, load_data, save_data
from .trigger import Trigger
from .model import Classifier, load_model
from .architectures import build_architecture, register_architecture
from .scanning import ScanResult, scan
from .torch_io import save_model
from .screening import ScreenEntry, ScreenResult, read_manifest, screen
from .repair.result import RepairResult
from .evaluate import Evaluation

__version__ = "0.1.0"

# the nouns every workflow shares; the workflows that would shadow their own module's name
# (netcleanse.repair.repair, netcleanse.evaluate.evaluate, ...) are imported from there
__all__ = ["NetcleanseError", "NetcleanseWarning", "Dataset", "load_data", "save_data", "Trigger",
           "RepairResult", "Evaluation", "Classifier", "load_model", "save_model", "build_architecture",
           "register_architecture", "scan", "ScanResult", "screen", "ScreenEntry", "ScreenResult", "read_manifest",
           "__version__"]
