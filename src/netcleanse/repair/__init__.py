"""Repair after a scan: one entry point, :func:`repair`, over a registry of methods, one module each.

* ``fine-prune`` (:mod:`.fine_prune`): :func:`netcleanse.pruning.fine_prune` (needs clean data);
* ``unlearn`` (:mod:`.unlearn`): :func:`netcleanse.unlearning.unlearn` with the scan's reversed
  triggers (needs clean data);
* ``filter`` (:mod:`.filter`): :func:`netcleanse.guard.trigger_filter`, a guarded N+1 classifier
  built from the reversed triggers (data-free; calibrated on clean data when given);
* ``disagree`` (:mod:`.disagree`): :func:`netcleanse.guard.disagreement_guard` between the
  original and its fine-pruned version (needs clean data).

A method is a function of a :class:`~.base.RepairJob` registered with ``@register_method(name)``
(:mod:`.base`); its settings live in one frozen :class:`RepairOptions`. Every repair returns a
:class:`RepairResult` (:mod:`.result`); ``save(dir)`` writes ``repair.json`` (settings, the table,
the fine-pruning curve, the measured numbers) and the models: ``repaired.pt`` and Keras-compatible
``repaired.h5`` for weight repairs (plus one pair per fine-pruning threshold), ``guarded.pt`` for
guards.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace

from ..data import Dataset, as_dataset
from ..errors import NetcleanseError
from ..classifier import Classifier, as_classifier
from .base import REGISTRY, MethodOutput, RepairJob, RepairOptions, method as register_method
from .inputs import check_scan_model, concat, scan_triggers
from .result import RepairResult
from ..utils import resolve_device

# importing the method modules registers them, in this order (the order of --method's choices)
from . import fine_prune as _fine_prune, unlearn as _unlearn, filter as _filter, disagree as _disagree  # noqa: E402,F401,I001

METHODS = tuple(REGISTRY)  # ("fine-prune", "unlearn", "filter", "disagree")

__all__ = ["METHODS", "MethodOutput", "RepairJob", "RepairOptions", "RepairResult", "concat", "register_method",
           "repair", "scan_triggers"]

_OPTION_NAMES = frozenset(f.name for f in fields(RepairOptions))


def repair(model: Classifier, scan_result, method: str, clean: Dataset | None = None, *,
           options: RepairOptions | None = None, test_clean: Dataset | None = None, test_poisoned=None,
           target: int | None = None, **settings) -> RepairResult:
    """Repair ``model`` with ``method`` using the scan's findings and (where needed) clean data.

    ``clean``: labelled clean validation data (fine-pruning's ranking and saves, unlearning's
    training set, the filter's calibration). ``test_clean`` / ``test_poisoned`` (one Dataset
    or several, e.g. one per target) and ``target``: optional test sets that fill the table's
    accuracy and ASR columns; they are never used to build the repair.

    ``options``: a :class:`RepairOptions`; any of its fields may also be given as a keyword
    (``repair(..., epochs=5)``), which overrides it: ``drops``, ``layer``, ``select_drop``,
    ``fine_tune_epochs``, ``lr``, ``epochs``, ``fraction``, ``quantile``, ``top_fraction``,
    ``seed``, ``progress``, ``device``.
    ``select_drop``: for fine-pruning (and ``disagree``), which saved model becomes the result:
    the one of the largest threshold not above it (Liu et al. prune until about 4 points are lost).
    ``lr``: Adam learning rate of fine-tuning (default 1e-3) and unlearning (default 3e-3).
    Unlearning defaults (half the clean set stamped, 10 epochs, lr 3e-3) were chosen on the lab's
    patch BadNet, where Neural Cleanse's 20% / few epochs left much of the backdoor (see README).
    ``device``: where the repair computes, "cpu" (default) or "cuda"; the repaired or guarded model
    comes back on the CPU, so its files load on any machine.
    """
    unknown = sorted(set(settings) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"repair() got an unexpected keyword argument {unknown[0]!r}")
    options = replace(options or RepairOptions(), **settings)
    run = REGISTRY.get(method)
    if run is None:
        raise NetcleanseError(f"unknown repair method {method!r}; use one of {', '.join(REGISTRY)}")
    resolve_device(options.device)
    as_classifier(model)
    for data, what in ((clean, "clean data"), (test_clean, "clean test data")):
        if data is not None:
            as_dataset(data, what)
    if target is not None and not test_poisoned:  # (eval refuses it too: the target would be ignored)
        raise NetcleanseError("a target was given without poisoned test data (--test-poisoned) to measure it on")
    started = time.perf_counter()
    sets = [] if test_poisoned is None or isinstance(test_poisoned, Dataset) else list(test_poisoned)
    test_poisoned = concat(test_poisoned)
    if scan_result is not None:
        check_scan_model(scan_result, model)
    triggers = scan_triggers(scan_result) if scan_result is not None else {}
    job = RepairJob(model, triggers, clean, options, test_clean, test_poisoned, target, poisoned_sets=sets)
    job.original = job.row("original", model, clean)
    out = run(job)
    covered = out.settings.get("clean_classes")
    if covered is not None and covered < model.num_classes:
        out.settings.setdefault("warnings", []).append(
            f"the clean data holds images of {covered} of the model's {model.num_classes} classes; training on it "
            "can make the repaired model forget the others: check its clean accuracy on a test set of every class")
    recorded = {"seed": options.seed, "device": options.device, **out.settings,
                "test_sets": {"clean": getattr(test_clean, "source", None),
                              "poisoned": getattr(test_poisoned, "source", None), "target": target}}
    return RepairResult(out.model, method, out.table, out.curve, sorted(triggers), recorded, out.saved,
                        round(time.perf_counter() - started, 3),
                        result_row=out.row or (out.table[-1].get("model") if out.table else None))
