"""Memory of a gradient pass: the bounded pass (netcleanse.passes) against the whole group of images.

    python benchmarks/pass_memory.py [--net resnet50|csaw-deepid|gtsrb-cnn] [--input 3x224x224]
                                     [--threads 2] [--labels 12] [--step search|train]

One trigger-search step of the refinement's shape (``--labels`` labels x 8 inputs, stamped, forward,
input gradient, Adam step), each setting in a fresh child process so that its peak RSS is its own:

* baseline: every pass holds up to 96 stamped images (the fixed bound before netcleanse.passes);
* bounded: up to ``images_per_pass`` images, as a scan sets it under ``NETCLEANSE_PASS_MIB``
  (default 2048 MiB of activations).

``--step predict``: a forward pass without gradient over 512 images (``predict``/``eval``,
:func:`netcleanse.evaluate.predict_dataset`); baseline: one pass of 512 (the fixed batch before
:func:`netcleanse.passes.forward_batch`), bounded: the default batch under the budget.

``--step train``: one training step of a repair instead (fine-tuning and unlearning: a mini-batch of
64 labelled images, weight gradients, one Adam step, :func:`netcleanse.training.train`); baseline:
the whole mini-batch in one pass (``NETCLEANSE_PASS_MIB`` set out of reach), bounded: the parts of
:func:`netcleanse.training.images_per_step`, their gradients summed.

Prints, for each: images per pass, peak RSS, wall time of the step, and the ratios bounded/baseline,
plus the per-image activation bytes :func:`netcleanse.passes.graph_bytes_per_image` measured. The
default net is a ResNet-50 (the bottleneck layout of He et al. 2016, written out here in torch.nn,
random weights: memory and time do not depend on the weights) at 224x224 with 1000 classes, the size
of an ImageNet classifier; ``csaw-deepid`` and ``gtsrb-cnn`` are netcleanse's registered
architectures (their passes are not bounded: bounded and baseline are the same setting).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if cin != cout or stride != 1 else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet50(num_classes: int = 1000) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, mid, mid * 4, stride if b == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build(net: str, input_shape):
    from netcleanse.classifier import Classifier
    if net == "resnet50":
        module, num_classes = resnet50(), 1000
    else:
        from netcleanse.architectures import build_architecture, get_architecture
        module, num_classes = build_architecture(net), get_architecture(net).default_classes
        input_shape = get_architecture(net).input_shape
    return Classifier(module, input_shape=input_shape, num_classes=num_classes), tuple(input_shape)


def train_child(net: str, input_shape, bounded: bool, threads: int) -> dict:
    """One fine-tuning step (a mini-batch of 64) in this (fresh) process."""
    import os
    from netcleanse.data import Dataset
    from netcleanse.passes import graph_bytes_per_image
    from netcleanse.pruning import FINE_TUNE_BATCH
    from netcleanse.training import images_per_step, train
    if not bounded:
        os.environ["NETCLEANSE_PASS_MIB"] = str(1 << 30)
    model, shape = build(net, input_shape)
    per_image = graph_bytes_per_image(model, shape, training=True)
    per_pass = images_per_step(model, FINE_TUNE_BATCH)
    gen = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(FINE_TUNE_BATCH, *shape, generator=gen),
                   torch.randint(0, model.num_classes, (FINE_TUNE_BATCH,), generator=gen), "random")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    train(model, data, epochs=1, batch_size=FINE_TUNE_BATCH, progress=False, threads=threads)
    return {"images_per_pass": per_pass, "step_s": time.perf_counter() - t, "before_mib": before,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "activation_mib_per_image": per_image / 2**20}


def predict_child(net: str, input_shape, bounded: bool, threads: int, n: int = 512) -> dict:
    """Predictions for ``n`` images in this (fresh) process, as ``netcleanse eval`` makes them."""
    from netcleanse.data import Dataset
    from netcleanse.evaluate import predict_dataset
    from netcleanse.passes import forward_batch, graph_bytes_per_image
    torch.set_num_threads(threads)
    model, shape = build(net, input_shape)
    per_image = graph_bytes_per_image(model, shape)
    data = Dataset(torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)), None, "random")
    per_pass = forward_batch(model, shape, n) if bounded else 512
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    predict_dataset(model, data, None if bounded else 512, progress=False)
    return {"images_per_pass": per_pass, "step_s": time.perf_counter() - t, "before_mib": before,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "activation_mib_per_image": per_image / 2**20}


def child(net: str, input_shape, labels: int, bounded: bool, threads: int) -> dict:
    """One search step in this (fresh) process: images per pass, peak RSS, wall time."""
    from netcleanse.neural_cleanse import MAX_IMAGES, Schedule, reverse_engineer
    from netcleanse.passes import graph_bytes_per_image, images_per_pass
    from netcleanse.scanning import _working_copy
    torch.set_num_threads(threads)
    model, shape = build(net, input_shape)
    work, channels_last = _working_copy(model, torch.device("cpu"))
    per_image = graph_bytes_per_image(work, shape, channels_last=channels_last)
    per_pass = min(MAX_IMAGES, images_per_pass(work, shape, channels_last=channels_last)) if bounded else MAX_IMAGES
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    reverse_engineer(work, x, list(range(labels)), Schedule(batch_size=8, steps_per_epoch=1, max_epochs=1),
                     generator=torch.Generator().manual_seed(1), channels_last=channels_last, max_images=per_pass)
    return {"images_per_pass": per_pass, "step_s": time.perf_counter() - t, "before_mib": before,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "activation_mib_per_image": per_image / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="resnet50", help="resnet50 (default) or a registered architecture")
    ap.add_argument("--input", default="3x224x224", help="CxHxW of the resnet50")
    ap.add_argument("--labels", type=int, default=12, help="labels searched together (x 8 inputs: 96 images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step", choices=("search", "train", "predict"), default="search",
                    help="a scan's trigger-search step (default), a repair's training step, or predictions "
                         "for 512 images (predict, eval)")
    ap.add_argument("--child", choices=("baseline", "bounded"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.input.lower().split("x"))
    if args.child:
        if args.step == "train":
            print(json.dumps(train_child(args.net, shape, args.child == "bounded", args.threads)))
        elif args.step == "predict":
            print(json.dumps(predict_child(args.net, shape, args.child == "bounded", args.threads)))
        else:
            print(json.dumps(child(args.net, shape, args.labels, args.child == "bounded", args.threads)))
        return 0
    out = {}
    what = {"search": f"{args.labels} labels x 8 inputs", "train": "a 64-image mini-batch",
            "predict": "predictions for 512 images"}[args.step]
    for setting in ("baseline", "bounded"):
        done = subprocess.run([sys.executable, __file__, "--net", args.net, "--input", args.input, "--labels",
                               str(args.labels), "--threads", str(args.threads), "--step", args.step, "--child", setting],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{setting}: the child failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        out[setting] = json.loads(done.stdout.strip().splitlines()[-1])
        r = out[setting]
        print(f"{setting:<8}: {r['images_per_pass']:>3} images per pass, peak RSS {r['peak_mib']:7.0f} MiB "
              f"(model loaded: {r['before_mib']:.0f}), one step of {what} {r['step_s']:.1f} s",
              flush=True)
    b, n = out["baseline"], out["bounded"]
    print(f"activations per image: {n['activation_mib_per_image']:.2f} MiB; bounded / baseline: peak RSS "
          f"{n['peak_mib'] / b['peak_mib']:.2f}, above the loaded model {(n['peak_mib'] - n['before_mib']) / max(1e-9, b['peak_mib'] - b['before_mib']):.2f}, "
          f"step time {n['step_s'] / b['step_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
