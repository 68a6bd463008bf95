"""Scan speed: the `reference` preset (original Neural Cleanse protocol) vs `fast`, on a real CSAW BadNet.

One run, same machine, same process, data-free inputs, torch threads = --threads (default 2):

* reference: the original protocol searches one label at a time, epochs of 31 mini-batches of 32
  images, until its early stop (at least ~40 epochs, often hundreds; at most 1000). Running that for
  even one label takes many minutes on 2 cores, so we MEASURE the time of --reference-epochs epochs
  for --reference-labels labels and EXTRAPOLATE per epoch (stated as such in the output).
  ``--converge-labels K`` also runs the reference's whole search, to its own early stop, for K
  more sampled labels: their MEASURED mean time per label, times the number of labels, is the
  reference's full scan without an assumed epoch count (with ``--full``: the ratio to the measured
  fast scan).
* fast: MEASURED on the trigger searches of one coarse chunk (96 labels) and one refinement chunk
  (48 labels); a full scan is ceil(1283 / 96) coarse chunks + at most ceil((64 + controls) / 48)
  refinement chunks, so the searches' full-scan time is EXTRAPOLATED (worst case) from those two
  measurements (without the input synthesis, attack-success checks and margins: ``--full``
  measures everything). `--full` also runs and times
  the whole data-free fast scan (several minutes), in a child process, with its own peak RSS.
* small nets: a full data-free fast scan (wall time, peak RSS of the scanning child process) of a
  43-class net of Neural Cleanse's traffic-sign architecture (``gtsrb-cnn`` on the built-in
  ``mnist-pairs-43``) and of a 10-class ``mnist-cnn`` net (on ``mnist``), both BadNets trained by the
  lab (patch trigger, target 7) on first use and cached in ``--cache`` (default
  ``benchmarks/.cache``), so reruns only scan; or given with ``--gtsrb-model`` / ``--mnist-model``.
  ``--no-small`` skips them.

Prints labels/second for each preset, their ratio, the extrapolated 1283-label times and the peak
RSS of this process (resource.getrusage). Timings on a shared machine are noisy: compare the ratio.

    python benchmarks/scan_speed.py [--model PATH] [--threads 2] [--reference-epochs 2] [--converge-labels K]
                                    [--full] [--no-small]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import netcleanse
from netcleanse.neural_cleanse import reverse_engineer
from netcleanse.presets import PRESETS
from netcleanse.synthesis import synthesize_inputs
from netcleanse.utils import write_json_atomic

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "csaw" / "models" / "sunglasses_bd_weights.h5"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


CACHE = Path(__file__).resolve().parent / ".cache"
# the small nets: name -> (lab dataset, architecture, training epochs)
SMALL = {"gtsrb-43": ("mnist-pairs-43", "gtsrb-cnn", None), "mnist-10": ("mnist", "mnist-cnn", None)}


def lab_model(name: str, cache: Path) -> Path:
    """The cached lab BadNet ``name`` (:data:`SMALL`), trained (patch trigger, target 7, seed 0) if absent."""
    folder = cache / name
    if not (folder / "model.pt").exists():
        from netcleanse.lab import make_badnet
        dataset, arch, epochs = SMALL[name]
        t = time.perf_counter()
        bad = make_badnet(dataset, "patch", target=7, arch=arch, epochs=epochs, seed=0, out=folder, force=True,
                          progress=False)
        print(f"trained {name} ({arch} on {dataset}) in {time.perf_counter() - t:.0f} s: clean accuracy "
              f"{bad.truth['clean_accuracy']:.3f}, attack success {bad.truth['attack_success']}", flush=True)
    return folder / "model.pt"


def scan_in_child(model: Path, arch: str | None, threads: int) -> dict:
    """A full data-free fast scan of ``model`` in a fresh process: wall time, peak RSS (VmHWM), verdict."""
    cmd = [sys.executable, __file__, "--child-scan", str(model), "--arch", arch or "-", "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scan of {model} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_scan(model_path: str, arch: str, threads: int) -> int:
    torch.set_num_threads(threads)
    model = netcleanse.load_model(model_path, arch=None if arch == "-" else arch)
    t = time.perf_counter()
    result = netcleanse.scan(model, data_free=True, progress=False)
    wall = time.perf_counter() - t
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    print(json.dumps({"model": model_path, "num_labels": model.num_classes, "full_s": wall, "peak_rss_mib": peak,
                      "flagged": result.flagged, "verdict": result.verdict, "p_value": result.p_value,
                      "passes": result.settings["passes"]}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--arch", default="csaw-deepid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-labels", type=int, default=2)
    ap.add_argument("--reference-epochs", type=int, default=2)
    ap.add_argument("--converge-labels", type=int, default=0,
                    help="also run the reference protocol to its own early stop (at most 1000 epochs) for this "
                         "many sampled labels, and extrapolate from their MEASURED time per label")
    ap.add_argument("--assumed-reference-epochs", type=int, default=100,
                    help="epochs per label assumed for the reference extrapolation (its early stop needs >= ~40)")
    ap.add_argument("--full", action="store_true", help="also run and time a full data-free fast scan")
    ap.add_argument("--no-small", action="store_true", help="skip the 43-class and 10-class nets")
    ap.add_argument("--cache", type=Path, default=CACHE, help="folder of the trained small nets")
    ap.add_argument("--gtsrb-model", type=Path, help="a 43-class gtsrb-cnn net to use instead of the cached one")
    ap.add_argument("--mnist-model", type=Path, help="a 10-class net to use instead of the cached one")
    ap.add_argument("--child-scan", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    args = ap.parse_args(argv)
    if args.child_scan:
        return child_scan(args.child_scan, args.arch, args.threads)
    if not args.model.exists():
        print(f"model not found: {args.model}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = netcleanse.load_model(args.model, arch=args.arch)
    n_labels = model.num_classes
    work = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    fast = PRESETS["fast"]
    x = synthesize_inputs(work, fast.n_opt + fast.n_val, fast.data_free_inputs, gen)
    x_opt = x[:fast.n_opt]
    sample = torch.randperm(n_labels, generator=gen).tolist()
    out = {"model": str(args.model), "threads": args.threads, "num_labels": n_labels}

    # --- reference: measured for a few epochs, extrapolated per epoch
    ref = PRESETS["reference"].coarse
    ref_schedule = ref.schedule.__class__(**{**ref.schedule.to_dict(), "max_epochs": args.reference_epochs,
                                             "betas": tuple(ref.schedule.betas)})
    ref_x = synthesize_inputs(work, 256, "inversion", gen)  # the reference draws batches from many inputs
    t = time.perf_counter()
    for label in sample[:args.reference_labels]:
        reverse_engineer(work, ref_x, [label], ref_schedule, generator=gen, channels_last=True)
    ref_epoch_s = (time.perf_counter() - t) / (args.reference_labels * args.reference_epochs)
    ref_label_s = ref_epoch_s * args.assumed_reference_epochs
    out["reference"] = {"measured_epoch_s": ref_epoch_s, "measured_labels": args.reference_labels,
                        "measured_epochs_per_label": args.reference_epochs,
                        "assumed_epochs_per_label": args.assumed_reference_epochs,
                        "extrapolated_label_s": ref_label_s, "labels_per_s": 1 / ref_label_s,
                        "extrapolated_full_s": ref_label_s * n_labels,
                        "full_at_1000_epochs_s": ref_epoch_s * 1000 * n_labels}

    if args.converge_labels:  # the whole reference search of a few labels, to its own early stop
        converged = []
        for label in sample[args.reference_labels:args.reference_labels + args.converge_labels]:
            t = time.perf_counter()
            found = reverse_engineer(work, ref_x, [label], ref.schedule, generator=gen, channels_last=True)[0]
            converged.append({"label": label, "epochs": found.epochs, "s": time.perf_counter() - t})
            print(f"reference search of label {label}: {found.epochs} epochs, {converged[-1]['s']:.0f} s", flush=True)
        label_s = sum(c["s"] for c in converged) / len(converged)
        out["reference"].update(converged=converged, converged_label_s=label_s,
                                converged_full_s=label_s * n_labels)

    # --- fast: one coarse chunk and one refinement chunk, measured
    coarse, refine = fast.coarse, fast.refine
    chunk = sample[:coarse.label_chunk]
    t = time.perf_counter()
    found = reverse_engineer(work, x_opt, chunk, coarse.schedule, generator=gen, channels_last=True)
    coarse_s = time.perf_counter() - t
    rchunk = chunk[:refine.label_chunk]
    init = (torch.stack([f.last_mask for f in found[:len(rchunk)]]),
            torch.stack([f.last_pattern for f in found[:len(rchunk)]]))
    cost = torch.tensor([max(f.cost, refine.schedule.init_cost) for f in found[:len(rchunk)]])
    t = time.perf_counter()
    reverse_engineer(work, x_opt, rchunk, refine.schedule, generator=gen, init=init, init_cost=cost,
                     channels_last=True)
    refine_s = time.perf_counter() - t
    n_chunks = math.ceil(n_labels / coarse.label_chunk)
    # worst case: the most candidates the preset refines, plus its controls
    n_refine_chunks = math.ceil((fast.max_candidates + fast.controls) / refine.label_chunk)
    fast_full = n_chunks * coarse_s + n_refine_chunks * refine_s
    out["fast"] = {"measured_coarse_chunk_s": coarse_s, "coarse_chunk_labels": len(chunk),
                   "measured_refine_chunk_s": refine_s, "refine_chunk_labels": len(rchunk),
                   "extrapolated_full_s": fast_full, "labels_per_s": n_labels / fast_full}
    out["speedup"] = out["reference"]["extrapolated_full_s"] / fast_full

    out["peak_rss_mib"] = peak_rss_mib()
    if args.full:
        full = scan_in_child(args.model, args.arch, args.threads)
        out["fast"]["measured_full_s"] = full["full_s"]
        if args.converge_labels:
            out["speedup_measured"] = out["reference"]["converged_full_s"] / full["full_s"]
        out["fast"]["full_flagged"] = full["flagged"]
        out["fast"]["full_peak_rss_mib"] = full["peak_rss_mib"]
        out["fast"]["full_passes"] = full["passes"]
    if not args.no_small:
        out["small"] = {}
        for name, given in (("gtsrb-43", args.gtsrb_model), ("mnist-10", args.mnist_model)):
            path = given or lab_model(name, args.cache)
            out["small"][name] = scan_in_child(path, None, args.threads)

    r, f = out["reference"], out["fast"]
    print(f"model {args.model.name}, {n_labels} labels, {args.threads} torch threads (shared machine: noisy)")
    print(f"reference: MEASURED {r['measured_epoch_s']:.1f} s/epoch/label over {args.reference_labels} labels x "
          f"{args.reference_epochs} epochs; EXTRAPOLATED at {args.assumed_reference_epochs} epochs/label: "
          f"{r['labels_per_s']:.5f} labels/s, full scan {r['extrapolated_full_s'] / 3600:.1f} h "
          f"({r['full_at_1000_epochs_s'] / 3600:.0f} h if every label ran 1000 epochs)")
    print(f"fast: MEASURED coarse chunk of {len(chunk)} labels {coarse_s:.1f} s, refinement chunk of {len(rchunk)} "
          f"labels {refine_s:.1f} s; EXTRAPOLATED full scan {fast_full / 60:.1f} min ({f['labels_per_s']:.2f} labels/s)")
    if "measured_full_s" in f:
        print(f"fast: MEASURED full data-free scan {f['measured_full_s'] / 60:.1f} min, peak RSS "
              f"{f['full_peak_rss_mib']:.0f} MiB (scan process alone), flagged {f['full_flagged']}; images "
              f"through the network: {f['full_passes']}")
    print(f"speed-up fast vs reference (extrapolated full scans): {out['speedup']:.0f}x")
    if "converged" in r:
        epochs = [c["epochs"] for c in r["converged"]]
        print(f"reference: MEASURED to its early stop for {len(epochs)} labels: epochs {epochs}, "
              f"{r['converged_label_s']:.0f} s/label; EXTRAPOLATED full scan {r['converged_full_s'] / 3600:.1f} h")
    if "speedup_measured" in out:
        print(f"speed-up, measured full fast scan vs reference searched to convergence (per label, "
              f"extrapolated): {out['speedup_measured']:.0f}x")
    print(f"peak RSS of this process (reference + chunk measurements) {out['peak_rss_mib']:.0f} MiB")
    for name, r in out.get("small", {}).items():
        print(f"{name}: MEASURED full data-free fast scan of {r['num_labels']} labels {r['full_s']:.1f} s, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB (scan process alone), {r['verdict']} {r['flagged']} (p {r['p_value']:.2g}); "
              f"images through the network: {r['passes']}")
    if args.json:
        write_json_atomic(args.json, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
