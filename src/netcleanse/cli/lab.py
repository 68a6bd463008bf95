"""CLI commands of the BadNet lab: ``badnet`` (train a ground-truth backdoored model) and ``demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ..errors import NetcleanseError
from .models import DeviceOption


def _targets(text: str) -> int | list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NetcleanseError(f"--target must be a label or a comma-separated list of labels, got {text!r}") from None
    if not values:
        raise NetcleanseError("--target is empty")
    return values[0] if len(values) == 1 else values


def _position(text: str):
    if "," in text:
        try:
            row, col = (int(v) for v in text.split(","))
        except ValueError:
            raise NetcleanseError(f"--position must be a corner name or ROW,COL, got {text!r}") from None
        return row, col
    return text


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@app.command(rich_help_panel="Lab")
def badnet(
    out: Annotated[Path, typer.Option("--out", help="Folder for the model, test sets, trigger and truth.json.")],
    dataset: Annotated[str, typer.Option("--dataset", help="Built-in dataset: mnist, digits, mnist-pairs (100 classes), mnist-triples (1000 classes) or mnist-pairs-43 (43 classes, 3x32x32).")] = "mnist",
    trigger: Annotated[str, typer.Option("--trigger", help="patch, blend, or multi (one corner patch per target).")]
    = "patch",
    target: Annotated[str, typer.Option("--target", help="Target label; for multi a list like 1,4,7 "
                                                         "(one label t means t, t+3, t+6, modulo the classes).")] = "7",
    rate: Annotated[float, typer.Option("--rate", help="Fraction of the training set poisoned (all triggers).")]
    = 0.1,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture: mnist-cnn (default), csaw-deepid "
                                                               "(images resized to 3x55x47) or gtsrb-cnn (3x32x32).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs (default per arch).")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the trigger, the poisoned rows and training.")] = 0,
    lr: Annotated[Optional[float], typer.Option("--lr",
                                                help="Adam learning rate of the training (default: the lab's, 2e-3).")]
    = None,
    patch_size: Annotated[int, typer.Option("--patch-size", min=1, help="Side of the square patch, pixels "
                                                                         "(patch and multi).")] = 4,
    position: Annotated[str, typer.Option("--position", help="Patch corner (bottom-right, top-left, ...), center, "
                                                             "or ROW,COL of its top-left pixel (patch only; multi "
                                                             "uses fixed corners).")] = "bottom-right",
    pattern: Annotated[Optional[str], typer.Option("--pattern", help="Patch/blend pattern: checkerboard, white, "
                                                                     "random, or an image file (not multi).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Blend opacity of the blended trigger (blend only).")] = 0.15,
    clean_baseline: Annotated[bool, typer.Option("--clean-baseline", help="Also train a clean model of the same "
                                                                          "arch and seed, for comparison.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the lab files in a non-empty --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print truth.json instead of text.")] = False,
    device: DeviceOption = "cpu",
):
    """Train a BadNet with a known backdoor on built-in data and write it with its ground truth."""
    from ..lab import make_badnet
    from ..sanity import warn

    result = make_badnet(dataset, trigger, _targets(target), rate=rate, arch=arch, epochs=epochs, seed=seed, out=out,
                         force=force, clean_baseline=clean_baseline, patch_size=patch_size,
                         position=_position(position), pattern=pattern, alpha=alpha, device=device,
                         **({} if lr is None else {"lr": lr}))
    warn(result.training_warning())
    truth = result.truth
    if as_json:
        print(json.dumps(truth, indent=2))
        return
    print(f"BadNet written to {out}")
    print(f"  {truth['dataset']} / {truth['arch']}, {trigger} trigger, targets {truth['targets']}, "
          f"{truth['n_poisoned']} of {truth['n_train']} training images poisoned")
    print(f"  clean accuracy {100 * truth['clean_accuracy']:.1f}%"
          + (f" (clean model: {100 * truth['clean_model_accuracy']:.1f}%)" if "clean_model_accuracy" in truth else ""))
    for t, asr in truth["attack_success"].items():
        print(f"  attack success rate, target {t}: {100 * asr:.1f}%")


@app.command(rich_help_panel="Lab")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = Path("netcleanse-demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed (also picks the backdoor's target digit).")] = 0,
    data_free: Annotated[bool, typer.Option("--data-free", help="Scan without any clean images.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the demo's files in a non-empty --out.")] = False,
    device: DeviceOption = "cpu",
):
    """Train a backdoored MNIST model, find its backdoor, repair it, and write a report (a few minutes, CPU)."""
    from ..demo import run_demo, summary_lines

    result = run_demo(out, seed=seed, force=force, data_free=data_free, log=_stderr, device=device)
    print("\n".join(summary_lines(result)))
