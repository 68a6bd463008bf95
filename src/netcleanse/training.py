"""Train a registered architecture on (clean or poisoned) data, on the CPU (or a CUDA GPU), reproducibly.

Plain supervised training: cross-entropy, Adam, shuffled mini-batches drawn from a generator
seeded with ``seed``; the weights are initialised after seeding too, so the same seed and data
give the same model on the same torch build.

Training runs on one CPU thread by default (``threads=1``). The lab's nets are small and their
mini-batches are overhead-bound: on a busy 2-core machine two threads were measured about 7x
slower than one (threads spin waiting for each other), and one thread also makes the result
independent of the machine's core count.

A mini-batch whose activations would exceed the memory bound of a gradient pass
(``NETCLEANSE_PASS_MIB``, :mod:`netcleanse.passes`; a ResNet-50 at 224x224 keeps about 80 MiB per
image) takes its gradient in parts of :func:`images_per_step` images, summed before the one
optimiser step of the mini-batch (gradient accumulation): the same step up to rounding, except
that batch-norm layers normalise each part by its own statistics. Small nets take whole
mini-batches, exactly as before.

``device="cuda"`` trains on a GPU: the model moves there for the training and back afterwards,
mini-batches are drawn in the same order (the shuffling generator stays on the CPU), but the
weights differ slightly from a CPU run (other kernels, other dropout draws).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from .architectures import build_architecture, get_architecture
from .data import Dataset
from .errors import NetcleanseError
from .evaluate import evaluate
from .classifier import Classifier
from .passes import images_per_pass
from .progress import progress_bar
from .utils import module_device, on_device, resolve_device, seed_everything


def build_classifier(arch: str, num_classes: int | None = None, name: str | None = None) -> Classifier:
    """A freshly initialised :class:`Classifier` of a registered architecture (pixels in [0, 1])."""
    spec = get_architecture(arch)
    num_classes = num_classes or spec.default_classes
    return Classifier(build_architecture(arch, num_classes), spec.input_shape, num_classes, name=name or arch,
                      arch=arch)


def images_per_step(model: Classifier, batch_size: int) -> int:
    """How many images of a ``batch_size`` mini-batch one gradient pass of :func:`train` takes:
    the whole mini-batch, or fewer where its activations would exceed ``NETCLEANSE_PASS_MIB``
    (module doc; measured where ``model`` is, in train mode, and left as it was)."""
    return min(batch_size, images_per_pass(model, model.input_shape, module_device(model), training=True))


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (None: leave the setting alone), then restore it."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(model_or_arch: Classifier | str, train: Dataset, val: Dataset | None = None, epochs: int = 5,
          batch_size: int = 64, lr: float = 1e-3, seed: int = 0, progress: bool = True,
          num_classes: int | None = None, name: str | None = None, history: list | None = None,
          threads: int | None = 1, after_step: Callable[[], None] | None = None,
          description: str | None = None, device: str = "cpu") -> Classifier:
    """Train a classifier on ``train`` and return it (in eval mode).

    ``model_or_arch``: a registered architecture name (a new model with ``num_classes``
    outputs, default: enough for the labels in ``train``) or an existing :class:`Classifier`,
    which is trained further in place. With ``val``, its accuracy is shown after each epoch.
    ``history``, when given, receives one dict per epoch (epoch, loss, val_accuracy).
    ``threads``: torch CPU threads while training (see the module doc; None = torch's setting).
    ``after_step``: called after every optimiser step (fine-pruning uses it to keep pruned
    channels at zero). ``description``: the progress bar's label. ``device``: where to train,
    "cpu" or "cuda"; the model is returned where it was (a new one on the CPU).
    """
    if train.y is None:
        raise NetcleanseError(f"{train.source}: training needs labels")
    if len(train) == 0:
        raise NetcleanseError(f"{train.source}: no training samples")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise NetcleanseError(f"epochs and batch size must be >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    resolve_device(device)
    generator = seed_everything(seed)
    if isinstance(model_or_arch, str):
        model = build_classifier(model_or_arch, num_classes or int(train.y.max()) + 1, name)
    elif isinstance(model_or_arch, Classifier):
        model = model_or_arch
    else:
        raise NetcleanseError("train() needs an architecture name or a Classifier")
    model.check_input(train.x[:1])
    if int(train.y.max()) >= model.num_classes or int(train.y.min()) < 0:
        raise NetcleanseError(f"{train.source}: labels go up to {int(train.y.max())} but the model has "
                              f"{model.num_classes} classes")

    with torch_threads(threads), on_device(model, device) as dev:
        _fit(model, train, val, epochs, batch_size, lr, generator, progress, history, after_step,
             description or f"training {model.name}", dev)
    return model.eval()


def unfrozen(model: Classifier) -> Classifier:
    """``model`` (in place) with every weight trainable where none was: a model frozen for inference
    (``requires_grad_(False)``), whose repair trains its own copy. The weights a Keras layer keeps
    fixed (BatchNormalization without ``scale`` or ``center``) stay fixed; a model with some weights
    trainable is left as its owner set it."""
    if any(p.requires_grad for p in model.parameters()):
        return model
    model.requires_grad_(True)
    for module in model.modules():
        if hasattr(module, "keras_scale") and hasattr(module, "keras_center"):
            module.weight.requires_grad_(module.keras_scale)
            module.bias.requires_grad_(module.keras_center)
    return model


def _fit(model: Classifier, train: Dataset, val: Dataset | None, epochs: int, batch_size: int, lr: float,
         generator: torch.Generator, progress: bool, history: list | None,
         after_step: Callable[[], None] | None, description: str, dev: torch.device) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise NetcleanseError(f"every weight of {model.name!r} is frozen (requires_grad=False): nothing to train; "
                              "call model.requires_grad_(True) first")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    per_step = images_per_step(model, batch_size)
    batches_per_epoch = (len(train) + batch_size - 1) // batch_size
    with progress_bar(disable=None if progress else True) as bar:
        task = bar.add_task(description, total=epochs * batches_per_epoch)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            total_loss = 0.0
            for start in range(0, len(train), batch_size):
                rows = order[start:start + batch_size]
                if len(rows) <= per_step:
                    loss = F.cross_entropy(model(train.x[rows].to(dev)), train.y[rows].to(dev))
                    optimizer.zero_grad()
                    loss.backward()
                else:  # the mini-batch's mean loss, its gradient summed over parts (module doc)
                    optimizer.zero_grad()
                    loss = torch.zeros((), device=dev)
                    for part in rows.split(per_step):
                        part_loss = F.cross_entropy(model(train.x[part].to(dev)), train.y[part].to(dev),
                                                    reduction="sum") / len(rows)
                        part_loss.backward()
                        loss += part_loss.detach()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total_loss += float(loss.detach()) * len(rows)
                if start + batch_size < len(train):  # (the epoch's last batch is counted with its summary below)
                    bar.advance(task)
            record = {"epoch": epoch, "loss": total_loss / len(train)}
            if val is not None:
                record["val_accuracy"] = evaluate(model, clean=val, device=dev.type).clean_accuracy
            bar.update(task, advance=1, description=f"training: epoch {epoch}/{epochs} loss {record['loss']:.3f}"
                       + (f" val {100 * record['val_accuracy']:.1f}%" if val is not None else ""))
            if history is not None:
                history.append(record)
