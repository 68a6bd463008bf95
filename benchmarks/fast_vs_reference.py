"""Does the ``fast`` preset flag the same labels as ``reference`` (the original protocol)?

    python benchmarks/zoo.py --n 3 --out zoo --seed 3              # build a zoo first
    python benchmarks/detection_quality.py ...                     # (separately: TPR/FPR)
    python benchmarks/fast_vs_reference.py zoo [--models badnet_00,clean_00] [--mode data|data-free]
                                               [--threads 1] [--json out.json]

For each chosen model of ``zoo/zoo.json`` it scans all labels twice in the same run, with
``reference`` and with ``fast`` (same inputs source, same seed), and prints both flag lists,
whether they agree, both wall times and their ratio, and the Spearman correlation of the two
presets' per-label mask L1 norms (do they rank the labels alike?). The last line sums up: models
where the flags agree, total time of each preset, and the overall speed-up.
Reference scans take minutes per 10-label model; pick a few models.
"""

from __future__ import annotations

import sys
import time

import netcleanse
from netcleanse.utils import write_json_atomic
from zoo import benchmark_parser, load_member, open_zoo  # benchmarks/ is on sys.path when run as a script


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__.splitlines()[0], threads=1)
    ap.add_argument("--models", default=None, help="comma-separated zoo folders (default: all)")
    ap.add_argument("--mode", choices=("data", "data-free"), default="data")
    args = ap.parse_args(argv)
    entries = open_zoo(args)
    if entries is None:
        return 2
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        entries = [e for e in entries if e["folder"] in wanted]
        if len(entries) != len(wanted):
            print(f"unknown model among {wanted}", file=sys.stderr)
            return 2

    from scipy.stats import spearmanr  # scikit-learn's dependency
    rows = []
    for entry in entries:
        model, data = load_member(args.zoo, entry, with_data=args.mode == "data")
        row = {"model": entry["folder"], "targets": sorted(entry["targets"])}
        for preset in ("reference", "fast"):
            t = time.perf_counter()
            result = netcleanse.scan(model, data, data_free=data is None, preset=preset, seed=args.seed,
                                     progress=False)
            row[preset] = {"flagged": result.flagged, "time_s": time.perf_counter() - t,
                           "mask_l1": [r["mask_l1"] for r in result.labels]}
        row["agree"] = row["reference"]["flagged"] == row["fast"]["flagged"]
        row["speedup"] = row["reference"]["time_s"] / row["fast"]["time_s"]
        row["l1_spearman"] = float(spearmanr(row["reference"]["mask_l1"], row["fast"]["mask_l1"])[0])
        rows.append(row)
        print(f"{row['model']:<10} truth {row['targets']!s:<7} reference {row['reference']['flagged']!s:<7} "
              f"({row['reference']['time_s']:.0f} s)  fast {row['fast']['flagged']!s:<7} ({row['fast']['time_s']:.1f} s)  "
              f"{'same flags' if row['agree'] else 'DIFFERENT flags'}  {row['speedup']:.0f}x faster  "
              f"L1 rank correlation {row['l1_spearman']:.2f}", flush=True)
    ref_s = sum(r["reference"]["time_s"] for r in rows)
    fast_s = sum(r["fast"]["time_s"] for r in rows)
    print(f"{args.mode}: same flags on {sum(r['agree'] for r in rows)}/{len(rows)} models; reference {ref_s:.0f} s, "
          f"fast {fast_s:.0f} s in all: {ref_s / fast_s:.1f}x faster")
    if args.json:
        write_json_atomic(args.json, {"mode": args.mode, "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
