"""Build a zoo of small models with known truth, for measuring backdoor detection.

    python benchmarks/zoo.py --out zoo [--n 60] [--datasets mnist,mnist-pairs] [--seed 0]
                             [--split dev|eval|all] [--shard K/N]

For each built-in dataset (default: 10-class ``mnist`` and 100-class ``mnist-pairs``) it trains
``--n`` clean models and ``--n`` backdoored ones, in pairs ``<dataset>-clean_<i>`` /
``<dataset>-badnet_<i>``; each is a BadNet-lab folder (``model.pt``, test sets, ``truth.json``; see
:mod:`netcleanse.lab`) plus ``entry.json``, its line in the zoo's index. The default 60 per
dataset gives 240 models. Also known: ``digits`` (10 classes), ``mnist-triples`` (1000) and
``mnist-pairs-43`` (43 classes at 3x32x32, for ``--arch gtsrb-cnn``, Neural Cleanse's traffic-sign net).

What pair ``i`` of a dataset looks like is drawn from ``(seed, dataset, i)`` alone, so a model's
plan never depends on ``--n`` or on which other models were built:

* training length: 8, 12 or 16 epochs (the same for the pair's clean and backdoored model);
* backdoor kind: patch (1/2), blend (1/4), or 2-3 patches with one target each (1/4);
* patches 3-6 px with a checkerboard, white or random pattern, in a corner (3/4) or anywhere;
  blend alpha 0.1-0.2 of a random pattern; several patches sit in different corners;
* poisoning rate 1, 3, 5 or 10 % of the training set (split among the patches of a multi-target
  model); targets uniform over the labels.

**Development and evaluation halves** (fixed before any evaluation number was looked at): pair
``i`` is in the *development* half when ``i`` is even and in the *evaluation* half when it is odd,
for every dataset. Settings of a detection rule are chosen on the development half only; the
evaluation half is only reported.

A model folder that already holds ``entry.json`` is kept, so an interrupted build continues where
it stopped; ``--shard K/N`` builds every N-th model (from the K-th), so N processes can share the
work. ``zoo.json`` is rewritten after each model from every finished folder.

``--executor ray [--ray-address ADDR]`` builds the models as Ray tasks (one model per task, each
with ``--threads`` CPUs) on a local Ray instance or a cluster; the tasks write their folders
themselves, so on a cluster ``--out`` must be on a file system every node sees.
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
from netcleanse.executor import EXECUTORS, LocalExecutor, make_executor
from netcleanse.lab import DEFAULT_ARCH, make_badnet, make_clean_model
from netcleanse.model import load_model
from netcleanse.utils import write_json_atomic

LEARNED_ASR = 0.9
DATASETS = ("mnist", "mnist-pairs")
NUM_CLASSES = {"mnist": 10, "digits": 10, "mnist-pairs-43": 43, "mnist-pairs": 100, "mnist-triples": 1000}
EPOCHS = (8, 12, 16)
RATES = (0.01, 0.03, 0.05, 0.1)
SPLITS = ("dev", "eval")
CORNERS = tuple(p for p in POSITIONS if p != "center")


def split_of(i: int) -> str:
    """The half a pair belongs to: even pair index -> development, odd -> evaluation."""
    return SPLITS[i % 2]


def random_patch(rng: random.Random, shape, seed: int, position=None):
    """A patch of random size and pattern; at ``position``, else a random corner or place."""
    size = rng.randint(3, 6)
    if position is None:
        position = (rng.choice(CORNERS) if rng.random() < 0.75
                    else (rng.randint(0, shape[1] - size), rng.randint(0, shape[2] - size)))
    pattern = rng.choice(PATTERNS)
    return patch_trigger(shape, size, position, pattern, seed), {"size": size, "position": position, "pattern": pattern}


def pair_plan(seed: int, dataset: str, i: int, shape) -> dict:
    """Everything drawn for pair ``i`` of ``dataset``: epochs, and the backdoored model's attack."""
    rng = random.Random(f"{seed}/{dataset}/{i}")
    num_classes = NUM_CLASSES[dataset]
    epochs = rng.choice(EPOCHS)
    kind = rng.choice(("patch", "patch", "blend", "multi"))
    rate = rng.choice(RATES)
    trigger_seed = seed * 100000 + 50000 + i
    if kind == "patch":
        trigger, spec = random_patch(rng, shape, trigger_seed)
        triggers, specs, targets = [trigger], [spec], [rng.randrange(num_classes)]
    elif kind == "blend":
        alpha = round(rng.uniform(0.1, 0.2), 3)
        triggers, specs = [blend_trigger(shape, alpha, "random", trigger_seed)], [{"alpha": alpha}]
        targets = [rng.randrange(num_classes)]
    else:
        corners = rng.sample(CORNERS, rng.choice((2, 3)))  # distinct corners: the patches never overlap
        made = [random_patch(rng, shape, trigger_seed + k, corner) for k, corner in enumerate(corners)]
        triggers, specs = [t for t, _ in made], [spec for _, spec in made]
        targets = rng.sample(range(num_classes), len(made))
    return {"epochs": epochs, "kind": kind, "rate": rate, "triggers": triggers, "specs": specs, "targets": targets}


def zoo_plan(n: int, datasets, seed: int) -> list[tuple[str, str, int, str]]:
    """(folder, dataset, pair index, role) of every model, development pairs first."""
    plan = []
    for i in sorted(range(n), key=lambda i: (SPLITS.index(split_of(i)), i)):
        for dataset in datasets:
            for role in ("clean", "badnet"):
                plan.append((f"{dataset}-{role}_{i:03d}", dataset, i, role))
    return plan


def build_model(out: Path, folder: str, dataset: str, i: int, role: str, seed: int, arch: str,
                epochs: int | None) -> dict:
    """Train one zoo model into ``out/folder`` and return its index entry."""
    shape = get_architecture(arch).input_shape
    plan = pair_plan(seed, dataset, i, shape)
    epochs = epochs or plan["epochs"]
    model_seed = seed * 100000 + NUM_CLASSES[dataset] * 1000 + 2 * i + (role == "badnet")
    target = out / folder
    if role == "clean":
        truth = make_clean_model(dataset, arch, epochs, model_seed, target, force=True, progress=False).truth
    else:
        truth = make_badnet(dataset, plan["triggers"], plan["targets"], rate=plan["rate"], arch=arch, epochs=epochs,
                            seed=model_seed, out=target, force=True, progress=False).truth
        truth["zoo"] = {"kind": plan["kind"], "triggers": plan["specs"]}
        write_json_atomic(target / "truth.json", truth, indent=2)
    asr = truth.get("attack_success", {})
    entry = {"model": f"{folder}/model.pt", "folder": folder, "dataset": dataset, "num_classes": NUM_CLASSES[dataset],
             "pair": i, "split": split_of(i), "backdoored": truth["backdoored"], "targets": truth["targets"],
             "kind": truth.get("zoo", {}).get("kind", "clean"), "rate": truth["rate"], "epochs": truth["epochs"],
             "clean_accuracy": truth["clean_accuracy"], "attack_success": asr,
             # a backdoor that did not take is no fair positive for a detector
             "attack_learned": bool(asr) and min(asr.values()) >= LEARNED_ASR}
    write_json_atomic(target / "entry.json", entry, indent=1)
    return entry


def _build_task(shared, job, progress) -> tuple[dict, float]:
    """One model of the zoo, wherever the executor runs it: (its entry, seconds)."""
    out, seed, arch, epochs = shared
    folder, dataset, i, role = job
    started = time.perf_counter()
    entry = build_model(Path(out), folder, dataset, i, role, seed, arch, epochs)
    return entry, time.perf_counter() - started


def build_zoo(out: Path, n: int = 60, datasets=DATASETS, seed: int = 0, arch: str | None = None,
              epochs: int | None = None, split: str = "all", shard: tuple[int, int] = (0, 1), log=print,
              executor=None, first_pair: int = 0) -> list[dict]:
    """Build (or finish building) the zoo in ``out``; returns the entries of every finished model.
    ``executor``: where the models are trained (:mod:`netcleanse.executor`; default this process).
    ``first_pair``: build only pairs ``i >= first_pair`` (to grow a zoo whose earlier pairs were
    built, and scanned, elsewhere; a pair's models do not depend on ``n``)."""
    arch = arch or DEFAULT_ARCH
    for dataset in datasets:
        if dataset not in NUM_CLASSES:
            raise NetcleanseError(f"the zoo knows the datasets {', '.join(NUM_CLASSES)}, not {dataset!r}")
    out.mkdir(parents=True, exist_ok=True)
    plan = [p for p in zoo_plan(n, datasets, seed)
            if (split == "all" or split_of(p[2]) == split) and p[2] >= first_pair]
    jobs = [job for k, job in enumerate(plan)
            if k % shard[1] == shard[0] and not (out / job[0] / "entry.json").is_file()]
    for _, (entry, seconds) in (executor or LocalExecutor()).map(_build_task, (str(out.resolve()), seed, arch, epochs),
                                                                 jobs):
        asr = entry["attack_success"]
        log(f"{entry['folder']} ({entry['split']}): "
            f"{'backdoored ' + str(entry['targets']) if entry['backdoored'] else 'clean'}, "
            f"clean accuracy {100 * entry['clean_accuracy']:.1f}%"
            + (", ASR " + ", ".join(f"{t}: {100 * a:.1f}%" for t, a in asr.items()) if asr else "")
            + f" ({seconds:.0f} s)")
        write_index(out, {"seed": seed, "arch": arch, "n": n, "datasets": list(datasets)})
    return read_zoo(out)


def write_index(out: Path, settings: dict) -> None:
    """``zoo.json``: the build settings and every finished model's entry (from the folders)."""
    write_json_atomic(out / "zoo.json", dict(settings, models=read_zoo(out)), indent=1)


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor local|ray`` and ``--ray-address ADDR``, as the netcleanse command has them."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local (this process) or ray (one model per Ray task)")
    parser.add_argument("--ray-address", default=None, help="with --executor ray: the cluster (default: a local "
                        "Ray instance with every CPU)")


def executor_from_args(args):
    """The executor ``args`` ask for; a Ray task gets ``args.threads`` CPUs (and torch threads), and
    this module travels by value (workers cannot import a script's modules by name)."""
    if args.executor != "ray":
        return make_executor(args.executor, args.ray_address)
    # (a script run as __main__ travels by value anyway; this module, imported as "zoo", must be told)
    return make_executor("ray", args.ray_address, cpus_per_task=args.threads,
                         pickle_by_value=[sys.modules["zoo"]] if "zoo" in sys.modules else [])


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
    """The entries of every finished model of the zoo (its folders' ``entry.json``), by folder name."""
    entries = [json.loads(p.read_text()) for p in sorted(Path(zoo).glob("*/entry.json"))]
    if not entries:
        raise NetcleanseError(f"no zoo models in {zoo}: build them with benchmarks/zoo.py")
    return entries


def load_member(zoo: Path, entry: dict, with_data: bool):
    """(model, its clean test images or None) of one zoo entry."""
    folder = zoo / entry["folder"]
    model = load_model(folder / "model.pt")
    data = (load_data(folder / "clean_test.npz", expect_shape=model.input_shape, num_classes=model.num_classes)
            if with_data else None)
    return model, data


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 0/2, not {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="clean and backdoored models (each) per dataset")
    parser.add_argument("--out", type=Path, default=Path("zoo"), help="zoo folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="built-in datasets, comma-separated")
    parser.add_argument("--arch", default=None, help="architecture (default mnist-cnn)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs for every model (default: drawn)")
    parser.add_argument("--split", choices=("dev", "eval", "all"), default="all", help="build only one half")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="K/N: build every N-th model from the K-th")
    parser.add_argument("--from-pair", type=int, default=0,
                        help="build only pairs from this index on (grow a zoo whose earlier pairs exist elsewhere)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    add_executor_arguments(parser)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        with executor_from_args(args) as executor:
            entries = build_zoo(args.out, args.n, datasets, args.seed, args.arch, args.epochs, args.split, args.shard,
                                executor=executor, first_pair=args.from_pair)
    except NetcleanseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(entries)} models in {args.out} (index: {args.out / 'zoo.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
