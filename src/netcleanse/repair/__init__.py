"""Repair after a scan: one entry point, :func:`repair`, over four methods.

* ``fine-prune``: :func:`netcleanse.pruning.fine_prune` (needs clean data);
* ``unlearn``: :func:`netcleanse.unlearning.unlearn` with the scan's reversed triggers (needs clean data);
* ``filter``: :func:`netcleanse.guard.trigger_filter`, a guarded N+1 classifier built from the
  reversed triggers (data-free; calibrated on clean data when given);
* ``disagree``: :func:`netcleanse.guard.disagreement_guard` between the original and its
  fine-pruned version (needs clean data).

Every method returns a :class:`RepairResult`; ``save(dir)`` writes ``repair.json`` (settings,
the table, the fine-pruning curve, the measured numbers) and the models: ``repaired.pt`` and
Keras-compatible ``repaired.h5`` for weight repairs (plus one pair per fine-pruning threshold),
``guarded.pt`` for guards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import scan_folder
from ..data import Dataset
from ..errors import NetcleanseError
from ..evaluate import evaluate
from ..model import Classifier
from ..trigger import Trigger
from ..utils import write_json_atomic

METHODS = ("fine-prune", "unlearn", "filter", "disagree")


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


@dataclass
class RepairResult:
    model: Classifier  # the repaired (weights) or guarded (N+1) classifier
    method: str
    table: list[dict]
    curve: list[dict] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    saved: dict[str, Classifier] = field(default_factory=dict)  # extra models to write (file stem -> model)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "flagged": self.flagged, "settings": self.settings,
                "model": {"name": self.model.name, "num_classes": self.model.num_classes,
                          "poison_label": self.model.poison_label},
                "table": self.table, "curve": self.curve, "elapsed_s": self.elapsed_s}

    def save(self, folder, force: bool = False) -> Path:
        """Write ``repair.json`` and the model files into ``folder``; refuse to overwrite unless ``force``."""
        from ..torch_io import save_model
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NetcleanseError(f"--out {folder} exists and is not a folder")
        if (folder / "repair.json").exists() and not force:
            raise NetcleanseError(f"{folder} already holds a repair (repair.json); choose another --out or use --force")
        models = {("guarded" if self.model.poison_label is not None else "repaired"): self.model, **self.saved}
        # every file this writes, checked before the first is written (the input model may live there)
        taken = [name for stem in models for name in (f"{stem}.pt", f"{stem}.h5") if (folder / name).exists()]
        if taken and not force:
            raise NetcleanseError(f"{folder / taken[0]} exists; choose another --out or use --force to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        files, notes = {}, {}
        for stem, model in models.items():
            files[stem] = [save_model(model, folder / f"{stem}.pt").name]
            if model.poison_label is None:
                try:
                    files[stem].append(save_model(model, folder / f"{stem}.h5").name)
                except NetcleanseError as exc:  # e.g. a TorchScript net: no Keras layout to write
                    notes[stem] = f"no .h5 export: {exc}"
        record = dict(self.to_dict(), files=files, notes=notes)
        write_json_atomic(folder / "repair.json", record, indent=2)
        return folder


def _row(name: str, model: Classifier, clean: Dataset | None, test_clean: Dataset | None,
         test_poisoned: Dataset | None, target: int | None) -> dict:
    row = {"model": name}
    if clean is not None and clean.y is not None:
        row["clean_val_accuracy"] = evaluate(model, clean=clean).clean_accuracy
    if test_clean is not None or test_poisoned is not None:
        measured = evaluate(model, clean=test_clean, poisoned=test_poisoned, target=target).to_dict()
        row.update({key: measured[key] for key in ("clean_accuracy", "attack_success", "poison_detection",
                                                    "false_positive") if measured[key] is not None})
    return row


def _need_clean(method: str, clean: Dataset | None) -> None:
    if clean is None or clean.y is None or len(clean) == 0:
        raise NetcleanseError(f"--method {method} needs labelled clean data (--data)")


def repair(model: Classifier, scan_result, method: str, clean: Dataset | None = None, *,
           test_clean: Dataset | None = None, test_poisoned=None, target: int | None = None,
           drops=(2, 4, 10, 30), layer: str | None = None, select_drop: float = 4.0,
           fine_tune_epochs: int = 0, lr: float | None = None, epochs: int = 10, fraction: float = 0.5,
           quantile: float = 0.5, top_fraction: float = 0.05, seed: int = 0, progress: bool = True) -> RepairResult:
    """Repair ``model`` with ``method`` using the scan's findings and (where needed) clean data.

    ``clean``: labelled clean validation data (fine-pruning's ranking and saves, unlearning's
    training set, the filter's calibration). ``test_clean`` / ``test_poisoned`` (one Dataset
    or several, e.g. one per target) and ``target``: optional test sets that fill the table's
    accuracy and ASR columns; they are never used to build the repair.
    ``select_drop``: for fine-pruning (and ``disagree``), which saved model becomes the result:
    the one of the largest threshold not above it (Liu et al. prune until about 4 points are lost).
    ``lr``: Adam learning rate of fine-tuning (default 1e-3) and unlearning (default 3e-3).
    Unlearning defaults (half the clean set stamped, 10 epochs, lr 3e-3) were chosen on the lab's
    patch BadNet, where Neural Cleanse's 20% / few epochs left much of the backdoor (see README).
    """
    from ..guard import disagreement_guard, trigger_filter
    from ..pruning import fine_prune
    from ..unlearning import unlearn

    if method not in METHODS:
        raise NetcleanseError(f"unknown repair method {method!r}; use one of {', '.join(METHODS)}")
    started = time.perf_counter()
    test_poisoned = concat(test_poisoned)
    triggers = scan_triggers(scan_result) if scan_result is not None else {}
    settings = {"seed": seed}
    curve, saved = [], {}
    original = _row("original", model, clean, test_clean, test_poisoned, target)
    if method in ("fine-prune", "disagree"):
        _need_clean(method, clean)
        pruning = fine_prune(model, clean, layer=layer, drops=drops, test_clean=test_clean,
                             test_poisoned=test_poisoned, target=target, fine_tune_epochs=fine_tune_epochs,
                             lr=lr or 1e-3, seed=seed, progress=progress)
        reached = sorted(pruning.saved)
        eligible = [d for d in reached if d <= select_drop] or reached[:1]
        chosen = eligible[-1]
        pruned = pruning.saved[chosen]
        pruned.name = f"{model.name}_pruned{chosen:g}"
        curve = [dict(pruning.baseline, channel=None)] + pruning.curve
        settings.update(layer=pruning.layer, drops=sorted(float(d) for d in drops), select_drop=chosen,
                        fine_tune_epochs=fine_tune_epochs, lr=lr or 1e-3, pruning_order=pruning.order)
        if method == "fine-prune":
            for threshold, pruned_model in pruning.saved.items():
                if threshold != chosen:
                    saved[f"pruned_drop{threshold:g}"] = pruned_model
            table = [dict(original, drop_threshold=0.0, channels_pruned=0, fraction_pruned=0.0)] + \
                [dict(row, model=f"pruned_drop{row['drop_threshold']:g}") for row in pruning.table]
            result_model = pruned
        else:
            result_model = disagreement_guard(model, pruned)
            settings["repaired_model"] = pruned.name
            table = [original, dict(_row("fine-pruned", pruned, clean, test_clean, test_poisoned, target),
                                    drop_threshold=chosen),
                     _row("guarded (disagree)", result_model, clean, test_clean, test_poisoned, target)]
    elif method == "unlearn":
        _need_clean(method, clean)
        result_model = unlearn(model, triggers, clean, fraction=fraction, epochs=epochs, lr=lr or 3e-3, seed=seed,
                               progress=progress)
        result_model.name = f"{model.name}_unlearned"
        settings.update(fraction=fraction, epochs=epochs, lr=lr or 3e-3)
        table = [original, _row("unlearned", result_model, None, test_clean, test_poisoned, target)]
        table[1]["clean_val_accuracy"] = None  # trained on it: its accuracy there says nothing
    else:  # filter
        result_model = trigger_filter(model, triggers, clean, top_fraction=top_fraction, quantile=quantile,
                                      seed=seed)
        settings.update(result_model.settings, thresholds=result_model.detector.thresholds,
                        neurons=result_model.detector.neurons)
        table = [original, _row("guarded (filter)", result_model, clean, test_clean, test_poisoned, target)]
    settings["test_sets"] = {"clean": getattr(test_clean, "source", None),
                             "poisoned": getattr(test_poisoned, "source", None), "target": target}
    return RepairResult(result_model, method, table, curve, sorted(triggers), settings, saved,
                        round(time.perf_counter() - started, 3))
