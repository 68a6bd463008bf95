"""How natural are a data-free scan's inputs? The planted trigger's flip rate on them, per synthesis variant.

    python benchmarks/data_free_flips.py zoo [--split dev] [--datasets mnist] [--n 328] [--seed 0]

For every backdoored model of a BadNet-lab zoo (``benchmarks/zoo.py``) whose attack was learned, it
synthesises data-free inputs as a scan does (:func:`netcleanse.synthesis.synthesize_inputs`: smooth
noise inverted towards distinct random classes) under a few variants of the inversion, stamps each
planted trigger (the zoo's ``triggers.npz``) on the inputs the model does not already give its target,
and prints the fraction that then go to the target (for several targets: the weakest one's), beside
the same fraction on the model's real clean test images and the inputs' median logit margin
(top-1 minus top-2). A planted trigger flips 94-100 % of real images; the lower it is on the
synthesised inputs, the larger the reversed target trigger has to be there, and the less it stands
out from clean labels' triggers. Nothing here is a detection figure: it explains them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import load_member, read_zoo  # noqa: E402

from netcleanse import synthesis  # noqa: E402
from netcleanse.errors import NetcleanseError  # noqa: E402

# the inversion's keyword arguments per variant (synthesis.invert); "presets" is what a scan uses
VARIANTS = {
    "presets": {},
    "tv 0.2": {"tv_weight": 0.2},
    "tv 0.5": {"tv_weight": 0.5},
    "10 steps": {"steps": 10},
    "kept at p 0.9": {"confidence": 0.9},
}


def flip_rate(model, x: torch.Tensor, masks, patterns, targets) -> float:
    """The smallest over the planted triggers of the fraction of ``x`` (not already the trigger's
    target) that the stamped trigger sends to its target; nan when no input is left."""
    rates = []
    with torch.no_grad():
        pred = model(x).argmax(1)
        for m, p, t in zip(masks, patterns, targets):
            keep = pred != int(t)
            if not keep.any():
                return float("nan")
            stamped = (1 - m) * x[keep] + m * p
            rates.append((model(stamped).argmax(1) == int(t)).float().mean().item())
    return min(rates)


def median_margin(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        top = model(x).topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).median())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--split", choices=("dev", "eval", "all"), default="dev")
    ap.add_argument("--datasets", default="mnist", help="zoo datasets (comma-separated)")
    ap.add_argument("--n", type=int, default=328, help="inputs per model (a 10-label scan's n_opt + n_val)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        entries = [e for e in read_zoo(args.zoo) if e["backdoored"] and e["attack_learned"]
                   and e["dataset"] in args.datasets.split(",") and args.split in ("all", e["split"])]
        if not entries:
            raise NetcleanseError(f"no learned backdoors of the {args.split} half in {args.zoo}")
        rates = {name: [] for name in ["real images", *VARIANTS]}
        margins = {name: [] for name in rates}
        for entry in entries:
            model, clean = load_member(args.zoo, entry, with_data=True)
            model.eval()
            with np.load(args.zoo / entry["folder"] / "triggers.npz") as trig:
                masks = torch.from_numpy(trig["masks"])[:, None]
                patterns, targets = torch.from_numpy(trig["patterns"]), trig["targets"]
            inputs = {"real images": clean.x[:args.n].float()}
            for name, kwargs in VARIANTS.items():
                gen = torch.Generator().manual_seed(args.seed)
                x0, targets_ = synthesis.inversion_start(model, args.n, gen)
                inputs[name] = synthesis.invert(model, x0, targets_, args.n, **kwargs)
            cells = []
            for name, x in inputs.items():
                rates[name].append(flip_rate(model, x, masks, patterns, targets))
                margins[name].append(median_margin(model, x))
                cells.append(f"{rates[name][-1]:.2f}")
            print(f"{entry['folder']:<22} {entry['kind']:<6} " + " ".join(cells), flush=True)
    except NetcleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{len(entries)} learned backdoors ({args.split} half, {args.datasets}); weakest planted trigger's flip rate")
    print(f"{'inputs':<16} {'median':>7} {'mean':>6} {'<= 0.5':>7} {'no input left':>14} {'logit margin':>13}")
    for name in rates:
        r = np.array(rates[name])
        ok = r[~np.isnan(r)]
        cells = f"{np.median(ok):7.2f} {ok.mean():6.2f}" if len(ok) else f"{'n/a':>7} {'n/a':>6}"
        print(f"{name:<16} {cells} {int((ok <= 0.5).sum()):4d}/{len(ok):<3d}"
              f"{int(np.isnan(r).sum()):14d} {np.median(margins[name]):13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
