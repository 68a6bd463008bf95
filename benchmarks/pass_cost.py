"""Per-pass cost: images/second of one trigger-search step (stamp, forward, input gradient) of a net,
at the fast preset's refinement batch shape (48 labels x 8 inputs = 384 images), under several
CPU execution settings, all measured in ONE run so that their ratios are comparable:

* ``nchw``: plain contiguous (NCHW) model and inputs;
* ``channels_last``: the scan's setting today (model and stamped inputs channels-last): the baseline;
* ``compile``: ``torch.compile`` of the channels-last model (inductor; compile time reported apart);
* ``bf16``: bfloat16 autocast around the forward pass (channels-last), logits back in float32;
* ``threads=1``: channels-last with one torch thread instead of ``--threads``.

Each setting is timed for ``--reps`` passes after ``--warmup`` passes (best of ``--rounds``
rounds, interleaved so that load on a shared machine hits every setting alike), and printed with
its ratio to ``channels_last`` measured in the same run.

Accuracy: each setting's mask/pattern gradients are compared with the float32 channels-last ones
(relative L2 error), and a short search (``--search-steps`` steps of the refinement schedule on
``--search-labels`` labels, from the same start and random numbers) is run under each setting;
its per-label mask L1 is compared with the baseline's (largest relative difference, and whether
the labels rank the same). Settings that change the arithmetic (compile, bf16) cannot give
bit-identical scans; the scan keeps them only if they are both faster and within tolerance.

    python benchmarks/pass_cost.py [--model PATH] [--arch csaw-deepid] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import netcleanse
from netcleanse.neural_cleanse import from_tanh_space, reverse_engineer, stamp, to_tanh_space
from netcleanse.presets import PRESETS
from netcleanse.synthesis import smooth_noise
from netcleanse.utils import write_json_atomic

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "csaw" / "models" / "sunglasses_bd_weights.h5"


class Bf16(torch.nn.Module):
    """The wrapped model's forward pass under CPU bfloat16 autocast, logits returned as float32."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.net(x)
        return out.float()


def one_pass(model, x, mask_w, pattern_w, targets, channels_last):
    """One step's work of :func:`netcleanse.neural_cleanse.reverse_engineer` without the Adam update."""
    mw, pw = mask_w.detach().requires_grad_(True), pattern_w.detach().requires_grad_(True)
    masks, patterns = from_tanh_space(mw), from_tanh_space(pw)
    logits = model(stamp(x, masks, patterns, channels_last))
    n, B = len(masks), len(x)
    ce = F.cross_entropy(logits, targets.repeat_interleave(B), reduction="none").view(n, B).mean(1)
    loss = (ce + 1e-3 * masks.flatten(1).sum(1)).sum()
    return torch.autograd.grad(loss, (mw, pw))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--arch", default="csaw-deepid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--labels", type=int, default=48, help="labels per pass (the refinement's chunk)")
    ap.add_argument("--batch", type=int, default=8, help="inputs per label (the refinement's batch)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--search-labels", type=int, default=24)
    ap.add_argument("--search-steps", type=int, default=60)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    for name in ("threads", "labels", "batch", "reps", "rounds", "search_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.search_labels <= args.labels:
        ap.error(f"--search-labels must be between 1 and --labels ({args.labels})")
    if not args.model.exists():
        print(f"model not found: {args.model}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = netcleanse.load_model(args.model, arch=args.arch)
    C, H, W = model.input_shape
    gen = torch.Generator().manual_seed(0)
    base = copy.deepcopy(model).eval().requires_grad_(False)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    x = smooth_noise(model.input_shape, args.batch, gen)
    labels = torch.randperm(model.num_classes, generator=gen)[:args.labels]
    mask_w = to_tanh_space(torch.full((args.labels, H, W), 0.05))
    pattern_w = to_tanh_space(torch.rand(args.labels, C, H, W, generator=gen))

    # setting -> (model, channels_last, threads)
    settings = {"channels_last": (cl, True, args.threads), "nchw": (base, False, args.threads),
                f"threads={1 if args.threads != 1 else 2}": (cl, True, 1 if args.threads != 1 else 2),
                "bf16": (Bf16(cl), True, args.threads)}
    compile_s = None
    if not args.no_compile:
        try:
            compiled = torch.compile(cl)
            t = time.perf_counter()
            one_pass(compiled, x, mask_w, pattern_w, labels, True)
            compile_s = time.perf_counter() - t
            settings["compile"] = (compiled, True, args.threads)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    images = args.labels * args.batch
    best: dict[str, float] = {}
    for name, (net, channels_last, threads) in settings.items():  # warm-up
        torch.set_num_threads(threads)
        for _ in range(args.warmup):
            one_pass(net, x, mask_w, pattern_w, labels, channels_last)
    for _ in range(args.rounds):
        for name, (net, channels_last, threads) in settings.items():
            torch.set_num_threads(threads)
            t = time.perf_counter()
            for _ in range(args.reps):
                one_pass(net, x, mask_w, pattern_w, labels, channels_last)
            rate = images * args.reps / (time.perf_counter() - t)
            best[name] = max(best.get(name, 0.0), rate)
    torch.set_num_threads(args.threads)

    # accuracy: gradients of one pass and a short search, against float32 channels-last
    ref_g = one_pass(cl, x, mask_w, pattern_w, labels, True)
    s = PRESETS["fast"].refine.schedule
    short = s.__class__(**{**s.to_dict(), "max_epochs": args.search_steps, "betas": tuple(s.betas)})
    x_opt = smooth_noise(model.input_shape, 256, torch.Generator().manual_seed(1))
    search_labels = labels[:args.search_labels].tolist()
    init = (torch.full((len(search_labels), H, W), 0.05), torch.rand(len(search_labels), C, H, W, generator=gen))
    cost = torch.full((len(search_labels),), s.init_cost)

    def search(net, channels_last):
        found = reverse_engineer(net, x_opt, search_labels, short, generator=torch.Generator().manual_seed(2),
                                 init=init, init_cost=cost, channels_last=channels_last)
        return np.array([f.mask_l1 for f in found])

    ref_l1 = search(cl, True)
    out = {"model": str(args.model), "threads": args.threads, "images_per_pass": images,
           "torch": torch.__version__, "compile_s": compile_s, "load_avg": os.getloadavg(), "settings": {}}
    print(f"{args.model.name}: {images} images per pass ({args.labels} labels x {args.batch}), torch "
          f"{torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    if compile_s is not None:
        print(f"torch.compile: first pass (compilation) {compile_s:.1f} s")
    print(f"{'setting':15s} {'images/s':>9s} {'ratio':>6s} {'grad rel err':>12s} {'mask L1 max rel diff':>21s} "
          f"{'same ranking':>12s}")
    for name, (net, channels_last, threads) in settings.items():
        torch.set_num_threads(threads)
        g = one_pass(net, x, mask_w, pattern_w, labels, channels_last)
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(g, ref_g))
        l1 = search(net, channels_last)
        rel = float(np.max(np.abs(l1 - ref_l1) / np.maximum(ref_l1, 1e-9)))
        same_rank = bool((np.argsort(l1, kind="stable") == np.argsort(ref_l1, kind="stable")).all())
        ratio = best[name] / best["channels_last"]
        out["settings"][name] = {"images_per_s": best[name], "ratio": ratio, "grad_rel_err": err,
                                 "search_mask_l1_max_rel_diff": rel, "search_same_ranking": same_rank}
        print(f"{name:15s} {best[name]:9.0f} {ratio:6.2f} {err:12.2e} {rel:21.2e} {str(same_rank):>12s}")
    torch.set_num_threads(args.threads)
    if args.json:
        write_json_atomic(args.json, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
