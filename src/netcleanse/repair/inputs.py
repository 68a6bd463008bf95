"""What a repair starts from: the reversed triggers of a scan's flagged labels, and test sets joined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import scan_folder
from ..data import Dataset
from ..errors import NetcleanseError
from ..trigger import Trigger


def scan_triggers(scan) -> dict[int, Trigger]:
    """The reversed triggers of the flagged labels of a scan.

    ``scan``: a ScanResult (anything with ``flagged`` and ``trigger(label)``), a scan output
    folder (``scan.json`` + ``masks.npz``), or a ready ``{label: Trigger}`` dict.
    """
    if isinstance(scan, dict):
        return {int(label): trigger for label, trigger in scan.items()}
    if isinstance(scan, (str, Path)):
        return _triggers_from_folder(Path(scan))
    if hasattr(scan, "flagged") and hasattr(scan, "trigger"):
        return {int(label): scan.trigger(int(label)) for label in scan.flagged}
    raise NetcleanseError("a scan must be a scan result, a scan output folder or a {label: Trigger} dict")


def _triggers_from_folder(folder: Path) -> dict[int, Trigger]:
    record, arrays = scan_folder.read_scan(folder)
    flagged = scan_folder.flagged_labels(record, folder / scan_folder.SCAN_JSON)
    missing = [label for label in flagged if arrays.get(label) is None]
    if missing:
        raise NetcleanseError(f"{folder / scan_folder.MASKS_NPZ} has no reversed trigger for flagged label(s) {missing}")
    return {label: Trigger(*(torch.from_numpy(a.astype(np.float32)) for a in arrays.get(label)))
            for label in flagged}


def concat(datasets) -> Dataset | None:
    """One dataset from several (e.g. one poisoned test set per target), or None."""
    if datasets is None or isinstance(datasets, Dataset):
        return datasets
    datasets = list(datasets)
    if not datasets:
        return None
    if len(datasets) == 1:
        return datasets[0]
    if any(d.y is None for d in datasets):
        raise NetcleanseError("poisoned test sets need labels (the attack target of each row)")
    return Dataset(torch.cat([d.x for d in datasets]), torch.cat([d.y for d in datasets]),
                   "+".join(d.source for d in datasets))
