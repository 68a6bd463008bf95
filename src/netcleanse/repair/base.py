"""What every repair method shares: the options object, the job a method is given, what it
returns, and the registry that :func:`netcleanse.repair.repair` dispatches on.

A method is a function ``(job: RepairJob) -> MethodOutput`` registered under its name with
``@method("name")``; it builds the repaired (or guarded) model and the rows of its table. The
options it reads come from :class:`RepairOptions`, which holds every method's settings (each
method reads only its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..data import Dataset
from ..errors import NetcleanseError
from ..evaluate import evaluate, poisoned_metrics
from ..classifier import Classifier
from ..trigger import Trigger


@dataclass(frozen=True)
class RepairOptions:
    """The settings of a repair (see :func:`netcleanse.repair.repair` for what each does)."""

    drops: tuple = (2, 4, 10, 30)       # fine-prune, disagree: accuracy drops (points) saving a pruned model
    layer: str | None = None            # fine-prune, disagree: the conv layer to prune
    select_drop: float = 4.0            # fine-prune, disagree: which saved model becomes the result
    fine_tune_epochs: int = 0           # fine-prune, disagree
    lr: float | None = None             # fine-tuning (default 1e-3), unlearning (default 3e-3)
    epochs: int = 10                    # unlearn
    fraction: float = 0.5               # unlearn: share of the clean set stamped with a trigger
    quantile: float = 0.5               # filter
    top_fraction: float = 0.05          # filter
    seed: int = 0
    progress: bool = True
    device: str = "cpu"                 # where every method computes: "cpu" or "cuda"

    def __post_init__(self):
        """Refuse a setting no method can use, naming it (one error line in the CLI)."""
        for name, bad, rule in (
                ("drops", not self.drops or min(float(d) for d in self.drops) <= 0, "must be positive percentage points"),
                ("select_drop", self.select_drop < 0, "must be >= 0"),
                ("fine_tune_epochs", self.fine_tune_epochs < 0, "must be >= 0"),
                ("lr", self.lr is not None and not self.lr > 0, "must be > 0"),
                ("epochs", self.epochs < 1, "must be >= 1"),
                ("fraction", not 0 < self.fraction < 1, "must be in (0, 1)"),
                ("quantile", not 0 <= self.quantile <= 1, "must be in [0, 1]"),
                ("top_fraction", not 0 < self.top_fraction <= 1, "must be in (0, 1]")):
            if bad:
                raise NetcleanseError(f"{name} {rule} (got {getattr(self, name)!r})")

    def lr_or(self, default: float) -> float:
        """The learning rate set, else the method's ``default``."""
        return self.lr if self.lr is not None else default


@dataclass
class RepairJob:
    """What a method is given: the model, the scan's triggers, the clean data, the options, and
    the test sets (only for the table's measured columns, never for building the repair)."""

    model: Classifier
    triggers: dict[int, Trigger]
    clean: Dataset | None
    options: RepairOptions
    test_clean: Dataset | None = None
    test_poisoned: Dataset | None = None
    target: int | None = None
    original: dict = field(default_factory=dict)  # the original model's row of the table
    poisoned_sets: list = field(default_factory=list)  # the poisoned test sets one by one (several targets)

    def row(self, name: str, model: Classifier, clean: Dataset | None = None) -> dict:
        """A table row: ``model``'s accuracy on ``clean`` (if labelled) and on the test sets (with
        several poisoned sets, also each set's own attack success, :func:`poisoned_metrics`)."""
        row = {"model": name}
        device = self.options.device
        if clean is not None and clean.y is not None:
            row["clean_val_accuracy"] = evaluate(model, clean=clean, device=device).clean_accuracy
        measured = evaluate(model, clean=self.test_clean, device=device) if self.test_clean is not None else None
        if measured is not None:
            row["clean_accuracy"] = measured.clean_accuracy
        poisoned = poisoned_metrics(model, self.poisoned_sets or self.test_poisoned, self.target, device)
        row.update({key: poisoned.pop(key) for key in ("attack_success", "poison_detection") if key in poisoned})
        if measured is not None and measured.false_positive is not None:
            row["false_positive"] = measured.false_positive
        row.update(poisoned)  # (attack_success_by_set)
        return row

    def clean_classes(self) -> int:
        """How many of the model's classes the clean data holds images of (a training repair's
        coverage: a class it never sees can be forgotten)."""
        return 0 if self.clean is None or self.clean.y is None else int(self.clean.y.unique().numel())

    def need_clean(self, method: str) -> Dataset:
        if self.clean is None or self.clean.y is None or len(self.clean) == 0:
            raise NetcleanseError(f"--method {method} needs labelled clean data (--data)")
        return self.clean


@dataclass
class MethodOutput:
    """What a method returns: the repaired or guarded model, its table (the original's row
    first), and, where it has them, the fine-pruning curve, its settings and extra models to save."""

    model: Classifier
    table: list[dict]
    curve: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    saved: dict[str, Classifier] = field(default_factory=dict)
    row: str | None = None  # the table row (its "model") that measures ``model``; None: the last row


Method = Callable[[RepairJob], MethodOutput]
REGISTRY: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    """Register the decorated function as the repair method ``name``."""
    def register(run: Method) -> Method:
        REGISTRY[name] = run
        return run
    return register
