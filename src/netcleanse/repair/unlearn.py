"""Repair method ``unlearn``: :func:`netcleanse.unlearning.unlearn` with the scan's reversed triggers
(needs clean data): fine-tuning on clean data, part of it stamped with the triggers and kept at
its true labels."""

from __future__ import annotations

from ..pruning import FINE_TUNE_BATCH
from ..training import images_per_step
from ..unlearning import unlearn
from .base import MethodOutput, RepairJob, method


@method("unlearn")
def run(job: RepairJob) -> MethodOutput:
    clean, options = job.need_clean("unlearn"), job.options
    lr = options.lr_or(3e-3)
    model = unlearn(job.model, job.triggers, clean, fraction=options.fraction, epochs=options.epochs, lr=lr,
                    seed=options.seed, progress=options.progress, device=options.device)
    model.name = f"{job.model.name}_unlearned"
    table = [job.original, job.row("unlearned", model)]
    table[1]["clean_val_accuracy"] = None  # trained on it: its accuracy there says nothing
    return MethodOutput(model, table, settings=dict(
        fraction=options.fraction, epochs=options.epochs, lr=lr,
        images_per_pass=images_per_step(job.model, FINE_TUNE_BATCH), clean_classes=job.clean_classes()))
