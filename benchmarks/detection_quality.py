"""Detection quality: scan every model of a BadNet-lab zoo with and without data, score both rules.

    python benchmarks/zoo.py --out zoo                                   # build the zoo first
    python benchmarks/detection_quality.py zoo --out dq --split dev      # scan (resumable)
    python benchmarks/detection_quality.py zoo --out dq --split eval --summary-only   # rows only, no zoo needed

For each model of the zoo (``benchmarks/zoo.py``; clean and backdoored, 10 and 100 labels) it runs
:func:`netcleanse.scan` on the model's own clean test images ("data") and data-free, and writes one
JSON file per scan to ``OUT/rows/`` (the scan's whole scan.json plus the model's truth). A scan
whose file exists is not redone, so an interrupted run continues; ``--shard K/N`` scans every
N-th model so N processes can share the work. ``--executor ray [--ray-address ADDR]`` runs each scan
as a Ray task (the worker reads the zoo's files, so on a cluster the zoo must be on a file system
every node sees; the rows come back and are written here).

The summary is computed from the rows alone, for the chosen half of the zoo (``--split``), per mode
and per number of labels, for the calibrated rule (:mod:`netcleanse.calibrated`, at ``--alpha``,
null ``--family``/``--df``, re-decided from the stored mask sizes so settings can be compared
without rescanning) and the paper's rule (anomaly index > 2) side by side:

* clean models flagged, with a 95 % Wilson interval;
* backdoored models detected (a planted target flagged) and with exactly the planted targets;
* AUROC (scikit-learn) of the model-level statistic: the calibrated test's -log10 p-value, the
  largest anomaly index for the paper's rule;
* inconclusive scans and the median time per scan.

Backdoors whose attack did not take (``attack_learned`` false) and models that did not learn their
task (clean accuracy below ``LEARNED_ACCURACY``, e.g. a 1000-class net whose training collapsed onto
one class) are listed but left out of the rates.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import netcleanse
from netcleanse.calibrated import DF, SCALE_FLOOR, TRANSFER_ORDERED, TRANSFER_RHO, calibrated_test
from netcleanse.errors import NetcleanseError
from netcleanse.presets import goal_variant, inversion_variant, plan_of, preset_variant
from netcleanse.scanning import calibrated_inputs, record_margins, tested_margins, tested_transfer
from netcleanse.utils import write_json_atomic
from zoo import add_executor_arguments, executor_from_args, load_member, parse_shard, read_zoo  # noqa: E402
# (benchmarks/ is on sys.path when run as a script)
from netcleanse.executor import LocalExecutor  # noqa: E402

MODES = ("data", "data-free")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def threshold_arg(text: str, option: str) -> float | None:
    """A transferability threshold given on the command line: a number, or 'off' (None)."""
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise NetcleanseError(f"{option} is a number or 'off', not {text!r}") from None


def row_path(out: Path, entry: dict, mode: str, seed: int) -> Path:
    return out / "rows" / f"{entry['folder']}__{mode}__seed{seed}.json"


def _scan_task(shared, job, progress) -> dict:
    """One scan of the benchmark, wherever the executor runs it: its row."""
    zoo, seed, preset = shared
    entry, mode = job
    model, clean = load_member(Path(zoo), entry, with_data=mode == "data")
    t = time.perf_counter()
    result = netcleanse.scan(model, clean, data_free=mode == "data-free", preset=preset, seed=seed, progress=False)
    return {"model": entry["folder"], "mode": mode, "seed": seed, "entry": entry, "time_s": time.perf_counter() - t,
            "scan": result.to_dict()}


def scan_zoo(zoo: Path, out: Path, entries: list[dict], modes, seed: int, preset: str, shard, log=print,
             executor=None) -> None:
    """Scan every (model, mode) of ``entries`` whose row file is missing, through ``executor``
    (:mod:`netcleanse.executor`; default this process)."""
    # pair by pair (a clean model beside its backdoored twin), so that a partial run is balanced
    entries = sorted(entries, key=lambda e: (e.get("pair", 0), e["folder"]))
    todo = [(e, m) for e in entries for m in modes if not row_path(out, e, m, seed).is_file()]
    todo = todo[shard[0]::shard[1]]
    started = time.perf_counter()
    executor = executor or LocalExecutor()
    for n, (_, row) in enumerate(executor.map(_scan_task, (str(Path(zoo).resolve()), seed, preset), todo), 1):
        entry, mode, result = row["entry"], row["mode"], row["scan"]
        write_json_atomic(row_path(out, entry, mode, seed), row)
        eta = (time.perf_counter() - started) / n * (len(todo) - n)
        log(f"[{n}/{len(todo)}, ETA {eta / 60:.0f} min] {entry['folder']:<24} {mode:<9} targets "
            f"{entry['targets']!s:<12} calibrated {result['flagged']!s:<12} (p {result['p_value']:.2g}) "
            f"mad {result['mad_flagged']!s:<16} {row['time_s']:.0f} s", flush=True)


def add_margins(zoo: Path, out: Path, entries: list[dict], modes, seed: int, preset: str, shard, log=print) -> None:
    """Give the rows of scans made before the second signal existed their labels' maximum margins,
    computed from the zoo model by the function the scan itself calls (a label's margin depends on
    the model, the seed and the label only, so this equals what a rescan would record; the trigger
    search in those rows is unchanged)."""
    todo = []
    for entry in sorted(entries, key=lambda e: (e.get("pair", 0), e["folder"])):
        paths = [row_path(out, entry, m, seed) for m in modes if row_path(out, entry, m, seed).is_file()]
        rows = [json.loads(p.read_text()) for p in paths]
        if any(r["scan"]["labels"][0].get("max_margin") is None for r in rows):
            todo.append((entry, paths, rows))
    todo = todo[shard[0]::shard[1]]
    started = time.perf_counter()
    for n, (entry, paths, rows) in enumerate(todo, 1):
        model, _ = load_member(zoo, entry, with_data=False)
        t = time.perf_counter()
        margins = record_margins(model, [row["scan"] for row in rows], seed, preset)
        for path, row in zip(paths, rows):
            row["margin_time_s"] = time.perf_counter() - t
            write_json_atomic(path, row)
        eta = (time.perf_counter() - started) / n * (len(todo) - n)
        log(f"[{n}/{len(todo)}, ETA {eta / 60:.0f} min] {entry['folder']:<24} margins of {len(margins)} labels "
            f"{time.perf_counter() - t:.0f} s", flush=True)


RULES = ("calibrated", "size-only", "mad")
# a model that classifies fewer of its clean test images right did not learn its task: no fair
# negative (or positive) for a detector (one 1000-class development model collapsed to 0.1 %)
LEARNED_ACCURACY = 0.5


def null_name(family: str | None, df: float | None) -> str:
    """How the summary names the null it re-decides with."""
    if family is None:
        return "the test's own for each number of labels" if df is None else f"t({df:g})"
    return family if family == "normal" else f"t({DF if df is None else df:g})"


def scored(row: dict) -> bool:
    """Whether a row counts in the rates: its model learned its task and, if backdoored, its backdoor."""
    entry = row["entry"]
    return entry["clean_accuracy"] >= LEARNED_ACCURACY and (not entry["backdoored"] or entry["attack_learned"])


def decide(row: dict, rule: str, alpha: float, family: str, df: float, scale: str = "qn",
           min_scale: float = SCALE_FLOOR, transfer_threshold: str | float | None = None,
           transfer_dependence: float = TRANSFER_RHO, transfer_ordered: bool = TRANSFER_ORDERED) -> dict:
    """One scan's verdict under ``rule``, re-decided from its stored per-label results: "calibrated"
    (trigger size and, where the row has them, maximum margins and transferability), "size-only" (the
    calibrated rule on the trigger size alone, as before the second signal) or "mad" (the paper's).
    ``transfer_threshold``: None, the scan's own; "off", without the transferable labels' stage; or a
    number, that threshold on the row's recorded transferability. ``transfer_dependence``: the first
    stage's allowance for easy labels that transfer (:data:`netcleanse.calibrated.TRANSFER_RHO`);
    ``transfer_ordered``: its first step tests the transferable labels together by their ordered
    indices, or (False) the most anomalous alone (:data:`netcleanse.calibrated.TRANSFER_ORDERED`)."""
    scan = row["scan"]
    if rule == "mad":
        flagged = sorted(scan["mad_flagged"])
        score = max(r["anomaly_index"] for r in scan["labels"])
        ceiling = scan.get("index_ceiling")
        inconclusive = not flagged and ceiling is not None and ceiling <= scan["threshold"]
    else:
        l1, reference, n_labels = calibrated_inputs(scan["labels"], scan["settings"]["detection"])
        margins = tested_margins(scan["labels"], scan["settings"]["detection"]) if rule == "calibrated" else None
        transfer = tested_transfer(scan["labels"], scan["settings"]["detection"]) if rule == "calibrated" else {}
        if transfer_threshold == "off":
            transfer = {}
        elif transfer_threshold is not None and transfer:
            transfer["transfer_threshold"] = float(transfer_threshold)
        if transfer:
            transfer.update(transfer_dependence=transfer_dependence, transfer_ordered=transfer_ordered)
        test = calibrated_test(l1, reference, n_labels, alpha=alpha, family=family, df=df, scale=scale,
                               min_scale=min_scale, margins=margins, **transfer)
        flagged = sorted(test.flagged)
        score = -math.log10(test.p_value) if test.p_value else 0.0
        inconclusive = test.inconclusive and not flagged
    targets = sorted(row["entry"]["targets"])
    return {"flagged": flagged, "score": score, "inconclusive": inconclusive, "detected": bool(flagged),
            "hit": bool(set(flagged) & set(targets)), "exact": flagged == targets}


def summarise(rows: list[dict], alpha: float, family: str, df: float, scale: str = "qn",
              min_scale: float = SCALE_FLOOR, log=print, transfer_threshold: str | float | None = None,
              transfer_dependence: float = TRANSFER_RHO, transfer_ordered: bool = TRANSFER_ORDERED) -> dict:
    from sklearn.metrics import roc_auc_score
    summary = {}
    groups = sorted({(r["mode"], r["entry"]["num_classes"]) for r in rows})
    for mode, k in groups:
        group = [r for r in rows if r["mode"] == mode and r["entry"]["num_classes"] == k]
        counted = [r for r in group if scored(r)]
        pos = [r for r in counted if r["entry"]["backdoored"]]
        neg = [r for r in counted if not r["entry"]["backdoored"]]
        times = [r["time_s"] for r in group]
        for rule in RULES:
            d_pos = [decide(r, rule, alpha, family, df, scale, min_scale, transfer_threshold, transfer_dependence,
                          transfer_ordered)
                     for r in pos]
            d_neg = [decide(r, rule, alpha, family, df, scale, min_scale, transfer_threshold, transfer_dependence,
                          transfer_ordered)
                     for r in neg]
            fp, tp = sum(d["detected"] for d in d_neg), sum(d["hit"] for d in d_pos)
            exact = sum(d["exact"] for d in d_pos)
            auroc = (roc_auc_score([1] * len(d_pos) + [0] * len(d_neg), [d["score"] for d in d_pos + d_neg])
                     if d_pos and d_neg else float("nan"))
            cell = {"clean": len(neg), "clean_flagged": fp, "clean_flagged_ci": wilson(fp, len(neg)),
                    "backdoored": len(pos), "detected": tp, "detected_ci": wilson(tp, len(pos)), "exact": exact,
                    "exact_ci": wilson(exact, len(pos)), "auroc": auroc,
                    "inconclusive": sum(d["inconclusive"] for d in d_pos + d_neg),
                    "not_learned": len(group) - len(counted), "median_time_s": float(np.median(times))}
            summary[f"{mode}/{k}/{rule}"] = cell
            lo, hi = cell["clean_flagged_ci"]
            log(f"{mode:<9} {k:>4} labels {rule:<10}: clean flagged {fp}/{len(neg)} ({_pct(fp, len(neg))}, "
                f"95 % CI {100 * lo:.1f}-{100 * hi:.1f} %); detected {tp}/{len(pos)} ({_pct(tp, len(pos))}); "
                f"exact {exact}/{len(pos)} ({_pct(exact, len(pos))}); AUROC {auroc:.3f}; inconclusive "
                f"{cell['inconclusive']}; {cell['not_learned']} models whose task or backdoor was not learned left out; "
                f"median {cell['median_time_s']:.0f} s/scan")
    # per mode, every label count together (the verdict issue's criterion is per mode); AUROC stays
    # per label count (model-level scores of different label counts are not on one scale)
    for mode in sorted({m for m, _ in groups}):
        for rule in RULES:
            cells = [summary[f"{mode}/{k}/{rule}"] for m, k in groups if m == mode]
            total = {key: sum(c[key] for c in cells) for key in ("clean", "clean_flagged", "backdoored", "detected",
                                                                   "exact", "inconclusive", "not_learned")}
            for key, n in (("clean_flagged", "clean"), ("detected", "backdoored"), ("exact", "backdoored")):
                total[f"{key}_ci"] = wilson(total[key], total[n])
            total["auroc_per_labels"] = {k: summary[f"{mode}/{k}/{rule}"]["auroc"] for m, k in groups if m == mode}
            summary[f"{mode}/all/{rule}"] = total
            ci = {key: "-".join(f"{100 * v:.1f}" for v in total[f"{key}_ci"]) for key in
                  ("clean_flagged", "detected", "exact")}
            log(f"{mode:<9}  all labels {rule:<10}: clean flagged {total['clean_flagged']}/{total['clean']} "
                f"({_pct(total['clean_flagged'], total['clean'])}, 95 % CI {ci['clean_flagged']} %); detected "
                f"{total['detected']}/{total['backdoored']} ({_pct(total['detected'], total['backdoored'])}, "
                f"{ci['detected']} %); exact {total['exact']}/{total['backdoored']} "
                f"({_pct(total['exact'], total['backdoored'])}, {ci['exact']} %); AUROC per label count "
                + ", ".join(f"{k}: {a:.3f}" for k, a in total["auroc_per_labels"].items()))
    return summary


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f} %" if n else "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for the per-scan rows (resumable)")
    ap.add_argument("--split", choices=("dev", "eval", "all"), default="dev")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--datasets", default=None, help="only these zoo datasets (comma-separated)")
    ap.add_argument("--max-pair", type=int, default=None,
                    help="only pairs up to this index (e.g. the finished prefix of an unfinished run)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--inversion-confidence", default=None,
                    help="scan with the preset's data-free inversion stopped at this confidence for every model, "
                         "or 'off' (a variant of the preset: use its own --out folder; default: the preset's own)")
    ap.add_argument("--few-labels-plan", choices=("on", "off"), default="on",
                    help="off: models with few labels take the many-labels plan's refinement (warm-started "
                         "from the coarse pass, 300 steps of 8 on the preset's inputs) instead of their own "
                         "(a variant of the preset: use its own --out folder)")
    ap.add_argument("--attack-goal", type=float, default=None,
                    help="scan with every trigger search's attack-success goal (the preset's 0.99) set to this "
                         "value, with data and data-free (a variant of the preset: use its own --out folder)")
    ap.add_argument("--refine-steps", type=int, default=None,
                    help="scan with the many-labels refinement's step limit (the preset's 300; models with few "
                         "labels keep their own refinement) set to this (a variant of the preset: use its own "
                         "--out folder)")
    ap.add_argument("--few-labels-data-free", choices=("on", "off"), default="on",
                    help="off: data-free scans of models with few labels keep the preset's attack-success goal and "
                         "measure no transferability (the plan before they were added; a variant of the preset: "
                         "use its own --out folder)")
    ap.add_argument("--few-labels-data-transfer", default=None,
                    help="scans WITH data of models with few labels measure each label's transferability and "
                         "test labels at or above this threshold first, or 'off' (a variant of the preset: use "
                         "its own --out folder; default: the preset's own)")
    ap.add_argument("--transfer-threshold", default=None,
                    help="summary: re-decide with this transferability threshold, or 'off' for the test without "
                         "the transferable labels' stage (default: each scan's own)")
    ap.add_argument("--transfer-dependence", type=float, default=TRANSFER_RHO,
                    help="summary: the transferable labels' stage's allowance for easy labels that transfer "
                         "(0: a null blind to size, the test before it; default: the shipped one)")
    ap.add_argument("--transfer-statistic", choices=("ordered", "max"),
                    default="ordered" if TRANSFER_ORDERED else "max",
                    help="summary: the transferable labels' stage's first step: all of them by their ordered indices, "
                         "or the most anomalous alone (max: the test until 2026-12-04); default: the shipped one")
    ap.add_argument("--seed", type=int, default=0, help="scan seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", type=parse_shard, default=(0, 1))
    ap.add_argument("--summary-only", action="store_true", help="do not scan; summarise the rows there are")
    ap.add_argument("--add-margins", action="store_true",
                    help="do not scan; add the maximum margins to rows scanned before the second signal existed")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--family", default=None,
                    help="calibrated rule's null family: normal or t (default: the test's own for each model's "
                         "number of labels, netcleanse.calibrated.null_family)")
    ap.add_argument("--df", type=float, default=None, help="degrees of freedom of the t null (default: as --family)")
    ap.add_argument("--scale", default="qn", help="calibrated rule's scale estimator: qn or mad")
    ap.add_argument("--min-scale", type=float, default=SCALE_FLOOR, help="calibrated rule's scale floor")
    ap.add_argument("--json", type=Path, help="write the summary here")
    add_executor_arguments(ap)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        print(f"error: --modes takes {', '.join(MODES)}", file=sys.stderr)
        return 2
    def chosen(entry: dict) -> bool:
        return ((args.split == "all" or entry["split"] == args.split)
                and (not args.datasets or entry["dataset"] in args.datasets.split(","))
                and (args.max_pair is None or entry.get("pair", 0) <= args.max_pair))

    try:
        planned = ""
        preset = inversion_variant(args.preset, args.inversion_confidence)
        if args.few_labels_plan == "off":
            preset = replace(plan_of(preset), few_labels_refine=None, few_labels_n_opt=None)
        if args.attack_goal is not None:
            preset = goal_variant(preset, args.attack_goal)
        if args.refine_steps is not None:
            if args.refine_steps < 1:
                raise NetcleanseError(f"--refine-steps is a positive number of steps, not {args.refine_steps}")
            plan = plan_of(preset)
            if plan.refine is None:
                raise NetcleanseError(f"--refine-steps: preset {args.preset!r} has no refinement stage")
            preset = replace(plan, refine=replace(plan.refine, schedule=replace(plan.refine.schedule,
                                                                                max_epochs=args.refine_steps)))
        if args.few_labels_data_free == "off":
            preset = preset_variant(preset, few_labels_data_free_goal=None, few_labels_data_free_transfer=None)
        if args.few_labels_data_transfer is not None:
            preset = preset_variant(preset, few_labels_data_transfer=threshold_arg(args.few_labels_data_transfer,
                                                                                    "--few-labels-data-transfer"))
        transfer_threshold = args.transfer_threshold
        if transfer_threshold not in (None, "off"):
            transfer_threshold = threshold_arg(transfer_threshold, "--transfer-threshold")
        if not args.summary_only:  # the summary needs only the rows (each holds its model's entry)
            entries = [e for e in read_zoo(args.zoo) if chosen(e)]
            torch.set_num_threads(args.threads)
            if args.add_margins:
                add_margins(args.zoo, args.out, entries, modes, args.seed, args.preset, args.shard)
            else:
                with executor_from_args(args) as executor:
                    scan_zoo(args.zoo, args.out, entries, modes, args.seed, preset, args.shard,
                             executor=executor)
            planned = f" (of {len(entries) * len(modes)} planned)"
        rows = [row for row in (json.loads(p.read_text()) for p in sorted((args.out / "rows").glob("*.json")))
                if chosen(row["entry"]) and row["mode"] in modes and row["seed"] == args.seed]
        if not rows:
            raise NetcleanseError(f"no scans of the {args.split} half in {args.out}")
        # the confidence and refinement each row's scan should have used (they differ with the label count)
        def expected(row):
            plan = plan_of(preset).for_labels(len(row["scan"]["labels"]), data_free=row["mode"] == "data-free")
            schedule = json.loads(json.dumps(plan.refine.to_dict()["schedule"])) if plan.refine else None
            # as scan.json records it (lists, not tuples)
            return plan.inversion_confidence, schedule, plan.transfer_threshold

        def recorded(row):
            plan = row["scan"]["settings"]["plan"]
            return (plan.get("inversion_confidence"), plan["refine"]["schedule"] if plan["refine"] else None,
                    plan.get("transfer_threshold"))

        other = [r["model"] for r in rows if recorded(r) != expected(r)]
        if other:
            raise NetcleanseError(f"{len(other)} rows in {args.out} (e.g. {other[0]}) were scanned with another "
                                  f"inversion confidence or refinement than --inversion-confidence "
                                  f"{args.inversion_confidence} --few-labels-plan {args.few_labels_plan} "
                                  f"--attack-goal {args.attack_goal} --refine-steps {args.refine_steps} --few-labels-data-free "
                                  f"{args.few_labels_data_free} --few-labels-data-transfer {args.few_labels_data_transfer}: "
                                  "one folder per variant")
        print(f"{len(rows)} scans of the {args.split} half{planned}; calibrated rule at alpha "
              f"{args.alpha:g}, null {null_name(args.family, args.df)}, "
              f"scale {args.scale} (floor {args.min_scale:g})")
        summary = summarise(rows, args.alpha, args.family, args.df, args.scale, args.min_scale,
                            transfer_threshold=transfer_threshold, transfer_dependence=args.transfer_dependence,
                            transfer_ordered=args.transfer_statistic == "ordered")
    except NetcleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        write_json_atomic(args.json, {"split": args.split, "alpha": args.alpha, "family": args.family, "df": args.df,
                                      "scale": args.scale, "min_scale": args.min_scale, "scans": len(rows),
                                      "summary": summary}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
