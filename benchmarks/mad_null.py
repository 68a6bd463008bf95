"""How often does Neural Cleanse's MAD rule flag a model that has no backdoor at all?

    python benchmarks/mad_null.py [--labels 8,10,43,100,1283] [--threshold 2] [--draws 20000]
                                  [--zoo-json dq.json ...] [--seed 0] [--json out.json]

A label is flagged when (median - L1) / (1.4826 MAD) exceeds the threshold (2 in the paper). On a
clean model the labels' mask L1 norms are only a sample from some distribution, so the rule has a
false-alarm rate of its own that depends on the number of labels K and on the shape (not the
scale: the index is scale-free) of that distribution. This benchmark draws K labels from a null
distribution many times and prints, per K, how often at least one label is flagged (the
per-model false-alarm rate) and how many labels are flagged on average. Null distributions:

* ``normal`` (the model behind the paper's "index > 2 = 95 % confidence");
* ``lognormal`` (sigma 0.35: positive and right-skewed, like mask sizes);
* ``empirical`` (with ``--zoo-json``, the output of ``detection_quality.py --json``): the mask L1s
  that the scans actually measured on the zoo's clean models, each scan divided by its own median
  and pooled, resampled with replacement, for the numbers of labels those scans had. Labels of one
  model are not independent (a "1" is always easier than a "0"), so this null is an approximation,
  and it is checked against the baseline measured in the same run: the false-alarm rate observed
  on those same clean scans.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from netcleanse.detection import anomaly_indices, flag_labels


def false_alarms(samples: np.ndarray, threshold: float) -> tuple[float, float]:
    """(fraction of rows with a flagged label, mean flagged labels per row) for rows of label L1s,
    each row judged by the scan's own detection functions."""
    counts = np.array([len(flag_labels(range(len(row)), anomaly_indices(row), threshold)) for row in samples])
    return float((counts > 0).mean()), float(counts.mean())


def clean_scans(paths: list[Path]) -> list[dict]:
    """The clean models' rows (per mode) of detection_quality.py JSON files."""
    rows = []
    for path in paths:
        rows += [r for r in json.loads(path.read_text())["rows"] if not r["backdoored"]]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", default="8,10,43,100,1283", help="numbers of labels K to simulate")
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--draws", type=int, default=20000, help="simulated clean models per K (fewer for K > 200)")
    ap.add_argument("--zoo-json", type=Path, nargs="*", default=[], help="detection_quality.py --json files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.labels.split(",") if k.strip()]
    except ValueError:
        print(f"error: --labels must be numbers like 10,1283, got {args.labels!r}", file=sys.stderr)
        return 2
    missing = [p for p in args.zoo_json if not p.is_file()]
    if missing or any(k < 3 for k in ks) or args.draws < 100:
        print("error: " + (f"no such file {missing[0]}" if missing else "need K >= 3 labels and >= 100 draws"),
              file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    nulls = {"normal": lambda shape: rng.normal(size=shape),
             "lognormal": lambda shape: rng.lognormal(0.0, 0.35, size=shape)}
    observed = None
    if args.zoo_json:
        scans = clean_scans(args.zoo_json)
        if not scans:
            print("error: the --zoo-json files hold no clean models", file=sys.stderr)
            return 2
        pooled = np.concatenate([np.asarray(r["labels"]["mask_l1"]) / np.median(r["labels"]["mask_l1"])
                                 for r in scans])
        nulls["empirical"] = lambda shape: rng.choice(pooled, size=shape, replace=True)
        by_k: dict[int, list[bool]] = {}
        for r in scans:
            by_k.setdefault(len(r["labels"]["mask_l1"]), []).append(bool(r["flagged"]))
        observed = {k: (sum(v) / len(v), len(v)) for k, v in by_k.items()}

    table = []
    print(f"false-alarm rate of 'anomaly index > {args.threshold:g}' on models WITHOUT a backdoor "
          f"(fraction of simulated clean models with at least one flagged label; mean flags per model)")
    for k in ks:
        draws = args.draws if k <= 200 else max(100, args.draws // 20)
        row = {"labels": k, "draws": draws}
        cells = []
        for name, draw in nulls.items():
            if name == "empirical" and k not in observed:
                continue  # the pooled shape of K-label models says nothing about other K
            rate, mean_flags = false_alarms(draw((draws, k)), args.threshold)
            row[name] = {"false_alarm_rate": rate, "mean_flags": mean_flags}
            cells.append(f"{name} {100 * rate:5.1f} % ({mean_flags:.2f} flags)")
        if observed and k in observed:
            rate, n = observed[k]
            row["observed"] = {"false_alarm_rate": rate, "clean_scans": n}
            cells.append(f"observed on the zoo's clean scans {100 * rate:5.1f} % (of {n})")
            if row.get("empirical", {}).get("false_alarm_rate"):
                cells.append(f"observed / empirical null {rate / row['empirical']['false_alarm_rate']:.2f}")
        table.append(row)
        print(f"K = {k:>5}: " + "; ".join(cells), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threshold": args.threshold, "seed": args.seed, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
