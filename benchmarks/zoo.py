"""Build a zoo of small models with known truth, for measuring backdoor detection.

    python benchmarks/zoo.py --n 5 --out zoo --seed 0 [--dataset mnist] [--epochs 10]

writes ``N`` clean models (``clean_00`` ...) and ``N`` backdoored ones (``badnet_00`` ...), each a
BadNet-lab folder (``model.pt``, ``model_weights.h5``, test sets, ``truth.json``; see
:mod:`netcleanse.lab`). Clean models have ``"backdoored": false`` and ``"targets": []``. The
backdoors mix trigger kinds (patch, blend, two-target multi-patch), patch sizes 3-6 px at
random corners or positions, patterns (checkerboard, white, random noise), blend alphas
0.1-0.2, and targets, all drawn from ``--seed``; every model also has its own training seed.
``zoo.json`` lists the models with their truth (``attack_learned``: every target's ASR >= 90 %). A model folder that already holds
``truth.json`` is kept, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from netcleanse.architectures import get_architecture
from netcleanse.attacks import PATTERNS, POSITIONS, blend_trigger, patch_trigger
from netcleanse.data import load_data
from netcleanse.errors import NetcleanseError
from netcleanse.lab import DEFAULT_ARCH, make_badnet, make_clean_model
from netcleanse.model import load_model

KINDS = ("patch", "blend", "multi")
NUM_CLASSES = 10
LEARNED_ASR = 0.9


CORNERS = tuple(p for p in POSITIONS if p != "center")


def random_patch(rng: random.Random, shape, seed: int, position=None):
    """A patch of random size and pattern; at ``position``, else a random corner or place."""
    size = rng.randint(3, 6)
    if position is None:
        position = (rng.choice(CORNERS) if rng.random() < 0.75
                    else (rng.randint(0, shape[1] - size), rng.randint(0, shape[2] - size)))
    pattern = rng.choice(PATTERNS)
    return patch_trigger(shape, size, position, pattern, seed), {"size": size, "position": position, "pattern": pattern}


def backdoor_plan(index: int, rng: random.Random, shape, seed: int):
    """Triggers, targets, kind and a description for the index-th backdoored model."""
    kind = KINDS[index % len(KINDS)]
    if kind == "patch":
        trigger, spec = random_patch(rng, shape, seed)
        return [trigger], [rng.randrange(NUM_CLASSES)], kind, [spec]
    if kind == "blend":
        alpha = round(rng.uniform(0.1, 0.2), 3)
        return [blend_trigger(shape, alpha, "random", seed)], [rng.randrange(NUM_CLASSES)], kind, [{"alpha": alpha}]
    corners = rng.sample(CORNERS, 2)  # two corners, so the two patches never overlap
    made = [random_patch(rng, shape, seed + k, corner) for k, corner in enumerate(corners)]
    return [t for t, _ in made], rng.sample(range(NUM_CLASSES), 2), kind, [spec for _, spec in made]


def build_zoo(n: int, out: Path, seed: int = 0, dataset: str = "mnist", arch: str | None = None,
              epochs: int | None = None, rate: float = 0.1, log=print) -> list[dict]:
    arch = arch or DEFAULT_ARCH
    shape = get_architecture(arch).input_shape
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    plans = []
    for i in range(n):
        plans.append(("clean", i, None))
        plans.append(("badnet", i, backdoor_plan(i, rng, shape, seed * 1000 + 500 + i)))
    entries = []
    for role, i, plan in plans:
        folder = out / f"{role}_{i:02d}"
        model_seed = seed * 1000 + i + (0 if role == "clean" else 500)
        started = time.perf_counter()
        if (folder / "truth.json").is_file():
            truth = json.loads((folder / "truth.json").read_text())
            log(f"{folder.name}: kept (already built)")
        elif role == "clean":
            truth = make_clean_model(dataset, arch, epochs, model_seed, folder, force=True, progress=False).truth
        else:
            triggers, targets, kind, specs = plan
            truth = make_badnet(dataset, triggers, targets, rate=rate, arch=arch, epochs=epochs, seed=model_seed,
                                out=folder, force=True, progress=False).truth
            truth["zoo"] = {"kind": kind, "triggers": specs}
            (folder / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
        asr = truth.get("attack_success", {})
        log(f"{folder.name}: {'backdoored ' + str(truth['targets']) if truth['backdoored'] else 'clean'}, "
            f"clean accuracy {100 * truth['clean_accuracy']:.1f}%"
            + (", ASR " + ", ".join(f"{t}: {100 * a:.1f}%" for t, a in asr.items()) if asr else "")
            + f" ({time.perf_counter() - started:.0f} s)")
        entries.append({"model": f"{folder.name}/model.pt", "folder": folder.name, "backdoored": truth["backdoored"],
                        "targets": truth["targets"], "kind": truth.get("zoo", {}).get("kind", "clean"),
                        "clean_accuracy": truth["clean_accuracy"], "attack_success": asr,
                        # a backdoor that did not take is no fair positive for a detector
                        "attack_learned": bool(asr) and min(asr.values()) >= LEARNED_ASR})
    index = {"dataset": dataset, "arch": arch, "seed": seed, "n": n, "models": entries}
    (out / "zoo.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return entries


def benchmark_parser(description: str, threads: int) -> argparse.ArgumentParser:
    """The arguments every zoo benchmark takes: the zoo folder, torch threads, scan seed, JSON output."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    return ap


def open_zoo(args) -> list[dict] | None:
    """The zoo's entries, with torch set to ``args.threads``; None (message printed) if there is no zoo."""
    try:
        entries = read_zoo(args.zoo)
    except NetcleanseError as exc:
        print(exc, file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    return entries


def read_zoo(zoo: Path) -> list[dict]:
    """The model entries of ``zoo/zoo.json`` (see :func:`build_zoo`)."""
    index_path = zoo / "zoo.json"
    if not index_path.is_file():
        raise NetcleanseError(f"no zoo.json in {zoo}: build it with benchmarks/zoo.py")
    return json.loads(index_path.read_text())["models"]


def load_member(zoo: Path, entry: dict, with_data: bool):
    """(model, its clean test images or None) of one zoo entry."""
    folder = zoo / entry["folder"]
    model = load_model(folder / "model.pt")
    data = (load_data(folder / "clean_test.npz", expect_shape=model.input_shape, num_classes=model.num_classes)
            if with_data else None)
    return model, data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5, help="number of clean and of backdoored models (each)")
    parser.add_argument("--out", type=Path, default=Path("zoo"), help="zoo folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="mnist", help="built-in dataset: mnist or digits")
    parser.add_argument("--arch", default=None, help="architecture (default mnist-cnn)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the lab's)")
    parser.add_argument("--rate", type=float, default=0.1, help="poisoning rate of the backdoored models")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    try:
        entries = build_zoo(args.n, args.out, args.seed, args.dataset, args.arch, args.epochs, args.rate)
    except NetcleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(entries)} models in {args.out} (index: {args.out / 'zoo.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
