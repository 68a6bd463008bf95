"""Prototype measurement: is a planted target a "sink" of the model's outputs, before any trigger search?

    python benchmarks/label_sink.py ZOO [ZOO ...] [--csaw ../shared] [--inputs 256] [--seed 0]
                                    [--split all|dev|eval] [--rows rows.jsonl] [--threads 1]

Not part of any verdict. K-Arm (Shen et al., ICML 2021) pre-screens labels by how often they appear
in the top-k outputs (k = 25 % of the labels) of the inputs; a backdoor's target, which a small
universal change reaches from any input, may also stand out on unchanged inputs. This measures two
per-label statistics on the scan's kind of inputs, for every label at the cost of one forward pass:

* ``logit``: the mean over inputs not classified as label j of j's logit standardised per input
  ((z_ij - mean_i) / sd_i);
* ``topk``: the fraction of those inputs with j among their top ceil(K / 4) outputs (K-Arm's rule).

Each is turned into a robust z-score over the model's labels ((s_j - median) / (1.4826 MAD)). The
question: do planted targets reach beyond the largest z-score of clean models with the same number
of labels? Inputs per model and mode: ``data``, ``--inputs`` of the zoo member's clean test images
drawn at random (seeded); ``data-free``, as many inputs synthesised by the scan's inversion
(:func:`netcleanse.synthesis.synthesize_inputs`). ``--csaw`` adds the four shared CSAW nets,
data-free (their targets as ``benchmarks/csaw_transferability.py`` names them). Rows (one JSON
line per model and mode) are appended to ``--rows`` and models already there are skipped, so the
run resumes; the summary is printed from the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from netcleanse.model import load_model
from netcleanse.synthesis import synthesize_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csaw_transferability import TARGETS  # noqa: E402
from detection_quality import scored  # noqa: E402
from zoo import load_member, read_zoo  # noqa: E402

STATISTICS = ("logit", "topk")


def sink_statistics(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Per label: mean standardised logit and top-(K/4) frequency over the inputs not classified as it."""
    z = logits.double()
    K = z.shape[1]
    zs = ((z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)).numpy()
    top1 = z.argmax(1).numpy()
    k = max(2, math.ceil(K / 4))
    in_topk = np.zeros(zs.shape, dtype=bool)
    np.put_along_axis(in_topk, torch.topk(z, k, dim=1).indices.numpy(), True, axis=1)
    others = top1[:, None] != np.arange(K)[None, :]
    n = np.maximum(others.sum(0), 1)
    return {"logit": (zs * others).sum(0) / n, "topk": (in_topk & others).sum(0) / n}


def robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return (v - med) / max(mad, 1e-12)


def measure(model, x: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    return {name: robust_z(v).round(4).tolist() for name, v in sink_statistics(logits).items()}


def zoo_rows(zoo: Path, split: str, n_inputs: int, seed: int, done: set):
    for entry in read_zoo(zoo):
        if split != "all" and entry["split"] != split:
            continue
        for mode in ("data", "data-free"):
            key = (entry["folder"], mode)
            if key in done:
                continue
            model, data = load_member(zoo, entry, with_data=mode == "data")
            if mode == "data":
                pick = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))[:n_inputs]
                x = data.x[pick]
            else:
                x = synthesize_inputs(model, n_inputs, "inversion", torch.Generator().manual_seed(seed))
            yield {"model": entry["folder"], "mode": mode, "labels": model.num_classes, "learned": scored({"entry": entry}),
                   "targets": entry["targets"] if entry["backdoored"] else [], **measure(model, x)}


def csaw_rows(shared: Path, n_inputs: int, seed: int, done: set):
    for net, targets in TARGETS.items():
        if (net, "data-free") in done:
            continue
        model = load_model(shared / "csaw" / "models" / f"{net}_bd_weights.h5", arch="csaw-deepid", input_scale=255)
        x = synthesize_inputs(model, n_inputs, "inversion", torch.Generator().manual_seed(seed))
        yield {"model": net, "mode": "data-free", "labels": model.num_classes, "learned": True, "targets": targets,
               "csaw": True, **measure(model, x)}


def summary(rows: list[dict]) -> None:
    groups = sorted({(r["labels"], r["mode"]) for r in rows if not r.get("csaw")})
    print("| labels | mode | statistic | clean models: largest z (median / 95 % / max) | planted targets: median z | "
          "targets above the clean 95 % / max | targets ranked first |")
    print("|---|---|---|---|---|---|---|")
    for labels, mode in groups:
        group = [r for r in rows if r["labels"] == labels and r["mode"] == mode and r["learned"] and not r.get("csaw")]
        for stat in STATISTICS:
            clean = np.array([max(r[stat]) for r in group if not r["targets"]])
            t = [(r[stat][j], sum(v > r[stat][j] for v in r[stat]) + 1) for r in group for j in r["targets"]]
            if not len(clean) or not t:
                continue
            tz, rank = np.array([a for a, _ in t]), np.array([b for _, b in t])
            q50, q95, qmax = np.quantile(clean, [0.5, 0.95, 1.0])
            print(f"| {labels} | {mode} | {stat} | {q50:.1f} / {q95:.1f} / {qmax:.1f} ({len(clean)} models) | "
                  f"{np.median(tz):.1f} ({len(tz)} targets) | {np.mean(tz > q95):.0%} / {np.mean(tz > qmax):.0%} | "
                  f"{np.mean(rank == 1):.0%} |")
    for r in rows:
        if r.get("csaw"):
            for stat in STATISTICS:
                z = np.array(r[stat])
                best = [int(j) for j in np.argsort(-z)[:4]]
                print(f"{r['model']} {stat}: targets " + ", ".join(
                    f"{j} z {z[j]:.1f} (rank {int((z > z[j]).sum()) + 1})" for j in r["targets"])
                      + "; largest: " + ", ".join(f"{j} {z[j]:.1f}" for j in best))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path, nargs="*")
    ap.add_argument("--csaw", type=Path, help="the shared folder holding csaw/models (adds the four CSAW nets)")
    ap.add_argument("--split", default="all", choices=("all", "dev", "eval"))
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=Path, default=Path("label_sink_rows.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()] if args.rows.exists() else []
    done = {(r["model"], r["mode"]) for r in rows}
    sources = [zoo_rows(z, args.split, args.inputs, args.seed, done) for z in args.zoo]
    if args.csaw:
        sources.append(csaw_rows(args.csaw, args.inputs, args.seed, done))
    with args.rows.open("a") as out:
        for source in sources:
            for row in source:
                out.write(json.dumps(row) + "\n")
                out.flush()
                rows.append(row)
                print(f"{row['model']} {row['mode']}", file=sys.stderr)
    summary(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
