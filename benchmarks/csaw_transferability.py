"""Prototype measurement: the expected transferability of the CSAW nets' labels, data-free.

    python benchmarks/csaw_transferability.py --scans csaw-scans [--shared ../shared] [--top 8]
                                              [--random 40] [--seed 0] [--json out.json]

Not part of any verdict. Many-label scans (the 1283-label CSAW nets) do not measure transferability
(:mod:`netcleanse.transferability`); this asks whether it would separate their planted targets from
their easiest clean labels, where the trigger size cannot (sunglasses: ranked first, unflagged).
For each net scanned by ``benchmarks/csaw_verdicts.py --out SCANS``: the scan's own data-free inputs
(the fast preset's synthesis for 1283 labels, the scan's seed), then the transferability (the
presets' budget: 8 per-input triggers of 150 steps per label, each tried on 64 other inputs) of
the known targets, the ``--top`` labels of largest test index in the scan, and ``--random`` labels
drawn at random (seeded) as a sample of ordinary labels. About 2-4 minutes per net on one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import netcleanse
from netcleanse.errors import NetcleanseError
from netcleanse.presets import PRESETS
from netcleanse.scanning import ScanResult, _working_copy, label_transferability
from netcleanse.synthesis import synthesize_inputs
from netcleanse.utils import write_json_atomic

# the competition's published answers (sunglasses, anonymous_1) and the multi-trigger net's labels
# that its scans rank as targets (not published)
TARGETS = {"sunglasses": [0], "anonymous_1": [0], "anonymous_2": [4], "multi_trigger_multi_target": [1, 5, 8]}


def measure(net: str, scan: ScanResult, model, top: int, n_random: int, seed: int, draws: int = 1) -> dict:
    plan = PRESETS["fast"].for_labels(model.num_classes, data_free=True)
    model = _working_copy(model, torch.device("cpu"))[0]  # frozen, as a scan's
    gen = torch.Generator().manual_seed(int(scan.settings.get("seed", seed)))
    x = synthesize_inputs(model, plan.n_opt + plan.n_val, plan.data_free_inputs, gen, torch.device("cpu"),
                          confidence=plan.inversion_confidence)
    targets = TARGETS.get(net, [])
    ranked = sorted((r for r in scan.labels if r.get("test_index") is not None), key=lambda r: -r["test_index"])
    top_labels = [r["label"] for r in ranked if r["label"] not in targets][:top]
    rng = np.random.default_rng(seed)
    pool = [t for t in range(model.num_classes) if t not in targets and t not in top_labels]
    random_labels = sorted(int(t) for t in rng.choice(pool, min(n_random, len(pool)), replace=False))
    labels = targets + top_labels + random_labels
    row = {"net": net, "draws": []}
    for draw in range(draws):  # draw k: the same inputs, another choice of sources and pools (seed + k)
        et, passes = label_transferability(model, labels, x, seed + draw, plan)
        row["draws"].append({"targets": {t: et[t] for t in targets}, "top": {t: et[t] for t in top_labels},
                             "random": {t: et[t] for t in random_labels}, "passes": passes})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=Path, required=True, help="the --out folder of benchmarks/csaw_verdicts.py")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--nets", default=",".join(TARGETS))
    ap.add_argument("--top", type=int, default=8, help="the labels of largest test index (not targets)")
    ap.add_argument("--random", type=int, default=40, help="labels drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=1,
                    help="measurements per net on the same inputs, each with other sources and pools (seed + k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    try:
        for net in args.nets.split(","):
            scan = ScanResult.load(args.scans / net)
            model = netcleanse.load_model(args.shared / "csaw" / "models" / f"{net}_bd_weights.h5", arch="csaw-deepid")
            start = time.perf_counter()
            row = measure(net, scan, model, args.top, args.random, args.seed, args.draws)
            row["time_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            fmt = lambda d: ", ".join(f"{t}: {v:.3f}" for t, v in d.items())  # noqa: E731
            for k, draw in enumerate(row["draws"]):
                rand = np.array(list(draw["random"].values()))
                print(f"{net} (draw {k}): targets {fmt(draw['targets'])}; top labels {fmt(draw['top'])}; "
                      f"{len(rand)} random labels: median {np.median(rand):.3f}, max {rand.max():.3f}", flush=True)
            print(f"{net}: {row['time_s']} s", flush=True)
    except NetcleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        write_json_atomic(args.json, {"seed": args.seed, "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
