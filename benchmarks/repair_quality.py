"""Measure every repair method on the BadNet lab's ground-truth models (patch, blend, multi-target).

For each BadNet: train it (``netcleanse.lab.make_badnet``, MNIST, seed 0), scan it with the clean
validation split and data-free (``netcleanse.scan``), then repair with each method, giving
it only the scan's flagged labels and reversed triggers and the clean validation split; the
clean test split and the lab's poisoned test sets fill the tables and are never used to build a
repair. Prints Markdown tables (percentages).

    .venv/bin/python benchmarks/repair_quality.py [--kinds patch,blend,multi] [--fine-tune-epochs 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from netcleanse.errors import NetcleanseError
from netcleanse.lab import make_badnet
from netcleanse.repair import repair
from netcleanse.scanning import scan

COLUMNS = [("model", "model"), ("drop_threshold", "drop"), ("fraction_pruned", "pruned %"),
           ("clean_accuracy", "clean acc %"), ("attack_success", "ASR %"),
           ("clean_accuracy_after_fine_tuning", "clean acc % after FT"),
           ("attack_success_after_fine_tuning", "ASR % after FT"),
           ("poison_detection", "answered N %"), ("false_positive", "clean answered N %")]


def markdown(rows: list[dict]) -> str:
    present = [(k, t) for k, t in COLUMNS if any(row.get(k) is not None for row in rows)]
    lines = ["| " + " | ".join(t for _, t in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        cells = []
        for key, _ in present:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key == "model":
                cells.append(str(value))
            elif key == "drop_threshold":
                cells.append(f"{value:g}")
            else:
                cells.append(f"{100 * value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="patch,blend,multi")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the numbers below were measured on a shared 2-core machine
    for kind in args.kinds.split(","):
        badnet = make_badnet("mnist", kind, target=[1, 5] if kind == "multi" else 7, seed=args.seed, progress=False)
        print(f"\n## {kind} BadNet: targets {badnet.targets}, clean accuracy "
              f"{100 * badnet.truth['clean_accuracy']:.2f}%, ASR {badnet.truth['attack_success']}\n")
        scans = {"with data": scan(badnet.model, badnet.val, seed=args.seed, progress=False),
                 "data-free": scan(badnet.model, data_free=True, seed=args.seed, progress=False)}
        for mode, result in scans.items():
            print(f"scan {mode}: flagged {result.flagged} ({result.elapsed_s:.1f} s)")
        runs = [("fine-prune", "with data", True), ("unlearn", "with data", True), ("filter", "data-free", False),
                ("filter", "with data", True), ("disagree", "with data", True)]
        for method, mode, with_data in runs:
            started = time.perf_counter()
            try:
                result = repair(badnet.model, scans[mode], method, badnet.val if with_data else None,
                                test_clean=badnet.clean_test, test_poisoned=badnet.poisoned_tests,
                                fine_tune_epochs=args.fine_tune_epochs, seed=args.seed, progress=False)
            except NetcleanseError as exc:  # e.g. the scan flagged nothing: nothing to unlearn or filter
                print(f"\n### {method} ({mode} scan): not run: {exc}")
                continue
            print(f"\n### {method} ({mode} scan{', calibrated on clean data' if method == 'filter' and with_data else ''};"
                  f" {time.perf_counter() - started:.0f} s)\n")
            print(markdown(result.table), flush=True)


if __name__ == "__main__":
    main()
