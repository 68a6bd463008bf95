"""Expected transferability: does a trigger found on one input work on the others?

A planted trigger is universal: the model learned to send *any* input carrying it to the target.
A naturally easy label is not: each input can be pushed there by a small perturbation of its own,
and that perturbation does little to other inputs. Xiang, Miller and Kesidis ("Post-Training
Detection of Backdoor Attacks for Two-Class and Multi-Attack Scenarios", ICLR 2022) measure this
as the *expected transferability* of per-input triggers; this module computes it for patch
(mask-and-pattern) triggers, the kind Neural Cleanse searches.

For label t, ``sources`` inputs not classified t are drawn, and for each source x_i a trigger of its
own, a mask m_i in [0, 1]^(H x W) and a pattern p_i in [0, 1]^(C x H x W) (sigmoid-parameterised),
is optimised for ``steps`` Adam steps (lr 0.1) on

    CE(f((1 - m_i) * x_i + m_i * p_i), t)  +  c_i * ||m_i||_1 ,

with a cost c_i per input (start ``COST``, times 1.2 after a step at which x_i went to t, divided by
1.2 otherwise: Neural Cleanse's schedule, one input at a time). The smallest mask that sent x_i to t
is kept. Its transfer rate is the fraction of ``pool`` other inputs (not classified t, disjoint
from the sources) that it sends to t, and the label's expected transferability is the mean over
sources (a source whose search never reached t counts 0):

    ET_t = (1 / S) * sum_i  mean_{x in pool} 1[ f((1 - m_i) * x + m_i * p_i) = t ] .

How the verdict uses it (:mod:`netcleanse.calibrated`, data-free scans of models with few labels):
labels whose ET is at least a threshold are tested first, against a reference of the other labels
alone, so that two or three planted targets no longer hide each other among ten labels.

On the data-free inputs of the development half of the benchmark zoo (10-label MNIST nets), the
largest ET of any label of 30 clean models was 0.027, while 39 of 43 planted targets were at 0.05 or
above; on nets of scikit-learn's blurry 8x8 digits clean labels reached 0.07-0.32, so the threshold
is not a universal boundary, and the test does not rely on it for its level (benchmarks/RESULTS.md,
"Data-free, few labels"). With real images easy labels transfer more, which is why the verdict uses
it data-free only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COST = 1e-2  # the per-input L1 cost the search starts at
STEP = 1.2  # its multiplicative adjustment per step
MAX_IMAGES = 256  # per-input triggers optimised in one forward pass


def expected_transferability(model, x: torch.Tensor, labels, *, sources: int = 8, pool: int = 64,
                             steps: int = 150, generator: torch.Generator, passes: dict | None = None,
                             max_images: int = MAX_IMAGES) -> dict[int, float]:
    """ET of each label in ``labels`` (module doc) on inputs ``x`` (N, C, H, W) in [0, 1], each label's
    sources and pool drawn from the inputs ``model`` does not classify as it (``generator`` fixes
    which). A label with no such inputs, or fewer than two, gets ET 0. ``passes``, if given, is
    filled with the images that went through the network: ``backward`` (forward + gradient) and
    ``forward`` (forward only). ``max_images``: per-input triggers per gradient pass (memory only,
    :mod:`netcleanse.passes`)."""
    model.eval()
    if passes is not None:
        passes.update(backward=0, forward=len(x))
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + MAX_IMAGES]).argmax(1) for i in range(0, len(x), MAX_IMAGES)])
    src, tgt, pools = [], [], {}
    for t in labels:
        idx = torch.nonzero(pred != t).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        if len(idx) < 2:
            continue
        n_src = min(sources, len(idx) - 1)
        src.append(x[idx[:n_src]])
        tgt += [int(t)] * n_src
        pools[int(t)] = x[idx[n_src:n_src + pool]]
    out = {int(t): 0.0 for t in labels}
    if not src:
        return out
    src, tgt = torch.cat(src), torch.tensor(tgt, device=x.device)
    if passes is not None:
        passes["backward"] += len(src) * steps
    parts = [_per_input_triggers(model, src[lo:lo + max_images], tgt[lo:lo + max_images], steps)
             for lo in range(0, len(src), max_images)]
    masks, patterns, found = (torch.cat(part) for part in zip(*parts))
    rates: dict[int, list[float]] = {}
    with torch.no_grad():
        for i, t in enumerate(tgt.tolist()):
            rate = 0.0
            if found[i]:
                stamped = (1 - masks[i]) * pools[t] + masks[i] * patterns[i]
                rate = (model(stamped).argmax(1) == t).float().mean().item()
                if passes is not None:
                    passes["forward"] += len(stamped)
            rates.setdefault(t, []).append(rate)
    out.update({t: float(sum(v) / len(v)) for t, v in rates.items()})
    return out


def _per_input_triggers(model, x: torch.Tensor, target: torch.Tensor, steps: int):
    """One trigger per input (module doc): the smallest mask that sent it to its target, its pattern,
    and whether any did."""
    B, C, H, W = x.shape
    wm = torch.full((B, 1, H, W), -2.0, device=x.device, requires_grad=True)
    wp = torch.zeros((B, C, H, W), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([wm, wp], lr=0.1)
    cost = torch.full((B,), COST, device=x.device)
    best = torch.full((B,), float("inf"), device=x.device)
    best_m, best_p = torch.zeros(B, 1, H, W, device=x.device), torch.zeros(B, C, H, W, device=x.device)
    for _ in range(steps):
        m, p = torch.sigmoid(wm), torch.sigmoid(wp)
        logits = model((1 - m) * x + m * p)
        l1 = m.flatten(1).sum(1)
        loss = (F.cross_entropy(logits, target, reduction="none") + cost * l1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            hit = logits.argmax(1) == target
            better = hit & (l1 < best)
            best[better], best_m[better], best_p[better] = l1[better], m[better], p[better]
            cost = torch.where(hit, cost * STEP, cost / STEP)
    return best_m.detach(), best_p.detach(), torch.isfinite(best)
