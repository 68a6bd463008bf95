"""Scan a classifier for backdoors: reverse-engineer a trigger per label, flag the outliers.

:func:`scan` runs Neural Cleanse (:mod:`netcleanse.neural_cleanse`) over the labels and the MAD
outlier test (:mod:`netcleanse.detection`), on the user's clean data or, data-free, on inputs it
synthesises (:mod:`netcleanse.synthesis`). Two presets (:mod:`netcleanse.presets`):

``reference``
    The original protocol: one label at a time, Adam(lr 0.1, betas 0.5/0.9), mini-batches of 32,
    31 mini-batches per epoch, up to 1000 epochs, cost schedule and early stop as in the original
    code. Every label is searched to convergence; median and MAD over all labels.

``fast`` (default)
    0. Inputs: 256 to optimise on, 128 held back for the attack success rate.
    1. Coarse pass: every label, 96 labels per forward pass, 4 inputs per step, at most 24 steps,
       the same cost schedule with a patience of 2 steps, masks starting small (0.05); each
       trigger's attack success on 32 of the held-back inputs.
    2. Refinement: the candidates (the 16 labels with the smallest coarse masks, plus any other
       label whose coarse anomaly index is above the threshold, 64 at most) and a random control
       sample of 48 labels drawn from all labels continue from where the coarse pass left them
       for up to 300 more steps of 8 inputs (patience 3, early stop after 100 steps without
       improvement). Shorter refinement left the controls unconverged and widely spread (MAD
       up to 200 on the CSAW nets), which hid real targets.
    3. Detection: labels optimised longer get smaller masks, so refined candidates are compared
       only with labels refined the same way: the median and MAD come from the random controls
       (an unbiased sample of all labels at the same budget). Labels that were not refined get
       their paper's index from the coarse pass's median/MAD over all labels, and cannot be flagged.
    With few labels (:meth:`~netcleanse.presets.Preset.few_labels`: up to 21 with ``fast``, while
    refining them all costs no more than the largest many-labels refinement), every label is
    refined, on 200 inputs with a longer schedule (``few_labels_refine``: up to 200 epochs of
    2 x 32 inputs), and the index is the paper's (median/MAD over all labels); each label's
    expected transferability (:mod:`netcleanse.transferability`) is measured on the scan's
    inputs for the test (threshold ``few_labels_data_transfer``, data-free
    ``few_labels_data_free_transfer``), and data-free every trigger search stops at attack
    success 0.5 (``few_labels_data_free_goal``). With more labels
    but no more than candidates + controls (64), every label is refined with step 2's schedule
    and the index is again over all labels.

Long scans persist every finished chunk of labels to ``out`` (``progress.jsonl`` + ``partial/``,
written atomically; :mod:`netcleanse.journal`), so an interrupted scan resumes with ``resume=True``
and gives the same result as an uninterrupted one with the same ``seed``.

The verdict comes from one of two rules, both always computed and recorded:

``calibrated`` (default)
    The model-level test of :mod:`netcleanse.calibrated`: log mask sizes, a null simulated for
    the model's number of labels and its reference, per-label p-values corrected for the number
    of labels, step-down for several targets. A model without a backdoor is flagged with
    probability <= ``alpha`` (under the null model stated there).
``mad``
    The paper's rule (:mod:`netcleanse.detection`): anomaly index > ``threshold`` (2).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import scan_folder
from .classifier import as_classifier
from .data import Dataset, as_dataset
from .calibrated import calibrated_test
from .detection import anomaly_indices, flag_labels, index_ceiling, median_and_mad
from .errors import NetcleanseError, NetcleanseWarning
from .executor import Executor, LocalExecutor
from .journal import Journal, data_digest, lock_folder, prepare_out, weights_digest
from .margin import max_margins
from .neural_cleanse import MAX_IMAGES, Schedule, attack_success, reverse_engineer
from .passes import MEASURE_IMAGES, images_per_pass
from .presets import PRESETS, Preset, Stage, plan_of  # PRESETS, Preset, Stage: still importable from here
from .progress import progress_bar
from .sanity import OUTPUT_CHECK_IMAGES, check_outputs, output_check_runs
from .synthesis import (INVERSION_STEPS, INVERT_IMAGES, check_kind, inversion_parts, inversion_start, invert,  # noqa: F401
                        smooth_noise, synthesize_inputs)  # (smooth_noise, INVERSION_STEPS lived here)
from .transferability import MAX_IMAGES as TRANSFER_IMAGES, expected_transferability
from .trigger import Trigger
from .utils import resolve_device

FORMAT_VERSION = scan_folder.FORMAT_VERSION
RULES = ("calibrated", "mad")


# ----------------------------------------------------------------------------------------------
# result


@dataclass
class ScanResult:
    """What a scan found. ``labels``: one dict per scanned label (see :meth:`to_dict`)."""

    labels: list[dict]
    flagged: list[int]
    threshold: float
    preset: str
    data: str
    elapsed_s: float
    model: dict
    settings: dict
    masks: np.ndarray = field(repr=False)  # (L, H, W) float32 in [0, 1], aligned with ``labels``
    patterns: np.ndarray = field(repr=False)  # (L, C, H, W)
    # the largest anomaly index any label could have got (an empty mask's); see detection.index_ceiling
    index_ceiling: float | None = None
    rule: str = "mad"  # which rule ``flagged`` and the verdict follow (scans before 0.2: always mad)
    alpha: float | None = None
    # the calibrated test (calibrated.TestResult.to_dict()) and the paper's rule's flags, whichever decided
    test: dict | None = None
    mad_flagged: list[int] | None = None

    @property
    def p_value(self) -> float | None:
        """The model-level p-value of the calibrated test (None for scans without it)."""
        return None if self.test is None else self.test.get("p_value")

    @property
    def verdict(self) -> str:
        """"backdoor-detected" (a label flagged), "inconclusive" (nothing flagged, but nothing could
        have been: the calibrated test had no power, or under the paper's rule the index ceiling is
        not above the threshold) or "none-detected"."""
        if self.flagged:
            return "backdoor-detected"
        if self.rule == "calibrated":
            return "inconclusive" if self.test and self.test.get("inconclusive") else "none-detected"
        if self.index_ceiling is not None and self.index_ceiling <= self.threshold:
            return "inconclusive"
        return "none-detected"

    def trigger(self, label: int) -> Trigger:
        for i, rec in enumerate(self.labels):
            if rec["label"] == int(label):
                return Trigger(torch.from_numpy(self.masks[i]), torch.from_numpy(self.patterns[i]))
        raise NetcleanseError(f"label {label} was not scanned")

    def record(self, label: int) -> dict:
        for rec in self.labels:
            if rec["label"] == int(label):
                return rec
        raise NetcleanseError(f"label {label} was not scanned")

    def to_dict(self) -> dict:
        return {"format": scan_folder.FORMAT, "version": FORMAT_VERSION, "verdict": self.verdict,
                "flagged": self.flagged, "rule": self.rule, "alpha": self.alpha, "p_value": self.p_value,
                "threshold": self.threshold, "index_ceiling": self.index_ceiling, "test": self.test,
                "mad_flagged": self.mad_flagged, "preset": self.preset, "data": self.data,
                "elapsed_s": self.elapsed_s, "model": self.model, "settings": self.settings, "labels": self.labels}

    def save(self, directory, all_images: bool = False, force: bool = False) -> Path:
        """Write the scan folder (:func:`netcleanse.scan_folder.write_scan`): masks.npz, the PNGs of
        the flagged labels (all with ``all_images``), ``triggers/`` (flagged labels) and, last,
        scan.json: a folder with scan.json holds a finished scan, and a scan interrupted while
        saving resumes instead. A folder that already holds a scan is refused unless ``force``;
        then the earlier scan's trigger images go (and its run files, unless it is this scan)."""
        d = Path(directory)
        if (d / scan_folder.SCAN_JSON).exists():
            if not force:
                raise NetcleanseError(f"{d} already holds a scan (scan.json); choose another folder or "
                                      "save(..., force=True) to replace it")
            scan_folder.clear_scan(d, keep_run=_same_record(d / scan_folder.SCAN_JSON, self.to_dict()))
        return scan_folder.write_scan(d, self.to_dict(), self.masks, self.patterns, all_images)

    @classmethod
    def load(cls, directory) -> "ScanResult":
        """The scan saved in ``directory`` (read by :func:`netcleanse.scan_folder.read_scan`)."""
        d = Path(directory)
        info, arrays = scan_folder.read_scan(d)
        masks, patterns = arrays.masks, arrays.patterns
        try:
            rows = [arrays.row[int(r["label"])] for r in info["labels"]]
        except KeyError:
            raise NetcleanseError(f"{d}: scan.json and masks.npz do not list the same labels") from None
        return cls(labels=info["labels"], flagged=info["flagged"], threshold=float(info.get("threshold", 2.0)),
                   preset=info.get("preset"), data=info.get("data"), elapsed_s=float(info.get("elapsed_s") or 0.0),
                   model=info.get("model") or {},
                   settings=info.get("settings") or {}, masks=masks[rows], patterns=patterns[rows],
                   index_ceiling=info.get("index_ceiling"), rule=info.get("rule", "mad"), alpha=info.get("alpha"),
                   test=info.get("test"), mad_flagged=info.get("mad_flagged", info["flagged"]))


def _same_record(path: Path, record: dict) -> bool:
    """Whether the scan.json at ``path`` records ``record`` (the same scan saved again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(record))
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# inputs


def label_ranges(text) -> list[tuple[int, int]]:
    """The ranges of a label list ``"0,5,7-9"`` -> [(0, 0), (5, 5), (7, 9)], its syntax checked (no
    model needed: a screen checks every entry's list before the first scan)."""
    if str(text).strip() == "":
        raise NetcleanseError("--labels is empty: give labels like 0,5,7-9, or leave the option out to scan all")
    ranges = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise NetcleanseError(f"bad label list {text!r}: use numbers and ranges like 0,5,7-9") from None
        ranges.append((lo, hi))
    return ranges


def parse_labels(text: str | None, num_classes: int) -> list[int] | None:
    """``"0,5,7-9"`` -> [0, 5, 7, 8, 9] (sorted, unique, checked against ``num_classes``); None
    (all labels) when no list is given. An empty list is an error, not "all labels"."""
    if text is None:
        return None
    out: set[int] = set()
    for lo, hi in label_ranges(text):
        # checked before a range is expanded, so that a huge one is refused, not allocated
        bad = lo if not 0 <= lo < num_classes else hi if not 0 <= hi < num_classes else None
        if bad is not None:
            raise NetcleanseError(f"label {bad} is out of range: the model has labels 0..{num_classes - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# the scan


def _chunk_seed(seed: int, stage: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{stage}/{index}".encode())


def _model_info(model) -> dict:
    info = {"name": model.name, "source": model.source, "arch": model.arch, "num_classes": model.num_classes,
            "input_shape": list(model.input_shape), "input_scale": model.input_scale}
    if getattr(model, "mean", None) is not None:  # recorded only when set: older scans resume unchanged
        info.update(mean=list(model.mean), std=list(model.std))
    return info


def check_decision(rule: str, alpha: float, threshold: float) -> None:
    """Refuse a decision setting no scan can use (an unknown rule, alpha outside (0, 1), a
    threshold that is not a positive number)."""
    if rule not in RULES:
        raise NetcleanseError(f"unknown rule {rule!r}; use one of: {', '.join(RULES)}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise NetcleanseError(f"threshold must be a positive number, got {threshold}")
    if not (math.isfinite(alpha) and 0 < alpha < 1):
        raise NetcleanseError(f"alpha must be a number between 0 and 1, got {alpha}")


def scan(model, data: Dataset | None = None, *, data_free: bool = False, labels=None, preset: str | Preset = "fast",
         rule: str = "calibrated", alpha: float = 0.05, threshold: float = 2.0, seed: int = 0, out=None,
         resume: bool = False, device: str = "cpu", progress: bool = True, save_all_images: bool = False,
         data_name: str | None = None, executor: Executor | None = None) -> ScanResult:
    """Reverse-engineer a trigger for each label of ``model`` and flag backdoor targets.

    Exactly one of ``data`` (clean inputs; labels not needed) and ``data_free=True``.
    ``labels``: the labels to scan (default all). ``preset``: a name in :data:`PRESETS`, or a
    :class:`Preset` (a variant, e.g. ``replace(PRESETS["fast"], inversion_confidence=0.9)``, recorded
    as preset "custom" with its whole plan). ``rule``: "calibrated" (model-level test at
    level ``alpha``) or "mad" (the paper's anomaly index > ``threshold``); see the module doc.
    ``out``: a folder for the results and for the progress of an unfinished scan; a non-empty
    folder is refused unless ``resume``.
    ``executor``: where the label chunks run (:mod:`netcleanse.executor`; default this process, e.g.
    ``RayExecutor(address)`` for a Ray cluster). The result does not depend on it: a chunk's random
    numbers come from (seed, stage, chunk index), and chunks are the same whichever executor runs
    them; a scan can be resumed with another executor.
    """
    start = time.perf_counter()
    as_classifier(model)
    if model.poison_label is not None:  # its answer N is the guard's, not a label a backdoor could target
        raise NetcleanseError(f"{model.name!r} is a guarded model (it answers {model.poison_label} for inputs it judges "
                              "poisoned); scan the model it guards instead (the original model file)")
    if data is not None:
        as_dataset(data, "clean data")
    plan = plan_of(preset)
    if isinstance(preset, Preset):  # a variant of a preset (benchmarks); recorded in full in the settings
        preset = "custom"
    if (data is None) == (not data_free):
        raise NetcleanseError("give exactly one of clean data or data_free=True")
    check_decision(rule, alpha, threshold)
    dev = resolve_device(device)
    labels = list(range(model.num_classes)) if labels is None else sorted({int(t) for t in labels})
    if not labels:
        raise NetcleanseError("no labels to scan")
    plan = plan.for_labels(len(labels), data_free=data is None)
    bad = [t for t in labels if not 0 <= t < model.num_classes]
    if bad:
        raise NetcleanseError(f"label {bad[0]} is out of range: the model has labels 0..{model.num_classes - 1}")
    if data is not None:
        model.check_input(data.x[:1])
        if len(data) < 2:
            raise NetcleanseError(f"{data.source}: a scan needs at least 2 clean images, got {len(data)}")
    data_desc = "data-free" if data is None else (data_name or data.source)
    softmax = check_outputs(model, OUTPUT_CHECK_IMAGES)
    checked = OUTPUT_CHECK_IMAGES if output_check_runs(model) else 0
    # the model's inputs: a wrong scale or normalisation makes every verdict meaningless (said before
    # the work, and kept in scan.json's warnings, so a screen's or notebook's scan says it too)
    from .sanity import check_preprocessing, one_class_note
    seen = {}
    preprocessing = check_preprocessing(model, data, device=device, seen=seen)
    # (a wrong preprocessing also lands the images on one class: that warning then says it all)
    one_class = None if preprocessing else one_class_note(model, seen.get("answers"))
    first_notes = [note for note in (softmax, preprocessing, one_class) if note]
    checked += seen["images"]
    for note in first_notes:
        warnings.warn(note, NetcleanseWarning, stacklevel=2)

    settings = {"preset": preset, "plan": plan.to_dict(), "seed": int(seed), "threshold": float(threshold),
                "rule": rule, "alpha": float(alpha),
                "labels_requested": labels if len(labels) < model.num_classes else "all",
                "data": data_desc, "device": dev.type, "torch_threads": torch.get_num_threads()}
    executor = executor or LocalExecutor()
    settings.update(executor.describe())

    out_dir = Path(out) if out is not None else None
    lock = None
    digest = weights_digest(model)  # (in scan.json too: a repair checks it is given a scan of its model)
    if out_dir is not None:
        # the resume key holds the content of the weights and data, not only their names
        prepare_out(out_dir, resume, settings, dict(_model_info(model), weights_sha256=digest,
                                                    data_sha256=None if data is None else data_digest(data)))
        if resume and (out_dir / scan_folder.SCAN_JSON).exists():
            return ScanResult.load(out_dir)  # already finished
        lock = lock_folder(out_dir)  # held until this function returns (or the process ends)
    journal = Journal(out_dir)

    work, channels_last = _working_copy(model, dev)
    # how many images a gradient pass may hold (memory only; :mod:`netcleanse.passes`)
    per_pass = images_per_pass(work, model.input_shape, dev, channels_last)
    settings["images_per_pass"] = min(MAX_IMAGES, per_pass)

    gen = torch.Generator().manual_seed(int(seed))
    results: dict[int, dict] = {}  # label -> record (latest stage)
    masks: dict[int, np.ndarray] = {}
    patterns: dict[int, np.ndarray] = {}

    bar = progress_bar(disable=None if progress else True)
    with bar:
        if data is None:
            x_all = data_free_inputs(work, plan.n_opt + plan.n_val, plan.data_free_inputs, gen, dev,
                                     plan.inversion_confidence, min(INVERT_IMAGES, per_pass), journal, bar,
                                     executor, channels_last)
            n_opt = plan.n_opt
        else:
            order = torch.randperm(len(data), generator=gen)
            n_val = min(plan.n_val, len(data) // 2)
            n_opt = min(plan.n_opt, len(data) - n_val)
            x_all = data.x[order[:n_opt + n_val]]
        x_opt, x_val = x_all[:n_opt].to(dev), x_all[n_opt:].to(dev)
        settings["n_opt"], settings["n_val"] = int(len(x_opt)), int(len(x_val))

        coarse = _run_stage(work, plan.coarse, labels, x_opt, x_val, journal, seed, bar, channels_last, dev,
                            executor=executor, per_pass=per_pass)
        for t, (rec, m, p, _, _) in coarse.items():
            results[t], masks[t], patterns[t] = rec, m, p

        refined: list[int] = []
        controls: list[int] = []
        candidates: list[int] = []
        if plan.refine is not None:
            if len(labels) <= plan.candidates + plan.controls:
                refined = candidates = controls = list(labels)
            else:
                def size(t):  # failed searches rank last
                    rec = coarse[t][0]
                    if not rec["succeeded"] and plan.rank_failed == "success":
                        return (1, -rec["attack_success"], t)
                    return (0 if rec["succeeded"] else 1, rec["mask_l1"], t)
                # the smallest coarse masks, and every label the coarse pass alone would flag, so that
                # no label is flagged on the coarse budget alone (up to max_candidates)
                coarse_index = dict(zip(labels, anomaly_indices([coarse[t][0]["mask_l1"] for t in labels])))
                ranked = sorted(labels, key=size)
                candidates = ranked[:plan.candidates] + [t for t in ranked[plan.candidates:]
                                                         if coarse_index[t] > threshold]
                candidates = sorted(candidates[:plan.max_candidates])
                rng = np.random.RandomState(_chunk_seed(seed, "controls", 0))
                controls = sorted(int(t) for t in rng.choice(labels, plan.controls, replace=False))
                refined = sorted(set(candidates) | set(controls))
            init = {t: (coarse[t][3], coarse[t][4], coarse[t][0]["cost"], coarse[t][0]["steps"],
                        coarse[t][0]["time_s"]) for t in refined}
            fine = _run_stage(work, plan.refine, refined, x_opt, x_val, journal, seed, bar, channels_last, dev,
                              init=init, executor=executor, per_pass=per_pass)
            for t, (rec, m, p, _, _) in fine.items():
                results[t], masks[t], patterns[t] = rec, m, p

        transfer_passes = None
        # the second signal, for every label the verdict tests (all, or the refined ones)
        tested = refined if refined and len(refined) < len(labels) else labels
        margins = label_margins(work, tested, seed, plan, dev, channels_last, journal, bar, executor, per_pass)
        for t in tested:
            results[t] = dict(results[t], max_margin=margins[t])
        if plan.transfer_threshold is not None:  # few labels (data-free, or with data if set): every label is tested
            transfer, transfer_passes = label_transferability(work, labels, torch.cat([x_opt, x_val]), seed, plan,
                                                              journal, bar, per_pass)
            for t in labels:
                results[t] = dict(results[t], transferability=transfer[t])

    # detection
    l1_all = np.array([results[t]["mask_l1"] for t in labels])
    if not np.isfinite(l1_all).all():
        bad = [t for t, v in zip(labels, l1_all) if not np.isfinite(v)]
        raise NetcleanseError(f"the trigger search of label {bad[0]} (and {len(bad) - 1} more) ended in NaN: the "
                              "model's outputs or gradients are not finite on these inputs; no verdict is possible")
    if refined and len(refined) < len(labels):
        ref_l1 = np.array([results[t]["mask_l1"] for t in controls])
        coarse_l1 = np.array([coarse[t][0]["mask_l1"] for t in labels])
        index = anomaly_indices(coarse_l1)  # non-refined labels: coarse budget vs coarse budget
        idx_ref = anomaly_indices(np.array([results[t]["mask_l1"] for t in refined]), reference=ref_l1)
        for t, a in zip(refined, idx_ref):
            index[labels.index(t)] = a
        med, mad = median_and_mad(ref_l1)
        settings["detection"] = {"scheme": "random controls", "candidates": candidates, "controls": controls,
                                 "median": med, "mad": mad}
        coarse_med, coarse_mad = median_and_mad(coarse_l1)
        settings["detection"].update(coarse_median=coarse_med, coarse_mad=coarse_mad)
        # flags come from the refined labels, scored against the controls (a label left unrefined has a
        # coarse index at or below the threshold unless more than max_candidates labels exceeded it)
        ceiling = index_ceiling(ref_l1)
        median_for = {t: med if t in refined else coarse_med for t in labels}
    else:
        index = anomaly_indices(l1_all)
        med, mad = median_and_mad(l1_all)
        settings["detection"] = {"scheme": "all labels", "median": med, "mad": mad}
        if plan.transfer_threshold is not None:
            settings["detection"]["transfer_threshold"] = plan.transfer_threshold
        ceiling = index_ceiling(l1_all, includes_labels=True)
        median_for = {t: med for t in labels}
    settings["passes"] = image_passes(plan, labels, coarse, {t: results[t] for t in refined}, tested,
                                      n_opt=len(x_opt), n_val=len(x_val), data_free=data is None,
                                      transfer=transfer_passes, probe=MEASURE_IMAGES, checks=checked)
    mad_flagged = flag_labels(labels, index, threshold)
    test = calibrated_test(*calibrated_inputs([results[t] for t in labels], settings["detection"]), alpha=alpha,
                           margins=tested_margins([results[t] for t in labels], settings["detection"]),
                           **tested_transfer([results[t] for t in labels], settings["detection"]))
    flagged = test.flagged if rule == "calibrated" else mad_flagged
    records = []
    for t, a in zip(labels, index):
        rec = dict(results[t])
        rec["anomaly_index"] = float(a)
        # the effect size beside the index's significance: how small the trigger is next to a typical label's
        rec["mask_l1_vs_median"] = rec["mask_l1"] / median_for[t] if median_for[t] > 0 else None
        rec["log_index"] = test.size_indices.get(t)  # the size's index (log scale); None: not testable
        rec["margin_index"] = test.margin_indices.get(t)  # the margin's index; None: not testable
        rec["test_index"] = test.indices.get(t)  # the index the calibrated test decides on
        rec["p_value"] = test.adjusted_p_values.get(t)  # the step-down's: never below the model's
        rec["flagged"] = t in flagged
        records.append(rec)

    empty = [t for t in flagged if results[t]["mask_l1"] < EMPTY_TRIGGER_L1]
    notes = []  # (warned now; the first notes were warned before the work)
    if empty:  # reached with no trigger at all: the model's default answer, which no search can pin on a backdoor
        notes.append(f"label {empty[0]} was flagged with an empty trigger (mask L1 {results[empty[0]]['mask_l1']:.2g}): "
                     f"the model answers it for the scan's inputs without any trigger (an untrained or collapsed "
                     f"model, a wrong preprocessing, or inputs unlike its training data); that is no evidence of a "
                     f"backdoor: check the model's accuracy on clean data (netcleanse eval)")
    if test.reference.get("margins_dropped"):
        notes.append("the test left out the maximum margins: no input could make most labels the model's answer "
                     "(an untrained or collapsed model, or a wrong preprocessing?); it decided on trigger sizes alone")
    for message in notes:
        warnings.warn(message, NetcleanseWarning, stacklevel=2)
    if first_notes or notes:
        settings["warnings"] = first_notes + notes
    result = ScanResult(labels=records, flagged=flagged, threshold=float(threshold), preset=preset,
                        data=data_desc, elapsed_s=0.0, model=dict(_model_info(model), weights_sha256=digest),
                        settings=settings,
                        masks=np.stack([masks[t] for t in labels]).astype(np.float32),
                        patterns=np.stack([patterns[t] for t in labels]).astype(np.float32),
                        index_ceiling=float(ceiling), rule=rule, alpha=float(alpha), test=test.to_dict(),
                        mad_flagged=mad_flagged)
    result.elapsed_s = round(journal.previous_elapsed + time.perf_counter() - start, 3)
    journal.close()
    if out_dir is not None:
        result.save(out_dir, all_images=save_all_images)
        shutil.rmtree(out_dir / "partial", ignore_errors=True)
        lock.close()
    return result


EMPTY_TRIGGER_L1 = 1.0  # a reversed mask smaller than one whole pixel: no trigger (scan's warning)


def image_passes(plan: Preset, labels, coarse: dict, refined: dict, tested, *, n_opt: int, n_val: int,
                 data_free: bool, transfer: dict | None = None, probe: int = 0, checks: int = 0) -> dict[str, int]:
    """What a scan cost, in images through the network (a machine-independent measure of its work):
    per stage, the forward + input-gradient passes (one image of one label's search, or of one
    margin start, per step) and the forward-only passes of the held-back attack-success check.

    coarse: label -> (record, ...) of the first stage; refined: label -> record after refinement
    (its ``steps`` include the first stage's); tested: the labels whose margins were computed;
    transfer: the transferability's own count (``backward``, ``forward``), if it was measured; probe: the
    images of the forward pass that measured the memory of a gradient pass (:mod:`netcleanse.passes`;
    built with autograd on, no backward); checks: the forward-only images of the checks that the model
    answers logits and is fed what it was trained on (:mod:`netcleanse.sanity`)."""
    def batch(stage: Stage) -> int:
        return min(stage.schedule.batch_size, n_opt)

    first = {t: int(coarse[t][0]["steps"]) for t in labels}
    out = {"synthesis": (n_opt + n_val) * INVERSION_STEPS if data_free and plan.data_free_inputs == "inversion" else 0,
           plan.coarse.name: sum(first.values()) * batch(plan.coarse)}
    if refined:
        out[plan.refine.name] = sum(int(rec["steps"]) - first[t] for t, rec in refined.items()) * batch(plan.refine)
    out["margin"] = len(tested) * plan.margin_restarts * plan.margin_steps
    if transfer is not None:
        out["transfer"] = int(transfer["backward"])
    if probe:
        out["memory_probe"] = int(probe)
    out["backward_total"] = sum(out.values())
    # the attack-success checks, and the margin search's last look at its inputs
    held_back = min(n_val, plan.coarse.held_back or n_val)
    out["forward_only"] = len(labels) * held_back + len(refined) * n_val + len(tested) * plan.margin_restarts
    if transfer is not None:
        out["forward_only"] += int(transfer["forward"])
    out["forward_only"] += int(checks)
    return out


def calibrated_inputs(records: list[dict], detection: dict) -> tuple[dict, list[int] | None, int]:
    """What the calibrated test runs on, from a scan's per-label records (``label``, ``mask_l1``)
    and its ``settings["detection"]``: (label -> mask L1 of the labels searched with the reference's
    budget, the reference labels or None for all, the number of labels scanned)."""
    if detection.get("scheme") == "random controls":
        refined = set(detection["candidates"]) | set(detection["controls"])
        return ({r["label"]: r["mask_l1"] for r in records if r["label"] in refined}, list(detection["controls"]),
                len(records))
    return {r["label"]: r["mask_l1"] for r in records}, None, len(records)


def tested_margins(records: list[dict], detection: dict) -> dict[int, float] | None:
    """The maximum margins (label -> ``max_margin``) of the labels :func:`calibrated_inputs` tests,
    or None when a scan did not record them (scans made before the margin was added: the test then
    uses the trigger size alone)."""
    tested = calibrated_inputs(records, detection)[0]
    margins = {r["label"]: r.get("max_margin") for r in records if r["label"] in tested}
    return None if any(v is None for v in margins.values()) else margins


def tested_transfer(records: list[dict], detection: dict) -> dict:
    """The transferability arguments of :func:`netcleanse.calibrated.calibrated_test` for a scan
    (``transfer``, ``transfer_threshold``): empty when the scan did not measure it."""
    threshold = detection.get("transfer_threshold")
    if threshold is None or any("transferability" not in r for r in records):
        return {}
    return {"transfer": {r["label"]: r["transferability"] for r in records}, "transfer_threshold": threshold}


def label_transferability(work, labels, x: torch.Tensor, seed: int, plan: Preset, journal: Journal | None = None,
                          bar=None, per_pass: int = TRANSFER_IMAGES) -> tuple[dict[int, float], dict]:
    """Each label's expected transferability (:mod:`netcleanse.transferability`) on inputs ``x``,
    with the preset's budget, and the image passes it took; one journal entry (``transfer``), so a
    resumed scan does not redo it."""
    memory = journal if journal is not None else Journal(None)
    if not memory.has("transfer"):
        task = bar.add_task(f"transferability: {len(labels)} labels", total=1) if bar is not None else None
        gen = torch.Generator().manual_seed(_chunk_seed(seed, "transfer", 0))
        passes: dict = {}
        with torch.enable_grad():
            values = expected_transferability(work, x, labels, sources=plan.transfer_sources, pool=plan.transfer_pool,
                                              steps=plan.transfer_steps, generator=gen, passes=passes,
                                              max_images=min(TRANSFER_IMAGES, per_pass))
        memory.put("transfer", {"stage": "transfer", "labels": list(labels), "passes": passes},
                   {"transferability": np.array([values[t] for t in labels])})
        if task is not None:
            bar.update(task, completed=1)
    entry, arrays = memory.get("transfer")
    return dict(zip(entry["labels"], arrays["transferability"].tolist())), entry["passes"]


def _working_copy(model, dev: torch.device):
    """A private, frozen copy of ``model`` on ``dev`` (channels-last on the CPU), so the caller's model
    is left untouched; returns (copy, channels_last). Copied without autograd: a TorchScript module's
    deepcopy otherwise clones its parameters into non-leaf tensors, whose requires_grad cannot be
    switched off."""
    with torch.no_grad():
        work = copy.deepcopy(model)
    work = work.to(dev).eval().requires_grad_(False)
    channels_last = dev.type == "cpu"
    if channels_last:
        work = work.to(memory_format=torch.channels_last)
    return work, channels_last


def record_margins(model, scans: list[dict], seed: int, preset: str = "fast") -> dict[int, float]:
    """Fill in the maximum margins (``max_margin``) of the labels each scan's test covers, in place,
    for scans of ``model`` (scan.json dicts) made before margins were recorded, computed exactly as a
    scan with ``seed`` computes them (a label's margin depends on the model, the seed and the label
    only, so this equals what a rescan would record); returns label -> margin."""
    tested = sorted(set().union(*(calibrated_inputs(s["labels"], s["settings"]["detection"])[0] for s in scans)))
    work, channels_last = _working_copy(model, torch.device("cpu"))
    margins = label_margins(work, tested, seed, plan_of(preset), torch.device("cpu"), channels_last)
    for s in scans:
        for rec in s["labels"]:
            if rec["label"] in margins:
                rec["max_margin"] = margins[rec["label"]]
    return margins


# inputs per forward pass of the margin search (max_margins' max_images; why 96: neural_cleanse.MAX_IMAGES)
MARGIN_IMAGES = 96


def data_free_inputs(work, n: int, kind: str, gen: torch.Generator, device, confidence: float | None,
                     max_images: int, journal: Journal | None = None, bar=None, executor: Executor | None = None,
                     channels_last: bool = False) -> torch.Tensor:
    """A data-free scan's ``n`` inputs (:func:`netcleanse.synthesis.synthesize_inputs`, the same
    bits): an inversion goes in parts of ``max_images`` inputs (each input's path is its own), each
    one task of ``executor`` and, when a journal is given, one journal entry (``inputs_<lo>-<hi>``),
    so an interrupted scan does not invert its finished parts again; the bar counts their steps."""
    if kind != "inversion":
        return synthesize_inputs(work, n, kind, gen, device, confidence=confidence)
    check_kind(kind, confidence)
    x0, targets = inversion_start(work, n, gen)
    parts = inversion_parts(n, max_images)
    keys = [f"inputs_{lo}-{hi}" for lo, hi in parts]
    device = str(device or "cpu")
    memory = _journalled_tasks(
        _invert_part, _ScanShared(work, None, None, channels_last, max_images), keys, [INVERSION_STEPS] * len(parts),
        lambda i: (x0[parts[i][0]:parts[i][1]], targets[parts[i][0]:parts[i][1]], n, confidence, max_images, device),
        lambda i, x: ({"stage": "inputs", "lo": parts[i][0], "hi": parts[i][1]}, {"x": x.numpy()}),
        journal, bar, f"inputs: inverting {n}", executor)
    return torch.cat([torch.from_numpy(memory.get(key)[1]["x"]) for key in keys])


def _journalled_tasks(fn, shared, keys: list[str], sizes: list[float], job_of, entry_of, journal: Journal | None,
                      bar, description: str, executor: Executor | None = None) -> Journal:
    """Run ``fn(shared, job_of(i), progress)`` through ``executor`` for every item ``i`` whose key the
    journal lacks, journalling each result as it comes back (``entry_of(i, value)``: its entry and
    arrays), in whatever order; the bar counts ``sizes`` units per item (the tasks report theirs as
    they go). Returns the journal (an in-memory one without ``journal``) holding every key."""
    memory = journal if journal is not None else Journal(None)
    todo = [i for i, key in enumerate(keys) if not memory.has(key)]
    total = sum(sizes)
    task = bar.add_task(description, total=total) if bar is not None else None
    finished = [total - sum(sizes[i] for i in todo)]
    running: dict[int, float] = {}  # job -> units done so far (local executor only)

    def show():
        if task is not None:
            bar.update(task, completed=finished[0] + sum(running.values()))

    def on_progress(j, amount):
        running[j] = min(running.get(j, 0.0) + amount, sizes[todo[j]])
        show()

    show()
    for j, value in (executor or LocalExecutor()).map(fn, shared, [job_of(i) for i in todo], on_progress):
        memory.put(keys[todo[j]], *entry_of(todo[j], value))
        running.pop(j, None)
        finished[0] += sizes[todo[j]]
        show()
    return memory


def _invert_part(shared: "_ScanShared", job, progress) -> torch.Tensor:
    """One part of a data-free inversion (:func:`netcleanse.synthesis.invert`), wherever it runs."""
    x0, targets, n, confidence, max_images, device = job
    return invert(shared.model, x0, targets, n, torch.device(device), confidence=confidence,
                  max_images=max_images, on_step=progress)


def label_margins(work, labels, seed: int, plan: Preset, device, channels_last: bool, journal: Journal | None = None,
                  bar=None, executor: Executor | None = None, per_pass: int = MARGIN_IMAGES) -> dict[int, float]:
    """Each label's maximum logit margin (:func:`netcleanse.margin.max_margins`) with the preset's
    budget; a label's value depends on the model, ``seed`` and the label only, so a scan and a later
    computation on the same model agree. The labels go in the chunks :func:`max_margins` forms itself
    (``MARGIN_IMAGES // margin_restarts`` labels), each one task of ``executor`` and, when a journal is
    given, one journal entry (``margin_<i>``), so that any executor does the same arithmetic."""
    labels = sorted(int(t) for t in labels)
    if not labels:
        return {}
    per_chunk = max(1, MARGIN_IMAGES // plan.margin_restarts)
    chunks = [labels[i:i + per_chunk] for i in range(0, len(labels), per_chunk)]
    keys = [f"margin_{ci:05d}_{chunk[0]}-{chunk[-1]}" for ci, chunk in enumerate(chunks)]
    memory = _journalled_tasks(
        _margin_chunk, _ScanShared(work, None, None, channels_last, per_pass), keys, [len(c) for c in chunks],
        lambda ci: (chunks[ci], seed, plan.margin_restarts, plan.margin_steps, str(device)),
        lambda ci, values: ({"stage": "margin", "labels": chunks[ci]}, {"margins": values}),
        journal, bar, f"margin: {len(labels)} labels", executor)
    out: dict[int, float] = {}
    for key in keys:
        entry, arrays = memory.get(key)
        out.update(zip(entry["labels"], arrays["margins"].tolist()))
    return out


def _margin_chunk(shared: "_ScanShared", job, progress) -> np.ndarray:
    """The margins of one chunk of labels (one forward pass of :func:`max_margins`), wherever it runs."""
    labels, seed, restarts, steps, device = job
    return max_margins(shared.model, labels, shared.model.input_shape, seed=seed, restarts=restarts, steps=steps,
                       device=torch.device(device), channels_last=shared.channels_last,
                       max_images=min(MARGIN_IMAGES, shared.per_pass),
                       on_chunk=progress)


def _run_stage(work, stage: Stage, labels: list[int], x_opt, x_val, journal: Journal, seed: int, bar,
               channels_last: bool, dev, init: dict | None = None, executor: Executor | None = None,
               per_pass: int = MAX_IMAGES) -> dict:
    """Search every label of ``labels`` in chunks; returns label -> (record, mask, pattern, last mask,
    last pattern), reading finished chunks from the journal. The chunks not yet in the journal go
    through ``executor`` (default: this process); each is journalled as soon as it comes back, in
    whatever order, and every chunk's random numbers come from (seed, stage, chunk index) alone."""
    out: dict[int, tuple] = {}
    chunks = [labels[i:i + stage.label_chunk] for i in range(0, len(labels), stage.label_chunk)]
    keys = [f"{stage.name}_{ci:05d}_{chunk[0]}-{chunk[-1]}" for ci, chunk in enumerate(chunks)]

    def job_of(ci):
        chunk, start = chunks[ci], None
        if init is not None:
            start = (np.stack([init[t][0] for t in chunk]), np.stack([init[t][1] for t in chunk]),
                     [init[t][2] for t in chunk], {t: (init[t][3], init[t][4]) for t in chunk})
        return _ChunkJob(stage.name, stage.schedule, chunk, _chunk_seed(seed, stage.name, ci), start, stage.held_back)

    _journalled_tasks(_search_chunk, _ScanShared(work, x_opt, x_val, channels_last, per_pass), keys,
                      [len(c) for c in chunks], job_of, lambda ci, value: value, journal, bar,
                      f"{stage.name}: {len(labels)} labels", executor)
    for key in keys:
        entry, arrays = journal.get(key)
        for i, rec in enumerate(entry["records"]):
            out[rec["label"]] = (rec, arrays["masks"][i], arrays["patterns"][i], arrays["last_masks"][i],
                                 arrays["last_patterns"][i])
    return out


@dataclass(frozen=True)
class _ChunkJob:
    """One chunk of one stage: its labels, its schedule, its seed and (refinement) where it starts:
    (last masks, last patterns, costs, label -> (steps, time) of the earlier search) or None."""

    stage: str
    schedule: Schedule
    labels: list[int]
    seed: int
    start: tuple | None = None
    held_back: int | None = None  # attack success on the first this many held-back inputs (None: all)


class _ScanShared:
    """What every chunk of a scan needs: the prepared model and the inputs. Picklable, so that Ray
    can ship it to workers once; a TorchScript network travels as ``torch.jit.save`` bytes (a
    ScriptModule cannot be pickled) and comes back in the same memory format."""

    def __init__(self, model, x_opt, x_val, channels_last: bool, per_pass: int = MAX_IMAGES):
        self.model, self.x_opt, self.x_val, self.channels_last = model, x_opt, x_val, channels_last
        self.per_pass = per_pass  # images a gradient pass may hold (:func:`netcleanse.passes.images_per_pass`)

    def __getstate__(self):
        state = dict(self.__dict__, scripted=None)
        net = getattr(self.model, "net", None)
        if isinstance(net, torch.jit.ScriptModule):
            import io
            buffer = io.BytesIO()
            torch.jit.save(net, buffer)
            model = copy.copy(self.model)
            model.__dict__["_modules"] = dict(self.model._modules, net=None)
            device = next(iter(net.parameters()), torch.empty(0)).device
            state.update(model=model, scripted=buffer.getvalue(), net_device=str(device))
        return state

    def __setstate__(self, state):
        scripted = state.pop("scripted")
        state.pop("net_device", None)
        self.__dict__.update(state)
        if scripted is not None:
            import io
            device = torch.device(state.get("net_device", "cpu"))
            net = torch.jit.load(io.BytesIO(scripted), map_location=device).eval()
            for parameter in net.parameters():
                parameter.requires_grad_(False)
            if self.channels_last:
                net = net.to(memory_format=torch.channels_last)
            self.model._modules["net"] = net


def _search_chunk(shared: _ScanShared, job: _ChunkJob, progress) -> tuple[dict, dict]:
    """Search the labels of one chunk; returns its journal entry and arrays. Runs wherever the
    executor puts it; ``progress(amount)`` is told label-equivalents of the worst case as epochs end."""
    work, x_opt, x_val, channels_last = shared.model, shared.x_opt, shared.x_val, shared.channels_last
    chunk, s, init = job.labels, job.schedule, job.start
    per_epoch = len(chunk) / s.max_epochs

    def on_epoch(n_active):
        progress(per_epoch)  # label-equivalents of the worst case (no early stop)

    gen = torch.Generator().manual_seed(job.seed)
    init_pair = init_cost = None
    if init is not None:
        init_pair = (torch.from_numpy(np.array(init[0])), torch.from_numpy(np.array(init[1])))  # writable copies
        init_cost = torch.tensor([max(c, s.init_cost) for c in init[2]])
    found = reverse_engineer(work, x_opt, chunk, s, generator=gen, init=init_pair, init_cost=init_cost,
                             on_epoch=on_epoch, channels_last=channels_last,
                             max_images=min(MAX_IMAGES, shared.per_pass))
    asr = attack_success(work, x_val[:job.held_back], torch.stack([r.mask for r in found]),
                         torch.stack([r.pattern for r in found]), chunk, channels_last=channels_last)
    # a refined label's steps and time include its coarse search
    prior = init[3] if init is not None else {t: (0, 0.0) for t in chunk}
    entry = {"stage": job.stage, "labels": chunk, "records": [
        {"label": r.label, "mask_l1": r.mask_l1, "attack_success": a, "succeeded": r.succeeded,
         "steps": r.steps + prior[r.label][0], "time_s": round(r.time_s + prior[r.label][1], 4), "cost": r.cost,
         "stage": job.stage} for r, a in zip(found, asr)]}
    arrays = {"masks": torch.stack([r.mask for r in found]).cpu().numpy(),
              "patterns": torch.stack([r.pattern for r in found]).cpu().numpy(),
              "last_masks": torch.stack([r.last_mask for r in found]).cpu().numpy(),
              "last_patterns": torch.stack([r.last_pattern for r in found]).cpu().numpy()}
    return entry, arrays
