"""Data poisoning: build ground-truth backdoors (BadNets, blended, multi-trigger multi-target).

Every trigger is a :class:`netcleanse.trigger.Trigger` (mask m, pattern p; stamped image
``(1 - m) x + m p``), the same noun Neural Cleanse reverse-engineers:

* a BadNets patch (Gu et al. 2017) is a binary mask over a small square (or any shape) with a
  pattern inside it;
* a blended trigger (Chen et al. 2017) is a constant mask equal to its ``alpha`` over the whole
  image, blending a pattern (random noise or any image) into every pixel.

Poisoning is all-to-one per trigger: a chosen fraction of training samples whose label is not
the trigger's target get the trigger stamped on and their label set to the target. Several
(trigger, target) pairs make a multi-trigger multi-target attack. Clean samples are copied
bit-for-bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import Dataset
from .errors import NetcleanseError
from .trigger import Trigger

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
PATTERNS = ("checkerboard", "white", "random")


def _check_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise NetcleanseError(f"image shape must be (C, H, W), got {image_shape}")
    return shape


def _patch_corner(position, size: int, height: int, width: int, margin: int) -> tuple[int, int]:
    if isinstance(position, str):
        if position not in POSITIONS:
            raise NetcleanseError(f"unknown patch position {position!r}; use one of {', '.join(POSITIONS)} "
                                  "or (row, col)")
        if position == "center":
            return (height - size) // 2, (width - size) // 2
        row = margin if position.startswith("top") else height - size - margin
        col = margin if position.endswith("left") else width - size - margin
        return row, col
    row, col = (int(v) for v in position)
    return row, col


def _pattern_values(pattern, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A (C, height, width) pattern in [0, 1] from a name, an image file, or an array/tensor."""
    if isinstance(pattern, Path) or (isinstance(pattern, str) and pattern not in PATTERNS):
        if not Path(pattern).is_file():
            raise NetcleanseError(f"trigger pattern {str(pattern)!r} is neither one of {', '.join(PATTERNS)} "
                                  "nor an image file")
        return _image_array(pattern, channels, (height, width))
    if isinstance(pattern, str):
        if pattern == "white":
            return torch.ones(channels, height, width)
        if pattern == "checkerboard":
            rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            return ((rows + cols) % 2 == 0).float().expand(channels, -1, -1).clone()
        if pattern == "random":
            return torch.rand(channels, height, width, generator=torch.Generator().manual_seed(seed))
        raise NetcleanseError(f"unknown trigger pattern {pattern!r}; use one of {', '.join(PATTERNS)} or an image")
    values = torch.as_tensor(np.asarray(pattern), dtype=torch.float32)
    if values.dim() == 2:
        values = values.expand(channels, -1, -1)
    if values.dim() != 3 or tuple(values.shape) != (channels, height, width):
        raise NetcleanseError(f"trigger pattern of shape {tuple(values.shape)} does not fit "
                              f"{channels}x{height}x{width}")
    if values.min() < 0 or values.max() > 1:
        raise NetcleanseError("trigger pattern values must be in [0, 1]")
    return values.clone()


def patch_trigger(image_shape, size: int = 4, position="bottom-right", pattern="checkerboard", seed: int = 0,
                  margin: int = 1) -> Trigger:
    """A BadNets square patch: binary mask over ``size`` x ``size`` pixels, ``pattern`` inside it.

    ``position`` is a corner name (the patch sits ``margin`` pixels from the edges), "center",
    or the (row, col) of the patch's top-left pixel. ``pattern`` is "checkerboard" (starting
    with a lit pixel at the top-left), "white", "random" (uniform noise drawn with ``seed``),
    an image file (resized to the patch), or an array of shape (size, size) or (C, size, size)
    in [0, 1].
    """
    channels, height, width = _check_shape(image_shape)
    size = int(size)
    if not 1 <= size <= min(height, width):
        raise NetcleanseError(f"patch size {size} does not fit {height}x{width} images")
    row, col = _patch_corner(position, size, height, width, margin)
    outside = row < 0 or col < 0 or row + size > height or col + size > width
    if isinstance(position, str) and position != "center" and outside:
        raise NetcleanseError(f"a {size}x{size} patch {margin} pixel(s) from the {position} corner does not fit "
                              f"{height}x{width} images: give a patch of at most {min(height, width) - margin} pixels "
                              "(or a ROW,COL position)")
    if outside:
        raise NetcleanseError(f"a {size}x{size} patch at (row {row}, col {col}) falls outside "
                              f"{height}x{width} images")
    mask = torch.zeros(height, width)
    mask[row:row + size, col:col + size] = 1
    full_pattern = torch.zeros(channels, height, width)
    full_pattern[:, row:row + size, col:col + size] = _pattern_values(pattern, channels, size, size, seed)
    return Trigger(mask, full_pattern)


def _image_array(image, channels: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    """An image (path, PIL image, HxW/HxWxC uint8 or [0,1] float array, CxHxW tensor) as CxHxW in [0,1]."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise NetcleanseError(f"trigger image not found: {image}")
        from .data import read_image  # the one image reader: a file that is no image is one error line
        image = torch.from_numpy(read_image(image, channels or 3).astype(np.float32) / 255.0)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if isinstance(image, torch.Tensor):
        values = image.detach().float()
        if values.dim() == 2:
            values = values.unsqueeze(0)
    else:
        array = np.asarray(image)
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        values = torch.from_numpy(array.astype(np.float32) / scale)
        values = values.unsqueeze(0) if values.dim() == 2 else values.permute(2, 0, 1)
    if values.dim() != 3:
        raise NetcleanseError(f"a trigger image must be 2-D or 3-D, got shape {tuple(values.shape)}")
    if values.min() < 0 or values.max() > 1:
        raise NetcleanseError("trigger image values must be in [0, 1] (floats) or 0..255 (uint8)")
    from .datasets import resize_images
    values = resize_images(values.unsqueeze(0), size or tuple(values.shape[1:]), channels)[0]
    return values


def trigger_from_images(mask_image, pattern_image, image_shape=None, binarize: bool = True) -> Trigger:
    """A trigger from any mask image and pattern image (paths, PIL images or arrays).

    The mask is read as grey in [0, 1] (binarised at 0.5 unless ``binarize=False``); the pattern
    keeps its colours. With ``image_shape`` (C, H, W) both are resized to fit the model's input.
    """
    channels, size = None, None
    if image_shape is not None:
        channels, height, width = _check_shape(image_shape)
        size = (height, width)
    pattern = _image_array(pattern_image, channels, size)
    mask = _image_array(mask_image, 1, tuple(pattern.shape[1:]))[0]
    if binarize:
        mask = (mask >= 0.5).float()
    if mask.sum() == 0:
        raise NetcleanseError("the trigger mask image is empty (all black)")
    return Trigger(mask, pattern)


def blend_trigger(image_shape, alpha: float = 0.15, pattern="random", seed: int = 0) -> Trigger:
    """A blended trigger (Chen et al. 2017): ``(1 - alpha) x + alpha p`` over the whole image.

    ``pattern`` is "random" (uniform noise drawn with ``seed``), another pattern name, an image
    file or PIL image (resized to the input), or a (C, H, W) / (H, W) array in [0, 1].
    """
    channels, height, width = _check_shape(image_shape)
    if not 0 < alpha <= 1:
        raise NetcleanseError(f"blend alpha must be in (0, 1], got {alpha}")
    if isinstance(pattern, (str, Path, np.ndarray, torch.Tensor)):
        values = _pattern_values(pattern, channels, height, width, seed)
    else:  # e.g. a PIL image, resized to the input
        values = _image_array(pattern, channels, (height, width))
    return Trigger(torch.full((height, width), float(alpha)), values)


def trigger_kind(trigger: Trigger) -> str:
    """"patch" for a binary mask, "blend" for a constant mask, "custom" otherwise."""
    mask = trigger.mask
    if torch.all((mask == 0) | (mask == 1)):
        return "patch"
    if torch.all(mask == mask.flatten()[0]):
        return "blend"
    return "custom"


def _normalise_attacks(attacks) -> list[tuple[Trigger, int]]:
    if isinstance(attacks, tuple) and len(attacks) == 2 and isinstance(attacks[0], Trigger):
        attacks = [attacks]
    pairs = [(trigger, int(target)) for trigger, target in attacks]
    if not pairs:
        raise NetcleanseError("no attack given: pass a list of (trigger, target) pairs")
    return pairs


def poison_counts(n_samples: int, n_attacks: int, rate: float) -> list[int]:
    """How many samples each attack poisons: ``round(rate * n_samples)`` in all, split evenly.

    ``rate`` is the fraction of the whole training set that is poisoned, as in the BadNets
    literature; with several triggers each gets an equal share (the first ones one more when
    it does not divide).
    """
    total = int(round(rate * n_samples))
    return [total // n_attacks + (k < total % n_attacks) for k in range(n_attacks)]


def poison_dataset(dataset: Dataset, attacks, rate: float = 0.1, seed: int = 0) -> tuple[Dataset, torch.Tensor]:
    """Poison a labelled dataset with one or several all-to-one (trigger, target) attacks.

    For each attack, :func:`poison_counts` samples are drawn (with ``seed``) among those whose
    label differs from the target and that no earlier attack took; they get the trigger stamped
    on and the target as label. Every other sample is copied unchanged.

    Returns the poisoned dataset and the indices of the poisoned rows (sorted). The dataset's
    ``info`` records ``poisoned_indices``, ``poison_targets`` (the target per poisoned row)
    and ``true_labels`` (int64 tensors).
    """
    if dataset.y is None:
        raise NetcleanseError(f"{dataset.source}: poisoning needs labels")
    if not 0 < rate < 1:
        raise NetcleanseError(f"poisoning rate must be in (0, 1), got {rate}")
    pairs = _normalise_attacks(attacks)
    generator = torch.Generator().manual_seed(seed)
    x, y = dataset.x.clone(), dataset.y.clone()
    taken = torch.zeros(len(dataset), dtype=torch.bool)
    counts = poison_counts(len(dataset), len(pairs), rate)
    if min(counts) == 0:  # a backdoor recorded as planted with nothing poisoned
        raise NetcleanseError(f"a poisoning rate of {rate:g} poisons {sum(counts)} of {len(dataset)} training images, "
                              f"{'none' if sum(counts) == 0 else 'none for some'} of the {len(pairs)} trigger(s): "
                              f"give a rate of at least {len(pairs) / len(dataset):.2g}")
    for (trigger, target), count in zip(pairs, counts):
        candidates = ((dataset.y != target) & ~taken).nonzero().flatten()
        if count > len(candidates):
            raise NetcleanseError(f"cannot poison {count} samples for target {target}: only "
                                  f"{len(candidates)} samples have another label")
        rows = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        x[rows] = trigger.apply(dataset.x[rows])
        y[rows] = target
        taken[rows] = True
    poisoned = taken.nonzero().flatten()
    info = dict(dataset.info, poisoned_indices=poisoned, poison_targets=y[poisoned],
                true_labels=dataset.y.clone(), poison_rate=rate)
    return Dataset(x, y, f"{dataset.source}+poisoned", dataset.names, info), poisoned


def poisoned_test_set(dataset: Dataset, trigger: Trigger, target: int) -> Dataset:
    """Every sample whose true label is not ``target``, with the trigger stamped on, labelled ``target``.

    CSAW style: ``y`` is the attack target for every row and ``info["true_labels"]`` keeps the
    original labels (int64 tensor), so attack success rate = accuracy on this set.
    """
    if dataset.y is None:
        raise NetcleanseError(f"{dataset.source}: a poisoned test set needs labels")
    keep = (dataset.y != target).nonzero().flatten()
    true_labels = dataset.y[keep]
    info = dict(dataset.info, true_labels=true_labels, target=int(target))
    names = [dataset.names[i] for i in keep.tolist()] if dataset.names is not None else None
    return Dataset(trigger.apply(dataset.x[keep]), torch.full((len(keep),), int(target), dtype=torch.long),
                   f"{dataset.source}+trigger->{target}", names, info)
