"""Repair method ``disagree``: :func:`netcleanse.guard.disagreement_guard` between the original and
its fine-pruned version (needs clean data): a guarded N+1 classifier answering N where they disagree."""

from __future__ import annotations

from ..guard import disagreement_guard
from .base import MethodOutput, RepairJob, method
from .fine_prune import prune


@method("disagree")
def run(job: RepairJob) -> MethodOutput:
    pruned = prune(job, "disagree")
    guarded = disagreement_guard(job.model, pruned.model)
    settings = dict(pruned.settings, repaired_model=pruned.model.name)
    table = [job.original, dict(job.row("fine-pruned", pruned.model, job.clean), drop_threshold=pruned.chosen),
             job.row("guarded (disagree)", guarded, job.clean)]
    return MethodOutput(guarded, table, pruned.curve, settings)
