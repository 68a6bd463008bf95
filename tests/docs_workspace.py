"""The folder the documentation's runnable examples run in: the files a user of the examples would
have, made here from a lab BadNet and small nets (built once per test session, copied for each
example, so no example sees another's output).

| file | what it is |
|---|---|
| ``badnet.pt``, ``model.pt``, ``a.pt`` | a lab BadNet (MNIST digits, 4x4 patch, target 7; netcleanse checkpoint) |
| ``b.pt`` | the clean model of the same architecture and seed |
| ``badnet_weights.h5`` | the BadNet's Keras weights (``--arch mnist-cnn``) |
| ``badnet.safetensors`` | its state_dict as safetensors (``--arch mnist-cnn``) |
| ``badnet.onnx`` | its ONNX export (needs the ``onnx`` package to write) |
| ``clean.npz`` | the lab's 1,000 clean MNIST test images; ``clean_val.npz``, ``clean_test.npz``: its two halves |
| ``poisoned_test.npz`` | the test images with the trigger (true labels kept) |
| ``digit.png``, ``digits/`` | one poisoned test image as a PNG file, a folder of 20 clean ones |
| ``models.csv`` | a screening manifest of ``a.pt`` and ``b.pt`` with ``clean.npz`` |
| ``models.py``, ``mypackage/nets.py`` | a user's own module (``MyNet``, 3x32x32, 10 classes) |
| ``weights.pth`` | a ``MyNet`` state_dict (seeded random weights) |
| ``scripted.pt`` | ``MyNet`` as TorchScript, which records no input shape |
| ``small.keras`` | a Keras 3 model (written only where Keras imports) |
| ``mask.png``, ``pattern.png`` | a trigger drawn as images (55x47) |
| ``resnet18*.{pth,safetensors,onnx}``, ``cifar_test.npz``, ``vit.safetensors`` | only where torchvision / timm import |
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import torch

MYNET = '''"""A user's own network (the docs' examples name it with --arch models.py:MyNet)."""
from torch import nn

input_shape = (3, 32, 32)


class MyNet(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * width * 8 * 8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
'''


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # a zoo package that does not import beside this torch raises RuntimeError
        return False


def requirement_missing(names: list[str]) -> str | None:
    """The first of ``names`` (Python modules, or programs with a leading ``!``) not available here."""
    for name in names:
        if name.startswith("!"):
            if shutil.which(name[1:]) is None:
                return f"program {name[1:]!r}"
        elif not _importable(name):
            return f"module {name!r}"
    return None


def build(folder: Path) -> Path:
    """Write the examples' files into ``folder`` (created); returns it."""
    from PIL import Image

    import netcleanse
    from netcleanse.lab import make_badnet

    folder.mkdir(parents=True)
    lab = folder / ".lab"
    make_badnet("mnist", "patch", target=7, out=lab, clean_baseline=True, progress=False)
    for name in ("badnet.pt", "model.pt", "a.pt"):
        shutil.copy(lab / "model.pt", folder / name)
    shutil.copy(lab / "clean_model.pt", folder / "b.pt")
    shutil.copy(lab / "model_weights.h5", folder / "badnet_weights.h5")
    shutil.copy(lab / "poisoned_test.npz", folder / "poisoned_test.npz")
    clean = np.load(lab / "clean_test.npz")
    np.savez_compressed(folder / "clean.npz", x=clean["x"], y=clean["y"])
    np.savez_compressed(folder / "clean_val.npz", x=clean["x"][:500], y=clean["y"][:500])
    np.savez_compressed(folder / "clean_test.npz", x=clean["x"][500:], y=clean["y"][500:])
    poisoned = np.load(lab / "poisoned_test.npz")
    Image.fromarray(poisoned["x"][0, 0]).save(folder / "digit.png")
    (folder / "digits").mkdir()
    for i in range(20):
        Image.fromarray(clean["x"][i, 0]).save(folder / "digits" / f"{i:02d}_label={clean['y'][i]}.png")
    (folder / "models.csv").write_text("model,data\na.pt,clean.npz\nb.pt,clean.npz\n")

    model = netcleanse.load_model(folder / "badnet.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(folder / "badnet.safetensors"))
    if _importable("onnx"):
        torch.onnx.export(model.net.eval(), torch.zeros(1, 1, 28, 28), str(folder / "badnet.onnx"), dynamo=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}})

    (folder / "models.py").write_text(MYNET)
    (folder / "mypackage").mkdir()
    (folder / "mypackage" / "__init__.py").write_text("")
    (folder / "mypackage" / "nets.py").write_text(MYNET)
    spec = importlib.util.spec_from_file_location("docs_models", folder / "models.py")
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)  # the text above, written by this file
    torch.manual_seed(0)
    net = user.MyNet().eval()
    torch.save(net.state_dict(), folder / "weights.pth")
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 32, 32)), str(folder / "scripted.pt"))

    mask = np.zeros((55, 47), np.uint8)
    mask[40:50, 33:43] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (55, 47, 3), dtype=np.uint8)).save(folder / "pattern.png")

    if _importable_keras():
        import keras
        keras.utils.set_random_seed(0)
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Rescaling(1 / 0.25, offset=-2.0)(inputs)
        x = keras.layers.Conv2D(8, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        keras.Model(inputs, keras.layers.Dense(10)(x)).save(folder / "small.keras")

    if _importable("torchvision"):
        import torchvision
        from safetensors.torch import save_file as save_st
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(num_classes=10).eval()
        torch.save(resnet.state_dict(), folder / "resnet18.pth")
        shutil.copy(folder / "resnet18.pth", folder / "resnet18_badnet.pth")
        save_st(resnet.state_dict(), str(folder / "resnet18.safetensors"))
        torch.onnx.export(resnet, torch.zeros(1, 3, 32, 32), str(folder / "resnet18.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
        np.savez(folder / "cifar_test.npz", x=rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8),
                 y=rng.integers(0, 10, 64))
    if _importable("timm"):
        import timm
        from safetensors.torch import save_file as save_st
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100)
        save_st(vit.state_dict(), str(folder / "vit.safetensors"))
    return folder


def _importable_keras() -> bool:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    return _importable("keras")
