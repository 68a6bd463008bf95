"""How often does each detection rule flag a model that has no backdoor at all?

    python benchmarks/mad_null.py [--labels 8,10,43,100,1283] [--threshold 2] [--alpha 0.05]
                                  [--draws 2000] [--rows dq/ --split dev] [--seed 0] [--json out.json]

Two rules, judged by netcleanse's own functions on simulated models without a backdoor:

* the paper's: a label is flagged when (median - L1) / (1.4826 MAD) exceeds the threshold (2);
* the calibrated model-level test (:mod:`netcleanse.calibrated`) at ``--alpha``, run the way a
  scan runs it: on all labels up to 64 labels, above that on the 16 smallest plus 48 random
  control labels as the reference. The KS statistic and p-value test whether its model-level
  p-values are uniform, as they must be where its null model holds.

For each number of labels K, K mask L1 norms are drawn from a null distribution many times.
Null distributions:

* ``normal`` (mean 50 px, sd 10: the model behind the paper's "index > 2 = 95 % confidence");
* ``lognormal`` (median 50 px, sigma 0.35: positive and right-skewed, like mask sizes);
* ``log-t`` (log sizes drawn from the calibrated rule's null family for K labels,
  :func:`netcleanse.calibrated.null_family`: its own null model, where its p-values must be uniform);
* ``empirical`` (with ``--rows``, the folder of ``detection_quality.py``): the mask L1s that the
  scans actually measured on the zoo's clean models (of ``--split``; the labels the calibrated
  test compares with: every label, or the random controls), each scan divided by its own median
  and pooled, resampled with replacement, for the numbers of labels those scans had.
  Labels of one model are not independent (a "1" is always easier than a "0"), so this null is an
  approximation, and it is checked against the baseline measured in the same run: the
  false-alarm rates observed on those same clean scans (the calibrated rule re-decided from their
  recorded mask sizes).

``--margins`` adds the calibrated test with its second signal (the maximum logit margin): each
label's (log size, log margin) pair is drawn from a bivariate Student-t(10) whose two anomaly
directions (small size, large margin) are correlated ``rho``: 0.5 (``pair-0.5``: the test's own null,
where its p-values must be uniform), 0 (``pair-0``: independent signals) and 0.8 (``pair-0.8``: more
dependence than the test assumes, where it must flag more than alpha). With ``--rows`` (rows that
carry margins), ``observed-pairs`` is the rate on the zoo's clean scans with both signals.

``--transfer`` (with ``--margins``; models that take the few-labels plan) adds the two-stage test of
data-free scans (transferable labels tested first, Bonferroni over both stages) on the test's own
bivariate null, with 1-3 labels of each clean model made transferable: those of largest score
``d * g + sqrt(1 - d^2) * e`` (``g`` the size anomaly, ``e`` noise), for dependences ``d`` of
0 (``transfer-0``: random labels), 0.3, the test's allowance ``TRANSFER_RHO`` (0.7: up to it the
test must flag at most alpha), 0.8 and 1 (``transfer-1``: the easiest labels, the worst case, which
measures how far the level can be off beyond the allowance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from scipy import stats

from netcleanse.calibrated import MARGIN_RHO, TRANSFER_RHO, calibrated_test, null_family, null_labels
from netcleanse.detection import anomaly_indices, flag_labels
from netcleanse.presets import PRESETS
from netcleanse.scanning import calibrated_inputs, tested_margins
from netcleanse.utils import write_json_atomic

FAST = PRESETS["fast"]
# the transferable labels' dependence on size simulated by --transfer: 0 (random labels), the test's
# allowance (TRANSFER_RHO) and beyond it, up to 1 (the easiest labels)
TRANSFER_DEPENDENCES = tuple(sorted({0.0, 0.3, TRANSFER_RHO, 0.8, 1.0}))


def false_alarms(samples: np.ndarray, threshold: float) -> tuple[float, float]:
    """(fraction of rows with a flagged label, mean flagged labels per row) for rows of label L1s,
    each row judged by the scan's own detection functions."""
    counts = np.array([len(flag_labels(range(len(row)), anomaly_indices(row), threshold)) for row in samples])
    return float((counts > 0).mean()), float(counts.mean())


def calibrated_p_values(samples: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Model-level p-values and flag decisions of the calibrated test for rows of label L1s, with the
    fast preset's scheme: every label up to candidates + controls, else candidates + random controls."""
    ps, flagged = [], []
    for row in samples:
        k = len(row)
        if k <= FAST.candidates + FAST.controls:
            test = calibrated_test(dict(enumerate(row)), alpha=alpha)
        else:
            controls = rng.choice(k, FAST.controls, replace=False)
            testable = set(controls.tolist()) | set(np.argsort(row)[:FAST.candidates].tolist())
            test = calibrated_test({t: row[t] for t in testable}, sorted(controls.tolist()), k, alpha=alpha)
        ps.append(test.p_value if test.p_value is not None else 1.0)
        flagged.append(bool(test.flagged))
    return np.array(ps), np.array(flagged)


def log_family(rng: np.random.Generator, shape) -> np.ndarray:
    """Draws of the test's own null family for models of ``shape[-1]`` labels (one signal)."""
    return null_labels(rng, shape[0], shape[1], *null_family(shape[1]))[0][0]


def pair_samples(rng: np.random.Generator, draws: int, k: int, rho: float,
                 normal: bool = False) -> tuple[np.ndarray, ...]:
    """(mask L1s, margins), each (draws, k): the bivariate family of the test's null for k labels
    (:func:`netcleanse.calibrated.null_labels`) with the anomaly directions correlated ``rho``; with
    ``normal`` also the size anomaly's normal draw (before the t family's scale)."""
    g, size_normal = null_labels(rng, draws, k, *null_family(k), signals=2, rho=rho)
    out = np.exp(np.log(50.0) - 0.35 * g[0]), np.exp(np.log(30.0) + 0.2 * g[1])
    return (*out, size_normal) if normal else out


def two_signal_p_values(l1s: np.ndarray, margins: np.ndarray, alpha: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`calibrated_p_values` for the test with its second signal (scale floors off: they only
    make the test more conservative, and would hide whether its null is right)."""
    ps, flagged = [], []
    for row, margin in zip(l1s, margins):
        k = len(row)
        if k <= FAST.candidates + FAST.controls:
            tested, reference = list(range(k)), None
        else:
            controls = rng.choice(k, FAST.controls, replace=False)
            tested = sorted(set(controls.tolist()) | set(np.argsort(row)[:FAST.candidates].tolist()))
            reference = sorted(controls.tolist())
        test = calibrated_test({t: row[t] for t in tested}, reference, k, alpha=alpha, min_scale=0.0,
                               margins={t: margin[t] for t in tested}, min_margin_scale=0.0)
        ps.append(test.p_value if test.p_value is not None else 1.0)
        flagged.append(bool(test.flagged))
    return np.array(ps), np.array(flagged)


def two_stage_flags(l1s: np.ndarray, margins: np.ndarray, size_normal: np.ndarray, alpha: float,
                    rng: np.random.Generator, dependence: float) -> np.ndarray:
    """Whether the two-stage test (every label tested) flags each simulated model (scale floors off,
    as above) when 1-3 of its labels are transferable: those of largest score ``dependence * g +
    sqrt(1 - dependence^2) * e`` (``g`` the size anomaly's normal draw, ``e`` noise; 0: random
    labels, 1: the easiest ones)."""
    flagged = []
    for row, margin, g in zip(l1s, margins, size_normal):
        n = int(rng.integers(1, 4))
        score = dependence * g + np.sqrt(1 - dependence * dependence) * rng.standard_normal(len(row))
        chosen = set(np.argsort(-score)[:n].tolist())
        test = calibrated_test(dict(enumerate(row)), alpha=alpha, min_scale=0.0, margins=dict(enumerate(margin)),
                               min_margin_scale=0.0, transfer={t: float(t in chosen) for t in range(len(row))},
                               transfer_threshold=0.5)
        flagged.append(bool(test.flagged))
    return np.array(flagged)


def clean_scans(rows_dir: Path, split: str) -> list[dict]:
    """The clean models' scans (scan.json dicts) among detection_quality.py's rows."""
    scans = []
    for path in sorted((rows_dir / "rows").glob("*.json")):
        row = json.loads(path.read_text())
        if not row["entry"]["backdoored"] and split in ("all", row["entry"]["split"]):
            scans.append(row["scan"])
    return scans


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", default="8,10,43,100,1283", help="numbers of labels K to simulate")
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--draws", type=int, default=2000, help="simulated clean models per K and null")
    ap.add_argument("--rows", type=Path, default=None, help="detection_quality.py --out folder")
    ap.add_argument("--split", choices=("dev", "eval", "all"), default="dev", help="zoo half of --rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margins", action="store_true", help="also the test with its second signal (maximum margin)")
    ap.add_argument("--transfer", action="store_true",
                    help="with --margins: also the two-stage test of data-free few-label scans (transferable labels)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.labels.split(",") if k.strip()]
    except ValueError:
        print(f"error: --labels must be numbers like 10,1283, got {args.labels!r}", file=sys.stderr)
        return 2
    if (args.rows is not None and not (args.rows / "rows").is_dir()) or any(k < 3 for k in ks) or args.draws < 100:
        print("error: " + (f"no detection_quality rows in {args.rows}" if args.rows is not None
                           and not (args.rows / "rows").is_dir() else "need K >= 3 labels and >= 100 draws"),
              file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    # mask sizes of a few dozen pixels, as on small images (the tests are scale-free above FLOOR)
    nulls = {"normal": lambda shape: np.maximum(rng.normal(50.0, 10.0, size=shape), 1e-3),
             "lognormal": lambda shape: rng.lognormal(np.log(50.0), 0.35, size=shape),
             "log-t": lambda shape: np.exp(np.log(50.0) + 0.35 * log_family(rng, shape))}
    observed = {}
    observed_pairs: dict[int, list] = {}
    if args.rows is not None:
        scans = clean_scans(args.rows, args.split)
        if not scans:
            print(f"error: {args.rows} holds no clean-model scans of the {args.split} half", file=sys.stderr)
            return 2
        by_k: dict[int, list] = {}
        for scan in scans:
            # the values the calibrated test compares against: the controls, or every label
            l1, reference, k = calibrated_inputs(scan["labels"], scan["settings"]["detection"])
            values = np.asarray([l1[t] for t in (reference or l1)])
            # this release's test, re-decided from the recorded mask sizes
            flagged = bool(calibrated_test(l1, reference, k, alpha=args.alpha).flagged)
            margins = tested_margins(scan["labels"], scan["settings"]["detection"])
            both = None if margins is None else bool(calibrated_test(l1, reference, k, alpha=args.alpha,
                                                                     margins=margins).flagged)
            by_k.setdefault(k, []).append((values / np.median(values), bool(scan["mad_flagged"]), flagged))
            observed_pairs.setdefault(k, []).append(both)
        for k, group in by_k.items():
            # pooled on one scale: each scan divided by its median (times 50 px, as the other nulls)
            pooled = 50.0 * np.concatenate([v for v, _, _ in group])
            nulls[f"empirical-{k}"] = (lambda pooled: lambda shape: rng.choice(pooled, size=shape, replace=True))(pooled)
            observed[k] = {"clean_scans": len(group), "mad": sum(m for _, m, _ in group) / len(group),
                           "calibrated": sum(c for _, _, c in group) / len(group)}

    table = []
    print(f"models WITHOUT a backdoor flagged (fraction of simulated models with at least one flagged label): the "
          f"paper's rule 'anomaly index > {args.threshold:g}' vs the calibrated test at alpha {args.alpha:g}; KS test "
          f"of the calibrated p-values against uniform")
    for k in ks:
        row = {"labels": k, "draws": args.draws}
        for name, draw in nulls.items():
            if name.startswith("empirical-") and name != f"empirical-{k}":
                continue  # the pooled shape of K-label models says nothing about other K
            samples = draw((args.draws, k))
            rate, mean_flags = false_alarms(samples, args.threshold)
            ps, flags = calibrated_p_values(samples, args.alpha, rng)
            ks_test = stats.kstest(ps, "uniform")
            key = "empirical" if name.startswith("empirical-") else name
            row[key] = {"mad_rate": rate, "mad_mean_flags": mean_flags,
                                       "calibrated_rate": float(flags.mean()), "ks_statistic": float(ks_test.statistic),
                                       "ks_p": float(ks_test.pvalue)}
            print(f"K = {k:>5} {key:<10}: paper's rule {100 * rate:5.1f} % ({mean_flags:.2f} flags); "
                  f"calibrated {100 * flags.mean():5.1f} %; KS D {ks_test.statistic:.3f} (p {ks_test.pvalue:.2g})",
                  flush=True)
        if args.margins:
            for rho in (MARGIN_RHO, 0.0, 0.8):
                ps, flags = two_signal_p_values(*pair_samples(rng, args.draws, k, rho), args.alpha, rng)
                ks_test = stats.kstest(ps, "uniform")
                row[f"pair-{rho:g}"] = {"calibrated_rate": float(flags.mean()), "ks_statistic": float(ks_test.statistic),
                                        "ks_p": float(ks_test.pvalue)}
                print(f"K = {k:>5} pair-{rho:<5g}: two-signal calibrated {100 * flags.mean():5.1f} %; KS D "
                      f"{ks_test.statistic:.3f} (p {ks_test.pvalue:.2g})", flush=True)
            if args.transfer and FAST.few_labels(k):
                for dependence in TRANSFER_DEPENDENCES:
                    name = f"transfer-{dependence:g}"
                    flags = two_stage_flags(*pair_samples(rng, args.draws, k, MARGIN_RHO, normal=True), args.alpha,
                                            rng, dependence)
                    row[name] = {"calibrated_rate": float(flags.mean())}
                    print(f"K = {k:>5} {name:<14}: two-stage calibrated {100 * flags.mean():5.1f} %", flush=True)
            seen = [v for v in observed_pairs.get(k, []) if v is not None]
            if seen:
                row["observed-pairs"] = {"clean_scans": len(seen), "calibrated": sum(seen) / len(seen)}
                print(f"K = {k:>5} observed-pairs: two-signal calibrated {100 * sum(seen) / len(seen):5.1f} % of "
                      f"{len(seen)} clean-model scans", flush=True)
        if k in observed:
            row["observed"] = observed[k]
            print(f"K = {k:>5} observed  : on {observed[k]['clean_scans']} clean-model scans of the zoo's "
                  f"{args.split} half: paper's rule {100 * observed[k]['mad']:5.1f} %, calibrated "
                  f"{100 * observed[k]['calibrated']:5.1f} %")
        table.append(row)
    if args.json:
        write_json_atomic(args.json, {"threshold": args.threshold, "alpha": args.alpha, "seed": args.seed,
                                      "rows": table}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
