"""Guarded classifiers: the CSAW-HackML contract of answering N (the (N+1)-th class) for inputs
judged poisoned and the model's own label otherwise.

A :class:`GuardedClassifier` wraps a base classifier and a *detector* that says, per input,
whether it looks poisoned. Its forward returns N+1 logits: the base logits plus one column that
is far above every other logit for flagged inputs and far below them otherwise, so ``predict``,
``predict_proba`` and :func:`netcleanse.evaluate.evaluate` work unchanged (``poison_label = N``).

Two detectors:

* :class:`Disagreement` (repaired-model disagreement, as in the CSAW-HackML "GoodNet"
  solutions): an input is poisoned when the original and a repaired model (e.g. fine-pruned)
  give different labels.
* :class:`TriggerFilter` (data-free, from a scan's reversed triggers, after Neural Cleanse's
  input filter, Wang et al. 2019, section VI-A): the *trigger-sensitive neurons* of the
  penultimate layer are those whose activation rises most when a flagged label's reversed
  trigger is stamped on calibration inputs (clean data when the user has it, synthetic smooth
  noise otherwise). An input is poisoned when the model answers a flagged label AND those
  neurons carry an unusually large share of its penultimate activation: more than the
  calibration inputs without the trigger typically do. The share (trigger neurons' mean over
  all neurons' mean) rather than the raw activation is used because it does not depend on the
  overall activation level, which differs a lot between synthetic and natural images.

This module builds guards; the guarded model itself (:class:`GuardedClassifier` and the two
detectors, what a saved guard needs to run) is :mod:`netcleanse.guarded`, and its checkpoint is
written and read by :mod:`netcleanse.torch_io`.
"""

from __future__ import annotations

import copy

import torch

from .classifier import Classifier
from .data import Dataset
from .errors import NetcleanseError
# the guarded model noun, re-exported: netcleanse.guard is where users meet it
from .guarded import (POISON_MARGIN, Disagreement, GuardedClassifier, TriggerFilter,  # noqa: F401
                      logits_and_features, output_linear)
from .synthesis import smooth_noise
from .trigger import Trigger, need_triggers
from .utils import module_device, on_device


def synthetic_inputs(input_shape, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Data-free calibration inputs: smooth random images plus a little pixel noise, which exercise
    a network more like natural images than white noise does."""
    return smooth_noise(input_shape, n, torch.Generator().manual_seed(seed), coarseness=8, pixel_noise=0.1)


@torch.no_grad()
def _features(model: Classifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The penultimate activations of ``x``, computed on the model's device; a CPU tensor."""
    model.eval()
    dev = module_device(model)
    return torch.cat([logits_and_features(model, x[i:i + batch_size].to(dev))[1].cpu()
                      for i in range(0, len(x), batch_size)])


def trigger_filter(model: Classifier, triggers: dict[int, Trigger], data: Dataset | None = None, *,
                   top_fraction: float = 0.05, quantile: float = 0.5, genuine_quantile: float = 0.99,
                   min_genuine: int = 10, n_synthetic: int = 256, max_calibration: int = 2000,
                   seed: int = 0, device: str = "cpu") -> GuardedClassifier:
    """Build the trigger filter guard from reversed triggers (data-free, or calibrated on clean data).

    For each flagged label t with reversed trigger T, and calibration inputs S (``data`` when
    given, else :func:`synthetic_inputs`):

    * reference inputs R: the *genuine* t inputs of S (labelled t, when labelled, and answered t)
      when there are at least ``min_genuine`` of them, else all of S (data-free);
    * trigger-sensitive neurons: the ``top_fraction`` of the penultimate neurons with the largest
      effect size (Cohen's d) of h(T(S)) against h(R);
    * threshold: the ``genuine_quantile`` (against genuine inputs: few genuine t inputs may be
      flagged) or the ``quantile`` (against plain inputs: flag what fires more than a typical
      trigger-free input) of the share score over R.

    Nothing here looks at test data or knows the true target: only the scan's flagged labels.
    ``device``: where the calibration inputs go through the model, "cpu" or "cuda"; the guard is
    built on the CPU (the model is moved back).
    """
    need_triggers(triggers, "build a filter from")
    for name, value, ok in (("top_fraction", top_fraction, 0 < top_fraction <= 1),
                            ("quantile", quantile, 0 <= quantile <= 1),
                            ("genuine_quantile", genuine_quantile, 0 <= genuine_quantile <= 1)):
        if not ok:
            raise NetcleanseError(f"{name} must be in {'(0, 1]' if name == 'top_fraction' else '[0, 1]'} (got {value!r})")
    model = copy.deepcopy(model)  # the guard's own copy: the caller's model (and its mode) stays theirs
    labels_known = None
    if data is not None and len(data):
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(data), generator=generator)[:max_calibration]
        calibration = data.x[rows]
        labels_known = data.y[rows] if data.y is not None else None
    else:
        calibration = synthetic_inputs(model.input_shape, n_synthetic, seed)
    model.check_input(calibration[:1])
    with on_device(model, device):
        plain = _features(model, calibration)
        answers = model.predict(calibration)
        stamped_by_label = {label: _features(model, trigger.apply(calibration))
                            for label, trigger in triggers.items()}
    k = max(1, round(top_fraction * plain.shape[1]))
    labels, neurons, thresholds, references = [], [], [], []
    for label in sorted(triggers):
        stamped = stamped_by_label[label]
        genuine = answers == label
        if labels_known is not None:
            genuine &= labels_known == label
        if data is not None and int(genuine.sum()) >= min_genuine:
            reference, level, references_kind = plain[genuine], genuine_quantile, "genuine"
        else:
            reference, level, references_kind = plain, quantile, "plain"
        pooled_sd = ((reference.var(0) + stamped.var(0)) / 2).sqrt() + 1e-6
        effect = (stamped.mean(0) - reference.mean(0)) / pooled_sd
        cells = effect.argsort(descending=True)[:k]
        share = reference[:, cells].mean(1) / (reference.mean(1) + 1e-6)
        labels.append(int(label))
        neurons.append(cells.tolist())
        thresholds.append(float(share.quantile(level)))
        references.append(references_kind)
    detector = TriggerFilter(model.num_classes, labels, neurons, thresholds)
    guarded = GuardedClassifier(model, detector)
    guarded.settings = {"top_fraction": top_fraction, "quantile": quantile, "genuine_quantile": genuine_quantile,
                        "calibration": "data" if data is not None else "synthetic",
                        "n_calibration": int(len(calibration)), "reference": references, "seed": seed}
    return guarded.eval()


def disagreement_guard(model: Classifier, repaired: Classifier) -> GuardedClassifier:
    """Guard answering N where ``model`` and ``repaired`` disagree (labels otherwise from ``model``)."""
    if repaired.num_classes != model.num_classes or tuple(repaired.input_shape) != tuple(model.input_shape):
        raise NetcleanseError("the repaired model does not have the original model's inputs and classes")
    guarded = GuardedClassifier(copy.deepcopy(model), Disagreement(copy.deepcopy(repaired)))  # (copies, as above)
    guarded.settings = {}
    return guarded.eval()
