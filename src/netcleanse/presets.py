"""The scan's presets: named, frozen plans of how :func:`netcleanse.scanning.scan` searches.

A :class:`Preset` fixes a scan's budget: its stages (:class:`Stage`: a trigger-search
:class:`~netcleanse.neural_cleanse.Schedule` and how many labels share a forward pass), how many
candidates and random controls are refined, how many inputs the triggers are optimised on and how
many are held back, the data-free inputs, the longer refinement of models with few labels, and the
margin search's budget. :data:`PRESETS` holds the two a scan can name, ``reference`` (the original
protocol) and ``fast`` (the default); :mod:`netcleanse.scanning` describes how a scan runs each.
A preset's :meth:`Preset.to_dict` is recorded in scan.json (``settings.plan``) and is part of the
resume key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import NetcleanseError
from .neural_cleanse import Schedule


@dataclass(frozen=True)
class Stage:
    """One pass of trigger searches: its schedule and how many labels share a forward pass."""

    name: str
    schedule: Schedule
    label_chunk: int
    # how many of the held-back inputs the stage's attack success of each trigger is measured on
    # (the first ones, a random sample); None: all of them
    held_back: int | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "label_chunk": self.label_chunk, "schedule": self.schedule.to_dict(),
                # only when set, so that the settings (and resume key) of scans without it stay as they were
                **({} if self.held_back is None else {"held_back": self.held_back})}


@dataclass(frozen=True)
class Preset:
    coarse: Stage
    refine: Stage | None = None  # None: single stage, every label to convergence
    candidates: int = 16
    max_candidates: int = 64
    controls: int = 48
    n_opt: int = 32  # inputs the triggers are optimised on
    n_val: int = 32  # held-back inputs for the attack success rate
    data_free_inputs: str = "inversion"
    # models with few labels (all of them refined) can afford a longer refinement on more inputs
    few_labels_refine: Stage | None = None
    few_labels_n_opt: int | None = None
    # the second per-label signal (:mod:`netcleanse.margin`): the maximum logit margin reached from
    # ``margin_restarts`` noise starts in ``margin_steps`` steps, for every label the verdict tests.
    # 2 x 150 costs ~300 passes per tested label (~7 % of a 1283-label scan); 4 x 200 detected one
    # more backdoor of 112 on the development half but costs ~18 %, above the 15 % the verdict may add
    margin_restarts: int = 2
    margin_steps: int = 150
    # data-free inputs: keep each inverted input at the first step its class reaches this probability
    # (:mod:`netcleanse.synthesis`); None: all INVERSION_STEPS steps
    inversion_confidence: float | None = None
    # the same for models with few labels (None: ``inversion_confidence``). Off in the presets: 0.9
    # found 24 of 28 backdoors data-free on the 10-label development models instead of 21 (clean
    # models flagged 1 of 30 instead of 0), but on the evaluation half it flagged 6 of 60 clean models
    # (all their digit 1) instead of 1: inputs kept at 0.9 make a naturally easy label an outlier,
    # and the test no longer holds its level (benchmarks/RESULTS.md, "stopping the data-free inversion")
    few_labels_inversion_confidence: float | None = None
    # how coarse searches that never reached the attack-success goal rank for candidacy (after every
    # one that did): "mask" (their mask L1, the default) or "success" (the attack success they
    # reached, highest first). A prototype (benchmarks/weak_targets.py): data-free on a 100-label lab
    # net with a blended trigger, 98 of 100 coarse searches failed and a target whose failed search
    # reached 76 % attack success (2nd of 100) ranked 57th by its mask and was never refined
    rank_failed: str = "mask"
    # data-free scans of models with few labels (:meth:`for_labels`): every stage's attack-success goal
    # (None: the stages' own), and the expected transferability (:mod:`netcleanse.transferability`)
    # at which a label is tested first, against the other labels alone (None: not computed; the
    # transferable labels' stage of :func:`netcleanse.calibrated.calibrated_test`). Data-free inputs are
    # unnatural: a planted trigger flips only about half of them (real images: 99 %), so a search held
    # to 99 % attack success on them inflates the targets' triggers; and with 10 labels two or three
    # targets hide each other in the reference. Chosen on the development half (benchmarks/RESULTS.md)
    few_labels_data_free_goal: float | None = None
    few_labels_data_free_transfer: float | None = None
    # the same threshold for scans of models with few labels WITH data (None: transferability not
    # computed; the search is the plan's own either way). 0.25 in ``fast``: chosen on the 10-label
    # development half (27 of 28 backdoors detected and exact instead of 26 and 25, clean 0 of 30),
    # then on the fresh evaluation half 49 of 52 detected and 47 exact instead of 46 and 45, clean 0
    # of 60 (benchmarks/RESULTS.md, "With data, transferable labels first"). Clean images are
    # natural inputs: a planted trigger transfers across most of them (0.24-0.81 on the weak-target
    # nets' targets), a clean label's per-input triggers seldom (at most 0.15 there)
    few_labels_data_transfer: float | None = None
    # the transferability's budget: per label, ``transfer_sources`` per-input triggers of
    # ``transfer_steps`` steps, each tried on ``transfer_pool`` other inputs
    transfer_sources: int = 8
    transfer_pool: int = 64
    transfer_steps: int = 150
    # set by :meth:`for_labels` for the scan at hand: the transferability threshold it uses (None: off)
    transfer_threshold: float | None = None

    def __post_init__(self):
        if self.rank_failed not in ("mask", "success"):
            raise NetcleanseError(f"rank_failed is 'mask' or 'success', not {self.rank_failed!r}")

    def few_labels(self, n_labels: int) -> bool:
        """Whether a scan of ``n_labels`` labels takes the few-labels plan (every label refined
        with ``few_labels_refine``): while refining all of them so costs no more image passes than
        the many-labels refinement at its largest, ``max_candidates + controls`` labels with
        ``refine``, and they are no more than ``candidates + controls``.

        With the ``fast`` preset: ``n * 12,800 <= 112 * 2,400`` passes, i.e. up to 21 labels (a
        10-label MNIST net takes the plan, a 43-class traffic-sign net does not), so no label
        count costs more refinement than a 1283-label scan."""
        if self.refine is None or self.few_labels_refine is None or n_labels > self.candidates + self.controls:
            return False
        return n_labels * self.few_labels_refine.schedule.max_passes() <= \
            (self.max_candidates + self.controls) * self.refine.schedule.max_passes()

    def for_labels(self, n_labels: int, data_free: bool = False) -> "Preset":
        """The plan a scan of ``n_labels`` labels follows: with few labels (:meth:`few_labels`) the
        ``few_labels_*`` settings replace their counterparts (data-free, also the
        ``few_labels_data_free_*`` ones), else the preset itself."""
        if not self.few_labels(n_labels):
            return self
        confidence = self.few_labels_inversion_confidence
        plan = replace(self, refine=self.few_labels_refine, n_opt=self.few_labels_n_opt or self.n_opt,
                       inversion_confidence=self.inversion_confidence if confidence is None else confidence)
        if not data_free:
            return plan if self.few_labels_data_transfer is None else \
                replace(plan, transfer_threshold=self.few_labels_data_transfer)
        goal = self.few_labels_data_free_goal
        if goal is not None:
            plan = replace(plan, **{name: replace(stage, schedule=replace(stage.schedule, attack_threshold=goal))
                                    for name, stage in (("coarse", plan.coarse), ("refine", plan.refine))})
        return replace(plan, transfer_threshold=self.few_labels_data_free_transfer)

    def to_dict(self) -> dict:
        budget = {"sources": self.transfer_sources, "pool": self.transfer_pool, "steps": self.transfer_steps}
        return {"coarse": self.coarse.to_dict(), "refine": None if self.refine is None else self.refine.to_dict(),
                "candidates": self.candidates, "max_candidates": self.max_candidates, "controls": self.controls, "n_opt": self.n_opt,
                "n_val": self.n_val, "data_free_inputs": self.data_free_inputs,
                "few_labels_refine": None if self.few_labels_refine is None else self.few_labels_refine.to_dict(),
                "few_labels_n_opt": self.few_labels_n_opt, "margin_restarts": self.margin_restarts,
                "margin_steps": self.margin_steps,
                # only when set, so that the settings (and resume key) of scans without it stay as they were
                **({} if self.inversion_confidence is None else {"inversion_confidence": self.inversion_confidence}),
                **({} if self.few_labels_inversion_confidence is None else
                   {"few_labels_inversion_confidence": self.few_labels_inversion_confidence}),
                **({} if self.rank_failed == "mask" else {"rank_failed": self.rank_failed}),
                **({} if self.few_labels_data_free_goal is None else
                   {"few_labels_data_free_goal": self.few_labels_data_free_goal}),
                **({} if self.few_labels_data_free_transfer is None else
                   {"few_labels_data_free_transfer": self.few_labels_data_free_transfer,
                    "transfer": budget}),
                **({} if self.few_labels_data_transfer is None else
                   {"few_labels_data_transfer": self.few_labels_data_transfer,
                    # (the budget once, where the data-free threshold has not recorded it already)
                    **({} if self.few_labels_data_free_transfer is not None else {"transfer": budget})}),
                **({} if self.transfer_threshold is None else {"transfer_threshold": self.transfer_threshold})}


PRESETS: dict[str, Preset] = {
    "reference": Preset(coarse=Stage("reference", Schedule(), label_chunk=1), n_opt=1000, n_val=200),
    "fast": Preset(
        coarse=Stage("coarse", Schedule(batch_size=4, steps_per_epoch=1, max_epochs=24, patience=2,
                                        early_stop_patience=8, mask_init=0.05), label_chunk=96,
                     # the coarse pass's attack success only describes the labels left unrefined (the
                     # refinement measures its labels' on all held-back inputs): 32 inputs, not 128,
                     # spare a 1283-label scan ~120,000 forward passes
                     held_back=32),
        # early stop only after 100 steps without a smaller mask: a label whose cost collapsed on
        # noisy 8-input batches needs that long to recover (with 30, a third of the CSAW controls
        # stopped after ~40 steps with masks 3-5x the median, the MAD doubled, and the
        # multi-target net's targets fell below the threshold)
        refine=Stage("refine", Schedule(batch_size=8, steps_per_epoch=1, max_epochs=300, patience=3,
                                        early_stop_patience=100), label_chunk=48),
        few_labels_refine=Stage("refine", Schedule(batch_size=32, steps_per_epoch=2, max_epochs=200, patience=5,
                                                   early_stop_patience=20), label_chunk=48),
        # 256 inputs to optimise on rather than 32: the refinement's ~150-300 steps of 8 would
        # otherwise revisit each input ~50 times, and clean labels then find small masks that only
        # fit those inputs (on the CSAW sunglasses net, data-free: 10 labels flagged with 32 inputs,
        # 2 with 256; held-back attack success of the controls' triggers 41 % -> 79 %)
        n_opt=256, n_val=128,
        few_labels_n_opt=200,
        few_labels_data_free_goal=0.5,
        few_labels_data_free_transfer=0.05,
        few_labels_data_transfer=0.25,
    ),
}


def preset_variant(name: str, **changes) -> "str | Preset":
    """The preset ``name`` with ``changes`` to its fields, for :func:`netcleanse.scanning.scan`:
    ``name`` itself when every change equals the preset's own value (the scan then records the
    name), else the changed :class:`Preset` (recorded as "custom" with its whole plan)."""
    base = plan_of(name)
    if all(getattr(base, field) == value for field, value in changes.items()):
        return name
    return replace(base, **changes)


def inversion_variant(name: str, confidence: str | float | None) -> "str | Preset":
    """The preset ``name`` with its data-free inversion stopped at ``confidence`` for every model,
    few labels or many (the benchmarks' ``--inversion-confidence``): a probability, "off" (never
    stopped early) or None (the preset as it is)."""
    if confidence is None:
        return preset_variant(name)
    if str(confidence).strip().lower() == "off":
        value = None
    else:
        try:
            value = float(confidence)
        except ValueError:
            raise NetcleanseError(f"an inversion confidence is a probability or 'off', not {confidence!r}") from None
        if not 0 < value < 1:
            raise NetcleanseError(f"an inversion confidence must be between 0 and 1, got {value}")
    return preset_variant(name, inversion_confidence=value, few_labels_inversion_confidence=value)


def goal_variant(preset: "str | Preset", goal: float) -> "str | Preset":
    """``preset`` with the attack-success goal (``Schedule.attack_threshold``) of every stage's
    trigger search set to ``goal`` (the benchmarks' ``--attack-goal``); ``preset`` itself when every
    stage already has that goal (as :func:`preset_variant`, so a scan still records the name)."""
    if not 0 < goal <= 1:
        raise NetcleanseError(f"an attack-success goal is in (0, 1], got {goal}")
    plan = plan_of(preset)
    stages = {"coarse": plan.coarse, "refine": plan.refine, "few_labels_refine": plan.few_labels_refine}
    if all(s is None or s.schedule.attack_threshold == goal for s in stages.values()):
        return preset
    return replace(plan, **{name: None if s is None else replace(s, schedule=replace(s.schedule, attack_threshold=goal))
                            for name, s in stages.items()})


def plan_of(preset: "str | Preset") -> Preset:
    """The :class:`Preset` a scan given ``preset`` (a name or a Preset) starts from."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise NetcleanseError(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")
    return PRESETS[preset]
