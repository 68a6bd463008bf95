"""Power on weak targets: is every target of a 3-target BadNet found, when the triggers differ in size?

    python benchmarks/weak_targets.py --out weak [--n 3] [--n-blend 2] [--seed 0] [--datasets mnist,mnist-pairs]
    python benchmarks/weak_targets.py --out weak --summary-only        # re-print from the rows

A multi-trigger net can have targets whose triggers are much larger (weaker, in Neural Cleanse's
sense: they need a larger mask) than the first ones a scan finds. A scan must not stop looking
after the strongest. This benchmark trains lab BadNets (``mnist-cnn``) on each dataset (default
the 10-label ``mnist`` and the 100-label ``mnist-pairs``), each with three triggers of clearly
different sizes, one target each:

* ``--n`` models ``<dataset>-3t_<i>``: patches of 3x3, 6x6 and 10x10 pixels in three different
  corners;
* ``--n-blend`` models ``<dataset>-blend_<i>``: patches of 3x3 and 6x6 pixels and a blended
  trigger (alpha 0.1 of a random pattern over the whole image, mask L1 78.4).

Targets, corners and patterns are drawn from ``(seed, dataset, layout, i)``; ``--rate`` of the
training set is poisoned, split evenly among the three triggers; ``--epochs`` epochs. Every model
is scanned with the ``fast`` preset, with its clean test images (``data``) and ``data-free``
(:func:`netcleanse.scan`, scan seed ``--scan-seed``).

Per model and target it prints the trigger size, the attack success (a target whose attack was not
learned, ASR < 90 %, is reported but not counted), whether the label was refined as a
*candidate* (with more than 64 labels the fast preset refines only the 16 smallest coarse masks and
the coarse outliers, paper's index > 2 on the coarse masks; with fewer, every label), its coarse
mask L1, rank among all labels (1 = smallest) and coarse index, its final mask L1 and its rank by the verdict's index among the tested labels
(1 = most anomalous), its single-step p-value, the step of the step-down test at which it was
tested (``-``: the step-down stopped before it), and whether it was flagged. Then per mode, per
dataset and in total: "targets found k/n", models with every target found, other labels flagged.

Layout of ``--out`` (each step is skipped when its output exists, so a run resumes):

* ``models/<model>/``: the lab folder (:mod:`netcleanse.lab`) with ``entry.json``;
* ``scans/<model>__<mode>__seed<S>/``: the scan folder (``scan.json``; ``progress.jsonl`` keeps the
  coarse pass's record of every label, from which the coarse ranks are read);
* ``rows/<model>__<mode>__seed<S>.json``: one row per scan, all the summary reads
  (``--summary-only`` re-prints it without the models or scans).

``--preset fast-rank-success`` scans with a prototype of the candidate selection
(:class:`netcleanse.presets.Preset` ``rank_failed="success"``: coarse searches that failed are
ranked by the attack success they reached, not by their mask); its scans and rows carry the
preset's name, and the summary shows one preset at a time. ``--models a,b`` builds and scans only
the models named.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import netcleanse
from netcleanse.architectures import get_architecture
from netcleanse.attacks import PATTERNS, blend_trigger, patch_trigger
from netcleanse.data import load_data
from netcleanse.detection import anomaly_indices
from netcleanse.errors import NetcleanseError
from netcleanse.lab import DEFAULT_ARCH, make_badnet
from netcleanse.model import load_model
from netcleanse.presets import PRESETS, preset_variant
from netcleanse.utils import write_json_atomic

SIZES = (3, 6, 10)  # patch side in pixels, one trigger (and target) each
BLEND_SIZES = (3, 6)  # the "blend" layout: two patches and a blended trigger
BLEND_ALPHA = 0.1
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
DATASETS = ("mnist", "mnist-pairs")
NUM_CLASSES = {"mnist": 10, "digits": 10, "mnist-pairs": 100}
MODES = ("data", "data-free")
LEARNED_ASR = 0.9
# the fast preset, and a prototype variant of its candidate selection (failed coarse searches ranked
# by the attack success they reached instead of their mask L1; see netcleanse.presets.Preset)
VARIANTS = {"fast": "mask", "fast-rank-success": "success"}
EPOCHS = 12
RATE = 0.1


LAYOUTS = ("sizes", "blend")


def model_name(dataset: str, i: int, layout: str = "sizes") -> str:
    return f"{dataset}-{'3t' if layout == 'sizes' else 'blend'}_{i:02d}"


def trigger_name(spec: dict) -> str:
    """"3px", "10px" (a patch's side) or "blend" (the size classes the summary counts by)."""
    return "blend" if spec.get("kind") == "blend" else f"{spec['size']}px"


def model_plan(seed: int, dataset: str, i: int, shape, layout: str = "sizes") -> dict:
    """Targets, corners and patterns of model ``i`` of ``dataset`` and ``layout``, drawn from
    ``(seed, dataset, layout, i)``: patches of ``SIZES`` ("sizes"), or patches of ``BLEND_SIZES``
    and a blended trigger of alpha ``BLEND_ALPHA`` ("blend")."""
    rng = random.Random(f"weak-targets/{seed}/{dataset}/{i}" + ("" if layout == "sizes" else f"/{layout}"))
    sizes = SIZES if layout == "sizes" else BLEND_SIZES
    corners = rng.sample(CORNERS, len(sizes))  # distinct corners: the patches never overlap
    patterns = [rng.choice(PATTERNS) for _ in sizes]
    targets = rng.sample(range(NUM_CLASSES[dataset]), 3)
    trigger_seed = seed * 100000 + 70000 + 10 * i + (0 if layout == "sizes" else 5000)
    triggers = [patch_trigger(shape, size, corner, pattern, trigger_seed + k)
                for k, (size, corner, pattern) in enumerate(zip(sizes, corners, patterns))]
    specs = [{"kind": "patch", "size": size, "corner": corner, "pattern": pattern}
             for size, corner, pattern in zip(sizes, corners, patterns)]
    if layout == "blend":
        triggers.append(blend_trigger(shape, BLEND_ALPHA, "random", trigger_seed + 3))
        specs.append({"kind": "blend", "alpha": BLEND_ALPHA, "pattern": "random"})
    return {"triggers": triggers, "targets": targets, "specs": specs}


def build_model(out: Path, dataset: str, i: int, seed: int, epochs: int, rate: float, layout: str = "sizes",
                log=print) -> dict:
    """Train model ``i`` of ``dataset`` and ``layout`` into ``out/models`` unless it is there; its entry."""
    folder = out / "models" / model_name(dataset, i, layout)
    if (folder / "entry.json").is_file():
        return json.loads((folder / "entry.json").read_text())
    shape = get_architecture(DEFAULT_ARCH).input_shape
    plan = model_plan(seed, dataset, i, shape, layout)
    started = time.perf_counter()
    truth = make_badnet(dataset, plan["triggers"], plan["targets"], rate=rate, epochs=epochs,
                        seed=seed * 100000 + NUM_CLASSES[dataset] * 1000 + 500 + (0 if layout == "sizes" else 50) + i,
                        out=folder, force=True, progress=False).truth
    asr = {int(t): a for t, a in truth["attack_success"].items()}
    entry = {"model": model_name(dataset, i, layout), "dataset": dataset, "num_classes": NUM_CLASSES[dataset],
             "layout": layout, "index": i, "seed": seed, "epochs": epochs, "rate": rate, "clean_accuracy": truth["clean_accuracy"],
             "targets": [dict(spec, target=t, attack_success=asr[t], learned=asr[t] >= LEARNED_ASR)
                         for spec, t in zip(plan["specs"], plan["targets"])],
             "train_s": round(time.perf_counter() - started, 1)}
    write_json_atomic(folder / "entry.json", entry, indent=1)
    log(f"trained {entry['model']}: clean accuracy {100 * entry['clean_accuracy']:.1f} %, ASR "
        + ", ".join(f"{trigger_name(t)} -> {t['target']}: {100 * t['attack_success']:.1f} %" for t in entry["targets"])
        + f" ({entry['train_s']:.0f} s)", flush=True)
    return entry


def coarse_records(scan_dir: Path) -> dict[int, dict]:
    """label -> the coarse pass's record (from the scan's journal, ``progress.jsonl``)."""
    out = {}
    for line in (scan_dir / "progress.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("stage") == "coarse":
            for rec in entry["records"]:
                out[rec["label"]] = rec
    return out


def make_row(entry: dict, mode: str, scan_seed: int, scan: dict, coarse: dict[int, dict], time_s: float) -> dict:
    """The summary's row of one scan: per planted target what the scan did with it."""
    labels = {r["label"]: r for r in scan["labels"]}
    detection = scan["settings"]["detection"]
    refined = (set(detection["candidates"]) | set(detection["controls"])
               if detection["scheme"] == "random controls" else set(labels))
    candidates = set(detection.get("candidates", labels))
    by_coarse = sorted(coarse, key=lambda t: (coarse[t]["mask_l1"], t))
    # the paper's index on the coarse masks of all labels: above the threshold a label is a candidate
    # whatever its rank (the fast preset's second way in, up to max_candidates)
    coarse_index = dict(zip(by_coarse, anomaly_indices([coarse[t]["mask_l1"] for t in by_coarse])))
    tested = [t for t in labels if labels[t].get("test_index") is not None]
    by_index = sorted(tested, key=lambda t: (-labels[t]["test_index"], t))
    steps = scan["test"]["steps"] if scan.get("test") else []
    step_of = {s["label"]: s for s in steps}
    targets = []
    for spec in entry["targets"]:
        t = spec["target"]
        rec = labels[t]
        step = step_of.get(t)
        targets.append(dict(spec, candidate=t in candidates, refined=t in refined, control=t in detection.get(
            "controls", ()), coarse_l1=coarse[t]["mask_l1"], coarse_rank=by_coarse.index(t) + 1,
            coarse_index=float(coarse_index[t]),
            l1=rec["mask_l1"], l1_vs_median=rec.get("mask_l1_vs_median"),
            rank=by_index.index(t) + 1 if t in tested else None, test_index=rec.get("test_index"),
            p_value=rec.get("p_value"), step=None if step is None else step["step"],
            step_p=None if step is None else step["p_value"], flagged=t in scan["flagged"]))
    planted = {s["target"] for s in entry["targets"]}
    return {"model": entry["model"], "dataset": entry["dataset"], "num_classes": entry["num_classes"], "mode": mode,
            "scan_seed": scan_seed, "clean_accuracy": entry["clean_accuracy"], "targets": targets,
            "flagged": scan["flagged"], "other_flagged": [t for t in scan["flagged"] if t not in planted],
            "p_value": scan["p_value"], "verdict": scan["verdict"], "steps": steps,
            "n_refined": len(refined), "n_candidates": len(candidates), "n_tested": len(tested),
            "threshold_l1": scan["test"]["reference"].get("threshold_l1") if scan.get("test") else None,
            "reference_median_l1": float(np.exp(scan["test"]["reference"]["median"])) if scan.get("test") else None,
            "coarse_median_l1": float(np.median([c["mask_l1"] for c in coarse.values()])),
            # the largest coarse mask among the labels that are candidates by rank (the preset's 16 smallest)
            "rank_cutoff_l1": coarse[by_coarse[min(PRESETS["fast"].candidates, len(by_coarse)) - 1]]["mask_l1"],
            "time_s": round(time_s, 1)}


def scan_name(model: str, mode: str, scan_seed: int, preset: str = "fast") -> str:
    return f"{model}__{mode}__seed{scan_seed}" + ("" if preset == "fast" else f"__{preset}")


def row_path(out: Path, model: str, mode: str, scan_seed: int, preset: str = "fast") -> Path:
    return out / "rows" / f"{scan_name(model, mode, scan_seed, preset)}.json"


def scan_model(out: Path, entry: dict, mode: str, scan_seed: int, preset: str = "fast", log=print) -> dict:
    """Scan one model in one mode (resuming or reusing its scan folder) and write its row."""
    path = row_path(out, entry["model"], mode, scan_seed, preset)
    if path.is_file():
        return json.loads(path.read_text())
    folder = out / "models" / entry["model"]
    model = load_model(folder / "model.pt")
    data = (load_data(folder / "clean_test.npz", expect_shape=model.input_shape, num_classes=model.num_classes)
            if mode == "data" else None)
    scan_dir = out / "scans" / scan_name(entry["model"], mode, scan_seed, preset)
    plan = preset_variant("fast", rank_failed=VARIANTS[preset])
    result = netcleanse.scan(model, data, data_free=mode == "data-free", preset=plan, seed=scan_seed, out=scan_dir,
                             resume=True, progress=False)
    # the scan's own time (a scan read back from its folder keeps the time it took)
    row = make_row(entry, mode, scan_seed, result.to_dict(), coarse_records(scan_dir), result.elapsed_s)
    row["preset"] = preset
    write_json_atomic(path, row, indent=1)
    found = sum(t["flagged"] for t in row["targets"])
    log(f"scanned {entry['model']} {mode} ({preset}): flagged {row['flagged']} (targets "
        f"{[t['target'] for t in row['targets']]}, {found}/3 found) {row['time_s']:.0f} s", flush=True)
    return row


def read_rows(out: Path, scan_seed: int | None = None, preset: str = "fast") -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    return [r for r in rows if (scan_seed is None or r["scan_seed"] == scan_seed) and r.get("preset", "fast") == preset]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _trigger_cell(t: dict) -> str:
    return (f"blend alpha {t['alpha']:g}" if t.get("kind") == "blend"
            else f"{t['size']}x{t['size']} {t['pattern']}")


def model_table(rows: list[dict]) -> list[str]:
    """One line per (scan, planted target). "step": the step of the step-down test at which the
    label was tested, with that step's p-value ("-": the test stopped before it)."""
    lines = ["| model | mode | target | trigger | ASR | candidate | coarse L1 (rank, index) | L1 (x median) | rank | "
             "p-value | step (p) | flagged |", "|" + "---|" * 12]
    for row in sorted(rows, key=lambda r: (r["num_classes"], r["model"], MODES.index(r["mode"]))):
        k = row["num_classes"]
        for t in row["targets"]:
            asr = f"{100 * t['attack_success']:.0f} %" + ("" if t["learned"] else " (not learned)")
            step = "-" if t["step"] is None else f"{t['step']} ({t['step_p']:.2g})"
            lines.append(
                f"| {row['model']} | {row['mode']} | {t['target']} | {_trigger_cell(t)} | {asr} | "
                f"{'yes' if t['candidate'] else 'no'} | {t['coarse_l1']:.0f} ({t['coarse_rank']}/{k}, "
                f"{_fmt(t.get('coarse_index'), '.1f')}) | "
                f"{t['l1']:.1f} ({_fmt(t['l1_vs_median'], '.2f')}) | {_fmt(t['rank'], 'd')} | "
                f"{_fmt(t['p_value'], '.2g')} | {step} | {'yes' if t['flagged'] else 'NO'} |")
        if row["other_flagged"]:
            lines.append(f"| {row['model']} | {row['mode']} | other labels flagged: {row['other_flagged']} |"
                         + " |" * 9)
    return lines


def totals(rows: list[dict]) -> dict:
    """Per mode and label count (and per mode overall): learned targets found, models with every
    learned target found, targets not refined, other labels flagged."""
    out: dict = {}
    for row in rows:
        for key in ((row["mode"], row["num_classes"]), (row["mode"], "all")):
            s = out.setdefault(key, {"found": 0, "targets": 0, "not_learned": 0, "models_all": 0, "models": 0,
                                     "not_refined": 0, "missed_refined": 0, "other_flagged": 0, "by_size": {},
                                     "worst_coarse_rank": 0, "lowest_coarse_index": None, "times": []})
            s["times"].append(row["time_s"])
            learned = [t for t in row["targets"] if t["learned"]]
            s["not_learned"] += len(row["targets"]) - len(learned)
            s["targets"] += len(learned)
            s["found"] += sum(t["flagged"] for t in learned)
            s["not_refined"] += sum(not t["refined"] for t in learned)
            s["missed_refined"] += sum(t["refined"] and not t["flagged"] for t in learned)
            if learned:
                s["models"] += 1
                s["models_all"] += all(t["flagged"] for t in learned)
            s["other_flagged"] += len(row["other_flagged"])
            for t in learned:
                s["worst_coarse_rank"] = max(s["worst_coarse_rank"], t["coarse_rank"])
                if t.get("coarse_index") is not None:
                    low = s["lowest_coarse_index"]
                    s["lowest_coarse_index"] = t["coarse_index"] if low is None else min(low, t["coarse_index"])
                k = s["by_size"].setdefault(trigger_name(t), [0, 0])
                k[0] += t["flagged"]
                k[1] += 1
    return out


def _size_order(item) -> tuple:
    name = item[0]
    return (1, 0) if name == "blend" else (0, int(name[:-2]))


def summary_lines(rows: list[dict]) -> list[str]:
    s = totals(rows)
    lines = ["| mode | labels | targets found | by trigger size | models with every target found | "
             "missed: not refined / refined | other labels flagged | targets not learned | "
             "targets' largest coarse rank, lowest coarse index | s/scan (median) |", "|" + "---|" * 10]
    for (mode, k), v in sorted(s.items(), key=lambda kv: (MODES.index(kv[0][0]), str(kv[0][1]))):
        sizes = ", ".join(f"{name} {a}/{b}" for name, (a, b) in sorted(v["by_size"].items(), key=_size_order))
        lines.append(f"| {mode} | {k} | {v['found']}/{v['targets']} | {sizes} | {v['models_all']}/{v['models']} | "
                     f"{v['not_refined']} / {v['missed_refined']} | {v['other_flagged']} | {v['not_learned']} | "
                     f"{v['worst_coarse_rank']}, {_fmt(v['lowest_coarse_index'], '.2f')} | "
                     f"{float(np.median(v['times'])):.0f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("weak-targets"), help="folder of models, scans and rows")
    parser.add_argument("--n", type=int, default=3, help="models per dataset with 3x3, 6x6 and 10x10 patches")
    parser.add_argument("--n-blend", type=int, default=2,
                        help="models per dataset with 3x3 and 6x6 patches and a blended trigger")
    parser.add_argument("--seed", type=int, default=0, help="draws the models (targets, corners, patterns, weights)")
    parser.add_argument("--scan-seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--rate", type=float, default=RATE, help="poisoned fraction, split among the 3 triggers")
    parser.add_argument("--preset", choices=tuple(VARIANTS), default="fast",
                        help="fast, or the prototype fast-rank-success (failed coarse searches ranked by attack success)")
    parser.add_argument("--models", default=None, help="scan only these models (comma-separated names)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--summary-only", action="store_true", help="print the summary of the rows in --out")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(d not in NUM_CLASSES for d in datasets) or any(m not in MODES for m in modes):
        parser.error(f"datasets from {', '.join(NUM_CLASSES)}, modes from {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    only = None if args.models is None else {m.strip() for m in args.models.split(",") if m.strip()}
    if not args.summary_only:
        try:
            # model by model across the datasets, so that a partial run is balanced
            plan = [(i, layout) for layout, n in (("sizes", args.n), ("blend", args.n_blend)) for i in range(n)]
            for i, layout in plan:
                for dataset in datasets:
                    if only and model_name(dataset, i, layout) not in only:
                        continue
                    entry = build_model(args.out, dataset, i, args.seed, args.epochs, args.rate, layout)
                    for mode in modes:
                        scan_model(args.out, entry, mode, args.scan_seed, args.preset)
        except NetcleanseError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    rows = read_rows(args.out, args.scan_seed, args.preset)
    if not rows:
        print(f"no rows in {args.out / 'rows'}", file=sys.stderr)
        return 2
    print("\n".join(model_table(rows)))
    print()
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
