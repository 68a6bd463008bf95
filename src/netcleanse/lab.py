"""The BadNet lab: train models whose backdoors (or absence of one) are known, for checking every claim.

:func:`make_badnet` poisons a built-in dataset with a patch, blended or multi-trigger attack,
trains a registered architecture on it, measures clean accuracy and attack success rate (ASR),
and optionally writes everything to a folder:

==========================  ==========================================================
``model.pt``                netcleanse checkpoint (PyTorch state_dict + architecture)
``model_weights.h5``        the same weights as a Keras-compatible weights file
``clean_model.pt``          (``clean_baseline=True``) a clean model of the same arch/seed
``clean_val.npz``           the clean validation split (``x``, ``y``): a defender's clean data
                            for ``repair --data``, apart from the test split
``clean_test.npz``          the clean test split (``x``, ``y``)
``poisoned_test.npz``       triggered test inputs, ``y`` = target, ``true_labels``;
                            ``poisoned_test_t<T>.npz`` per target when there are several
``trigger.png``             the planted trigger: pattern colours, mask as alpha
                            (``trigger_<i>.png`` for several)
``triggers.npz``            exact ``masks`` (K,H,W), ``patterns`` (K,C,H,W), ``targets`` (K,)
``truth.json``              what was planted and what it achieved (see :func:`make_badnet`)
==========================  ==========================================================

:func:`make_clean_model` writes the same layout for a model without a backdoor (``truth.json``
with ``"backdoored": false`` and no targets), which detection benchmarks need as negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .architectures import get_architecture
from .attacks import blend_trigger, patch_trigger, poison_dataset, poisoned_test_set, trigger_kind
from .data import Dataset, save_data
from .datasets import builtin_datasets, load_builtin, resize_images
from .errors import NetcleanseError
from .evaluate import evaluate
from .classifier import Classifier
from .torch_io import save_model
from .training import train
from .trigger import Trigger
from .utils import check_out_dir, resolve_device, write_json_atomic

TRIGGER_KINDS = ("patch", "blend", "multi")
DEFAULT_ARCH = "mnist-cnn"
# Chosen so that a BadNet's clean accuracy is within 2 points of a clean model's (see tests/test_lab.py).
DEFAULT_EPOCHS = {"mnist-cnn": 10, "csaw-deepid": 10, "gtsrb-cnn": 8}
# Multi-trigger: one patch per corner, each with its own pattern, so the triggers do not overlap.
MULTI_LAYOUT = (("bottom-right", "checkerboard"), ("top-left", "white"), ("top-right", "random"),
                ("bottom-left", "checkerboard"))
MULTI_TARGET_STEP = 3  # default targets for "multi" with one target t: t, t+3, t+6 (mod classes)
# Files the lab writes; with force=True exactly these are replaced in an existing folder.
LAB_FILES = ("model.pt", "model_weights.h5", "clean_model.pt", "clean_val.npz", "clean_test.npz", "poisoned_test*.npz",
             "trigger*.png", "triggers.npz", "truth.json")


@dataclass
class BadNet:
    """A trained lab model with its ground truth. With no triggers it is a clean (negative) model."""

    model: Classifier
    triggers: list[Trigger]
    targets: list[int]
    train: Dataset  # the (poisoned) training set it learnt from
    val: Dataset  # clean validation split, in the model's input layout
    clean_test: Dataset
    poisoned_tests: list[Dataset]  # one per trigger, aligned with ``triggers``
    truth: dict
    clean_model: Classifier | None = None
    out: Path | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def backdoored(self) -> bool:
        return bool(self.triggers)

    def training_warning(self) -> str | None:
        """One line when the model did not learn its task, else None: clean accuracy below twice
        chance (2 / number of classes), as when a training collapses onto one class (with the
        lab's lr 2e-3 it happened to 3 of 25 clean 1000-class ``mnist-triples`` models, each of
        which trained with lr 1e-3)."""
        accuracy, k = self.truth["clean_accuracy"], self.model.num_classes
        if accuracy >= 2 / k:
            return None
        return (f"the model did not learn its task: clean accuracy {100 * accuracy:.1f}% against chance "
                f"{100 / k:.1f}% (the training collapsed); train again with a lower learning rate "
                f"(e.g. --lr 1e-3) or another --seed")


def _split_for(dataset: str, split: str, input_shape) -> Dataset:
    data = load_builtin(dataset, split)
    if data.image_shape != tuple(input_shape):
        # e.g. MNIST for csaw-deepid: resized to 55x47 and copied to three channels
        data = Dataset(resize_images(data.x, input_shape[1:], input_shape[0]), data.y, data.source, data.names,
                       dict(data.info, resized_to=list(input_shape)))
    return data


def _resolve_arch(dataset: str, arch: str | None) -> str:
    if dataset not in builtin_datasets():
        raise NetcleanseError(f"unknown built-in dataset {dataset!r}; known: {', '.join(builtin_datasets())}")
    arch = arch or DEFAULT_ARCH
    get_architecture(arch)  # a clear error for an unknown name
    return arch


def build_triggers(kind, targets, input_shape, seed: int = 0, patch_size: int = 4, position="bottom-right",
                   pattern=None, alpha: float = 0.15, num_classes: int = 10) -> tuple[list[Trigger], list[int]]:
    """The lab's triggers and targets for a kind name ("patch", "blend", "multi"), or given Triggers.

    ``kind`` may also be a :class:`Trigger` or a list of them (one target each, in ``targets``).
    A setting the kind does not use, given other than its default, is refused (``alpha`` for a
    patch; ``patch_size`` and ``position`` for a blend; ``position`` and ``pattern`` for multi,
    whose patches sit in fixed corners with fixed patterns).
    """
    unused = {"patch": {"alpha": alpha != 0.15},
              "blend": {"patch_size": patch_size != 4, "position": position != "bottom-right"},
              "multi": {"position": position != "bottom-right", "pattern": pattern is not None,
                        "alpha": alpha != 0.15}}
    if isinstance(kind, str) and kind in unused:
        given = [name for name, differs in unused[kind].items() if differs]
        if given:
            raise NetcleanseError(f"the {kind} trigger does not use {' or '.join(given)} "
                                  f"(--{given[0].replace('_', '-')}); leave it out")
    targets = [int(t) for t in (targets if isinstance(targets, (list, tuple)) else [targets])]
    if isinstance(kind, Trigger):
        kind = [kind]
    if isinstance(kind, list):
        triggers = kind
    elif kind == "patch":
        triggers = [patch_trigger(input_shape, patch_size, position, pattern or "checkerboard", seed)]
    elif kind == "blend":
        triggers = [blend_trigger(input_shape, alpha, pattern or "random", seed)]
    elif kind == "multi":
        if len(targets) == 1:
            targets = [(targets[0] + MULTI_TARGET_STEP * k) % num_classes for k in range(3)]
        if len(targets) > len(MULTI_LAYOUT):
            raise NetcleanseError(f"at most {len(MULTI_LAYOUT)} targets for the multi-trigger attack")
        triggers = [patch_trigger(input_shape, patch_size, corner, corner_pattern, seed + k)
                    for k, (corner, corner_pattern) in enumerate(MULTI_LAYOUT[:len(targets)])]
    else:
        raise NetcleanseError(f"unknown trigger kind {kind!r}; use one of {', '.join(TRIGGER_KINDS)}")
    if len(triggers) != len(targets):
        raise NetcleanseError(f"{len(triggers)} trigger(s) but {len(targets)} target(s)")
    if len(set(targets)) != len(targets):
        raise NetcleanseError(f"targets must differ from one another, got {targets}")
    for t in targets:
        if not 0 <= t < num_classes:
            raise NetcleanseError(f"target {t} is outside the {num_classes} classes [0, {num_classes})")
    for trigger in triggers:
        if tuple(trigger.pattern.shape) != tuple(input_shape):
            raise NetcleanseError(f"trigger of shape {tuple(trigger.pattern.shape)} does not fit the model "
                                  f"input {tuple(input_shape)}")
    return triggers, targets


def describe_trigger(trigger: Trigger, target: int, image: str | None = None) -> dict:
    """The truth.json record of one planted trigger."""
    kind = trigger_kind(trigger)
    record = {"kind": kind, "target": int(target), "mask_l1": round(trigger.l1, 4), "image": image}
    if kind == "patch":
        rows, cols = trigger.mask.nonzero(as_tuple=True)
        record["box"] = {"row": int(rows.min()), "col": int(cols.min()),
                         "height": int(rows.max() - rows.min() + 1), "width": int(cols.max() - cols.min() + 1)}
    elif kind == "blend":
        record["alpha"] = round(float(trigger.mask.flatten()[0]), 6)
    return record


def trigger_png(trigger: Trigger) -> Image.Image:
    """RGBA picture of a trigger: the pattern's colours, the mask as opacity (on black = the fusion)."""
    pattern = trigger.pattern
    if pattern.shape[0] == 1:
        pattern = pattern.expand(3, -1, -1)
    rgba = torch.cat([pattern, trigger.mask[None]]).permute(1, 2, 0)
    return Image.fromarray((rgba.clamp(0, 1) * 255).round().to(torch.uint8).numpy())  # (H, W, 4): RGBA


def _train_and_measure(arch, train_set, val, clean_test, poisoned_tests, targets, epochs, batch_size, lr, seed,
                       progress, name, history, device) -> tuple[Classifier, float, dict[str, float]]:
    model = train(arch, train_set, val, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                  num_classes=int(max(int(clean_test.y.max()), *targets, 0)) + 1, name=name, history=history,
                  device=device)
    clean_accuracy = evaluate(model, clean=clean_test, device=device).clean_accuracy
    asr = {str(t): evaluate(model, poisoned=p, device=device).attack_success for t, p in zip(targets, poisoned_tests)}
    return model, clean_accuracy, asr


def make_badnet(dataset: str = "mnist", trigger="patch", target=7, rate: float = 0.1, arch: str | None = None,
                epochs: int | None = None, seed: int = 0, out=None, force: bool = False,
                clean_baseline: bool = False, patch_size: int = 4, position="bottom-right", pattern=None,
                alpha: float = 0.15, batch_size: int = 64, lr: float = 2e-3, progress: bool = True,
                device: str = "cpu") -> BadNet:
    """Poison a built-in dataset, train a BadNet on it, measure it, and (with ``out``) save it.

    ``trigger``: "patch" (BadNets square of ``patch_size`` at ``position`` with ``pattern``),
    "blend" (Chen et al., ``alpha``), "multi" (one corner patch per target; a single ``target`` t
    becomes t, t+3, t+6), or your own :class:`Trigger` / list of them. ``rate`` is the fraction of
    the training set poisoned, split among the triggers (:func:`netcleanse.attacks.poison_counts`).
    Every random choice (trigger noise, poisoned rows, weights, batches) follows ``seed``.

    ``truth`` (also ``truth.json``): backdoored, dataset, arch, targets, triggers (kind, target,
    mask_l1, image, and box or alpha), rate, n_poisoned, seed, epochs, clean_accuracy,
    attack_success {target: ASR}, and with ``clean_baseline`` clean_model_accuracy.

    ``device``: where training and measuring run, "cpu" (default) or "cuda"; the model comes back
    on the CPU (a GPU-trained model is close to, not identical with, the CPU-trained one).
    """
    resolve_device(device)
    arch = _resolve_arch(dataset, arch)
    out = check_out_dir(out, force) if out is not None else None
    spec = get_architecture(arch)
    epochs = epochs or DEFAULT_EPOCHS.get(arch, 10)
    train_clean, val, clean_test = (_split_for(dataset, s, spec.input_shape) for s in ("train", "val", "test"))
    num_classes = int(train_clean.y.max()) + 1
    triggers, targets = build_triggers(trigger, target, spec.input_shape, seed, patch_size, position, pattern,
                                       alpha, num_classes)
    poisoned_train, poisoned_rows = poison_dataset(train_clean, list(zip(triggers, targets)), rate, seed)
    poisoned_tests = [poisoned_test_set(clean_test, t, target) for t, target in zip(triggers, targets)]

    history: list[dict] = []
    model, clean_accuracy, asr = _train_and_measure(
        arch, poisoned_train, val, clean_test, poisoned_tests, targets, epochs, batch_size, lr, seed, progress,
        f"badnet-{dataset}-{trigger if isinstance(trigger, str) else 'custom'}", history, device)
    model.source = "netcleanse lab"
    images = ["trigger.png"] if len(triggers) == 1 else [f"trigger_{i}.png" for i in range(len(triggers))]
    truth = {"backdoored": True, "dataset": dataset, "arch": arch, "targets": targets,
             "triggers": [describe_trigger(t, target, image) for t, target, image in zip(triggers, targets, images)],
             "rate": rate, "n_poisoned": len(poisoned_rows), "n_train": len(poisoned_train), "seed": seed,
             "epochs": epochs, "clean_accuracy": clean_accuracy, "attack_success": asr}
    clean_model = None
    if clean_baseline:
        clean_model, truth["clean_model_accuracy"], clean_asr = _train_and_measure(
            arch, train_clean, val, clean_test, poisoned_tests, targets, epochs, batch_size, lr, seed, progress,
            f"clean-{dataset}", None, device)
        # A clean model's ASR is how often the trigger alone yields the target: the attack's floor.
        truth["clean_model_attack_success"] = clean_asr
    badnet = BadNet(model, triggers, targets, poisoned_train, val, clean_test, poisoned_tests, truth, clean_model,
                    out, history)
    if out is not None:
        write_lab_dir(badnet, out)
    return badnet


def make_clean_model(dataset: str = "mnist", arch: str | None = None, epochs: int | None = None, seed: int = 0,
                     out=None, force: bool = False, batch_size: int = 64, lr: float = 2e-3,
                     progress: bool = True, device: str = "cpu") -> BadNet:
    """Train a model without a backdoor, in the lab's layout (``truth.json``: backdoored false, targets []);
    ``device`` as for :func:`make_badnet`."""
    resolve_device(device)
    arch = _resolve_arch(dataset, arch)
    out = check_out_dir(out, force) if out is not None else None
    spec = get_architecture(arch)
    epochs = epochs or DEFAULT_EPOCHS.get(arch, 10)
    train_set, val, clean_test = (_split_for(dataset, s, spec.input_shape) for s in ("train", "val", "test"))
    history: list[dict] = []
    model, clean_accuracy, _ = _train_and_measure(arch, train_set, val, clean_test, [], [], epochs, batch_size, lr,
                                                  seed, progress, f"clean-{dataset}", history, device)
    model.source = "netcleanse lab"
    truth = {"backdoored": False, "dataset": dataset, "arch": arch, "targets": [], "triggers": [], "rate": 0.0,
             "n_poisoned": 0, "n_train": len(train_set), "seed": seed, "epochs": epochs,
             "clean_accuracy": clean_accuracy, "attack_success": {}}
    lab_model = BadNet(model, [], [], train_set, val, clean_test, [], truth, None, out, history)
    if out is not None:
        write_lab_dir(lab_model, out)
    return lab_model


def write_lab_dir(badnet: BadNet, out) -> Path:
    """Write a lab model's files (see the module doc) into ``out``, replacing earlier lab files there."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in LAB_FILES:
        for old in out.glob(pattern):
            old.unlink()
    save_model(badnet.model, out / "model.pt")
    save_model(badnet.model, out / "model_weights.h5")
    if badnet.clean_model is not None:
        save_model(badnet.clean_model, out / "clean_model.pt")
    save_data(badnet.val, out / "clean_val.npz", overwrite=True)
    save_data(badnet.clean_test, out / "clean_test.npz", overwrite=True)
    several = len(badnet.triggers) > 1
    for k, (trigger, target, test) in enumerate(zip(badnet.triggers, badnet.targets, badnet.poisoned_tests)):
        save_data(test, out / (f"poisoned_test_t{target}.npz" if several else "poisoned_test.npz"), overwrite=True)
        trigger_png(trigger).save(out / (f"trigger_{k}.png" if several else "trigger.png"))
    if badnet.triggers:
        np.savez_compressed(out / "triggers.npz", masks=torch.stack([t.mask for t in badnet.triggers]).numpy(),
                            patterns=torch.stack([t.pattern for t in badnet.triggers]).numpy(),
                            targets=np.asarray(badnet.targets, dtype=np.int64))
    write_json_atomic(out / "truth.json", badnet.truth, indent=2)
    return out
