"""The verdict on the four real CSAW-HackML-2020 BadNets: full data-free scans, both rules.

    python benchmarks/csaw_verdicts.py [--shared ../shared] [--out csaw-scans] [--seed 0]

Scans each ``../shared/csaw/models/*_bd_weights.h5`` (architecture csaw-deepid, all 1283 labels,
data-free, fast preset) into ``OUT/<net>/`` with ``netcleanse scan --resume`` semantics (a finished
scan is read back, an interrupted one continues), then prints, per net, the calibrated rule's
flags and p-values, re-decided from the scan's recorded mask sizes and maximum margins with this
release's test (so a change of the decision rule needs no rescan), and the paper's rule's flags
beside them. A scan made before the maximum margin was recorded gets it first (the function the scan
calls, written into its scan.json): a label's margin depends on the model, seed and label only.
Known targets: sunglasses 0, anonymous_1 0 (the competition's published answers); anonymous_2
and the multi-trigger net's targets are not published.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import netcleanse
from netcleanse.calibrated import calibrated_test
from netcleanse.errors import NetcleanseError
from netcleanse.presets import goal_variant, inversion_variant, plan_of
from netcleanse.scanning import ScanResult, calibrated_inputs, record_margins, tested_margins
from netcleanse import scan_folder
from netcleanse.utils import write_json_atomic

NETS = ("sunglasses", "anonymous_1", "anonymous_2", "multi_trigger_multi_target")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--out", type=Path, default=Path("csaw-scans"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--inversion-confidence", default=None,
                    help="scan with the fast preset's data-free inversion stopped at this confidence, or 'off' "
                         "(a variant of the preset: use its own --out folder; default: the preset's own)")
    ap.add_argument("--attack-goal", type=float, default=None,
                    help="scan with every trigger search's attack-success goal (the preset's 0.99) set to this "
                         "value (a variant of the preset: use its own --out folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    try:
        preset = inversion_variant("fast", args.inversion_confidence)
        if args.attack_goal is not None:
            preset = goal_variant(preset, args.attack_goal)
        for net in args.nets.split(","):
            out = args.out / net
            path = args.shared / "csaw" / "models" / f"{net}_bd_weights.h5"
            if (out / "scan.json").is_file():
                result = ScanResult.load(out)
                plan = plan_of(preset).for_labels(len(result.labels))
                wanted = plan.inversion_confidence, plan.coarse.schedule.attack_threshold
                recorded = result.settings["plan"]
                if (recorded.get("inversion_confidence"), recorded["coarse"]["schedule"]["attack_threshold"]) != wanted:
                    raise NetcleanseError(f"{out} holds a scan with another inversion confidence or attack-success "
                                          f"goal than --inversion-confidence {args.inversion_confidence} "
                                          f"--attack-goal {args.attack_goal}: one folder per variant")
                if tested_margins(result.labels, result.settings["detection"]) is None:
                    _add_margins(out, netcleanse.load_model(path, arch="csaw-deepid"), result, args.seed)
                    result = ScanResult.load(out)
            else:
                model = netcleanse.load_model(path, arch="csaw-deepid")
                started = time.perf_counter()
                result = netcleanse.scan(model, data_free=True, seed=args.seed, out=out, resume=True, progress=False,
                                         preset=preset)
                print(f"{net}: scanned in {time.perf_counter() - started:.0f} s", flush=True)
            detection = result.settings["detection"]
            test = calibrated_test(*calibrated_inputs(result.labels, detection), alpha=args.alpha,
                                   margins=tested_margins(result.labels, detection))
            steps = "; ".join(f"{s['label']} (index {s['index']:.2f}, p {s['p_value']:.2g})" for s in test.steps)
            print(f"{net:<28} calibrated {test.flagged} (model p {test.p_value:.2g}; steps: {steps}); "
                  f"paper's rule {result.mad_flagged}; scan {result.elapsed_s / 60:.1f} min", flush=True)
            rows.append({"net": net, "flagged": test.flagged, "p_value": test.p_value, "steps": test.steps,
                         "reference": test.reference,
                         "mad_flagged": result.mad_flagged, "elapsed_s": result.elapsed_s})
    except NetcleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out / "verdicts.json", rows, indent=1)
    return 0


def _add_margins(out: Path, model, result: ScanResult, seed: int) -> None:
    """Record the maximum margins of the tested labels in an older scan's scan.json."""
    started = time.perf_counter()
    info = scan_folder.read_scan_json(out / scan_folder.SCAN_JSON)
    margins = record_margins(model, [info], seed, result.preset)
    scan_folder.write_scan_json(out, info)
    print(f"{out.name}: margins of {len(margins)} labels added in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
