"""Is the model fed what it was trained on? A warning when the configured preprocessing looks wrong.

A wrong input scale or a forgotten normalisation is the most common silent failure of backdoor
scanners: the network then answers nearly one class for everything, and every trigger search on it
is meaningless. :func:`check_preprocessing` compares the model's behaviour at its configured
preprocessing with the common alternatives (the input scale multiplied or divided by 255; no
mean/std normalisation when one is configured; when none is and the data is labelled, the two
everyone uses, ImageNet's mean/std for colour models and 0.5/0.5) and returns one warning line
when the best alternative looks much healthier:

- with labelled data: accuracy at an alternative at least 20 points above, and above twice, the
  accuracy at the configured preprocessing;
- with unlabelled data or none (smooth synthetic images, as data-free scans use): at the
  configured preprocessing at least 95 % of the inputs land on one class (90 % for data), while at
  an alternative at least 25 points fewer do.

It is a warning, never an error: some models do answer one class for noise.

:func:`check_outputs` warns when the model answers probabilities instead of logits (a softmax at
the end of a network of the user's own: the Keras and ONNX readers drop a final softmax, sigmoid
or tanh themselves), or per-class sigmoid scores (every output strictly between 0 and 1). Neural Cleanse's losses then see values in [0, 1] as logits, and a saturated softmax
passes almost no gradient back to the trigger: the scan runs, but its results are unreliable (on a
lab net: model p 0.0025 with logits, 0.038 with the softmax kept; on another, a clean label flagged
beside the target). ``predict`` warns too: its confidence would be a softmax of probabilities.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from .errors import NetcleanseError
from .utils import on_device

MAX_IMAGES = 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@contextmanager
def _preprocessing(model, input_scale: float, mean, std):
    before = (model.input_scale, model.mean, model.std)
    model.set_preprocessing(input_scale=input_scale, mean=mean, std=std)
    try:
        yield model
    finally:
        model.set_preprocessing(input_scale=before[0], mean=before[1], std=before[2])


def _alternatives(model, labelled: bool = False) -> list[tuple[str, float, tuple | None, tuple | None]]:
    scale, mean, std = model.input_scale, model.mean, model.std
    if scale >= 16:
        swapped = ("--input-scale 1" if scale == 255 else f"--input-scale {scale / 255:g}", scale / 255)
    else:
        swapped = (f"--input-scale {scale * 255:g}", scale * 255)
    out = [(swapped[0], swapped[1], mean, std)]
    if mean is not None:
        out.append(("no --mean/--std", scale, None, None))
    elif labelled:  # a net trained on normalised inputs, loaded without it (judged on accuracy alone)
        channels = model.input_shape[0]
        if channels == 3:
            out.append((f"--mean {','.join(map(str, IMAGENET_MEAN))} --std {','.join(map(str, IMAGENET_STD))}",
                        scale, IMAGENET_MEAN, IMAGENET_STD))
        out.append(("--mean 0.5 --std 0.5", scale, (0.5,) * channels, (0.5,) * channels))
    return out


def check_preprocessing(model, data=None, n: int = MAX_IMAGES, seed: int = 0, device: str = "cpu",
                        seen: dict | None = None) -> str | None:
    """One warning line when the model's configured preprocessing looks wrong (see the module doc),
    else ``None``. ``data``: a :class:`netcleanse.data.Dataset` of clean images (labels optional);
    without it, smooth synthetic images are used. Guarded models are not checked. ``device``:
    where the model computes, "cpu" or "cuda" (it is moved back afterwards). ``seen``: where given,
    ``seen["images"]`` grows by the images the check ran through the model (a scan's cost record),
    and ``seen["answers"]`` holds the model's answers to the clean images it checked, at the
    configured preprocessing (for :func:`one_class_note`)."""
    seen = {} if seen is None else seen
    seen.setdefault("images", 0)

    def answers(x: torch.Tensor) -> torch.Tensor | None:
        parts = []
        for start in range(0, len(x), 64):
            seen["images"] += len(x[start:start + 64])
            try:
                parts.append(model.predict(x[start:start + 64], batch_size=64))
            except NetcleanseError:  # NaN outputs at an alternative: that alternative is no better
                return None
        return torch.cat(parts)

    with on_device(model, device):
        return _check(model, data, n, seed, answers, seen)


def _check(model, data, n: int, seed: int, answers, seen: dict) -> str | None:
    if getattr(model, "poison_label", None) is not None or model.num_classes < 3:
        return None
    if data is not None and len(data):
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        x = data.x[idx].float()
        y = data.y[idx] if getattr(data, "y", None) is not None else None
        what = f"{len(x)} of your images"
    else:
        from .guard import synthetic_inputs
        x, y, what = synthetic_inputs(model.input_shape, n, seed), None, f"{n} synthetic images"
    now = answers(x)
    if now is not None and data is not None and len(data):
        seen["answers"] = now
    if now is None:
        return None
    configured = model.describe_preprocessing()
    if y is not None:
        acc = float((now == y).float().mean())
        scored = []
        for label, scale, mean, std in _alternatives(model, labelled=True):
            with _preprocessing(model, scale, mean, std):
                alt = answers(x)
            if alt is not None:
                scored.append((float((alt == y).float().mean()), label))
        if scored:  # the best alternative is the one to suggest, not the first that helps
            alt_acc, label = max(scored, key=lambda pair: pair[0])
            if alt_acc >= acc + 0.2 and alt_acc > 2 * acc:
                return (f"the model's accuracy on {what} is {100 * acc:.0f}% with the configured preprocessing "
                        f"({configured}) but {100 * alt_acc:.0f}% with {label}: check --input-scale/--mean/--std")
        return None
    share, top = _top_share(now, model.num_classes)
    if share < (0.9 if data is not None else 0.95):
        return None
    scored = []
    for label, scale, mean, std in _alternatives(model):
        with _preprocessing(model, scale, mean, std):
            alt = answers(x)
        if alt is not None:
            scored.append((_top_share(alt, model.num_classes)[0], label))
    if scored:  # the alternative spreading the answers most
        alt_share, label = min(scored, key=lambda pair: pair[0])
        if alt_share <= share - 0.25:
            mine = " (or, if your images are all of one class, give images of many)" if data is not None else ""
            return (f"{100 * share:.0f}% of {what} land on class {top} with the configured preprocessing "
                    f"({configured}), only {100 * alt_share:.0f}% on one class with {label}: a model fed "
                    f"the wrong scale or normalisation answers one class for everything; check "
                    f"--input-scale/--mean/--std{mine}")
    return None


ONE_CLASS_SHARE = 0.5  # a scan's clean images answered this much as one class: too few classes


def one_class_note(model, answers: torch.Tensor | None) -> str | None:
    """One warning line when a scan's clean images are mostly of one class by the model's own
    ``answers`` to them (at least ``ONE_CLASS_SHARE``; :func:`check_preprocessing` records them),
    else ``None``: inputs that are that class already need no trigger, so that label's reversed
    trigger comes out small for want of other inputs, not for a backdoor, and the other labels'
    triggers are fitted to one class's images."""
    if answers is None or not len(answers):
        return None
    share, top = _top_share(answers, model.num_classes)
    if share < ONE_CLASS_SHARE:
        return None
    return (f"the model answers {top} for {100 * share:.0f}% of the {len(answers)} clean images checked: a scan "
            f"needs images of many classes (label {top}'s trigger comes out small when its inputs are {top} "
            "already, backdoor or not)")


def _top_share(labels: torch.Tensor, num_classes: int) -> tuple[float, int]:
    counts = torch.bincount(labels, minlength=num_classes)
    return float(counts.max()) / max(len(labels), 1), int(counts.argmax())


def warn(message: str | None) -> None:
    """Print ``message`` as one ``warning:`` line on stderr (nothing for ``None``)."""
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)


OUTPUT_CHECK_IMAGES = 16


def output_check_runs(model) -> bool:
    """Whether :func:`check_outputs` looks at ``model`` (not at a guarded one, whose N+1 answers are
    its own, nor at fewer than 2 classes)."""
    return getattr(model, "poison_label", None) is None and model.num_classes >= 2


def check_outputs(model, n: int = OUTPUT_CHECK_IMAGES, seed: int = 0) -> str | None:
    """One warning line when ``model`` answers probabilities (every row of its outputs on ``n``
    synthetic images non-negative and summing to 1) or sigmoid scores (every output strictly
    between 0 and 1), else ``None`` (see the module doc)."""
    if not output_check_runs(model):
        return None
    from .guard import synthetic_inputs
    from .utils import module_device
    x = synthetic_inputs(model.input_shape, n, seed).to(module_device(model))
    with torch.no_grad():
        try:
            out = model.logits(x)
        except NetcleanseError:
            return None
    if bool((out >= -1e-6).all()) and bool(((out.sum(dim=1) - 1).abs() < 1e-3).all()):
        return ("the model's outputs look like probabilities (non-negative, summing to 1), not logits: remove "
                "its final softmax (netcleanse needs logits: a scan of probabilities can miss a backdoor and flag "
                "clean labels, and a prediction's confidence is a softmax of the probabilities)")
    if bool((out > 0).all()) and bool((out < 1).all()):  # a ReLU gives zeros, a sigmoid never does
        return ("the model's outputs all lie strictly between 0 and 1, like a final sigmoid's, not logits: "
                "remove its final sigmoid (netcleanse needs the scores before it: a scan of squashed scores can "
                "miss a backdoor and flag clean labels, and a prediction's confidence is a softmax of them)")
    return None
