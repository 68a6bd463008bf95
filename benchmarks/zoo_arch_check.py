"""The zoo-architecture routes with the real libraries: a torchvision ResNet-18 BadNet on normalised
inputs, scanned from its state_dict, its safetensors and its ONNX export with the same flags, and a
timm model's state_dict against timm's own outputs.

torchvision does not import beside netcleanse's pinned torch 2.13.0 (PyPI's torchvision needs the
torch it was built with), so this runs in a separate environment, e.g.

    python3.11 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /tmp/tv/bin/pip install --no-deps -e . && /tmp/tv/bin/pip install numpy h5py pillow typer rich \\
        matplotlib jinja2 mlxtend scikit-learn scipy safetensors onnx onnx2torch
    /tmp/tv/bin/python benchmarks/zoo_arch_check.py --work /tmp/zoo-arch

Where torchvision does not import it says so in one line and exits 0 (nothing to check).

What it does: the lab's pieces (``netcleanse.attacks``: a 4x4 checkerboard patch, target 7, 10 %
of the training set poisoned) on the built-in MNIST digits resized to 32x32x3; a
``torchvision.models.resnet18(num_classes=10)`` trained 3 epochs (Adam 1e-3, batches of 64) on
ImageNet-normalised inputs; saved as ``.pth`` (state_dict), ``.safetensors`` and ``.onnx``
(TorchScript exporter, normalisation outside the graph), with the test sets as ``.npz``. Then the
CLI, the same flags each time (``--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``; the weights
routes also ``--arch torchvision:resnet18 --num-classes 10 --input-shape 3x32x32``): ``eval`` (clean
accuracy, attack success) and a full data-free ``scan`` per route. Exit 1 when a route disagrees
with the trained network or a scan does not flag exactly the planted target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLAGS = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
WEIGHTS = ["--arch", "torchvision:resnet18", "--num-classes", "10", "--input-shape", "3x32x32"]
TARGET = 7


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "netcleanse"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


def train(work: Path, epochs: int, seed: int) -> dict:
    import torchvision
    from safetensors.torch import save_file

    from netcleanse.attacks import patch_trigger, poison_dataset, poisoned_test_set
    from netcleanse.data import Dataset
    from netcleanse.datasets import load_builtin, resize_images

    torch.manual_seed(seed)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]

    def to32(d):
        return Dataset(resize_images(d.x, (32, 32), channels=3), d.y, source=d.source)

    train_set, test = to32(load_builtin("mnist", "train")), to32(load_builtin("mnist", "test"))
    trigger = patch_trigger((3, 32, 32), size=4, position="bottom-right")
    poisoned_train, _ = poison_dataset(train_set, [(trigger, TARGET)], 0.1, seed)
    poisoned_test = poisoned_test_set(test, trigger, TARGET)
    net = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(poisoned_train))
        for i in range(0, len(order), 64):
            batch = order[i:i + 64]
            loss = F.cross_entropy(net((poisoned_train.x[batch] - mean) / std), poisoned_train.y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net((test.x - mean) / std).argmax(1) == test.y).float().mean().item()
        asr = (net((poisoned_test.x - mean) / std).argmax(1) == TARGET).float().mean().item()
    torch.save(net.state_dict(), work / "resnet18_badnet.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, work / "resnet18_badnet.safetensors")
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(work / "resnet18_badnet.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    for name, data in (("test_clean", test), ("test_poisoned", poisoned_test)):
        np.savez(work / f"{name}.npz", x=(data.x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8),
                 y=data.y.numpy())
    return {"clean_accuracy": accuracy, "attack_success": asr, "train_s": time.perf_counter() - started}


def timm_check(work: Path) -> float | None:
    """Max abs logit difference between timm's resnet18 and netcleanse's ``--arch timm:resnet18``
    rebuild from its state_dict (None: timm not installed)."""
    try:
        import timm
    except ImportError:
        return None
    import netcleanse
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save(net.state_dict(), work / "timm_resnet18.pth")
    model = netcleanse.load_model(work / "timm_resnet18.pth", arch="timm:resnet18", num_classes=10,
                                  input_shape="3x32x32", mean=MEAN, std=STD)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        return float((net((x - mean) / std) - model(x)).abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the model files, data and scans")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # an ImportError, or torchvision's own error beside another torch
        print(f"torchvision does not import here ({type(exc).__name__}: {str(exc)[:80]}): nothing to check")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    truth = train(args.work, args.epochs, args.seed)
    print(f"trained torchvision resnet18 BadNet in {truth['train_s']:.0f} s: clean accuracy "
          f"{truth['clean_accuracy']:.3f}, attack success {truth['attack_success']:.3f}", flush=True)
    failed = False
    routes = {"state_dict": ["resnet18_badnet.pth", *WEIGHTS], "safetensors": ["resnet18_badnet.safetensors", *WEIGHTS],
              "onnx": ["resnet18_badnet.onnx"]}
    rows = {}
    for route, model_args in routes.items():
        model_args = [str(args.work / model_args[0]), *model_args[1:], *FLAGS]
        ev = cli("eval", *model_args, "--clean", str(args.work / "test_clean.npz"), "--poisoned",
                 str(args.work / "test_poisoned.npz"), "--target", str(TARGET), "--json")
        out = args.work / f"scan-{route}"
        shutil.rmtree(out, ignore_errors=True)  # this script's own scan of an earlier run
        started = time.perf_counter()
        sc = cli("scan", *model_args, "--data-free", "--seed", str(args.seed), "--out", str(out))
        if ev.returncode or sc.returncode:
            print(f"{route}: failed: {(ev.stderr or sc.stderr).strip()[-300:]}")
            failed = True
            continue
        measured = json.loads(ev.stdout)
        scan = json.loads((out / "scan.json").read_text())
        rows[route] = {"clean_accuracy": measured["clean_accuracy"], "attack_success": measured["attack_success"],
                       "flagged": scan["flagged"], "p_value": scan["p_value"], "scan_s": time.perf_counter() - started}
        ok = (abs(measured["clean_accuracy"] - truth["clean_accuracy"]) < 0.005
              and abs(measured["attack_success"] - truth["attack_success"]) < 0.005 and scan["flagged"] == [TARGET])
        failed |= not ok
        print(f"{route:<12} clean accuracy {measured['clean_accuracy']:.3f}, attack success "
              f"{measured['attack_success']:.3f}; scan flags {scan['flagged']} (p {scan['p_value']:.2g}) in "
              f"{rows[route]['scan_s']:.0f} s{'' if ok else '  <- MISMATCH'}", flush=True)
    diff = timm_check(args.work)
    print("timm: not installed" if diff is None
          else f"timm resnet18 from its state_dict: max abs logit difference {diff:.2g}")
    failed |= diff is not None and diff > 1e-4
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
