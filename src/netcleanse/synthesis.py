"""Data-free input synthesis: image-like inputs for a scan (or a guard) that has no clean data.

Three kinds (:func:`synthesize_inputs`): ``uniform`` pixels; ``smooth`` noise (:func:`smooth_noise`:
uniform noise on a coarser grid, bilinearly upsampled); and ``inversion`` (every preset's choice):
smooth noise ``x0`` optimised for :data:`INVERSION_STEPS` Adam steps (lr 0.05) in tanh space,
x = tanh(w) / 2 + 1/2 starting from w = atanh(2 x0 - 1) (clipped to [-0.999, 0.999]), to minimise

    mean over inputs of CE(f(x_i), t_i)  +  tv_weight * C * H * TV(x) ,

where the targets t_i are distinct random classes (repeated when there are more inputs than
classes), TV(x) is the mean absolute difference of vertically plus horizontally adjacent pixels
over all inputs, and ``tv_weight`` is 0.05: inputs the model classifies confidently as many
different classes, kept smooth by the total-variation prior. The gradient is taken
:data:`INVERT_IMAGES` inputs at a time, which bounds memory and gives the same gradient as one pass up to
float rounding (a CPU's kernels may round a pass of fewer inputs differently). Each input's terms of
the loss are its own and Adam works element by element, so the inputs are inverted in parts of that
many (:func:`inversion_parts`), one after another: the same bits as all at once, and a scan can
journal each part (:func:`netcleanse.scanning.data_free_inputs`).

**Stopping at a confidence** (``confidence``, off unless a preset asks for it): an input is kept at
the first iterate at which the model gives its target class a probability of at least
``confidence`` (checked before each step; an input that never reaches it is the last iterate).
Optimised on, an input is pushed far past the decision boundary into a region of extreme
confidence, where a planted trigger no longer overrides the model: on two 10-label lab BadNets of
the development half, the planted triggers flipped 61 % and 12-82 % of the inversion's inputs to
their targets after 30 steps, against 100 % and 50-100 % when each input was kept at probability
0.9 (and 94-100 % of real test images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import NetcleanseError


def smooth_noise(input_shape, n: int, generator: torch.Generator, coarseness: int = 5,
                 pixel_noise: float = 0.0) -> torch.Tensor:
    """Image-like random inputs: uniform noise on a ``coarseness``-times coarser grid, bilinearly
    upsampled (low-frequency blobs), plus optional Gaussian pixel noise; (n, C, H, W) in [0, 1]."""
    C, H, W = input_shape
    coarse = torch.rand(n, C, max(2, H // coarseness), max(2, W // coarseness), generator=generator)
    x = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    if pixel_noise:
        x = x + pixel_noise * torch.randn(n, C, H, W, generator=generator)
    return x.clamp(0, 1)


INVERSION_STEPS = 30  # gradient steps of the data-free input inversion
INVERT_IMAGES = 96  # inputs per forward pass of the inversion (bounds its autograd graph's memory)


def synthesize_inputs(model, n: int, kind: str, generator: torch.Generator, device=None,
                      confidence: float | None = None, max_images: int = INVERT_IMAGES,
                      on_step=None) -> torch.Tensor:
    """Inputs for a data-free scan, (n, C, H, W) in [0, 1].

    ``uniform``: i.i.d. uniform pixels. ``smooth``: uniform noise on a 5x coarser grid,
    bilinearly upsampled (image-like low-frequency blobs). ``inversion``: smooth noise optimised
    to be classified confidently as n different random classes, with a total-variation prior;
    with ``confidence``, each input kept at the first step its class reaches that probability.
    ``max_images``: inputs per gradient pass of the inversion (memory only, :mod:`netcleanse.passes`).
    ``on_step(k)``: told k finished inversion steps of one part (:func:`inversion_parts` parts of
    :data:`INVERSION_STEPS` steps each).
    """
    check_kind(kind, confidence)
    C, H, W = model.input_shape
    if kind == "uniform":
        return torch.rand(n, C, H, W, generator=generator).float()
    x0, targets = inversion_start(model, n, generator) if kind == "inversion" else \
        (smooth_noise(model.input_shape, n, generator), None)
    if kind == "smooth":
        return x0.float()
    return torch.cat([invert(model, x0[lo:hi], targets[lo:hi], n, device, confidence=confidence,
                             max_images=max_images, on_step=on_step)
                      for lo, hi in inversion_parts(n, max_images)]).float()


def check_kind(kind: str, confidence: float | None = None) -> None:
    """Refuse an unknown input kind, or a confidence that is not a probability of an inversion."""
    if kind not in ("uniform", "smooth", "inversion"):
        raise NetcleanseError(f"unknown data-free input kind {kind!r}; use uniform, smooth or inversion")
    if confidence is not None and not (0 < confidence < 1 and kind == "inversion"):
        raise NetcleanseError(f"an inversion confidence must be between 0 and 1 (and needs kind inversion), "
                              f"got {confidence} for {kind!r}")


def inversion_start(model, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The inversion's starting points (smooth noise) and target classes (distinct random classes,
    repeated when there are more inputs than classes), drawn from ``generator`` in that order."""
    x0 = smooth_noise(model.input_shape, n, generator)
    targets = torch.randperm(model.num_classes, generator=generator)[:n]
    if len(targets) < n:
        targets = targets.repeat(math.ceil(n / len(targets)))[:n]
    return x0, targets


def inversion_parts(n: int, max_images: int = INVERT_IMAGES) -> list[tuple[int, int]]:
    """The parts (lo, hi) of ``n`` inputs that are inverted one after another, ``max_images`` each."""
    return [(lo, min(n, lo + max_images)) for lo in range(0, n, max_images)]


def invert(model, x0: torch.Tensor, targets: torch.Tensor, n: int, device=None, steps: int = INVERSION_STEPS,
           tv_weight: float = 0.05, max_images: int = INVERT_IMAGES, confidence: float | None = None,
           on_step=None) -> torch.Tensor:
    """Invert the inputs ``x0`` (a part of the ``n`` of the whole loss, module doc) towards
    ``targets``; returns them in [0, 1] on the CPU.

    The loss is a sum over inputs of terms of each input alone (its cross-entropy and total
    variation, over ``n``), and Adam works element by element, so every input follows its own
    path: a part inverted on its own ends where it would in one optimisation of all ``n``. Its
    gradient is still taken ``max_images`` inputs at a time (memory).
    """
    device = device or torch.device("cpu")
    w = torch.atanh((x0 * 2 - 1).clamp(-0.999, 0.999)).to(device).requires_grad_(True)
    targets = targets.to(device)
    opt = torch.optim.Adam([w], lr=0.05)
    m, (C, H, W) = len(w), w.shape[1:]
    if confidence is not None:  # each input's first iterate confident enough, and whether it has one
        kept, done = torch.empty_like(w), torch.zeros(m, dtype=torch.bool, device=device)
    for _ in range(steps):
        grads = []
        for lo in range(0, m, max_images):
            part = w[lo:lo + max_images].detach().requires_grad_(True)
            x = torch.tanh(part) / 2 + 0.5
            tv = ((x[..., 1:, :] - x[..., :-1, :]).abs().sum() / (n * C * (H - 1) * W)
                  + (x[..., :, 1:] - x[..., :, :-1]).abs().sum() / (n * C * H * (W - 1)))
            logits = model(x)
            if confidence is not None:  # keep each input at the first iterate confident enough
                with torch.no_grad():
                    rows = torch.arange(len(x), device=device)
                    sure = logits.softmax(1)[rows, targets[lo:lo + max_images]] >= confidence
                    now = sure & ~done[lo:lo + max_images]
                    kept[lo:lo + max_images][now] = x.detach()[now]
                    done[lo:lo + max_images] |= now
            loss = (F.cross_entropy(logits, targets[lo:lo + max_images], reduction="sum") / n
                    + tv_weight * tv * x.shape[1] * x.shape[2])
            grads.append(torch.autograd.grad(loss, part)[0])
        w.grad = torch.cat(grads)
        opt.step()
        if on_step is not None:
            on_step(1)
    out = (torch.tanh(w) / 2 + 0.5).detach()
    if confidence is not None:
        out = torch.where(done[:, None, None, None], kept, out)
    return out.cpu()
