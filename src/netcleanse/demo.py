"""``netcleanse demo``: the whole story on a model whose truth we know, in a few minutes on a laptop CPU.

1. train a BadNet on the built-in MNIST digits: a 4x4 checkerboard patch in the bottom-right
   corner turns any digit into a target picked from the seed (``badnet/``);
2. scan it with Neural Cleanse, using the clean validation split (``scan/``);
3. repair it with the flagged labels' reversed triggers (``repair/``);
4. measure clean accuracy and attack success rate before and after, on the held-out test split;
5. write ``report.html``.

Stages whose module is not installed are reported as missing and skipped; nothing needs the
network or ``../shared``.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .evaluate import Evaluation, evaluate
from .lab import BadNet, make_badnet
from .repair import repair
from .report import render_report
from .scanning import scan
from .training import torch_threads
from .utils import check_out_dir, resolve_device

DEFAULT_OUT = "netcleanse-demo"
DEFAULT_REPAIR = "unlearn"
DEMO_DATASET = "mnist"
NUM_DIGITS = 10
# Sub-folders the demo owns inside its output folder; --force replaces exactly these.
STAGE_DIRS = ("badnet", "scan", "repair")


@dataclass
class DemoResult:
    out: Path
    seed: int
    target: int
    badnet: BadNet
    before: Evaluation
    flagged: list[int] | None = None  # None: the scan did not run
    after: Evaluation | None = None
    repair_method: str | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)  # stages that were skipped, and why
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def elapsed_s(self) -> float:
        return sum(self.timings.values())


def demo_target(seed: int) -> int:
    """The digit the demo's backdoor targets: a function of the seed only."""
    return random.Random(seed).randrange(NUM_DIGITS)




def run_demo(out=DEFAULT_OUT, seed: int = 0, force: bool = False, epochs: int | None = None,
             data_free: bool = False, repair_method: str = DEFAULT_REPAIR, preset: str = "fast",
             progress: bool = True, log: Callable[[str], None] | None = None, threads: int | None = 1,
             device: str = "cpu") -> DemoResult:
    """Train a patch BadNet on built-in MNIST, scan, repair, evaluate, report. See the module doc.

    ``out`` must be empty or absent unless ``force`` (which replaces the demo's own files there).
    ``data_free``: scan without the clean validation images. ``log`` receives one line per stage.
    ``threads``: torch CPU threads for the whole run; the demo's net is so small that one thread
    is fastest on a busy machine (see :mod:`netcleanse.training`); None keeps torch's setting.
    ``device``: where every stage computes, "cpu" (default) or "cuda".
    """
    resolve_device(device)
    with torch_threads(threads):
        return _run_demo(out, seed, force, epochs, data_free, repair_method, preset, progress,
                         log or (lambda message: None), device)


def _run_demo(out, seed, force, epochs, data_free, repair_method, preset, progress, say, device) -> DemoResult:
    out = check_out_dir(out, force)
    if force and out.is_dir():
        for name in STAGE_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    target = demo_target(seed)
    timings: dict[str, float] = {}
    notes: list[str] = []

    say(f"[1/5] training a BadNet on built-in MNIST: patch trigger, target {target}")
    started = time.perf_counter()
    badnet = make_badnet(DEMO_DATASET, "patch", target, seed=seed, epochs=epochs, out=out / "badnet",
                         progress=progress, device=device)
    timings["badnet"] = time.perf_counter() - started
    poisoned_test = badnet.poisoned_tests[0]
    before = evaluate(badnet.model, clean=badnet.clean_test, poisoned=poisoned_test, device=device)
    result = DemoResult(out, seed, target, badnet, before, notes=notes, timings=timings)

    say("[2/5] scanning every label with Neural Cleanse" + (" (data-free)" if data_free else
                                                            " (clean validation images)"))
    started = time.perf_counter()
    scan_result = scan(badnet.model, None if data_free else badnet.val, data_free=data_free, preset=preset,
                       seed=seed, progress=progress, device=device,
                       data_name=None if data_free else f"builtin:{DEMO_DATASET}/val")
    scan_result.save(out / "scan")
    result.flagged = list(scan_result.flagged)
    timings["scan"] = time.perf_counter() - started

    say(f"[3/5] repairing ({repair_method})")
    if not scan_result.flagged:
        notes.append("repair: skipped (the scan flagged no label"
                     + ("; inconclusive: no label could have been flagged)" if scan_result.verdict == "inconclusive"
                        else ")"))
    else:
        started = time.perf_counter()
        repaired = repair(badnet.model, scan_result, repair_method, badnet.val, test_clean=badnet.clean_test,
                          test_poisoned=poisoned_test, seed=seed, progress=progress, device=device)
        repaired.save(out / "repair", force=True)
        result.repair_method = repair_method
        say("[4/5] evaluating the repaired model")
        result.after = evaluate(repaired.model, clean=badnet.clean_test, poisoned=poisoned_test, device=device)
        timings["repair"] = time.perf_counter() - started

    say("[5/5] writing the report")
    started = time.perf_counter()
    result.report = render_report(out, format="html")
    timings["report"] = time.perf_counter() - started
    return result


def summary_lines(result: DemoResult) -> list[str]:
    """The demo's short human summary (what the CLI prints)."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [f"true backdoor target : {result.target} (patch trigger, {result.badnet.truth['n_poisoned']} of "
             f"{result.badnet.truth['n_train']} training images poisoned)"]
    if result.flagged is None:
        lines.append("flagged labels       : (scan not run)")
    else:
        verdict = ("found" if result.target in result.flagged else "MISSED")
        lines.append(f"flagged labels       : {result.flagged or 'none'} -> true target {verdict}")
    lines.append(f"before repair        : clean accuracy {pct(result.before.clean_accuracy)}, "
                 f"attack success {pct(result.before.attack_success)}")
    if result.after is not None:
        line = (f"after repair         : clean accuracy {pct(result.after.clean_accuracy)}, "
                f"attack success {pct(result.after.attack_success)}")
        if result.after.poison_detection is not None:
            line += f", poisoned inputs caught {pct(result.after.poison_detection)}"
        lines.append(line + f" ({result.repair_method})")
    for note in result.notes:
        lines.append(f"note                 : {note}")
    lines.append(f"files                : {result.out}")
    if result.report is not None:
        lines.append(f"report               : {result.report}")
    lines.append(f"time                 : {result.elapsed_s:.0f} s ("
                 + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()) + ")")
    return lines


__all__ = ["run_demo", "DemoResult", "demo_target", "summary_lines"]
