"""Repair method ``fine-prune``: :func:`netcleanse.pruning.fine_prune` (needs clean data); the result
is the pruned model of the largest accuracy-drop threshold not above ``select_drop``, the other
thresholds' models are saved beside it."""

from __future__ import annotations

from dataclasses import dataclass

from ..classifier import Classifier
from ..pruning import FINE_TUNE_BATCH, FinePruning, fine_prune
from ..training import images_per_step
from .base import MethodOutput, RepairJob, method


@dataclass
class Pruned:
    """Fine-pruning's run, the chosen threshold and its model, the curve and the settings to record."""

    pruning: FinePruning
    chosen: float
    model: Classifier
    curve: list[dict]
    settings: dict


def prune(job: RepairJob, name: str) -> Pruned:
    """Fine-prune ``job.model`` on the clean data and pick the result (shared with ``disagree``)."""
    clean, options = job.need_clean(name), job.options
    lr = options.lr_or(1e-3)
    pruning = fine_prune(job.model, clean, layer=options.layer, drops=options.drops, test_clean=job.test_clean,
                         test_poisoned=job.poisoned_sets or job.test_poisoned, target=job.target,
                         fine_tune_epochs=options.fine_tune_epochs, lr=lr, seed=options.seed,
                         progress=options.progress, device=options.device)
    reached = sorted(pruning.saved)
    eligible = [d for d in reached if d <= options.select_drop]
    chosen = eligible[-1] if eligible else reached[0]
    pruned = pruning.saved[chosen]
    pruned.name = f"{job.model.name}_pruned{chosen:g}"
    curve = [dict(pruning.baseline, channel=None)] + pruning.curve
    settings = dict(layer=pruning.layer, drops=sorted(float(d) for d in options.drops),
                    select_drop=float(options.select_drop), chosen_drop=chosen,
                    fine_tune_epochs=options.fine_tune_epochs, lr=lr, pruning_order=pruning.order)
    if not eligible:  # every saved model lost more than select_drop: the least pruned one is the result
        settings["warnings"] = [f"no saved model lost at most {options.select_drop:g} points of validation accuracy "
                                f"(the thresholds reached: {', '.join(f'{d:g}' for d in reached)}); the result is "
                                f"the {chosen:g}-point model"]
    if options.fine_tune_epochs > 0:
        settings["images_per_pass"] = images_per_step(job.model, FINE_TUNE_BATCH)
        settings["clean_classes"] = job.clean_classes()
    return Pruned(pruning, chosen, pruned, curve, settings)


@method("fine-prune")
def run(job: RepairJob) -> MethodOutput:
    pruned = prune(job, "fine-prune")
    saved = {f"pruned_drop{threshold:g}": model for threshold, model in pruned.pruning.saved.items()
             if threshold != pruned.chosen}
    table = [dict(job.original, drop_threshold=0.0, channels_pruned=0, fraction_pruned=0.0)] + \
        [dict(row, model=f"pruned_drop{row['drop_threshold']:g}") for row in pruned.pruning.table]
    return MethodOutput(pruned.model, table, pruned.curve, pruned.settings, saved, row=f"pruned_drop{pruned.chosen:g}")
