"""Prototype measurement: with clean data, is a label's expected transferability evidence of a backdoor on its own?

    python benchmarks/transfer_evidence.py DQ [--split dev] [--modes data] [--alpha 0.05]
                                           [--min-scale 0.5,1.0] [--draws 20000]

Not part of any verdict. ``DQ`` is a ``benchmarks/detection_quality.py --out`` folder whose scans
recorded every label's expected transferability (:mod:`netcleanse.transferability`): data-free
scans of models with few labels always do, scans with data when made with
``--few-labels-data-transfer T``. Two questions, per mode and label count, over the models
``detection_quality.scored`` counts:

1. How far apart are planted targets and clean labels? The largest transferability of each clean
   model, each planted target's, the largest of each backdoored model's other labels, and the AUROC
   of the model's largest transferability as a model-level score.
2. Does a test of the transferability's own, with a stated level, add to the shipped test? Label t's
   index is ``(u_t - median(u)) / max(Qn(u), s0)`` with ``u`` the logit of the transferability clipped
   to [0.01, 0.99], over all of the model's K labels; its p-value is that of the largest index of K
   labels under the shipped null for K labels (:func:`netcleanse.calibrated.max_index_pvalue`), and a
   step-down refits without the labels it flags, as the size test does. It runs at alpha / 2 beside
   the shipped size-and-margin test at alpha / 2 (Bonferroni; the flags united), printed beside
   the shipped test on the same scans (without the transferable labels' stage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from netcleanse.calibrated import max_index_pvalue, null_family, robust_scale
from netcleanse.errors import NetcleanseError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection_quality import decide, scored  # noqa: E402

FLOOR = 0.01  # transferabilities below it (or above 1 - it) are not told apart


def transfer_logit(et) -> np.ndarray:
    p = np.clip(np.asarray(et, dtype=np.float64), FLOOR, 1 - FLOOR)
    return np.log(p / (1 - p))


def transferability_test(transfer: dict, alpha: float, min_scale: float, draws: int) -> tuple[list[int], float]:
    """The transferability's own step-down test (module doc): (flagged labels, model p-value)."""
    labels = sorted(transfer)
    k = len(labels)
    family, df = null_family(k)
    u = dict(zip(labels, transfer_logit([transfer[t] for t in labels]).tolist()))
    flagged, remaining, previous, first = [], list(labels), 0.0, None
    while len(remaining) >= 3:
        v = np.array([u[t] for t in remaining])
        med, spread = float(np.median(v)), max(float(robust_scale(v)), min_scale)
        t = max(remaining, key=lambda w: (u[w], -w))
        p = max(previous, max_index_pvalue((u[t] - med) / spread, k - len(flagged), None, family, df, draws))
        first = p if first is None else first
        if p > alpha:
            break
        flagged.append(t)
        remaining.remove(t)
        previous = p
    return flagged, 1.0 if first is None else first


def size_test(row: dict, alpha: float) -> list[int]:
    """The shipped test's flags (trigger size and margin, no transferable labels' stage) at ``alpha``."""
    return decide(row, "calibrated", alpha, None, None, transfer_threshold="off")["flagged"]


def auroc(neg: list[float], pos: list[float]) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score([0] * len(neg) + [1] * len(pos), neg + pos)) if neg and pos else float("nan")


def _q(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.2f} / {float(np.median(values)):.2f} / {max(values):.2f}"


def summarise(rows: list[dict], alpha: float, scales: list[float], draws: int, log=print) -> dict:
    out = {}
    for mode, k in sorted({(r["mode"], r["entry"]["num_classes"]) for r in rows}):
        group = [r for r in rows if r["mode"] == mode and r["entry"]["num_classes"] == k and scored(r)]
        pos = [r for r in group if r["entry"]["backdoored"]]
        neg = [r for r in group if not r["entry"]["backdoored"]]
        et = {r["model"]: {rec["label"]: rec["transferability"] for rec in r["scan"]["labels"]} for r in group}
        clean_max = [max(et[r["model"]].values()) for r in neg]
        bd_max = [max(et[r["model"]].values()) for r in pos]
        targets = [et[r["model"]][t] for r in pos for t in r["entry"]["targets"]]
        others = [max(v for t, v in et[r["model"]].items() if t not in r["entry"]["targets"]) for r in pos]
        cell = {"clean": len(neg), "backdoored": len(pos), "clean_largest": clean_max, "targets": targets,
                "backdoored_others_largest": others, "auroc_largest": auroc(clean_max, bd_max)}
        log(f"{mode} {k} labels: {len(neg)} clean, {len(pos)} backdoored models")
        log(f"  largest transferability of a clean model (min / median / max): {_q(clean_max)}; "
            f"at 0.25 or more: {sum(v >= 0.25 for v in clean_max)}")
        log(f"  planted targets: {_q(targets)}; at 0.25 or more: {sum(v >= 0.25 for v in targets)} of {len(targets)}")
        log(f"  backdoored models' other labels, largest: {_q(others)}")
        log(f"  AUROC of the model's largest transferability: {cell['auroc_largest']:.3f}")

        def counts(decide) -> tuple[int, int, int]:
            fp = sum(bool(decide(r)) for r in neg)
            flags = [sorted(decide(r)) for r in pos]
            tp = sum(bool(set(f) & set(r["entry"]["targets"])) for f, r in zip(flags, pos))
            exact = sum(f == sorted(r["entry"]["targets"]) for f, r in zip(flags, pos))
            return fp, tp, exact

        shipped = counts(lambda r: size_test(r, alpha))
        cell["shipped"] = shipped
        log(f"  shipped test (size and margin) at alpha {alpha:g}: clean flagged / detected / exact "
            f"{shipped[0]}/{len(neg)}, {shipped[1]}/{len(pos)}, {shipped[2]}/{len(pos)}")
        halves = {r["model"]: size_test(r, alpha / 2) for r in group}
        for s0 in scales:
            own = {r["model"]: transferability_test(et[r["model"]], alpha / 2, s0, draws)[0] for r in group}
            alone = counts(lambda r: own[r["model"]])
            united = counts(lambda r: set(halves[r["model"]]) | set(own[r["model"]]))
            cell[f"floor {s0:g}"] = {"alone": alone, "united": united}
            log(f"  transferability test (scale floor {s0:g}) at alpha {alpha / 2:g} alone: {alone[0]}/{len(neg)}, "
                f"{alone[1]}/{len(pos)}, {alone[2]}/{len(pos)}; united with the shipped test at alpha "
                f"{alpha / 2:g}: {united[0]}/{len(neg)}, {united[1]}/{len(pos)}, {united[2]}/{len(pos)}")
        out[f"{mode}/{k}"] = cell
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dq", type=Path, help="a detection_quality.py --out folder")
    ap.add_argument("--split", choices=("dev", "eval", "all"), default="dev")
    ap.add_argument("--modes", default="data")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-scale", default="0.5,1.0", help="the transferability test's scale floors (logit scale)")
    ap.add_argument("--draws", type=int, default=20000, help="simulated models per null of the transferability test")
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args(argv)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        try:
            scales = [float(v) for v in args.min_scale.split(",")]
        except ValueError:
            raise NetcleanseError(f"--min-scale takes numbers, not {args.min_scale!r}") from None
        if not 0 < args.alpha < 1:
            raise NetcleanseError(f"--alpha must be between 0 and 1, got {args.alpha}")
        rows = [json.loads(p.read_text()) for p in sorted((args.dq / "rows").glob("*.json"))]
        rows = [r for r in rows if r["mode"] in modes and (args.split == "all" or r["entry"]["split"] == args.split)
                and all("transferability" in rec for rec in r["scan"]["labels"])]
        if not rows:
            raise NetcleanseError(f"no scans with transferability recorded in {args.dq} (split {args.split}, "
                                  f"modes {args.modes})")
        summary = summarise(rows, args.alpha, scales, args.draws)
    except (NetcleanseError, OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
