"""Keras's own application architectures, written by Keras 3 and read by netcleanse.

    python benchmarks/keras_applications_check.py --work DIR [--models mobilenetv2,resnet50,...]

For each architecture of ``keras.applications`` named in ``--models`` (default: all below), a
child process running Keras 3 on its JAX backend (the ``keras-reference`` extra; nothing is
downloaded: ``weights=None``, random weights, BatchNormalization statistics randomised) builds a
10-class model on a small input, saves it as a ``.keras`` archive and as a legacy ``.h5`` file,
and records Keras's ``predict`` on 4 random inputs. netcleanse then loads each file (its own
PyTorch rebuild; no Keras in this process) and prints the largest absolute difference between
its probabilities and Keras's, or the one-line error with which it refuses the file.

``transfer`` is the usual fine-tuning shape: a MobileNetV2 base without its top nested in a
Sequential behind ``Rescaling``. Files are kept in ``--work`` (a model whose three files exist is
not rebuilt).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from netcleanse import NetcleanseError, load_model

MODELS = ("vgg16", "resnet50", "resnet50v2", "inceptionv3", "xception", "mobilenet", "mobilenetv2",
          "mobilenetv3small", "densenet121", "nasnetmobile", "efficientnetb0", "convnexttiny", "transfer")

WRITER = r'''
import sys
import numpy as np
import keras
from keras import layers

out, names = sys.argv[1], sys.argv[2].split(",")
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
A = keras.applications
SMALL = (64, 64, 3)
BUILD = {
    "vgg16": lambda: A.VGG16(input_shape=(32, 32, 3), weights=None, classes=10),
    "resnet50": lambda: A.ResNet50(input_shape=SMALL, weights=None, classes=10),
    "resnet50v2": lambda: A.ResNet50V2(input_shape=SMALL, weights=None, classes=10),
    "inceptionv3": lambda: A.InceptionV3(input_shape=(75, 75, 3), weights=None, classes=10),
    "xception": lambda: A.Xception(input_shape=(71, 71, 3), weights=None, classes=10),
    "mobilenet": lambda: A.MobileNet(input_shape=SMALL, weights=None, classes=10, alpha=0.25),
    "mobilenetv2": lambda: A.MobileNetV2(input_shape=SMALL, weights=None, classes=10, alpha=0.35),
    "mobilenetv3small": lambda: A.MobileNetV3Small(input_shape=SMALL, weights=None, classes=10),
    "densenet121": lambda: A.DenseNet121(input_shape=(32, 32, 3), weights=None, classes=10),
    "nasnetmobile": lambda: A.NASNetMobile(input_shape=SMALL, weights=None, classes=10),
    "efficientnetb0": lambda: A.EfficientNetB0(input_shape=SMALL, weights=None, classes=10),
    "convnexttiny": lambda: A.ConvNeXtTiny(input_shape=(32, 32, 3), weights=None, classes=10),
    "transfer": lambda: keras.Sequential([
        keras.Input(SMALL), layers.Rescaling(1 / 127.5, offset=-1),
        A.MobileNetV2(input_shape=SMALL, weights=None, include_top=False, alpha=0.35),
        layers.GlobalAveragePooling2D(), layers.Dropout(0.2), layers.Dense(10, activation="softmax")],
        name="transfer"),
}


def all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        yield layer


for name in names:
    model = BUILD[name]()
    for layer in all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            w = layer.get_weights()  # [gamma,] beta, moving mean, moving variance
            new = [rng.normal(0, 0.2, w[-3].shape), rng.normal(0, 0.5, w[-2].shape), rng.uniform(0.5, 2, w[-1].shape)]
            layer.set_weights(([rng.uniform(0.5, 1.5, w[0].shape)] if len(w) == 4 else []) + new)
    x = rng.random((4,) + tuple(model.input_shape[1:])).astype("float32")
    np.save(f"{out}/{name}_x.npy", x)
    np.save(f"{out}/{name}_y.npy", np.asarray(model.predict(x, verbose=0)))
    model.save(f"{out}/{name}.keras")
    model.save(f"{out}/{name}.h5")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the Keras files")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"error: unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if not all((work / f"{n}{s}").exists() for s in (".keras", ".h5", "_y.npy"))]
    if missing:
        env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run([sys.executable, "-c", WRITER, str(work), ",".join(missing)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: Keras could not write the models: {done.stderr.strip().splitlines()[-1]}")
    print("| architecture | .keras | .h5 |")
    print("|---|---|---|")
    for name in names:
        x = torch.from_numpy(np.load(work / f"{name}_x.npy")).permute(0, 3, 1, 2)
        expected = np.load(work / f"{name}_y.npy")
        cells = []
        for suffix in (".keras", ".h5"):
            try:
                got = load_model(work / f"{name}{suffix}").predict_proba(x).numpy()
                cells.append(f"max abs diff {np.abs(got - expected).max():.1e}")
            except NetcleanseError as exc:
                cells.append(f"refused: {exc}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
