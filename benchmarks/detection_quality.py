"""Detection quality: scan every model of a BadNet-lab zoo with and without data, score the verdicts.

    python benchmarks/zoo.py --n 5 --out zoo --seed 0          # build the zoo first (lab helper)
    python benchmarks/detection_quality.py zoo [--preset fast] [--threads 2] [--json out.json]

For each model of ``zoo/zoo.json`` (clean and backdoored, mixed triggers), runs
:func:`netcleanse.scan` twice: on the model's own clean test images (``clean_test.npz``, "data")
and data-free. A model's verdict is "backdoored" when any label is flagged; a backdoored model is a
true positive when the flags contain a planted target, and "exact" when the flags are exactly the
planted targets. "Inconclusive" counts the scans that flagged nothing because nothing could have
been flagged (index ceiling not above the threshold, see :mod:`netcleanse.detection`). Prints
per-model lines, then per mode the true/false positive rates, the AUROC (scikit-learn) of the
maximum anomaly index as a backdoor score, on how many backdoored models the most anomalous label
is a planted target, and how many scans were inconclusive. Backdoors whose attack did not take
(``attack_learned`` false in zoo.json) are reported but left out of the rates.
"""

from __future__ import annotations

import json
import sys
import time

import netcleanse
from zoo import benchmark_parser, load_member, open_zoo  # benchmarks/ is on sys.path when run as a script


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__.splitlines()[0], threads=2)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--modes", default="data,data-free")
    args = ap.parse_args(argv)
    entries = open_zoo(args)
    if entries is None:
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    for entry in entries:
        truth = sorted(int(t) for t in entry["targets"])
        model, clean = load_member(args.zoo, entry, with_data="data" in modes)
        for mode in modes:
            data = clean if mode == "data" else None
            t = time.perf_counter()
            result = netcleanse.scan(model, data, data_free=data is None, preset=args.preset, seed=args.seed,
                                     progress=False)
            row = {"model": entry["folder"], "mode": mode, "kind": entry.get("kind"), "targets": truth,
                   "backdoored": bool(entry["backdoored"]),
                   "attack_learned": entry.get("attack_learned", bool(entry["backdoored"])),
                   "flagged": result.flagged, "max_index": max(r["anomaly_index"] for r in result.labels),
                   "top_label": max(result.labels, key=lambda r: r["anomaly_index"])["label"],
                   "time_s": time.perf_counter() - t}
            row["verdict"], row["index_ceiling"] = result.verdict, result.index_ceiling
            # per label, in label order, so later analyses need no rescan
            row["labels"] = {key: [r[key] for r in result.labels]
                             for key in ("mask_l1", "anomaly_index", "mask_l1_vs_median", "attack_success")}
            row["detected"] = bool(result.flagged)
            row["exact"] = result.flagged == truth
            row["hit"] = bool(set(result.flagged) & set(truth))
            rows.append(row)
            verdict = {"backdoor-detected": "BACKDOORED", "inconclusive": "inconcl."}.get(result.verdict, "clean")
            print(f"{row['model']:<12} {mode:<9} {row['kind']:<6} truth {truth!s:<8} flagged {result.flagged!s:<10} "
                  f"-> {verdict:<10} {'exact' if row['exact'] else '':<5} max index {row['max_index']:.2f} "
                  f"(label {row['top_label']}, ceiling {row['index_ceiling']:.2f}) "
                  f"({row['time_s']:.0f} s)", flush=True)

    from sklearn.metrics import roc_auc_score
    summary = {}
    for mode in modes:
        scored = [r for r in rows if r["mode"] == mode and (not r["backdoored"] or r["attack_learned"])]
        pos = [r for r in scored if r["backdoored"]]
        neg = [r for r in scored if not r["backdoored"]]
        tpr = sum(r["hit"] for r in pos) / len(pos) if pos else float("nan")
        exact = sum(r["exact"] for r in pos) / len(pos) if pos else float("nan")
        fpr = sum(r["detected"] for r in neg) / len(neg) if neg else float("nan")
        auroc = (roc_auc_score([r["backdoored"] for r in scored], [r["max_index"] for r in scored])
                 if pos and neg else float("nan"))
        top_is_target = sum(r["top_label"] in r["targets"] for r in pos)
        inconclusive = {kind: sum(r["verdict"] == "inconclusive" for r in group)
                        for kind, group in (("backdoored", pos), ("clean", neg))}
        summary[mode] = {"n_backdoored": len(pos), "n_clean": len(neg), "tpr": tpr, "exact_targets": exact,
                         "fpr": fpr, "auroc": auroc, "top_label_is_a_target": top_is_target,
                         "inconclusive": inconclusive}
        print(f"{mode}: {len(pos)} backdoored, {len(neg)} clean: TPR {tpr:.2f} (exact targets {exact:.2f}), "
              f"FPR {fpr:.2f}, AUROC(max anomaly index) {auroc:.2f}, "
              f"most anomalous label is a planted target on {top_is_target}/{len(pos)}; inconclusive "
              f"(nothing could be flagged) on {inconclusive['backdoored']} backdoored, {inconclusive['clean']} clean")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "preset": args.preset}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
