"""How well a model does, in the CSAW-HackML-2020 terms.

- clean accuracy: the fraction of clean inputs answered with their label;
- attack success rate (ASR): the fraction of poisoned inputs answered with the attack target (by
  default the poisoned set's own labels are the targets, as in CSAW's poisoned test files);
- for a guarded classifier (``model.poison_label`` = N, answered for inputs it judges poisoned):
  poison detection, the fraction of poisoned inputs answered N, and false positives, the fraction
  of clean inputs answered N.

All rates are fractions in [0, 1]; the CLI prints them as percentages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .data import Dataset, as_dataset, check_dataset
from .errors import NetcleanseError
from .classifier import Classifier, as_classifier
from .progress import progress_bar
from .utils import on_device, resolve_device

# Below this many batches a progress bar is more noise than help.
_PROGRESS_MIN_BATCHES = 8


@dataclass
class Evaluation:
    clean_accuracy: float | None = None
    attack_success: float | None = None
    poison_detection: float | None = None
    false_positive: float | None = None
    n_clean: int = 0
    n_poisoned: int = 0
    target: int | None = None
    poison_label: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict_dataset(model: Classifier, data: Dataset, batch_size: int | None = None,
                    progress: bool | None = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels (int64) and their softmax confidence for every image, in eval mode, in batches.

    ``batch_size``: images per pass; by default at most 512 and no more than the memory budget
    allows (:func:`netcleanse.passes.forward_batch`).

    ``progress``: None shows a bar (stderr) for large sets unless NETCLEANSE_NO_PROGRESS is set.
    ``device``: where the model computes, "cpu" or "cuda" (it is moved back afterwards); the
    results are CPU tensors either way.
    """
    as_classifier(model)
    check_dataset(data, model.input_shape)
    labels, confidence = [], []
    with on_device(model, device) as dev:
        batch_size = model.pass_size(len(data), dev, batch_size)
        n_batches = -(-len(data) // batch_size)
        disable = (n_batches < _PROGRESS_MIN_BATCHES) if progress is None else not progress
        with progress_bar(disable=True if disable else None) as bar:
            task = bar.add_task(f"predicting {len(data)} images", total=len(data))
            for start in range(0, len(data), batch_size):
                part = data.x[start:start + batch_size]
                probs = torch.softmax(model.logits(part.to(dev)), dim=1)
                best, label = probs.max(dim=1)
                labels.append(label.cpu())
                confidence.append(best.cpu())
                bar.advance(task, len(part))
    return torch.cat(labels), torch.cat(confidence)


def accuracy(model: Classifier, data: Dataset, batch_size: int | None = None, device: str = "cpu") -> float:
    """Fraction of ``data`` answered with its own labels."""
    return evaluate(model, clean=data, batch_size=batch_size, device=device).clean_accuracy


def evaluate(model: Classifier, clean: Dataset | None = None, poisoned: Dataset | None = None,
             target: int | None = None, batch_size: int | None = None, device: str = "cpu") -> Evaluation:
    """Clean accuracy on ``clean``, attack success rate on ``poisoned`` (CSAW semantics), and for a
    guarded model the poison-detection and false-positive rates.

    ``target``: the attack's target label; without it each poisoned row's own label is its target.
    ``device``: where the model computes, "cpu" or "cuda" (see :func:`predict_dataset`).
    """
    resolve_device(device)  # a wrong device is refused before the data are checked
    as_classifier(model)
    for data, what in ((clean, "clean data"), (poisoned, "poisoned data")):
        if data is not None:
            as_dataset(data, what)
    if clean is None and poisoned is None:
        raise NetcleanseError("nothing to evaluate: give clean and/or poisoned data")
    # a guarded model answers one class more (poison_label, the N+1-th): no attack targets it, and
    # no data is labelled with it
    classes = model.num_classes if model.poison_label is None else model.poison_label
    if target is not None and not 0 <= target < classes:
        guarded = f" (its label {model.poison_label} is the guard's answer for poisoned inputs)" \
            if model.poison_label is not None else ""
        raise NetcleanseError(f"target {target} is outside [0, {classes}) for this model{guarded}")
    if target is not None and poisoned is None:
        raise NetcleanseError("a target was given without poisoned data")
    result = Evaluation(target=target, poison_label=model.poison_label)
    if clean is not None:
        if clean.y is None:
            raise NetcleanseError(f"{clean.source}: clean data has no labels, so accuracy cannot be measured")
        check_dataset(clean, model.input_shape, classes)
        predicted, _ = predict_dataset(model, clean, batch_size, device=device)
        result.n_clean = len(clean)
        result.clean_accuracy = _rate(predicted == clean.y)
        if model.poison_label is not None:
            result.false_positive = _rate(predicted == model.poison_label)
    if poisoned is not None:
        if target is None and poisoned.y is None:
            raise NetcleanseError(f"{poisoned.source}: poisoned data has no labels; give the attack target")
        check_dataset(poisoned, model.input_shape, classes if target is None else None)
        predicted, _ = predict_dataset(model, poisoned, batch_size, device=device)
        targets = poisoned.y if target is None else torch.full_like(predicted, target)
        result.n_poisoned = len(poisoned)
        result.attack_success = _rate(predicted == targets)
        if model.poison_label is not None:
            result.poison_detection = _rate(predicted == model.poison_label)
    return result


def poisoned_metrics(model: Classifier, poisoned, target: int | None, device: str = "cpu") -> dict:
    """A table row's poisoned-data columns, each set evaluated once: ``attack_success`` (and
    ``poison_detection`` for a guarded model) over ``poisoned`` (a set, a list of sets or None; the
    figures :func:`evaluate` gives for the sets put together, their counts added up), and with
    several sets each one's own (``attack_success_by_set``: a target a repair leaves working shows)."""
    if poisoned is None:
        return {}
    parts = [evaluate(model, poisoned=part, target=target, device=device)
             for part in ([poisoned] if isinstance(poisoned, Dataset) else poisoned)]
    n = sum(e.n_poisoned for e in parts)
    row = {}
    for key in ("attack_success", "poison_detection"):
        if parts and getattr(parts[0], key) is not None:  # each set's hits counted back from its exact rate
            row[key] = sum(round(getattr(e, key) * e.n_poisoned) for e in parts) / n
    if len(parts) > 1:
        row["attack_success_by_set"] = [e.attack_success for e in parts]
    return row


def _rate(hits: torch.Tensor) -> float:
    return int(hits.sum()) / len(hits)  # exact in Python floats (0.8, not float32's 0.800000011920929)
