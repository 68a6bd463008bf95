"""Neural Cleanse trigger reverse-engineering (Wang et al., IEEE S&P 2019), batched over labels.

For a target label t, Neural Cleanse looks for the smallest trigger that sends every input to t:

    minimise  CE(f((1 - m) * x + m * p), t) + cost * |m|_1      over the mask m and pattern p,

with ``m = tanh(w_m) / (2 - eps) + 0.5`` (H x W, shared by the channels) and ``p = tanh(w_p) / (2 - eps)
+ 0.5`` (C x H x W), optimised with Adam. The ``cost`` (lambda) is tuned as in the original code:

* it starts at 0; once the attack succeeds (epoch-average success >= ``attack_threshold``) for
  ``patience`` epochs in a row it is set to ``init_cost``;
* afterwards ``patience`` successful epochs in a row multiply it by ``cost_multiplier`` and
  ``patience`` failing epochs divide it by ``cost_multiplier ** 1.5``;
* the best trigger is the smallest mask seen at the end of a successful epoch; the search stops
  when the cost has gone both up and down and the best norm has not improved (by the factor
  ``early_stop_threshold``) for ``early_stop_patience`` epochs, or after ``max_epochs``.

An "epoch" is ``steps_per_epoch`` Adam steps on mini-batches of ``batch_size`` inputs. The
original protocol (the ``reference`` preset) uses 31 steps of 32 images (~1000 images per epoch).

The one structural change from the original code is that :func:`reverse_engineer` optimises a
chunk of L labels at once: masks (L, H, W) and patterns (L, C, H, W) are stamped on the same
mini-batch, giving L * B images in one forward pass. The labels' losses are summed, so gradients,
Adam moments (element-wise) and cost schedules stay exactly per label; a label that stops early
is simply dropped from the active rows. Adam is written out (a few lines) so rows can be dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F


EPS = 1e-7  # the Keras epsilon of the original tanh parametrisation
# stamped inputs per forward pass of a trigger search: the fast preset's chunks of 96 x 4 and 48 x 8
# go through in four. Results do not depend on it (every label's loss, gradient and Adam step are
# its own); speed and memory do: on a 2-core CPU a full CSAW scan took 136 s instead of 147 s with
# 192 per pass (labels 0-299 alone: 67-80 s instead of 89-109 s), ~150 MiB less at its peak, the
# same masks bit for bit (benchmarks/RESULTS.md: more of a pass stays in the CPU's cache)
MAX_IMAGES = 96
# stamped inputs per forward pass of the attack-success check (a full 1283-label CSAW scan peaked at
# 1019 MiB with 512, ~0.1 GiB less with 256; 96 for the same reason as MAX_IMAGES)
ATTACK_IMAGES = 96


@dataclass(frozen=True)
class Schedule:
    """Hyper-parameters of one trigger search (see the module doc for their meaning)."""

    batch_size: int = 32
    steps_per_epoch: int = 31
    max_epochs: int = 1000
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    attack_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0
    early_stop: bool = True
    early_stop_threshold: float = 1.0
    early_stop_patience: int = 25
    # how the search starts: "random" = uniform random mask and pattern (original code);
    # a number = every mask pixel starts at that value (pattern still random)
    mask_init: str | float = "random"

    def to_dict(self) -> dict:
        return asdict(self)

    def max_passes(self) -> int:
        """The most inputs one label's search can stamp: batch_size x steps_per_epoch x max_epochs."""
        return self.batch_size * self.steps_per_epoch * self.max_epochs


@dataclass
class LabelSearch:
    """Outcome of the search for one label (values in [0, 1], float32)."""

    label: int
    mask: torch.Tensor  # (H, W): the best (smallest successful) mask, or the last one if none succeeded
    pattern: torch.Tensor  # (C, H, W)
    mask_l1: float
    succeeded: bool  # some epoch reached the attack threshold
    epochs: int
    steps: int
    time_s: float
    cost: float
    last_mask: torch.Tensor = field(repr=False, default=None)
    last_pattern: torch.Tensor = field(repr=False, default=None)


def to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tanh(w) / (2 - eps) + 0.5`` (values clipped into the open interval first)."""
    return torch.atanh(((x.clamp(0, 1) - 0.5) * (2 - EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


def from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / (2 - EPS) + 0.5


def stamp(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Every input stamped with every trigger: (L*B, C, H, W), label-major.

    ``channels_last`` lays the result out NHWC in memory (same values), which roughly doubles the
    speed of the convolutions on CPU when the model's weights are channels-last too.
    """
    L, B = masks.shape[0], x.shape[0]
    m = masks[:, None, None]  # (L, 1, 1, H, W)
    stamped = (1 - m) * x[None] + m * patterns[:, None]  # (L, B, C, H, W)
    stamped = stamped.reshape(L * B, *x.shape[1:])
    return stamped.contiguous(memory_format=torch.channels_last) if channels_last else stamped


@torch.inference_mode()
def attack_success(model, x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor, labels,
                   max_images: int = ATTACK_IMAGES, channels_last: bool = False) -> list[float]:
    """Fraction of inputs ``x`` that each trigger sends to its label (labels aligned with masks),
    at most ``max_images`` stamped inputs per forward pass."""
    labels = torch.as_tensor(labels)
    per_chunk = max(1, max_images // max(1, len(x)))
    out = []
    for i in range(0, len(labels), per_chunk):
        m, p, t = masks[i:i + per_chunk], patterns[i:i + per_chunk], labels[i:i + per_chunk]
        pred = model(stamp(x, m.to(x.device), p.to(x.device), channels_last)).argmax(1).view(len(t), len(x))
        out.extend((pred == t[:, None].to(pred.device)).float().mean(1).tolist())
    return out


@dataclass
class _State:
    """Per-label bookkeeping of the original cost schedule and early stop, as tensors over labels."""

    cost: torch.Tensor
    set_counter: torch.Tensor
    up_counter: torch.Tensor
    down_counter: torch.Tensor
    up_flag: torch.Tensor
    down_flag: torch.Tensor
    best_l1: torch.Tensor
    early_best: torch.Tensor
    early_counter: torch.Tensor
    epochs: torch.Tensor

    @classmethod
    def new(cls, n: int, cost: float = 0.0):
        z = lambda: torch.zeros(n, dtype=torch.long)  # noqa: E731
        f = lambda: torch.zeros(n, dtype=torch.bool)  # noqa: E731
        inf = torch.full((n,), math.inf)
        return cls(torch.full((n,), float(cost)), z(), z(), z(), f(), f(), inf.clone(), inf.clone(), z(), z())


def reverse_engineer(model, x: torch.Tensor, labels, schedule: Schedule, *, generator: torch.Generator,
                     init: tuple[torch.Tensor, torch.Tensor] | None = None, init_cost: torch.Tensor | None = None,
                     on_epoch=None, channels_last: bool = False,
                     max_images: int | None = MAX_IMAGES) -> list[LabelSearch]:
    """Run the Neural Cleanse search for each label in ``labels``, all at once (see module doc).

    ``x``: the inputs to stamp (N, C, H, W) in [0, 1], on the model's device; mini-batches are
    drawn from it without replacement, reshuffled every pass, by ``generator`` (the same
    mini-batch serves every label of the chunk).
    ``init``: optional starting (masks (L,H,W), patterns (L,C,H,W)) instead of the schedule's
    initialisation, to continue an earlier search (Adam moments restart; the cost continues from
    ``init_cost`` if given, else follows the usual start at 0).
    ``on_epoch(n_active)``: called after every epoch (progress display).
    ``channels_last``: see :func:`stamp` (the caller converts the model).
    ``max_images``: at most this many stamped inputs per forward pass (labels are taken in groups of
    ``max_images // batch_size``); None: all labels of the chunk in one pass. It bounds the memory
    of the autograd graph and does not change the result: every label's loss, gradient and Adam
    step are its own (checked bit for bit against one pass on the CSAW net and the lab's nets).
    """
    labels = [int(t) for t in labels]
    L = len(labels)
    if L == 0:
        return []
    C, H, W = x.shape[1:]
    device = x.device
    s = schedule
    start = time.perf_counter()

    if init is not None:
        mask0, pattern0 = init[0].to(device).float(), init[1].to(device).float()
    else:
        if s.mask_init == "random":
            mask0 = torch.rand(L, H, W, generator=generator).to(device)
        else:
            mask0 = torch.full((L, H, W), float(s.mask_init), device=device)
        pattern0 = torch.rand(L, C, H, W, generator=generator).to(device)
    mask_w, pattern_w = to_tanh_space(mask0), to_tanh_space(pattern0)
    # Adam moments and per-row step counts (rows = labels still active)
    m1 = [torch.zeros_like(mask_w), torch.zeros_like(pattern_w)]
    m2 = [torch.zeros_like(mask_w), torch.zeros_like(pattern_w)]
    adam_t = 0

    st = _State.new(L)
    if init_cost is not None:
        # a continued search has already found its cost: skip the "start at 0" phase. As in the
        # original code, the early stop waits until the cost has moved both ways, in this search
        st.cost = init_cost.clone().float()
    best_mask = from_tanh_space(mask_w).detach().clone()
    best_pattern = from_tanh_space(pattern_w).detach().clone()
    last_mask, last_pattern = best_mask.clone(), best_pattern.clone()
    finished_epochs = torch.zeros(L, dtype=torch.long)
    active = torch.arange(L)  # indices (into 0..L-1) of the labels still searching
    targets_all = torch.tensor(labels, device=device)

    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    b1, b2 = s.betas
    for epoch in range(s.max_epochs):
        n = len(active)
        sum_acc = torch.zeros(n)
        cost_dev = st.cost[active].to(device)
        targets = targets_all[active.to(device)]
        for _ in range(s.steps_per_epoch):
            if cursor + s.batch_size > len(x):
                order = torch.randperm(len(x), generator=generator)
                cursor = 0
            xb = x[order[cursor:cursor + s.batch_size].to(device)]
            cursor += s.batch_size
            B = len(xb)
            # the labels' losses are independent, so their gradients can be taken a group of labels at a
            # time (at most max_images stamped inputs per forward pass): the same numbers, less memory
            group = n if max_images is None else max(1, max_images // B)
            parts = []
            for lo in range(0, n, group):
                hi = min(n, lo + group)
                mw = (mask_w if hi - lo == n else mask_w[lo:hi]).detach().requires_grad_(True)
                pw = (pattern_w if hi - lo == n else pattern_w[lo:hi]).detach().requires_grad_(True)
                masks, patterns = from_tanh_space(mw), from_tanh_space(pw)
                logits = model(stamp(xb, masks, patterns, channels_last))
                ce = F.cross_entropy(logits, targets[lo:hi].repeat_interleave(B), reduction="none").view(hi - lo, B)
                l1 = masks.flatten(1).sum(1)
                loss = (ce.mean(1) + cost_dev[lo:hi] * l1).sum()
                g = torch.autograd.grad(loss, (mw, pw))
                with torch.no_grad():
                    parts.append((*g, (logits.argmax(1).view(hi - lo, B) == targets[lo:hi, None]).float().mean(1)))
                del logits, ce, loss, masks, patterns, g
            gm, gp, hit = (p[0] for p in zip(*parts)) if len(parts) == 1 else (torch.cat(p) for p in zip(*parts))
            with torch.no_grad():
                adam_t += 1
                for i, (w, g) in enumerate(((mask_w, gm), (pattern_w, gp))):
                    m1[i].mul_(b1).add_(g, alpha=1 - b1)
                    m2[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = s.lr / (1 - b1 ** adam_t)
                    w.sub_(step * m1[i] / ((m2[i] / (1 - b2 ** adam_t)).sqrt() + 1e-8))
            sum_acc += hit.cpu()
        avg_acc = sum_acc / s.steps_per_epoch
        with torch.no_grad():
            cur_mask = from_tanh_space(mask_w)
            cur_l1 = cur_mask.flatten(1).sum(1).cpu()
        finished_epochs[active] += 1
        ok = avg_acc >= s.attack_threshold

        # best trigger: the smallest mask at the end of a successful epoch
        improve = ok & (cur_l1 < st.best_l1[active])
        if improve.any():
            rows = improve.nonzero().flatten()
            idx = active[rows]
            best_mask[idx.to(device)] = cur_mask[rows.to(device)]
            best_pattern[idx.to(device)] = from_tanh_space(pattern_w[rows.to(device)]).detach()
            st.best_l1[idx] = cur_l1[rows]

        a = active
        # early stop (only once a successful trigger exists)
        has_best = torch.isfinite(st.best_l1[a])
        no_gain = st.best_l1[a] >= s.early_stop_threshold * st.early_best[a]
        st.early_counter[a] = torch.where(has_best & no_gain, st.early_counter[a] + 1,
                                          torch.where(has_best, torch.zeros_like(st.early_counter[a]),
                                                      st.early_counter[a]))
        st.early_best[a] = torch.minimum(st.best_l1[a], st.early_best[a])
        stop = (st.up_flag[a] & st.down_flag[a] & (st.early_counter[a] >= s.early_stop_patience)
                if s.early_stop else torch.zeros(len(a), dtype=torch.bool))

        # cost schedule (original): start at 0, set to init_cost after `patience` successes
        cost = st.cost[a]
        zero_ok = (cost == 0) & ok
        st.set_counter[a] = torch.where(zero_ok, st.set_counter[a] + 1, torch.zeros_like(st.set_counter[a]))
        do_set = st.set_counter[a] >= s.patience
        up = torch.where(ok, st.up_counter[a] + 1, torch.zeros_like(st.up_counter[a]))
        down = torch.where(ok, torch.zeros_like(st.down_counter[a]), st.down_counter[a] + 1)
        cost = torch.where(do_set, torch.full_like(cost, s.init_cost), cost)
        up = torch.where(do_set, torch.zeros_like(up), up)
        down = torch.where(do_set, torch.zeros_like(down), down)
        st.up_flag[a] &= ~do_set
        st.down_flag[a] &= ~do_set
        st.set_counter[a] = torch.where(do_set, torch.zeros_like(st.set_counter[a]), st.set_counter[a])
        go_up = up >= s.patience
        go_down = (~go_up) & (down >= s.patience)
        cost = torch.where(go_up, cost * s.cost_multiplier, cost)
        cost = torch.where(go_down, cost / s.cost_multiplier ** 1.5, cost)
        st.up_flag[a] |= go_up
        st.down_flag[a] |= go_down
        st.up_counter[a] = torch.where(go_up, torch.zeros_like(up), up)
        st.down_counter[a] = torch.where(go_down, torch.zeros_like(down), down)
        st.cost[a] = cost

        if stop.any():
            rows = stop.nonzero().flatten()
            last_mask[a[rows].to(device)] = from_tanh_space(mask_w[rows.to(device)]).detach()
            last_pattern[a[rows].to(device)] = from_tanh_space(pattern_w[rows.to(device)]).detach()
            keep = (~stop).nonzero().flatten().to(device)
            mask_w, pattern_w = mask_w[keep].clone(), pattern_w[keep].clone()
            m1 = [m[keep].clone() for m in m1]
            m2 = [m[keep].clone() for m in m2]
            active = a[~stop]
        if on_epoch is not None:
            on_epoch(len(active))
        if len(active) == 0:
            break
    with torch.no_grad():
        if len(active):
            last_mask[active.to(device)] = from_tanh_space(mask_w)
            last_pattern[active.to(device)] = from_tanh_space(pattern_w)

    elapsed = time.perf_counter() - start
    steps = finished_epochs * s.steps_per_epoch
    total_steps = max(1, int(steps.sum()))
    results = []
    for i, t in enumerate(labels):
        ok = bool(torch.isfinite(st.best_l1[i]))
        # tanh(w) / (2 - eps) + 0.5 reaches -3e-8 in float32 where tanh saturates: a pixel is in [0, 1]
        mask = (best_mask[i] if ok else last_mask[i]).detach().cpu().clamp(0, 1)
        pattern = (best_pattern[i] if ok else last_pattern[i]).detach().cpu().clamp(0, 1)
        results.append(LabelSearch(
            label=t, mask=mask, pattern=pattern, mask_l1=float(mask.sum()), succeeded=ok,
            epochs=int(finished_epochs[i]), steps=int(steps[i]), time_s=elapsed * int(steps[i]) / total_steps,
            cost=float(st.cost[i]), last_mask=last_mask[i].detach().cpu().clone(),
            last_pattern=last_pattern[i].detach().cpu().clone()))
    return results
