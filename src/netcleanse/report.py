"""The report: one page a person reads to decide whether a model is backdoored and whether a repair worked.

The report is rendered from files only, never from objects in memory, so that any old scan
directory can be re-rendered and the files stay the single source of truth:

* ``scan.json`` + ``masks.npz`` (required scan; read by :mod:`netcleanse.scan_folder`),
* ``truth.json`` (optional; the BadNet lab's ground truth, with its trigger images beside it),
* ``repair.json`` (optional, any number; one per repair method).

Discovery rule, for ``render_report(DIR)``:

1. ``scan.json`` is taken from DIR itself, else from the one immediate subdirectory of DIR that
   has one (several are an error: name the one you mean). If neither has one, a ``repair.json``
   that names its scan directory (key ``"scan"``) leads to it. ``masks.npz`` is read from the
   directory of ``scan.json``.
2. ``truth.json`` is taken from DIR, else from the one immediate subdirectory that has one, else
   from the scan's directory.
3. Every ``repair.json`` in DIR and its immediate subdirectories is shown (one per method).

So the demo's layout ``DIR/badnet/``, ``DIR/scan/``, ``DIR/repair-*/`` is one report at ``DIR``,
and a plain scan directory is a report on its own. Subdirectories are visited in name order.

What the figures draw is computed apart from the drawing, from scan.json alone, so that it can be
checked: :func:`search_roles` and :func:`search_groups` (how each label was searched: the coarse
pass only, a refined candidate, or a reference label the null is fitted on, with the recorded
budgets) and :func:`decision_inputs` (the calibrated test's statistic, as the scan recorded it:
the reference labels' indices, its null, critical index and step-down steps, and for a test on two
signals each tested label's size and margin index, drawn against each other by the scatter of the
two signals). The report re-decides nothing: it shows the test scan.json records. A scan made
before margins existed was decided on the trigger size alone and is drawn that way, even when
margins were added to its records later (the page says so; scan again for the two-signal verdict).

HTML output is self-contained (images as ``data:`` URIs, inline CSS, no scripts, no external
links) and every string read from JSON is escaped by Jinja2's autoescape. Markdown output carries
the same content with the images written as PNG files beside it. Plots are written as PNG files
next to the report in both formats.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from PIL import Image, UnidentifiedImageError

from . import __version__
from . import plots
from .calibrated import most_anomalous
from .detection import median_and_mad
from .data import IMAGE_FORMATS
from .errors import NetcleanseError, NetcleanseWarning
from .utils import atomic_write, read_json_object
from .scan_folder import MASKS_NPZ, SCAN_JSON, TriggerArrays, read_masks, read_scan_json

FORMATS = ("html", "md")

COMPARISON_LABELS = 3  # lowest-L1 non-flagged labels shown beside the flagged ones
MAX_GALLERY_FLAGGED = 12  # beyond this, the gallery shows the most anomalous flagged labels
SMALLEST_LABELS_TABLE = 10
VERDICT_LISTED = 10  # flagged labels given a line each in the verdict; the rest share one line
# Keys the project stores as fractions in [0, 1] (see netcleanse.evaluate); shown as percentages.
FRACTION_KEYS = {"clean_accuracy", "attack_success", "poison_detection", "false_positive", "fraction_pruned",
                 "rate", "clean_model_accuracy", "clean_val_accuracy", "accuracy", "asr"}


# ----------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class ReportSources:
    """Where each input of a report was found, and what it holds."""

    root: Path
    scan_dir: Path | None = None
    scan: dict | None = None
    triggers: TriggerArrays | None = None
    truth_dir: Path | None = None
    truth: dict | None = None
    repairs: list[tuple[Path, dict]] = field(default_factory=list)


def _find_one(root: Path, name: str) -> Path | None:
    """``root/name``, else the one immediate subdirectory's ``name``; several are an error."""
    if (root / name).is_file():
        return root / name
    found = sorted(p / name for p in root.iterdir() if p.is_dir() and (p / name).is_file())
    if len(found) > 1:
        raise NetcleanseError(f"several {name} under {root} ({', '.join(str(p.parent.name) for p in found)}); "
                              "render the report of one of these directories")
    return found[0] if found else None


def _named_scan(repair: dict) -> str | None:
    settings = repair.get("settings") if isinstance(repair.get("settings"), dict) else {}
    named = repair.get("scan") or repair.get("scan_dir") or settings.get("scan")
    return named if isinstance(named, str) else None


def _scan_dir_named_by(repair: dict, repair_dir: Path) -> Path | None:
    named = _named_scan(repair)
    if named is None:
        return None
    # relative to the repair's folder (repair records it so); older records: to where repair ran
    for candidate in (repair_dir / named, Path(named)):
        if (candidate / SCAN_JSON).is_file():
            return candidate
    return None


def find_sources(directory: str | Path) -> ReportSources:
    """Locate and read a report's inputs in ``directory`` (see the module docstring for the rule)."""
    root = Path(directory)
    if not root.is_dir():
        raise NetcleanseError(f"{root} is not a directory")
    sources = ReportSources(root=root)

    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    sources.repairs = [(d, read_json_object(d / "repair.json")) for d in candidates if (d / "repair.json").is_file()]

    scan_json = _find_one(root, SCAN_JSON)
    named_by = {d: _scan_dir_named_by(repair, d) for d, repair in sources.repairs}
    for d, repair in sources.repairs:
        said = _named_scan(repair)
        if said is not None and named_by[d] is None:
            shown = "without a scan" if scan_json is None else \
                f"beside the scan in {scan_json.parent}, which may not be the one it was made from"
            warnings.warn(f"{d / 'repair.json'} names the scan {said}, which is not found from here: the report "
                          f"shows the repair {shown}", NetcleanseWarning, stacklevel=2)
        elif named_by[d] is not None and scan_json is not None and \
                named_by[d].resolve() != scan_json.parent.resolve():
            warnings.warn(f"the repair in {d} was made from the scan in {named_by[d]}, not from the one in "
                          f"{scan_json.parent}, whose verdict the report shows beside it", NetcleanseWarning,
                          stacklevel=2)
    if scan_json is None:
        named = [d for d in named_by.values() if d is not None]
        scan_json = named[0] / SCAN_JSON if named else None
    if scan_json is not None:
        sources.scan_dir = scan_json.parent
        sources.scan = read_scan_json(scan_json)
        if (sources.scan_dir / MASKS_NPZ).is_file():
            sources.triggers = read_masks(sources.scan_dir / MASKS_NPZ)

    truth_json = _find_one(root, "truth.json")
    if truth_json is None and sources.scan_dir is not None and (sources.scan_dir / "truth.json").is_file():
        truth_json = sources.scan_dir / "truth.json"
    if truth_json is not None:
        sources.truth_dir, sources.truth = truth_json.parent, read_json_object(truth_json)

    if sources.scan is None and not sources.repairs:
        from .scan_folder import unfinished
        if unfinished(root):
            raise NetcleanseError(f"{root} holds a scan that did not finish; rerun the same scan command with "
                                  "--resume, and its report is written at the end")
        raise NetcleanseError(f"no scan.json or repair.json in {root} or its immediate subdirectories; "
                              "run `netcleanse scan MODEL --out DIR` first")
    return sources


# ----------------------------------------------------------------------------------------------
# Neural Cleanse's detection statistic, recomputed for drawing the threshold
# ----------------------------------------------------------------------------------------------

def mad_threshold(mask_l1: np.ndarray, threshold: float, detection: dict | None = None) -> tuple[float, float, float]:
    """(median, MAD, L1 at the threshold), MAD scaled by 1.4826 as in :mod:`netcleanse.detection`:
    a label whose mask L1 is below ``median - threshold * MAD`` has an anomaly index above
    ``threshold`` (Wang et al. 2019, Sec. IV). ``detection``: the statistics the scan itself used
    (scan.json ``settings.detection``; the fast preset takes them from a control sample of labels),
    which win over recomputing them from every label's L1."""
    stored = detection or {}
    if isinstance(stored.get("median"), (int, float)) and isinstance(stored.get("mad"), (int, float)):
        median, mad = float(stored["median"]), float(stored["mad"])
    else:
        median, mad = median_and_mad(mask_l1)
    return median, mad, median - threshold * mad


# ----------------------------------------------------------------------------------------------
# What the figures are drawn from (factored out so that tests can check it against scan.json)
# ----------------------------------------------------------------------------------------------

# How a label was searched and what the verdict did with it.
UNTESTED = "untested"  # the coarse pass only: a shorter budget, so not comparable and never flagged
CANDIDATE = "candidate"  # refined because its coarse mask was small; tested against the reference
REFERENCE = "reference"  # the labels the null is fitted on (random controls, or every label); tested too
ROLES = (UNTESTED, CANDIDATE, REFERENCE)


@dataclass
class SearchGroup:
    """Labels searched the same way: one marker in the figures and one row of the report's table.

    ``role``: one of :data:`ROLES`. ``name``: the legend text. ``budget``: the search budget, from
    the scan's recorded plan. ``steps``: the median number of optimisation steps these labels took
    (both passes together), from their records. ``sample``: the reference is a random sample of
    the labels (the fast preset's controls) rather than all of them. ``also_candidates``: reference
    labels that were candidates too."""

    role: str
    labels: list[int]
    name: str
    budget: str
    steps: float | None = None
    sample: bool = False
    also_candidates: int = 0


def _schedule_budget(stage: Any) -> str | None:
    """"at most N steps of B inputs" for a recorded stage (``settings.plan.coarse`` / ``.refine``)."""
    schedule = stage.get("schedule") if isinstance(stage, dict) else None
    if not isinstance(schedule, dict):
        return None
    epochs, per_epoch, batch = (_as_int(schedule.get(k)) for k in ("max_epochs", "steps_per_epoch", "batch_size"))
    if epochs is None or per_epoch is None or batch is None:
        return None
    return f"at most {epochs * per_epoch} steps of {batch} inputs"


def search_roles(scan: dict, rows: list[dict]) -> dict[int, str]:
    """Each label's role (:data:`ROLES`), as the scan recorded it.

    A fast-preset scan of many labels records its random controls and candidates in
    ``settings.detection`` (the sets its test ran on, see ``scanning.calibrated_inputs``): controls
    are the reference, candidates not among them are tested against it, every other label had the
    coarse pass only. Without that record, the calibrated test's ``reference.labels`` are the
    reference, the other labels with a p-value were tested, the rest were not; a scan with neither
    record compares every label with every other (the paper's scheme): all are the reference."""
    settings = scan.get("settings") if isinstance(scan.get("settings"), dict) else {}
    detection = settings.get("detection") if isinstance(settings.get("detection"), dict) else {}
    test = scan.get("test") if isinstance(scan.get("test"), dict) else {}
    reference = test.get("reference") if isinstance(test.get("reference"), dict) else {}
    labels = [r["label"] for r in rows]
    if detection.get("scheme") == "random controls" and isinstance(detection.get("controls"), list) \
            and isinstance(detection.get("candidates"), list):
        controls = {_as_int(t) for t in detection["controls"]}
        tested = controls | {_as_int(t) for t in detection["candidates"]}
    elif isinstance(reference.get("labels"), list):
        controls = {_as_int(t) for t in reference["labels"]}
        stepped = {_as_int(s.get("label")) for s in test.get("steps", []) if isinstance(s, dict)}
        tested = controls | stepped | {r["label"] for r in rows if r["p_value"] is not None or r["flagged"]}
    else:
        controls = tested = set(labels)
    return {t: REFERENCE if t in controls else CANDIDATE if t in tested else UNTESTED for t in labels}


def search_groups(scan: dict, rows: list[dict], roles: dict[int, str]) -> list[SearchGroup]:
    """The labels of each role, with the budget they were searched with (from ``settings.plan``)."""
    settings = scan.get("settings") if isinstance(scan.get("settings"), dict) else {}
    plan = settings.get("plan") if isinstance(settings.get("plan"), dict) else {}
    detection = settings.get("detection") if isinstance(settings.get("detection"), dict) else {}
    coarse, refine = _schedule_budget(plan.get("coarse")), _schedule_budget(plan.get("refine"))
    stages = {r["label"]: r.get("stage") for r in rows}
    by_role = {role: sorted(t for t, r in roles.items() if r == role) for role in ROLES}
    sample = bool(by_role[UNTESTED] or by_role[CANDIDATE]) and bool(by_role[REFERENCE])
    listed = detection.get("candidates")
    candidates = {_as_int(t) for t in listed} if isinstance(listed, list) else set()
    steps = {r["label"]: r["steps"] for r in rows if r["steps"] is not None}

    def budget(members: list[int]) -> str:
        refined = any(stages.get(t) == "refine" for t in members)
        if refined and coarse and refine:
            return f"coarse pass ({coarse}), then {refine.replace('at most', 'up to')} more"
        if coarse and not refined:
            return f"coarse pass only ({coarse})" if refine else coarse
        return "as recorded in scan.json (no search plan recorded)"

    names = {UNTESTED: "coarse pass only: not comparable, not tested",
             CANDIDATE: "candidate: refined, tested against the reference",
             REFERENCE: ("random control: refined, the null is fitted on these" if sample
                         else "label (every label is in the reference the null is fitted on)")}
    groups = []
    for role in ROLES:
        members = by_role[role]
        if not members:
            continue
        taken = [steps[t] for t in members if t in steps]
        groups.append(SearchGroup(role, members, names[role], budget(members),
                                  float(np.median(taken)) if taken else None, sample,
                                  len(candidates & set(members)) if role == REFERENCE else 0))
    return groups


MARKERS = {UNTESTED: "small grey dot", CANDIDATE: "blue triangle", REFERENCE: "hollow orange square"}
PURPOSE = {UNTESTED: "not tested: a shorter search leaves larger masks, not comparable with the refined labels'; "
                     "cannot be flagged",
           CANDIDATE: "tested against the reference (refined for a small coarse mask or a coarse anomaly index "
                      "above the threshold)",
           REFERENCE: "the reference: the null's median and scale are fitted on these; tested too"}


def guarantee(calibrated: bool, alpha: float | None, threshold: float, family: str | None,
              signals: int = 1) -> tuple[str, str]:
    """(what the verdict guarantees, what it does not), one sentence each, for the verdict box.
    ``signals``: 1, the test used the trigger size alone; 2, the size and the maximum margin."""
    if calibrated and alpha is not None:
        varies = ("log trigger sizes and log maximum margins vary like the test's bivariate "
                  if signals == 2 else "log trigger sizes vary like the test's ")
        given = (f"A model without a backdoor is flagged with probability ≤ {100 * alpha:g} % (α), whatever its "
                 f"number of labels, provided its clean labels' {varies}{family or 'null'} model.")
    else:
        given = (f"The paper's rule (anomaly index above {threshold:g}) bounds each label, not the model: the chance "
                 "that a model without a backdoor is flagged grows with its number of labels (the calibrated "
                 "rule, --rule calibrated, states it).")
    limits = ("Neural Cleanse only looks for a small trigger that sends every input to one label, "
              "so input-specific (sample-dependent) triggers are not tested for and large or blended triggers "
              "may be missed; \"no backdoor detected\" does not prove a model clean.")
    return given, limits


@dataclass
class DecisionInputs:
    """What the figure of the calibrated decision draws, read from scan.json.

    The statistic is the index the scan's test decided on (``signals``: 1 or 2). With one signal it
    is each label's log-scale size index ``z = (median - log max(L1, FLOOR)) / scale`` against the
    reference; with two a combined index of it and ``z_margin = (log max_margin - margin_median) /
    margin_scale`` (:mod:`netcleanse.calibrated`): ``combination`` "sum", ``(z_size + z_margin) /
    sqrt(2)``, or "max", ``max(z_size, (z_size + z_margin) / sqrt(2))``, as the scan's test
    recorded it (``test.reference.statistic``). ``reference``: the reference labels' indices (the
    histogram); ``tested``: the other tested labels' indices; under the null one label's index
    follows ``family`` (for two signals correlated ``rho``: the sum's is the family times
    ``sqrt(1 + rho)``, the max's is simulated: the fitted curve). ``null``: the
    test's simulated null of the largest index among ``n_labels`` labels (the same simulation as
    the scan's, so its ``1 - alpha`` point is ``critical_index``); ``steps``: the step-down tests
    as recorded (label, index, p_value, flagged, and with two signals size_index, margin_index).
    ``size`` and ``margin``: every tested label's two indices (two signals only; the scatter)."""

    statistic: str
    family: str  # "normal" or "t"
    df: float
    median: float
    scale: float
    raw_scale: float | None  # the estimator's value before the floor (None: not recomputable)
    estimator: str
    n_labels: int
    n_reference: int | None  # None: every label is the reference
    alpha: float
    reference: dict[int, float]
    tested: dict[int, float]
    steps: list[dict]
    critical_index: float | None
    null: np.ndarray | None
    decided: bool  # the calibrated rule made the verdict (else the paper's rule did)
    signals: int = 1  # 1: the trigger size alone; 2: the size and the maximum margin combined
    size: dict[int, float] = field(default_factory=dict)  # two signals: each tested label's size index
    margin: dict[int, float] = field(default_factory=dict)  # ... and its margin index
    margin_median: float | None = None  # log scale, of the reference
    margin_scale: float | None = None
    rho: float | None = None  # the null's correlation between the two signals
    combination: str | None = None  # two signals: "sum" or "max" (see above)
    stages: int = 1  # 2: transferable labels were tested first, each stage at alpha / 2
    # the first stage's allowance for easy labels that transfer (None: not recorded, a null blind to size)
    transfer_dependence: float | None = None
    # the first stage's first step tested the transferable labels together by their ordered indices
    transfer_ordered: bool = False
    # that stage's reference (the labels outside the transferable set): its size median on the L1
    # scale, its scale, and how many labels (None: not recorded, scans before it was)
    transfer_reference: dict | None = None

    @property
    def size_alpha(self) -> float:
        """The level of the size test this figure draws: alpha, or its half with two stages."""
        return self.alpha / self.stages

    @property
    def combined(self) -> bool:
        return self.signals == 2

    @property
    def index_name(self) -> str:
        return "combined index" if self.combined else "log-scale index"

    @property
    def formula(self) -> str:
        """The combined index, written out (two signals only)."""
        if not self.combined:
            return "z"
        return ("max(z_size, (z_size + z_margin) / √2)" if self.combination == "max"
                else "(z_size + z_margin) / √2")

    @property
    def boundary(self) -> float | None:
        """The line ``z_size + z_margin = boundary`` of the scatter: sqrt(2) times the critical index.
        (With the "max" combination a label is also flagged when ``z_size`` alone exceeds the
        critical index: the region's other edge, :meth:`beyond`.)"""
        return math.sqrt(2) * self.critical_index if self.combined and self.critical_index is not None else None

    def combine(self, size: float, margin: float) -> float:
        """The test's index of a label with these two indices."""
        both = (size + margin) / math.sqrt(2)
        return max(size, both) if self.combination == "max" else both

    def beyond(self, size: float, margin: float) -> bool:
        """Whether a label at (size index, margin index) lies beyond the first step's critical index
        (the scatter's shaded region)."""
        return self.critical_index is not None and self.combine(size, margin) > self.critical_index

    @property
    def scale_name(self) -> str:
        """The estimator the scale was computed with: Qn, or the MAD (asked for, or above QN_MAX labels)."""
        from .calibrated import QN_MAX
        return "Qn" if self.estimator == "qn" and len(self.reference) <= QN_MAX else "MAD"

    @property
    def family_name(self) -> str:
        return "normal" if self.family == "normal" else f"Student-t({self.df:g})"

    @property
    def simulated_critical(self) -> float | None:
        """The critical index of :attr:`null` as simulated here (the ``1 - alpha`` point, as
        :func:`netcleanse.calibrated.critical_index` takes it); None without a null."""
        if self.null is None or not len(self.null):
            return None
        i = max(1, math.ceil((len(self.null) + 1) * (1 - self.size_alpha) - 1e-9))
        return float(self.null[i - 1]) if i <= len(self.null) else None

    @property
    def null_disagrees(self) -> bool:
        """The recorded critical index is not this simulation's: the scan was decided with another
        version of the null (the figure then draws a null that is not the one its line came from)."""
        here = self.simulated_critical
        return (here is not None and self.critical_index is not None
                and not math.isclose(here, self.critical_index, rel_tol=1e-9, abs_tol=1e-12))

    @property
    def label_spread(self) -> float:
        """The null scale of one label's index: 1, or sqrt(1 + rho) for the combined index (the sum
        of two unit signals correlated rho, over sqrt(2))."""
        return math.sqrt(1 + self.rho) if self.combined and self.rho is not None else 1.0

    def label_density(self, z: np.ndarray) -> np.ndarray:
        """The null density of one label's index: the family's, scaled by :attr:`label_spread`
        (symmetric, so the same for z and -z); for the "max" combination, a histogram of simulated
        labels (:func:`_max_index_density`)."""
        from scipy import stats
        z = np.asarray(z, dtype=float)
        if self.combined and self.combination == "max":
            edges, density = _max_index_density(self.family, self.df, self.rho if self.rho is not None else 0.0)
            return np.interp(z, (edges[:-1] + edges[1:]) / 2, density, left=0.0, right=0.0)
        dist = stats.norm if self.family == "normal" else stats.t(self.df)
        spread = self.label_spread
        return dist.pdf(z / spread) / spread


@lru_cache(maxsize=8)
def _max_index_density(family: str, df: float, rho: float, draws: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, density) of one clean label's ``max(z_size, (z_size + z_margin) / sqrt(2))``
    when its two signals are a bivariate draw of the family with correlation ``rho`` (the test's
    per-label model, medians and scales known); fixed seed."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((2, draws))
    g[1] = rho * g[0] + math.sqrt(1 - rho * rho) * g[1]
    if family == "t":
        g /= np.sqrt(rng.chisquare(df, draws) / df)
    index = np.maximum(g[0], (g[0] + g[1]) / math.sqrt(2))
    density, edges = np.histogram(index, bins=np.linspace(-8, 12, 201))
    return edges, density / (draws * np.diff(edges))


def _family(text: Any) -> tuple[str, float]:
    from .calibrated import DF, FAMILY
    if text == "normal":
        return "normal", DF
    if isinstance(text, str) and text.startswith("t(") and text.endswith(")"):
        df = _as_float(text[2:-1])
        if df is not None and df > 0:
            return "t", df
    return FAMILY, DF


def decision_inputs(scan: dict, rows: list[dict], roles: dict[int, str]) -> DecisionInputs | None:
    """The inputs of the decision figure, or None when the scan recorded no calibrated test (or one
    without its reference's median and scale). The test used two signals when its reference
    records ``margin_median`` and ``margin_scale``. Size indices are the records' ``log_index``
    where present, else recomputed from the mask L1 and the recorded median and scale; margin
    indices the records' ``margin_index``, else recomputed from ``max_margin`` and the recorded
    margin median and scale; the combined index the records' ``test_index``, else the two's sum
    over sqrt(2). A label of a two-signal test without a margin is left out."""
    from . import calibrated as cal
    test = scan.get("test") if isinstance(scan.get("test"), dict) else {}
    reference = test.get("reference") if isinstance(test.get("reference"), dict) else {}
    median = _as_float(reference.get("median"))
    # scans before the Qn estimator recorded the spread as "mad" (and "scale" named the statistic)
    scale = _as_float(reference.get("scale")) if not isinstance(reference.get("scale"), str) else None
    scale = _as_float(reference.get("mad")) if scale is None else scale
    alpha = _as_float(test.get("alpha", scan.get("alpha")))
    if median is None or not scale or alpha is None or not rows:
        return None
    estimator = reference.get("scale_estimator") or ("mad" if "mad" in reference else "qn")
    family, df = _family(reference.get("family"))
    n_labels = _as_int(reference.get("n_labels")) or len(rows)

    margin_median, margin_scale = _as_float(reference.get("margin_median")), _as_float(reference.get("margin_scale"))
    signals = 2 if margin_median is not None and margin_scale else 1
    combination = _combination(reference.get("statistic"), rows) if signals == 2 else None

    def size_index(r: dict) -> float:
        z = r.get("log_index")
        return z if z is not None else (median - float(cal.log_size(r["mask_l1"]))) / scale

    def margin_index(r: dict) -> float | None:
        if r.get("margin_index") is not None:
            return r["margin_index"]
        if r.get("max_margin") is None:
            return None
        return (math.log(max(r["max_margin"], cal.MARGIN_FLOOR)) - margin_median) / margin_scale

    def index(r: dict) -> float | None:
        if signals == 1:
            return size_index(r)
        if r.get("test_index") is not None:
            return r["test_index"]
        z = margin_index(r)
        if z is None:
            return None
        both = (size_index(r) + z) / math.sqrt(2)
        return max(size_index(r), both) if combination == "max" else both

    in_test = [r for r in rows if roles.get(r["label"]) in (REFERENCE, CANDIDATE) and index(r) is not None]
    ref = {r["label"]: index(r) for r in in_test if roles.get(r["label"]) == REFERENCE}
    tested = {r["label"]: index(r) for r in in_test if roles.get(r["label"]) == CANDIDATE}
    size = {r["label"]: size_index(r) for r in in_test} if signals == 2 else {}
    margin = {r["label"]: margin_index(r) for r in in_test} if signals == 2 else {}
    n_reference = len(ref) if len(ref) < n_labels else None
    raw = None
    if estimator in cal.SCALES and len(ref) >= 2:
        raw = float(cal.robust_scale(cal.log_size([r["mask_l1"] for r in rows if r["label"] in ref]), estimator))
    null, critical = None, _as_float(reference.get("critical_index"))
    stages = 2 if _as_int(reference.get("stages")) == 2 else 1
    if len(ref) >= 3:
        try:
            null = cal.null_max_index(n_labels, n_reference, family, df, cal.DRAWS, estimator, signals)
        except NetcleanseError:
            null = None
        if critical is None and null is not None:
            critical = cal.critical_index(n_labels, n_reference, alpha / stages, family, df, cal.DRAWS, estimator,
                                          signals)
    steps = [{"step": _as_int(s.get("step")), "label": _as_int(s.get("label")), "index": _as_float(s.get("index")),
              "size_index": _as_float(s.get("size_index")), "margin_index": _as_float(s.get("margin_index")),
              "p_value": _as_float(s.get("p_value")), "n_labels": _as_int(s.get("n_labels")),
              "n_reference": _as_int(s.get("n_reference")), "flagged": bool(s.get("flagged")),
              "stage": s.get("stage") if isinstance(s.get("stage"), str) else None}
             for s in test.get("steps", []) if isinstance(s, dict)]
    return DecisionInputs(str(reference.get("statistic") or "log mask L1"), family, df, median, scale, raw, estimator,
                          n_labels, n_reference, alpha, ref, tested, steps,
                          critical if critical is not None and math.isfinite(critical) else None, null,
                          scan.get("rule") == "calibrated", signals, size, margin,
                          margin_median if signals == 2 else None, margin_scale if signals == 2 else None,
                          cal.MARGIN_RHO if signals == 2 else None, combination, stages,
                          _as_float(reference.get("transfer_dependence")),
                          reference.get("transfer_statistic") == "ordered", _transfer_reference(reference))


def _transfer_reference(reference: dict) -> dict | None:
    """The transferable stage's reference as the report states it (see :class:`DecisionInputs`)."""
    fit = reference.get("transferable_reference")
    if not isinstance(fit, dict) or _as_float(fit.get("median")) is None or _as_float(fit.get("scale")) is None:
        return None
    labels = fit.get("labels") if isinstance(fit.get("labels"), list) else []
    return {"median_l1": math.exp(_as_float(fit["median"])), "scale": _as_float(fit["scale"]), "n": len(labels),
            "transferable": [t for t in reference.get("transferable", []) if isinstance(t, int)]}


def _combination(statistic: Any, rows: list[dict]) -> str:
    """How a two-signal test combined its indices: "max" (``max(z_size, (z_size + z_margin) /
    sqrt(2))``) or "sum" (``(z_size + z_margin) / sqrt(2)``), from the recorded statistic's name;
    a name that says neither is told by the records (a ``test_index`` that equals the size index
    where the sum is below it), else "sum" (the first two-signal scans')."""
    text = statistic if isinstance(statistic, str) else ""
    if text.startswith("max(") or "max(z_size" in text:
        return "max"
    if "(z_size + z_margin) / sqrt(2)" in text:
        return "sum"
    for r in rows:
        size, margin, index = r.get("log_index"), r.get("margin_index"), r.get("test_index")
        # where the sum is below the size index, the two combinations differ
        if size is not None and margin is not None and index is not None and margin < (math.sqrt(2) - 1) * size - 1e-6:
            return "max" if math.isclose(index, size, rel_tol=1e-9, abs_tol=1e-12) else "sum"
    return "sum"


# ----------------------------------------------------------------------------------------------
# Building the page's content
# ----------------------------------------------------------------------------------------------

@dataclass
class Picture:
    """A PNG shown in the report: embedded as a data URI (HTML) or written as a file (Markdown)."""

    name: str  # file name (Markdown) / stem of the plot file
    png: bytes
    alt: str
    src: str = ""


def _as_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _as_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def _label_rows(scan: dict) -> list[dict]:
    """Per-label records that carry a mask L1 (unfinished labels of an interrupted scan do not)."""
    flagged_top = scan.get("flagged")
    flagged = {_as_int(x) for x in flagged_top} if isinstance(flagged_top, list) else None
    rows = []
    for record in scan.get("labels", []):
        if not isinstance(record, dict):
            continue
        label, l1 = _as_int(record.get("label")), _as_float(record.get("mask_l1"))
        if label is None or l1 is None:
            continue
        rows.append({"label": label, "mask_l1": l1,
                     "anomaly_index": _as_float(record.get("anomaly_index")),
                     "p_value": _as_float(record.get("p_value")),
                     "mask_l1_vs_median": _as_float(record.get("mask_l1_vs_median")),
                     "attack_success": _as_float(record.get("attack_success")),
                     "steps": _as_int(record.get("steps")), "time_s": _as_float(record.get("time_s")),
                     "log_index": _as_float(record.get("log_index")),
                     # the second signal (scans since the maximum margin): its value and index, and
                     # the index the test decided on
                     "max_margin": _as_float(record.get("max_margin")),
                     "margin_index": _as_float(record.get("margin_index")),
                     "test_index": _as_float(record.get("test_index")),
                     "stage": record.get("stage") if isinstance(record.get("stage"), str) else None,
                     # the top-level list is the scan's verdict; per-label flags are its copy
                     "flagged": (label in flagged) if flagged is not None else bool(record.get("flagged"))})
    return rows


def _truth_targets(truth: dict | None) -> list[int]:
    if not truth:
        return []
    targets = truth.get("targets")
    if not isinstance(targets, list):
        targets = [t.get("target") for t in truth.get("triggers", []) if isinstance(t, dict)]
    return sorted({t for t in (_as_int(x) for x in targets) if t is not None})


def _real_trigger_pictures(sources: ReportSources) -> dict[int, list[Picture]]:
    """The BadNet lab's trigger images, by target label."""
    out: dict[int, list[Picture]] = {}
    if not sources.truth or sources.truth_dir is None:
        return out
    triggers = [t for t in sources.truth.get("triggers", []) if isinstance(t, dict)]
    for n, trigger in enumerate(triggers):
        target, image = _as_int(trigger.get("target")), trigger.get("image")
        if target is None or not isinstance(image, str):
            continue
        # only a file inside truth.json's own folder (no absolute paths, no "..", no links out)
        folder = sources.truth_dir.resolve()
        path = (sources.truth_dir / image).resolve()
        if Path(image).is_absolute() or not path.is_relative_to(folder):
            continue
        try:
            with Image.open(path, formats=IMAGE_FORMATS) as im:  # never PIL's other decoders (EPS runs Ghostscript)
                png = plots.image_png(_on_black(im))
        except (OSError, UnidentifiedImageError, ValueError):
            continue  # a missing picture must not hide the rest of the report
        kind = trigger.get("kind") or "trigger"
        out.setdefault(target, []).append(
            Picture(f"true_trigger_{n}_label_{target}.png", png,
                    f"planted {kind} trigger for target {target}"))
    return out


def _on_black(image: Image.Image) -> Image.Image:
    """A trigger image as RGB, transparent parts black: comparable with a reversed trigger's fusion."""
    rgba = image.convert("RGBA")
    shown = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    shown.alpha_composite(rgba)
    return shown.convert("RGB")


def _gallery(sources: ReportSources, rows: list[dict], flagged: list[dict],
             targets: list[int]) -> tuple[list[dict], int]:
    """Rows of the trigger gallery: the flagged rows in the order given (the verdict's), true targets
    the scan missed, then the lowest-L1 non-flagged labels for comparison. Returns (rows, flagged not
    shown)."""
    by_label = {r["label"]: r for r in rows}
    hidden = max(0, len(flagged) - MAX_GALLERY_FLAGGED)
    chosen: list[tuple[dict, str]] = [(r, "flagged") for r in flagged[:MAX_GALLERY_FLAGGED]]
    chosen += [(by_label[t], "true target, not flagged") for t in targets if t in by_label and not by_label[t]["flagged"]]
    shown = {r["label"] for r, _ in chosen}
    quiet = sorted((r for r in rows if not r["flagged"] and r["label"] not in shown), key=lambda r: r["mask_l1"])
    chosen += [(r, f"not flagged, {k}{'st' if k == 1 else 'nd' if k == 2 else 'rd' if k == 3 else 'th'} smallest")
               for k, r in enumerate(quiet[:COMPARISON_LABELS], start=1)]

    real = _real_trigger_pictures(sources)
    gallery = []
    for record, role in chosen:
        label = record["label"]
        arrays = sources.triggers.get(label) if sources.triggers is not None else None
        pictures = None
        if arrays is not None:
            mask, pattern = arrays
            pictures = [Picture(f"label_{label}_{kind}.png", plots.array_png(image),
                                f"reversed trigger {kind} for label {label}")
                        for kind, image in (("mask", mask), ("pattern", pattern), ("fusion", mask[None] * pattern))]
        gallery.append({**record, "role": role, "pictures": pictures,
                        "is_target": label in targets, "real": real.get(label, [])})
    return gallery, hidden


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s"


def _setting_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "null" if value is None else str(value)


def _settings_table(mapping: dict, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [(str(k), _setting_value(v)) for k, v in mapping.items() if k not in skip]


def _repair_context(sources: ReportSources) -> dict:
    """Methods' tables merged into one, curves for plotting, before/after summaries."""
    methods, table_rows, columns, curves, saved = [], [], ["method"], [], []
    for directory, repair in sources.repairs:
        method = str(repair.get("method") or directory.name)
        table = [r for r in repair.get("table", []) if isinstance(r, dict)]
        for row in table:
            for key in row:
                if key not in columns and key != "method":
                    columns.append(key)
            table_rows.append({"method": method, **{k: v for k, v in row.items() if k != "method"}})
        curve = [r for r in repair.get("curve", []) if isinstance(r, dict) and _as_float(r.get("fraction_pruned")) is not None]
        if curve:
            curves.append((method, curve))
            saved.append((method, [r for r in table if _as_float(r.get("fraction_pruned")) is not None]))
        before, after = repair.get("before"), repair.get("after")
        methods.append({"method": method, "dir": _relative(directory, sources.root),
                        "before": before if isinstance(before, dict) else None,
                        "after": after if isinstance(after, dict) else None,
                        "settings": _settings_table(repair, skip=("table", "curve", "before", "after"))})
    return {"methods": methods, "columns": columns, "rows": table_rows, "curves": curves, "saved": saved}


def build_context(sources: ReportSources) -> tuple[dict, list[Picture]]:
    """Everything the templates show, plus the plots to save next to the report."""
    scan, truth = sources.scan or {}, sources.truth
    rows = _label_rows(scan)
    threshold = _as_float(scan.get("threshold"))
    threshold = 2.0 if threshold is None else threshold
    targets = _truth_targets(truth)
    l1 = np.array([r["mask_l1"] for r in rows], dtype=float)
    median = mad = threshold_l1 = None
    if len(rows):
        settings = scan.get("settings") if isinstance(scan.get("settings"), dict) else {}
        detection = settings.get("detection") if isinstance(settings.get("detection"), dict) else None
        median, mad, threshold_l1 = mad_threshold(l1, threshold, detection)
    for r in rows:  # a scan written without indices still gets them, computed the same way
        if r["anomaly_index"] is None and mad:
            r["anomaly_index"] = max(0.0, (median - r["mask_l1"]) / mad)

    # how the flags were decided, for the figures' legends
    test = scan.get("test") if isinstance(scan.get("test"), dict) else {}
    reference = test.get("reference") if isinstance(test.get("reference"), dict) else {}
    alpha = _as_float(scan.get("alpha"))
    calibrated = scan.get("rule") == "calibrated" and alpha is not None
    flag_rule = f"calibrated test, alpha {alpha:g}" if calibrated else None
    # how each label was searched, and what the calibrated test was computed from
    roles = search_roles(scan, rows)
    groups = search_groups(scan, rows, roles)
    decision = decision_inputs(scan, rows, roles) if rows else None
    two_signals = decision is not None and decision.combined
    calibrated_l1 = _as_float(reference.get("threshold_l1")) if calibrated else None
    if calibrated and calibrated_l1 is None and decision is not None and decision.critical_index is not None:
        # the size index a label of the reference's median margin (z_margin = 0) needs
        # (calibrated.calibrated_test's threshold_l1): the critical index, times sqrt(2) for the sum
        needed = decision.critical_index * (math.sqrt(2) if two_signals and decision.combination == "sum" else 1.0)
        calibrated_l1 = math.exp(decision.median - needed * decision.scale)
    at_median = " at the median margin" if two_signals else ""
    rule_line = ((calibrated_l1, f"calibrated threshold{at_median}: L1 < {calibrated_l1:.4g} (p <= {alpha:g})")
                 if calibrated_l1 is not None else None)
    # the step-down step that decided a label (tested in both stages: the one of the smaller p-value)
    deciding: dict[int, dict] = {}
    for s in (decision.steps if decision else []):
        if s["p_value"] is not None and (s["label"] not in deciding or s["p_value"] < deciding[s["label"]]["p_value"]):
            deciding[s["label"]] = s
    for r in rows:  # the p-value that decided a label: its step's, else the record's
        step = deciding.get(r["label"])
        r["decision_p"] = step["p_value"] if step else r["p_value"]
        r["role"] = roles.get(r["label"])
        # the two signals' indices as the test computed them: at that step, else at the first fit
        r["size_index"] = (step["size_index"] if step and step["size_index"] is not None
                           else decision.size.get(r["label"])) if two_signals else None
        r["margin_index"] = (step["margin_index"] if step and step["margin_index"] is not None
                             else decision.margin.get(r["label"])) if two_signals else None
        r["combined_index"] = (step["index"] if step and step["index"] is not None
                               else decision.reference.get(r["label"], decision.tested.get(r["label"]))) \
            if two_signals else None
    plots_out: list[Picture] = []
    if rows:
        plots_out.append(Picture("mask_l1", plots.figure_png(plots.mask_l1_figure(
            [r["label"] for r in rows], l1, [r["flagged"] for r in rows], threshold_l1, median, threshold, targets,
            flag_rule, rule_line, [r["role"] for r in rows], {g.role: f"{g.name} ({len(g.labels)})" for g in groups})),
            "mask L1 norm of every label, marked by how it was searched, with the thresholds; flagged labels marked"))
        if decision is not None:
            plots_out.append(Picture("decision", plots.figure_png(plots.decision_figure(decision)),
                                     f"the calibrated test: the reference labels' {decision.index_name.replace('index', 'indices')}, "
                                     "the fitted null, the critical index and each tested label's p-value"))
        if two_signals:
            tested_labels = sorted(set(decision.size) & set(decision.margin))
            flagged_tested = [r["label"] for r in rows if r["flagged"] and r["label"] in decision.size]
            plots_out.append(Picture("signals", plots.figure_png(plots.signals_figure(
                decision.size, decision.margin, {t: roles.get(t) for t in tested_labels}, flagged_tested,
                decision.critical_index, decision.combination, targets, {g.role: g.name for g in groups})),
                "the two signals of every tested label: size index against margin index, with the decision "
                "boundary; flagged labels marked"))
        indices = [r for r in rows if r["anomaly_index"] is not None]
        if indices:
            tested = [r["role"] != UNTESTED for r in indices]
            plots_out.append(Picture("anomaly_index", plots.figure_png(plots.anomaly_index_figure(
                [r["anomaly_index"] for r in indices], [r["flagged"] for r in indices], threshold, flag_rule,
                tested if not all(tested) else None)),
                "histogram of anomaly indices with the threshold"))

    repair = _repair_context(sources)
    if repair["curves"]:
        plots_out.append(Picture("repair_curve", plots.figure_png(plots.repair_curve_figure(
            repair["curves"], repair["saved"])), "clean accuracy and attack success versus fraction pruned"))

    flagged = sorted((r for r in rows if r["flagged"]),
                     key=lambda r: (r["decision_p"] if calibrated and r["decision_p"] is not None else 0,
                                    -(r["anomaly_index"] or 0)))
    unflagged = [r for r in rows if not r["flagged"] and r["anomaly_index"] is not None]
    gallery, hidden = _gallery(sources, rows, flagged, targets) if rows else ([], 0)
    model = scan.get("model") if isinstance(scan.get("model"), dict) else {}
    data = scan.get("data")
    found = [t for t in targets if any(r["label"] == t for r in flagged)]
    context = {
        "version": __version__,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "has_scan": sources.scan is not None,
        "backdoored": bool(flagged),
        # the scan's own verdict (ScanResult.verdict); scans written before it was recorded have none
        "inconclusive": not flagged and scan.get("verdict") == "inconclusive",
        "index_ceiling": _as_float(scan.get("index_ceiling")),
        "flagged": flagged,
        "verdict_listed": VERDICT_LISTED,
        # the label the scan's rule ranks first (the calibrated test: its own index, not the paper's)
        "most_anomalous_clean": most_anomalous(unflagged, calibrated),
        "n_labels": len(rows),
        "n_records": len(scan.get("labels", [])),
        "num_classes": _as_int(model.get("num_classes")),
        "threshold": threshold,
        # the calibrated model-level test (netcleanse.calibrated), when it decided
        "calibrated": calibrated,
        "calibrated_threshold_l1": calibrated_l1,
        "critical_index": _as_float(reference.get("critical_index")),
        "groups": groups,
        "distinct_groups": len(groups) > 1,
        "markers": MARKERS,
        "purpose": PURPOSE,
        "guarantee": guarantee(calibrated, alpha, threshold, decision.family_name if decision else None,
                               decision.signals if decision else 1),
        # the test combined the trigger size with the maximum logit margin (netcleanse.margin)
        "two_signals": two_signals,
        # margins in the records, but the recorded test predates them and used the size alone
        "margins_unused": decision is not None and not two_signals and any(r["max_margin"] is not None for r in rows),
        "reference_median_l1": math.exp(decision.median) if decision is not None else None,
        "reference_median_margin": math.exp(decision.margin_median) if two_signals else None,
        "n_reference": next((len(g.labels) for g in groups if g.role == REFERENCE and g.sample), None),
        "decision": decision,
        "rule": "calibrated" if calibrated else "mad",
        "alpha": alpha,
        "p_value": _as_float(scan.get("p_value")),
        "steps": [s for s in test.get("steps", []) if isinstance(s, dict)],
        "mad_flagged": scan.get("mad_flagged") if isinstance(scan.get("mad_flagged"), list) else None,
        "median_l1": median, "mad": mad, "threshold_l1": threshold_l1,
        # an inconclusive scan's threshold can lie below zero, where no mask can get
        "threshold_unreachable": threshold_l1 is not None and threshold_l1 <= 0,
        # or above zero but out of reach: a label's own mask is in the median and MAD (two labels: +-0.67)
        "ceiling_below": (_as_float(scan.get("index_ceiling"))
                          if threshold_l1 is not None and threshold_l1 > 0
                          and (_as_float(scan.get("index_ceiling")) or math.inf) <= threshold else None),
        "model": model,
        "model_name": str(model.get("name") or "unnamed model"),
        "data": "data-free" if data in (None, "data-free") else str(data),
        "data_free": data in (None, "data-free"),
        "preset": scan.get("preset"),
        "elapsed": _duration(_as_float(scan.get("elapsed_s"))),
        "smallest": sorted(rows, key=lambda r: r["mask_l1"])[:SMALLEST_LABELS_TABLE],
        "gallery": gallery,
        "gallery_hidden": hidden,
        "has_masks": sources.triggers is not None,
        "truth": truth,
        "targets": targets,
        "found": found,
        "missed": [t for t in targets if t not in found],
        "extra": [r["label"] for r in flagged if r["label"] not in targets],
        "truth_settings": _settings_table(truth or {}, skip=("triggers",)),
        "truth_triggers": [t for t in (truth or {}).get("triggers", []) if isinstance(t, dict)],
        "repair": repair,
        "plots": {p.name: p for p in plots_out},
        "scan_settings": _settings_table({k: v for k, v in scan.items() if k not in ("labels", "model", "settings")}),
        "algorithm_settings": _settings_table(scan.get("settings") if isinstance(scan.get("settings"), dict) else {}),
        "model_settings": _settings_table(model),
        "sources": {"scan": _relative(sources.scan_dir, sources.root),
                    "truth": _relative(sources.truth_dir, sources.root),
                    "repairs": [_relative(d, sources.root) for d, _ in sources.repairs]},
    }
    return context, plots_out


# ----------------------------------------------------------------------------------------------
# Formatting helpers for the templates
# ----------------------------------------------------------------------------------------------

def fmt_number(value, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; '—' when absent."""
    number = _as_float(value)
    if number is None:
        return "—" if value is None else str(value)
    if float(number).is_integer() and abs(number) < 1e9 and not isinstance(value, float):
        return str(int(number))
    return f"{number:.{digits}g}"


def fmt_index(value) -> str:
    """An anomaly index, always with two decimals (the way the verdict states it)."""
    number = _as_float(value)
    return "—" if number is None else f"{number:.2f}"


def fmt_pvalue(value) -> str:
    """A p-value with two significant digits ('—' when absent)."""
    number = _as_float(value)
    return "—" if number is None else f"{number:.2g}"


def fmt_percent(value) -> str:
    """A fraction in [0, 1] as a percentage with one decimal."""
    number = _as_float(value)
    return "—" if number is None else f"{100 * number:.1f} %"


# the plots a report can have, each written as <report stem>_<name>.png beside it
PLOT_NAMES = ("mask_l1", "decision", "signals", "anomaly_index", "repair_curve")


def fmt_cell(key: str, value) -> str:
    """A table cell: fractions as percentages, other numbers compact, the rest as text."""
    if value is None:  # a column this row has no value for
        return "—"
    if isinstance(value, bool):
        return _setting_value(value)
    base = key.removesuffix("_after_fine_tuning")
    if base in FRACTION_KEYS and _as_float(value) is not None:
        return fmt_percent(value)
    if base.removesuffix("_by_set") in FRACTION_KEYS and isinstance(value, list) \
            and all(_as_float(v) is not None for v in value):  # one figure per poisoned set
        return " / ".join(fmt_percent(v) for v in value)
    if isinstance(value, (int, float)):
        return fmt_number(value)
    return _setting_value(value)


def markdown_escape(value: Any) -> Any:
    """Make a string from JSON inert in Markdown (and in the HTML that Markdown allows)."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    text = value.replace("\r", " ").replace("\n", " ")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|#~":
        text = text.replace(char, "\\" + char)
    return text


def _environment(fmt: str) -> Environment:
    if fmt == "html":
        env = Environment(loader=PackageLoader("netcleanse", "templates"), autoescape=True,
                          undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    else:
        # Every {{ expression }} passes through markdown_escape unless the code marked it safe.
        env = Environment(loader=PackageLoader("netcleanse", "templates"), autoescape=False,
                          finalize=markdown_escape, undefined=StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(num=fmt_number, index=fmt_index, pct=fmt_percent, pval=fmt_pvalue, cell=fmt_cell)
    return env


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

_SUFFIXES = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}


def _report_format(format: str | None, out: str | Path | None) -> str:  # noqa: A002
    """The format asked for, else the one ``out``'s suffix names, else html; a suffix that names the
    other format is refused rather than written (an HTML page in ``report.md``)."""
    named = _SUFFIXES.get(Path(out).suffix.lower()) if out is not None and not Path(out).is_dir() else None
    if out is not None and not Path(out).is_dir() and Path(out).suffix and named is None:
        raise NetcleanseError(f"--out {out}: a report is an .html or .md file (or a folder); the results "
                              "for programs are the scan's scan.json and a repair's repair.json")
    if format is None:
        return named or "html"
    format = format.lower()  # noqa: A001
    if format not in FORMATS:
        raise NetcleanseError(f"unknown report format {format!r}; choose one of {', '.join(FORMATS)}")
    if named is not None and named != format:
        kind = {"html": "an HTML", "md": "a Markdown"}
        raise NetcleanseError(f"--out {out} names {kind[named]} file but the format asked for is {format}; "
                              f"give --format {named} or another --out")
    return format


def _output_path(root: Path, fmt: str, out: str | Path | None) -> Path:
    if out is None:
        return root / f"report.{fmt}"
    out = Path(out)
    if not out.parent.is_dir():
        raise NetcleanseError(f"cannot write the report to {out}: directory {out.parent} does not exist")
    if out.is_dir() or (not out.exists() and not out.suffix):  # a new name without a suffix: a folder
        return out / f"report.{fmt}"
    return out


def render_report(directory: str | Path, format: str | None = None, out: str | Path | None = None,  # noqa: A002
                  force: bool = False) -> Path:
    """Render the report of a scan (and its truth and repairs) found in ``directory``.

    Writes ``report.html`` (or ``report.md``) into ``directory`` unless ``out`` names another file
    or directory (a new name without a suffix is made a directory), and the plots as
    ``<report stem>_<plot>.png`` beside it; Markdown's trigger images go to
    ``<report stem>_triggers/``. Returns the report's path. Inputs are only read. ``format``:
    "html" or "md"; by default the one ``out``'s suffix names (.html, .md), else html.
    The default report in ``directory`` is netcleanse's own and is replaced; a file named with
    ``out`` that exists (or one of its plots) is replaced only with ``force``.
    """
    format = _report_format(format, out)  # noqa: A001
    sources = find_sources(directory)
    path = _output_path(sources.root, format, out)
    context, plot_pictures = build_context(sources)
    if out is not None and not force:
        taken = [p for p in [path] + [path.with_name(f"{path.stem}_{pic.name}.png") for pic in plot_pictures]
                 if p.exists()]
        if taken:
            raise NetcleanseError(f"{taken[0]} exists; choose another --out or use --force to replace it")

    path.parent.mkdir(exist_ok=True)  # a new folder named by --out (its parent exists)
    for picture in plot_pictures:
        plot_path = path.with_name(f"{path.stem}_{picture.name}.png")
        plot_path.write_bytes(picture.png)
        picture.src = plot_path.name if format == "md" else _data_uri(picture.png)
    if out is None or force:  # an earlier render's plot that this one has not: stale (only what may be replaced)
        for name in set(PLOT_NAMES) - {picture.name for picture in plot_pictures}:
            path.with_name(f"{path.stem}_{name}.png").unlink(missing_ok=True)

    gallery_pictures = [p for row in context["gallery"] for p in (row["pictures"] or []) + row["real"]]
    if format == "md" and gallery_pictures:
        folder = path.with_name(f"{path.stem}_triggers")
        folder.mkdir(exist_ok=True)
        for picture in gallery_pictures:
            (folder / picture.name).write_bytes(picture.png)
            picture.src = f"{folder.name}/{picture.name}"
    else:
        for picture in gallery_pictures:
            picture.src = _data_uri(picture.png)
    if format == "md":  # our own file names: safe to put into Markdown links as they are
        for picture in plot_pictures + gallery_pictures:
            picture.src = Markup(picture.src)

    text = _environment(format).get_template(f"report.{format}.j2").render(**context)
    with atomic_write(path) as tmp:  # a full disk leaves the previous report, never half of one
        tmp.write_text(text, encoding="utf-8")
    return path


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
