"""The guarded classifier noun: a base classifier plus a poison detector, answering N (the
(N+1)-th class) for inputs judged poisoned, the CSAW-HackML contract. Its two detectors,
:class:`Disagreement` and :class:`TriggerFilter`, are described in :mod:`netcleanse.guard`,
which builds them; this module holds what a saved guarded model needs to run again (read back
by :mod:`netcleanse.torch_io`)."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .classifier import Classifier
from .errors import NetcleanseError
from .utils import module_device

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


_OUTPUT_LAYERS: "weakref.WeakKeyDictionary[nn.Module, nn.Linear]" = weakref.WeakKeyDictionary()


def output_linear(model: Classifier) -> nn.Linear:
    """The Linear (Dense) layer that computes ``model``'s logits: of the Linear layers a forward pass
    runs, the last one run with one output per class (else the last one run). Found by running two
    blank images through the model once (then remembered), not by the order in which the layers
    were defined: a head defined before the hidden layers, or an unused auxiliary layer defined last,
    would otherwise be taken for it."""
    net = model.net
    if isinstance(net, torch.jit.ScriptModule):
        raise NetcleanseError("the trigger filter needs to look into the network's last Linear (Dense) layer; "
                              "TorchScript models are opaque")
    if net in _OUTPUT_LAYERS:
        return _OUTPUT_LAYERS[net]
    ran: list[nn.Linear] = []
    handles = [m.register_forward_hook(lambda module, inputs, output: ran.append(module))
               for m in net.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            training = net.training
            net.eval()
            try:
                model(torch.zeros((2,) + tuple(model.input_shape), device=module_device(net)))
            finally:
                net.train(training)
    finally:
        for handle in handles:
            handle.remove()
    if not ran:
        raise NetcleanseError("the trigger filter needs a network whose logits come from a Linear (Dense) "
                              "layer it can look into; this one runs none")
    heads = [m for m in ran if m.out_features == model.num_classes]
    _OUTPUT_LAYERS[net] = layer = (heads or ran)[-1]
    return layer


def logits_and_features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and its penultimate activations (the input of the Linear layer that
    computes the logits, :func:`output_linear`)."""
    captured = {}
    handle = output_linear(model).register_forward_pre_hook(
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

    def parts(self) -> list[Classifier]:
        """The classifiers that see the input, each through its own preprocessing: the base, and a
        disagreement guard's repaired model."""
        return [self.base] + ([self.detector.repaired] if isinstance(self.detector, Disagreement) else [])

    @property
    def preprocessing(self) -> dict:
        """The base model's (the guard adds none of its own)."""
        return self.base.preprocessing

    def describe_preprocessing(self) -> str:
        return self.base.describe_preprocessing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.detector, TriggerFilter):
            logits, features = logits_and_features(self.base, x)
        else:
            logits, features = self.base(x), None
        poisoned = self.detector(x, logits, features)
        extra = torch.where(poisoned, logits.max(dim=1).values + POISON_MARGIN,
                            logits.min(dim=1).values - POISON_MARGIN)
        return torch.cat([logits, extra[:, None]], dim=1)

    def is_poisoned(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return self.predict(x, batch_size) == self.poison_label
