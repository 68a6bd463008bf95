"""Repair method ``filter``: :func:`netcleanse.guard.trigger_filter`, a guarded N+1 classifier built
from the reversed triggers (data-free; calibrated on clean data when given)."""

from __future__ import annotations

from ..guard import trigger_filter
from .base import MethodOutput, RepairJob, method


@method("filter")
def run(job: RepairJob) -> MethodOutput:
    options = job.options
    guarded = trigger_filter(job.model, job.triggers, job.clean, top_fraction=options.top_fraction,
                             quantile=options.quantile, seed=options.seed, device=options.device)
    settings = dict(guarded.settings, thresholds=guarded.detector.thresholds, neurons=guarded.detector.neurons)
    return MethodOutput(guarded, [job.original, job.row("guarded (filter)", guarded, job.clean)], settings=settings)
