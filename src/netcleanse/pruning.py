"""Fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks
on Deep Neural Networks", RAID 2018), as the CSAW-HackML lab runs it.

Backdoor behaviour tends to live in channels of the last convolutional layer that clean inputs
leave dormant. So: rank that layer's channels by their mean activation on clean validation data,
prune them in increasing order, and watch the clean validation accuracy; keep the model at the
moment the accuracy has first dropped by each of a few thresholds; optionally fine-tune the
pruned models on clean data afterwards to win back accuracy (and erase more of the backdoor).

A channel is pruned by zeroing its kernel and bias. Its output is then exactly 0 before the
ReLU, so after the ReLU (and any max-pooling) it is 0 as it would be with a mask, and the pruned
model is an ordinary model of the same architecture, exportable to Keras ``.h5`` unchanged.
Where a batch-norm layer takes the convolution's output, directly or through a ReLU (Conv ->
BatchNorm -> ReLU, as in most CNNs, or Conv -> ReLU -> BatchNorm), a zero convolution output
would leave the constant ``beta - gamma * mean / sqrt(var + eps)`` after it, so that layer's
scale and shift of the channel are zeroed as well (its output is then 0),
and the channels are ranked by the activation after it, ``relu(BN(conv))``: what the next layer
sees (:func:`following_batchnorm`).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .data import Dataset
from .errors import NetcleanseError, NetcleanseWarning
from .evaluate import evaluate, poisoned_metrics
from .classifier import Classifier
from .progress import progress_bar
from .training import train, unfrozen
from .utils import on_device, resolve_device


def prune_layer_name(model: Classifier, layer: str | None = None) -> str:
    """The layer to prune: ``layer`` if given, else the architecture's ``prune_layer``, else the last Conv2d."""
    if isinstance(model.net, torch.jit.ScriptModule):  # its layers are compiled code, not Conv2d modules
        raise NetcleanseError(f"model {model.name!r} is a TorchScript program, whose layers netcleanse cannot prune; "
                              "load its weights into the architecture instead (a state_dict with --arch)")
    convs = [name for name, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
    if layer is not None:
        if layer not in convs:
            raise NetcleanseError(f"layer {layer!r} is not a convolutional layer of {model.name!r}; "
                                  f"its convolutional layers are: {', '.join(convs) or 'none'}")
        return layer
    default = getattr(type(model.net), "prune_layer", None)
    if default in convs:
        return default
    if not convs:
        raise NetcleanseError(f"model {model.name!r} has no convolutional layer to prune")
    head = dict(model.net.named_modules())[convs[-1]]
    if head.out_channels == model.num_classes and head.kernel_size == (1, 1) and len(convs) > 1:
        # (a 1x1 convolution with one channel per class: an all-convolutional net's classifier)
        warnings.warn(f"the last convolutional layer, {convs[-1]}, has one 1x1 channel per class, like a "
                      "classification head; pruning it prunes classes: name the layer to prune with --layer "
                      f"(e.g. {convs[-2]})", NetcleanseWarning, stacklevel=2)
    return convs[-1]


def _conv(model: Classifier, layer: str) -> nn.Conv2d:
    return dict(model.net.named_modules())[layer]


_FOLLOWING: "weakref.WeakKeyDictionary[nn.Conv2d, tuple]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def following_batchnorm(model: Classifier, layer: str) -> "_BatchNorm | None":
    """The batch-norm layer that takes ``layer``'s output, as it is or through a ReLU, or None:
    found by one forward pass of a random image, in which the first batch norm whose input is the
    very tensor the convolution returned, or equals its ReLU (Conv -> ReLU -> BatchNorm, Keras's
    ``Conv2D(activation="relu")`` then ``BatchNormalization``), is the one, whatever the modules'
    names or order in the code. (A zero channel is zero after a ReLU too, so the norm then turns it
    into its constant all the same.) Other activations between them are not looked through."""
    conv = _conv(model, layer)
    known = _FOLLOWING.get(conv)
    if known is not None:
        return known[0]
    out, found = {}, []

    def remember(module, inputs, output):
        out["conv"] = output

    def check(module, inputs):
        if "conv" in out and inputs and module.num_features == conv.out_channels and not found and \
                (inputs[0] is out["conv"] or (inputs[0].shape == out["conv"].shape
                                              and torch.equal(inputs[0], F.relu(out["conv"])))):
            found.append(module)

    handles = [conv.register_forward_hook(remember)] + \
        [m.register_forward_pre_hook(check) for m in model.net.modules() if isinstance(m, _BatchNorm)]
    was_training = model.training
    model.eval()
    try:
        model(torch.rand((1,) + tuple(model.input_shape), generator=torch.Generator().manual_seed(0))
              .to(conv.weight.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    _FOLLOWING[conv] = (found[0] if found else None,)
    return found[0] if found else None


@torch.no_grad()
def mean_channel_activation(model: Classifier, layer: str, data: Dataset, batch_size: int = 256,
                            device: str = "cpu") -> torch.Tensor:
    """Mean post-ReLU activation of each output channel of ``layer`` over ``data`` (after the
    batch-norm layer that takes its output, if one does: :func:`following_batchnorm`), computed on
    ``device`` ("cpu" or "cuda"); a CPU tensor."""
    conv = _conv(model, layer)
    total = torch.zeros(conv.out_channels)

    def accumulate(module, inputs, output) -> None:  # returning None keeps the layer's output
        total.add_(F.relu(output).mean(dim=(2, 3)).sum(dim=0).cpu())

    handle = (following_batchnorm(model, layer) or conv).register_forward_hook(accumulate)
    model.eval()
    try:
        with on_device(model, device) as dev:
            for start in range(0, len(data), batch_size):
                model(data.x[start:start + batch_size].to(dev))
    finally:
        handle.remove()
    return total / max(1, len(data))


@torch.no_grad()
def prune_channels(model: Classifier, layer: str, channels) -> None:
    """Zero the kernels and biases of ``channels`` of ``layer`` in place (and the scale and shift of
    the batch-norm layer that takes its output, if one does: module doc)."""
    conv = _conv(model, layer)
    index = torch.as_tensor(list(channels), dtype=torch.long, device=conv.weight.device)
    conv.weight[index] = 0
    if conv.bias is not None:
        conv.bias[index] = 0
    norm = following_batchnorm(model, layer)
    if norm is not None:
        scale, center = _norm_parameters(norm)
        if scale:
            norm.weight[index] = 0
        elif norm.running_mean is not None:  # gamma fixed at 1: (0 - mean) / sd is 0 where the mean is
            norm.running_mean[index] = 0
        if center:
            norm.bias[index] = 0


def _norm_parameters(norm) -> tuple[bool, bool]:
    """Whether a batch-norm layer has its own scale (gamma) and shift (beta): not with
    ``affine=False``, nor for a Keras layer built with ``scale=False``/``center=False`` (whose
    fixed gamma 1 / beta 0 are not weights a Keras file would keep)."""
    return (norm.affine and getattr(norm, "keras_scale", True), norm.affine and getattr(norm, "keras_center", True))


def pruned_channels(model: Classifier, layer: str) -> list[int]:
    """Channels of ``layer`` whose kernel and bias are all zero (and, where a batch-norm layer
    follows, its scale and shift)."""
    conv = _conv(model, layer)
    dead = conv.weight.detach().flatten(1).abs().sum(1) == 0
    if conv.bias is not None:
        dead &= conv.bias.detach() == 0
    norm = following_batchnorm(model, layer)
    if norm is not None:
        scale, center = _norm_parameters(norm)
        if scale:
            dead &= norm.weight.detach() == 0
        elif norm.running_mean is not None:
            dead &= norm.running_mean.detach() == 0
        if center:
            dead &= norm.bias.detach() == 0
    return dead.nonzero().flatten().tolist()


FINE_TUNE_BATCH = 64  # images per mini-batch of fine-tuning (and unlearning)


def fine_tune(model: Classifier, data: Dataset, epochs: int = 5, lr: float = 1e-3, batch_size: int = FINE_TUNE_BATCH,
              seed: int = 0, frozen: dict[str, list[int]] | None = None, progress: bool = True,
              description: str = "fine-tuning", device: str = "cpu") -> Classifier:
    """Train ``model`` further on labelled clean ``data`` (Adam), in place, on ``device``.

    ``frozen`` maps a conv layer to channels that must stay pruned: they are zeroed again after
    every step, so fine-tuning cannot revive them.
    """
    if data.y is None:
        raise NetcleanseError(f"{data.source}: fine-tuning needs labelled clean data")

    def keep_pruned() -> None:
        for layer, channels in (frozen or {}).items():
            if channels:
                prune_channels(model, layer, channels)

    return train(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                 after_step=keep_pruned, description=description, device=device)


@dataclass
class FinePruning:
    """Outcome of :func:`fine_prune`: the curve, the saved models and the CSAW lab table."""

    layer: str
    order: list[int]  # channels in pruning order (lowest mean clean activation first)
    baseline: dict  # metrics of the unpruned model
    curve: list[dict]  # one row per pruned channel
    saved: dict[float, Classifier] = field(default_factory=dict)  # drop threshold -> pruned model
    table: list[dict] = field(default_factory=list)  # one row per saved model


def _metrics(model: Classifier, val: Dataset, test_clean: Dataset | None, test_poisoned: list[Dataset],
             target: int | None, device: str) -> dict:
    row = {"clean_val_accuracy": evaluate(model, clean=val, device=device).clean_accuracy}
    if test_clean is not None:
        row["clean_accuracy"] = evaluate(model, clean=test_clean, device=device).clean_accuracy
    if test_poisoned:
        row.update(poisoned_metrics(model, test_poisoned, target, device))
    return row


def fine_prune(model: Classifier, val: Dataset, *, layer: str | None = None, drops=(2, 4, 10, 30),
               test_clean: Dataset | None = None, test_poisoned: Dataset | Sequence[Dataset] | None = None,
               target: int | None = None, fine_tune_epochs: int = 0, lr: float = 1e-3, seed: int = 0, progress: bool = True,
               device: str = "cpu") -> FinePruning:
    """Prune ``layer``'s channels by increasing mean clean activation; keep a model per accuracy drop.

    ``val``: labelled clean validation data (ranking, the accuracy that decides the saves, and
    fine-tuning). ``drops``: thresholds in percentage points of clean validation accuracy below
    the original; the model is saved the first time the drop reaches each. ``test_clean`` /
    ``test_poisoned`` (and ``target``): optional test sets measured along the curve and in the
    table (ASR semantics as :func:`netcleanse.evaluate.evaluate`; several poisoned sets, one per
    target, also get each one's attack success, ``attack_success_by_set``). With ``fine_tune_epochs`` > 0
    each saved model is then fine-tuned on ``val`` (pruned channels stay pruned) and the table
    gets its metrics after fine-tuning too. The input model is left untouched. ``device``: where
    every forward pass and the fine-tuning run, "cpu" or "cuda"; the saved models are on the CPU.
    """
    resolve_device(device)
    if val.y is None or len(val) == 0:
        raise NetcleanseError("fine-pruning needs labelled clean validation data (--data)")
    drops = sorted({float(d) for d in drops})
    if not drops or drops[0] <= 0:
        raise NetcleanseError("accuracy-drop thresholds must be positive percentage points, e.g. 2,4,10,30")
    layer = prune_layer_name(model, layer)
    test_poisoned = [] if test_poisoned is None else \
        [test_poisoned] if isinstance(test_poisoned, Dataset) else list(test_poisoned)
    work = copy.deepcopy(model).eval()
    with on_device(work, device):  # the work copy stays there for the whole curve
        result = _prune_curve(work, layer, val, drops, test_clean, test_poisoned, target, progress, device)
    if not result.saved:
        worst = max(100 * (result.baseline["clean_val_accuracy"] - row["clean_val_accuracy"]) for row in result.curve)
        raise NetcleanseError(f"pruning all {len(result.order)} channels of {layer} lowered the validation accuracy "
                              f"by at most {worst:.1f} points, less than the smallest threshold ({drops[0]:g}): give "
                              "smaller --drops (or more varied validation data)")
    if fine_tune_epochs > 0:
        for entry in result.table:
            pruned = unfrozen(result.saved[entry["drop_threshold"]])  # (a copy: trained even if frozen for inference)
            frozen = {layer: result.order[:entry["channels_pruned"]]}
            fine_tune(pruned, val, epochs=fine_tune_epochs, lr=lr, seed=seed, frozen=frozen, progress=progress,
                      description=f"fine-tuning the {entry['drop_threshold']:g}-point model", device=device)
            after = _metrics(pruned, val, test_clean, test_poisoned, target, device)
            entry.update({f"{key}_after_fine_tuning": value for key, value in after.items()})
    return result


def _prune_curve(work: Classifier, layer: str, val: Dataset, drops: list[float], test_clean: Dataset | None,
                 test_poisoned: list[Dataset], target: int | None, progress: bool, device: str) -> FinePruning:
    """Prune ``work`` in place channel by channel, recording the curve and a CPU copy of the model at
    each drop threshold (no fine-tuning)."""
    order = mean_channel_activation(work, layer, val, device=device).argsort().tolist()
    baseline = _metrics(work, val, test_clean, test_poisoned, target, device)
    start_accuracy = baseline["clean_val_accuracy"]
    result = FinePruning(layer, order, dict(baseline, channels_pruned=0, fraction_pruned=0.0), [])
    pending = list(drops)
    with progress_bar(disable=None if progress else True) as bar:
        task = bar.add_task(f"pruning {layer}", total=len(order))
        for count, channel in enumerate(order, start=1):
            prune_channels(work, layer, [channel])
            row = {"channels_pruned": count, "fraction_pruned": count / len(order), "channel": channel,
                   **_metrics(work, val, test_clean, test_poisoned, target, device)}
            result.curve.append(row)
            drop = 100 * (start_accuracy - row["clean_val_accuracy"])
            while pending and drop >= pending[0] - 1e-9:
                threshold = pending.pop(0)
                result.saved[threshold] = copy.deepcopy(work).cpu()
                result.table.append({"drop_threshold": threshold, **row})
            bar.advance(task)
    for entry in result.table:
        entry.pop("channel", None)
    return result
