"""Neural Cleanse's mitigation by unlearning (Wang et al., S&P 2019, section VI-C).

Fine-tune the model on clean data in which a fraction of the images carries the reversed
trigger of a flagged label while keeping its *correct* label: the network learns that the
trigger means nothing, which breaks the shortcut to the target label.
"""

from __future__ import annotations

import copy

import torch

from .data import Dataset
from .errors import NetcleanseError
from .classifier import Classifier
from .pruning import fine_tune
from .training import unfrozen
from .trigger import Trigger, need_triggers
from .utils import resolve_device


def unlearning_set(clean: Dataset, triggers: dict[int, Trigger], fraction: float = 0.5, seed: int = 0) -> Dataset:
    """``clean`` with ``fraction`` of its rows stamped with the reversed triggers (shared out evenly
    between the flagged labels), every row keeping its true label."""
    if clean.y is None:
        raise NetcleanseError(f"{clean.source}: unlearning needs labelled clean data")
    need_triggers(triggers, "unlearn")
    if not 0 < fraction < 1:
        raise NetcleanseError(f"the stamped fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(clean), generator=generator)[:int(round(fraction * len(clean)))]
    x = clean.x.clone()
    for part, trigger in zip(rows.tensor_split(len(triggers)), [triggers[label] for label in sorted(triggers)]):
        if len(part):
            x[part] = trigger.apply(clean.x[part])
    info = dict(clean.info, stamped_rows=rows)
    return Dataset(x, clean.y.clone(), f"{clean.source}+reversed-triggers", clean.names, info)


def unlearn(model: Classifier, triggers: dict[int, Trigger], clean: Dataset, *, fraction: float = 0.5,
            epochs: int = 10, lr: float = 3e-3, seed: int = 0, progress: bool = True,
            device: str = "cpu") -> Classifier:
    """A copy of ``model`` fine-tuned on :func:`unlearning_set` (the input model is left untouched),
    on ``device`` ("cpu" or "cuda"); the copy is returned where the input model is."""
    resolve_device(device)
    data = unlearning_set(clean, triggers, fraction, seed)
    repaired = unfrozen(copy.deepcopy(model))  # (a model frozen for inference: its copy is trained)
    return fine_tune(repaired, data, epochs=epochs, lr=lr, seed=seed, progress=progress, description="unlearning",
                     device=device)
