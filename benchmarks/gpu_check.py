"""Check ``--device cuda`` on a machine with a GPU: every command that computes runs on the GPU and
agrees with the same command on the CPU, and every file a GPU run writes loads on a CPU machine.

On a machine without CUDA it prints one line saying so and exits 0 (nothing to check).

    .venv/bin/python benchmarks/gpu_check.py [--work DIR] [--epochs 5] [--commands scan,repair,...]

What it does, on a tiny lab model (built-in ``digits``, mnist-cnn, a patch backdoor):

* ``badnet``: trained once per device; clean accuracy and attack success within a few points
  (GPU training is not bit-identical: other kernels, other dropout draws); the written model
  files hold CPU tensors only;
* ``info``, ``predict``, ``eval``, ``scan``, ``screen``, ``repair`` (every method): run on the
  CPU-trained model once with ``--device cpu`` and once with the device under test; outputs agree
  within the tolerances below (predictions, rates; the scan's verdict and flagged labels exactly;
  repair tables within a few points), and repaired/guarded ``.pt`` files hold CPU tensors. The
  repairs start from the planted trigger (a scan folder written from the lab's ``triggers.npz``),
  so they run whatever the scan finds;
* ``demo``: runs with the device under test and finds its backdoor (its CPU run takes minutes).

``report`` renders files only and takes no ``--device``. Exit status: 0 all checks passed (or no
CUDA), 1 a check failed, 2 a command failed outright. ``--device cpu`` runs the whole comparison
CPU against CPU: a dry run of this script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# how far a GPU run may be from the CPU run
PREDICTION_AGREEMENT = 0.99  # share of images with the same predicted label
CONFIDENCE_ATOL = 1e-3
RATE_ATOL = 0.01             # eval's rates (same model, same data)
TRAINED_ATOL = 0.05          # anything that trains (badnet, unlearning, fine-tuning): accuracy and ASR
REPAIR_METHODS = ("fine-prune", "unlearn", "filter", "disagree")
COMMANDS = ("badnet", "info", "predict", "eval", "scan", "repair", "screen", "demo")

CLI = "import sys; from netcleanse.cli import main; main(sys.argv[1:])"


class CommandFailed(Exception):
    pass


def netcleanse(*args, log: Path) -> str:
    """Run ``netcleanse ARGS`` in a fresh process; its stdout (a failure raises, its stderr logged)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ netcleanse {' '.join(map(str, args))}  ({time.perf_counter() - started:.1f} s, "
                f"exit {done.returncode})\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise CommandFailed(f"netcleanse {' '.join(map(str, args))} exited {done.returncode}: "
                            f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return done.stdout


def cpu_tensors_only(path: Path) -> bool:
    """Every tensor of a checkpoint is a CPU tensor when loaded as stored (no map_location)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)
    return all(t.device.type == "cpu" for t in tensors(torch.load(path, weights_only=True)))


class Checks:
    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.rows.append((name, bool(ok), detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)

    def close(self, name: str, a, b, atol: float) -> None:
        if a is None or b is None:
            self.add(name, a is None and b is None, f"cpu {a}, device {b}")
        else:
            self.add(name, abs(a - b) <= atol, f"cpu {a:.4f}, device {b:.4f} (tolerance {atol})")

    @property
    def failed(self) -> list[str]:
        return [name for name, ok, _ in self.rows if not ok]


def check_badnet(runs: list, checks: Checks) -> None:
    cpu, dev = (json.loads((run / "badnet" / "truth.json").read_text()) for _, run in runs)
    checks.close("badnet: clean accuracy", cpu["clean_accuracy"], dev["clean_accuracy"], TRAINED_ATOL)
    for target, asr in cpu["attack_success"].items():
        checks.close(f"badnet: attack success (target {target})", asr, dev["attack_success"][target], TRAINED_ATOL)
    for d, run in runs:
        checks.add(f"badnet ({d}): model.pt holds CPU tensors", cpu_tensors_only(run / "badnet" / "model.pt"))


def compare_repair(method: str, cpu: dict, dev: dict, checks: Checks) -> None:
    trained = method in ("unlearn", "fine-prune", "disagree")  # fine-pruning's order may flip near ties
    atol = TRAINED_ATOL if trained else RATE_ATOL
    checks.add(f"repair {method}: same table rows", [r["model"] for r in cpu["table"]] == [r["model"] for r in dev["table"]],
               f"cpu {[r['model'] for r in cpu['table']]}, device {[r['model'] for r in dev['table']]}")
    for row_cpu, row_dev in zip(cpu["table"], dev["table"]):
        for key in ("clean_val_accuracy", "clean_accuracy", "attack_success", "poison_detection", "false_positive"):
            if key in row_cpu or key in row_dev:
                checks.close(f"repair {method}: {row_cpu['model']} {key}", row_cpu.get(key), row_dev.get(key), atol)


def truth_scan(lab: Path, folder: Path) -> Path:
    """A scan folder (scan.json + masks.npz) flagging the planted targets with the planted triggers,
    so that the repairs run whatever a scan of this small model finds."""
    planted = np.load(lab / "triggers.npz")
    folder.mkdir(parents=True, exist_ok=True)
    targets = [int(t) for t in planted["targets"]]
    (folder / "scan.json").write_text(json.dumps({"flagged": targets, "labels": []}))
    np.savez(folder / "masks.npz", labels=np.array(targets), masks=planted["masks"], patterns=planted["patterns"])
    return folder


def check_info(runs, files, checks, log) -> None:
    infos = [netcleanse("info", files["model"], "--data", files["clean"], "--json", "--device", d, log=log)
             for d, _ in runs]
    checks.add("info: same output", infos[0] == infos[1])


def check_predict(runs, files, checks, log) -> None:
    for d, run in runs:
        netcleanse("predict", files["model"], files["clean"], "--out", run / "predictions.npz", "--device", d, log=log)
    a, b = (np.load(run / "predictions.npz") for _, run in runs)
    agreement = float((a["labels"] == b["labels"]).mean())
    checks.add("predict: labels agree", agreement >= PREDICTION_AGREEMENT, f"{100 * agreement:.2f} %")
    gap = float(np.abs(a["confidence"] - b["confidence"]).max())
    checks.add("predict: confidences agree", gap <= CONFIDENCE_ATOL, f"largest difference {gap:.2e}")


def check_eval(runs, files, checks, log) -> None:
    evals = [json.loads(netcleanse("eval", files["model"], "--clean", files["clean"], "--poisoned", files["poisoned"],
                                   "--json", "--device", d, log=log)) for d, _ in runs]
    for key in ("clean_accuracy", "attack_success"):
        checks.close(f"eval: {key}", evals[0][key], evals[1][key], RATE_ATOL)


def check_scan(runs, files, checks, log) -> None:
    for d, run in runs:
        netcleanse("scan", files["model"], "--data", files["clean"], "--out", run / "scan", "--device", d, log=log)
    scans = [json.loads((run / "scan" / "scan.json").read_text()) for _, run in runs]
    checks.add("scan: same verdict", scans[0]["verdict"] == scans[1]["verdict"],
               f"cpu {scans[0]['verdict']}, device {scans[1]['verdict']}")
    checks.add("scan: same flagged labels", scans[0]["flagged"] == scans[1]["flagged"],
               f"cpu {scans[0]['flagged']}, device {scans[1]['flagged']} (true target {files['target']})")
    l1 = {r["label"]: r["mask_l1"] for r in scans[0]["labels"]}
    print("     mask L1 per label (cpu / device): " + ", ".join(
        f"{r['label']}: {l1[r['label']]:.1f}/{r['mask_l1']:.1f}" for r in scans[1]["labels"]), flush=True)


def check_repair(runs, files, checks, log) -> None:
    for method in REPAIR_METHODS:
        for d, run in runs:
            netcleanse("repair", files["model"], "--scan", files["truth_scan"], "--method", method,
                       "--data", files["clean"], "--test-clean", files["clean"], "--test-poisoned", files["poisoned"],
                       "--drops", "2,4", "--epochs", 2, "--out", run / f"repair-{method}", "--json", "--device", d,
                       log=log)
        records = [json.loads((run / f"repair-{method}" / "repair.json").read_text()) for _, run in runs]
        compare_repair(method, *records, checks)
        device, out = runs[1][0], runs[1][1] / f"repair-{method}"
        for stem in records[1]["files"]:
            checks.add(f"repair {method} ({device}): {stem}.pt holds CPU tensors", cpu_tensors_only(out / f"{stem}.pt"))


def check_screen(runs, files, checks, log) -> None:
    for d, run in runs:
        netcleanse("screen", files["model"], "--data", files["clean"], "--out", run / "screen", "--device", d, log=log)
    rows = [json.loads((run / "screen" / "screen.json").read_text())["rows"] for _, run in runs]
    checks.add("screen: same verdicts", [r["verdict"] for r in rows[0]] == [r["verdict"] for r in rows[1]],
               f"cpu {[r['verdict'] for r in rows[0]]}, device {[r['verdict'] for r in rows[1]]} "
               f"(errors {[r['error'] for r in rows[1]]})")


def check_demo(runs, files, checks, log) -> None:
    device, run = runs[1]
    out = netcleanse("demo", "--out", run / "demo", "--device", device, log=log)
    checks.add(f"demo ({device}): finds its backdoor", "-> true target found" in out)


CHECKS = {"info": check_info, "predict": check_predict, "eval": check_eval, "scan": check_scan,
          "repair": check_repair, "screen": check_screen, "demo": check_demo}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary folder, kept)")
    parser.add_argument("--epochs", type=int, default=5, help="lab training epochs (default 5)")
    parser.add_argument("--device", default="cuda", help="the device under test (default cuda; cpu: dry run)")
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help=f"which to check, of {','.join(COMMANDS)} (badnet always runs: it makes the model)")
    args = parser.parse_args(argv)
    wanted = set(args.commands.split(","))
    if wanted - set(COMMANDS):
        parser.error(f"unknown command(s) {', '.join(sorted(wanted - set(COMMANDS)))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="netcleanse-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    what = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    print(f"gpu_check: cpu against {args.device} ({what}), torch {torch.__version__}; runs in {work}", flush=True)
    devices = ("cpu", args.device)
    runs = [(d, work / f"{i}-{d}") for i, d in enumerate(devices)]  # (device, folder); two even for a dry run
    checks = Checks()
    started = time.perf_counter()
    try:
        for d, run in runs:
            netcleanse("badnet", "--dataset", "digits", "--epochs", args.epochs, "--seed", 0, "--out",
                       run / "badnet", "--json", "--device", d, log=log)
        check_badnet(runs, checks)

        lab = runs[0][1] / "badnet"  # the one model every other command computes with
        files = {"model": lab / "model.pt", "clean": lab / "clean_test.npz", "poisoned": lab / "poisoned_test.npz",
                 "target": json.loads((lab / "truth.json").read_text())["targets"][0],
                 "truth_scan": truth_scan(lab, work / "truth-scan")}
        for name in COMMANDS[1:]:
            if name in wanted:
                CHECKS[name](runs, files, checks, log)
    except CommandFailed as exc:
        print(f"FAIL {exc} (log: {log})")
        return 2
    elapsed = time.perf_counter() - started
    if checks.failed:
        print(f"gpu_check: {len(checks.failed)} of {len(checks.rows)} checks FAILED in {elapsed:.0f} s "
              f"(commands and their output: {log})")
        return 1
    print(f"gpu_check: all {len(checks.rows)} checks passed in {elapsed:.0f} s (commands: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
