"""The maximum achievable logit margin of each label: a second per-label backdoor signal (MM-BD).

Wang, Xiang, Miller and Kesidis (MM-BD, IEEE S&P 2024) observe that a backdoor's target label can be
driven much further above the other labels than any natural label can: the planted trigger is a
feature the network learnt to answer with overwhelming evidence. For label t the statistic is

    r_t = max over inputs x in [0, 1]^(C x H x W) of  ( f_t(x) - max_{j != t} f_j(x) ),

with f the model's logits (its preprocessing included). It needs no clean data. It is estimated
here by gradient ascent (Adam, ``steps`` steps, learning rate ``lr``) on x, parametrised as
``x = tanh(w) / 2 + 0.5`` so it stays in range, from ``restarts`` uniform-noise starts per label;
r_t is the best margin reached. Many labels are optimised together (their inputs share one
forward pass), and each label's starts come from its own generator, seeded by ``seed`` and the
label, so a label's margin depends on the model, the seed and the label only, not on which other
labels are computed with it or how they are chunked (up to the rounding of batched kernels).

Neural Cleanse's mask size measures how *little* of the input a trigger needs; the margin measures
how *strongly* the network answers once it sees it. A naturally easy label (a class many inputs are
already close to) needs a small mask but gains no unusual margin; a large planted trigger (sunglasses
on a face) needs a sizeable mask yet drives its target's logit far beyond the others. The scan's
verdict (:mod:`netcleanse.calibrated`) combines the two per label.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .neural_cleanse import EPS


def max_margins(model, labels, input_shape, *, seed: int, restarts: int = 4, steps: int = 200,
                lr: float = 0.05, device=None, max_images: int = 256, channels_last: bool = False,
                on_chunk=None) -> np.ndarray:
    """Estimate r_t (module doc) for each label in ``labels``; returns float64 margins in that order.

    ``model``: a frozen classifier taking [0, 1] pixels. ``max_images``: inputs per forward pass
    (labels are processed ``max_images // restarts`` at a time). ``on_chunk(n_done)``: progress.
    """
    labels = [int(t) for t in labels]
    if not labels:
        return np.zeros(0)
    C, H, W = input_shape
    device = device or torch.device("cpu")
    starts = torch.stack([torch.rand(restarts, C, H, W, generator=label_generator(seed, t)) for t in labels])
    per_chunk = max(1, max_images // restarts)
    out = np.empty(len(labels))
    for lo in range(0, len(labels), per_chunk):
        chunk = labels[lo:lo + per_chunk]
        x0 = starts[lo:lo + len(chunk)].reshape(-1, C, H, W)
        w = torch.atanh(((x0 - 0.5) * (2 - EPS)).clamp(-1 + 1e-6, 1 - 1e-6)).to(device).requires_grad_(True)
        target = torch.tensor(chunk, device=device).repeat_interleave(restarts)
        opt = torch.optim.Adam([w], lr=lr)
        best = torch.full((len(target),), -torch.inf, device=device)
        for _ in range(steps):
            margin = _margin(model, w, target, channels_last)
            best = torch.maximum(best, margin.detach())
            opt.zero_grad(set_to_none=True)
            (-margin.sum()).backward()
            opt.step()
        with torch.no_grad():
            best = torch.maximum(best, _margin(model, w, target, channels_last))
        out[lo:lo + len(chunk)] = best.view(len(chunk), restarts).max(1).values.double().cpu().numpy()
        if on_chunk is not None:
            on_chunk(len(chunk))
    return out


def label_generator(seed: int, label: int) -> torch.Generator:
    """The generator of one label's starting points."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/margin/{label}".encode()))


def _margin(model, w: torch.Tensor, target: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = torch.tanh(w) / (2 - EPS) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    logits = model(x)
    own = logits.gather(1, target[:, None])[:, 0]
    others = logits.scatter(1, target[:, None], -torch.inf).max(1).values
    return own - others
