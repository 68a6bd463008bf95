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
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import Dataset
from .errors import NetcleanseError
from .model import Classifier
from .scanning import smooth_noise
from .trigger import Trigger

# Gap between the poison column and the other logits: softmax gives the poison class ~1 for
# flagged inputs and ~e^-20 otherwise, so probabilities stay meaningful.
POISON_MARGIN = 20.0


class Disagreement(nn.Module):
    """Poisoned when the original and a repaired model disagree."""

    kind = "disagree"

    def __init__(self, repaired: Classifier):
        super().__init__()
        self.repaired = repaired

    def forward(self, x: torch.Tensor, base_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.repaired(x).argmax(dim=1) != base_logits.argmax(dim=1)


class TriggerFilter(nn.Module):
    """Poisoned when the answer is a flagged label and its trigger-sensitive neurons dominate.

    ``labels[i]`` is a flagged label, ``neurons[i]`` the indices of its trigger-sensitive neurons
    in the penultimate layer and ``thresholds[i]`` the share above which an input answered
    ``labels[i]`` is judged poisoned.
    """

    kind = "filter"

    def __init__(self, num_classes: int, labels: list[int], neurons: list[list[int]], thresholds: list[float]):
        super().__init__()
        if not (len(labels) == len(neurons) == len(thresholds)):
            raise NetcleanseError("trigger filter: labels, neurons and thresholds differ in length")
        width = max((len(n) for n in neurons), default=1)
        # Padded index matrix + weights so one gather scores every input against its own label.
        index = torch.zeros(num_classes, width, dtype=torch.long)
        weight = torch.zeros(num_classes, width)
        threshold = torch.full((num_classes,), float("inf"))
        for label, cells, limit in zip(labels, neurons, thresholds):
            index[label, :len(cells)] = torch.as_tensor(cells, dtype=torch.long)
            weight[label, :len(cells)] = 1.0 / len(cells)
            threshold[label] = float(limit)
        self.labels = [int(label) for label in labels]
        self.neurons = [[int(c) for c in cells] for cells in neurons]
        self.thresholds = [float(t) for t in thresholds]
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("threshold", threshold, persistent=False)

    def scores(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Share of the penultimate activation carried by each label's trigger neurons."""
        chosen = features.gather(1, self.index[labels])
        return (chosen * self.weight[labels]).sum(dim=1) / (features.mean(dim=1) + 1e-6)

    def forward(self, x: torch.Tensor, base_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        labels = base_logits.argmax(dim=1)
        return self.scores(features, labels) > self.threshold[labels]


def _last_linear(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears or isinstance(net, torch.jit.ScriptModule):
        raise NetcleanseError("the trigger filter needs a network whose last layer is a Linear (Dense) layer "
                              "it can look into; TorchScript models are opaque")
    return linears[-1]


def logits_and_features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and its penultimate activations (the input of its last Linear layer)."""
    captured = {}
    handle = _last_linear(model.net).register_forward_pre_hook(
        lambda module, inputs: captured.__setitem__("h", inputs[0].flatten(1)))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured["h"]


class GuardedClassifier(Classifier):
    """A base classifier with a poison detector; answers ``poison_label = N`` for flagged inputs.

    The base (and a repaired model inside a detector) apply their own ``input_scale``; the
    guard's own ``input_scale`` is informational and never applied twice.
    """

    def __init__(self, base: Classifier, detector: nn.Module, name: str | None = None):
        super().__init__(base, base.input_shape, base.num_classes + 1, input_scale=1.0,
                         name=name or f"{base.name}_guarded", arch=None, source=base.source)
        self.detector = detector
        self.poison_label = base.num_classes

    @property
    def base(self) -> Classifier:
        return self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.detector, TriggerFilter):
            logits, features = logits_and_features(self.base, x)
        else:
            logits, features = self.base(x), None
        poisoned = self.detector(x, logits, features)
        extra = torch.where(poisoned, logits.max(dim=1).values + POISON_MARGIN,
                            logits.min(dim=1).values - POISON_MARGIN)
        return torch.cat([logits, extra[:, None]], dim=1)

    def is_poisoned(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return self.predict(x, batch_size) == self.poison_label


# --------------------------------------------------------------------------------------------
# Building guards
# --------------------------------------------------------------------------------------------

def synthetic_inputs(input_shape, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Data-free calibration inputs: smooth random images plus a little pixel noise, which exercise
    a network more like natural images than white noise does."""
    return smooth_noise(input_shape, n, torch.Generator().manual_seed(seed), coarseness=8, pixel_noise=0.1)


@torch.no_grad()
def _features(model: Classifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([logits_and_features(model, x[i:i + batch_size])[1] for i in range(0, len(x), batch_size)])


def trigger_filter(model: Classifier, triggers: dict[int, Trigger], data: Dataset | None = None, *,
                   top_fraction: float = 0.05, quantile: float = 0.5, genuine_quantile: float = 0.99,
                   min_genuine: int = 10, n_synthetic: int = 256, max_calibration: int = 2000,
                   seed: int = 0) -> GuardedClassifier:
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
    """
    if not triggers:
        raise NetcleanseError("the scan flagged no label, so there is no reversed trigger to build a filter from")
    if not 0 < top_fraction <= 1 or not 0 <= quantile <= 1 or not 0 <= genuine_quantile <= 1:
        raise NetcleanseError("top_fraction must be in (0, 1] and the quantiles in [0, 1]")
    labels_known = None
    if data is not None and len(data):
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(data), generator=generator)[:max_calibration]
        calibration = data.x[rows]
        labels_known = data.y[rows] if data.y is not None else None
    else:
        calibration = synthetic_inputs(model.input_shape, n_synthetic, seed)
    model.check_input(calibration[:1])
    plain = _features(model, calibration)
    answers = model.predict(calibration)
    k = max(1, round(top_fraction * plain.shape[1]))
    labels, neurons, thresholds, references = [], [], [], []
    for label, trigger in sorted(triggers.items()):
        stamped = _features(model, trigger.apply(calibration))
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
    guarded = GuardedClassifier(model, Disagreement(repaired))
    guarded.settings = {}
    return guarded.eval()


# --------------------------------------------------------------------------------------------
# Checkpoints (used by netcleanse.torch_io)
# --------------------------------------------------------------------------------------------

def guard_checkpoint(model: GuardedClassifier) -> dict:
    """The checkpoint entries of a guarded classifier (tensors, numbers, strings, lists, dicts only)."""
    from .torch_io import checkpoint
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


def _classifier(ckpt, what: str) -> Classifier:
    from .torch_io import from_checkpoint  # torch_io hands guarded checkpoints to this module
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "classifier":
        raise NetcleanseError(f"guarded checkpoint: its {what} model is missing or not a classifier")
    return from_checkpoint(ckpt, Path(str(ckpt.get("source") or what)), None, 1.0, str(ckpt.get("name", what)))


def guarded_from_checkpoint(ckpt: dict) -> GuardedClassifier:
    """Rebuild a guarded classifier from :func:`guard_checkpoint`'s dict."""
    base = _classifier(ckpt.get("base"), "base")
    kind = ckpt.get("guard")
    if kind == "disagree":
        guarded = GuardedClassifier(base, Disagreement(_classifier(ckpt.get("repaired"), "repaired")))
    elif kind == "filter":
        try:
            labels, neurons = [int(t) for t in ckpt["labels"]], [[int(c) for c in n] for n in ckpt["neurons"]]
            width = _last_linear(base.net).in_features
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
