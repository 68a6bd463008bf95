"""What a repair starts from: the reversed triggers of a scan's flagged labels, and test sets joined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import scan_folder
from ..data import Dataset
from ..errors import NetcleanseError
from ..trigger import Trigger
from ..utils import read_json_object


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


def check_scan_model(scan, model) -> None:
    """Refuse a scan of another model: its reversed triggers would repair this one against a backdoor
    it may not have. Checked where the scan recorded them: the number of classes and the input
    shape (scan.json's ``model``), and the weights' SHA-256 (scan.json's ``model.weights_sha256``, or
    a scan folder's ``scan_settings.json``, written when the scan started; it covers the parameters'
    names too, so the same weights loaded another way, e.g. a Keras whole-model file rebuilt from its
    config rather than into a registered architecture, count as other weights: scan the model as it
    will be repaired)."""
    from ..journal import weights_digest
    if isinstance(scan, dict):
        return  # ready triggers: nothing recorded to compare
    where, recorded, digest = "the scan", getattr(scan, "model", None) or {}, None
    if isinstance(scan, (str, Path)):
        folder = Path(scan)
        where = str(folder)
        recorded = scan_folder.read_scan_json(folder / scan_folder.SCAN_JSON).get("model") or {}
        started = folder / "scan_settings.json"
        if started.is_file():
            try:
                digest = (read_json_object(started).get("model") or {}).get("weights_sha256")
            except NetcleanseError:
                digest = None  # an unreadable settings file decides nothing; scan.json was checked
    if not isinstance(recorded, dict):
        return
    if digest is None and isinstance(recorded.get("weights_sha256"), str):  # scan.json's own (scans since 2026-12-05)
        digest = recorded["weights_sha256"]
    ours = {"num_classes": model.num_classes, "input_shape": list(model.input_shape)}
    for key, value in ours.items():
        theirs = recorded.get(key)
        if theirs is not None and (list(theirs) if key == "input_shape" else theirs) != value:
            raise NetcleanseError(f"{where} is a scan of a model with {key.replace('_', ' ')} {theirs}, not this "
                                  f"model's {value}; scan this model first")
    if isinstance(digest, str) and digest != weights_digest(model):
        raise NetcleanseError(f"{where} is a scan of other weights or preprocessing than this model's (it "
                              "records another SHA-256); scan this model first")


def _triggers_from_folder(folder: Path) -> dict[int, Trigger]:
    record, arrays = scan_folder.read_scan(folder)
    flagged = record["flagged"]  # a list of scanned labels (scan_folder.check_scan_record)
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
