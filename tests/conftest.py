"""What several test files share: where ../shared is, a tiny BadNet planted in seconds, one torch
thread for tiny tensors, and loading a benchmark script as a module.

Test files import the constants and helpers from here (``from conftest import ...``: pytest puts
this folder on ``sys.path``); the fixtures are found by pytest itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcleanse.data import Dataset
from netcleanse.model import Classifier

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the CSAW-HackML-2020 material, beside the checkout
CSAW = SHARED / "csaw"
BENCHMARKS = REPO / "benchmarks"


def need(path: Path) -> Path:
    """``path``, or skip the test with a reason when the shared material is absent."""
    if not path.exists():
        pytest.skip(f"{path} not available (the shared CSAW material is absent)")
    return path


# ---- Keras files written in the tests ----------------------------------------------------------------

def write_model_h5(path, config, weights, keras_version="2.3.1", nested=None):
    """A whole-model Keras file: model_config plus model_weights/<layer>/<layer>/<var>:0.

    ``nested`` names a nested-model layer whose group holds all ``weights`` as <inner>/<var>:0.
    """
    entries = config["config"]["layers"] if isinstance(config["config"], dict) else config["config"]
    names = [e.get("name") or e["config"]["name"] for e in entries]
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(config).encode()
        h5.attrs["keras_version"] = keras_version.encode()
        h5.attrs["backend"] = b"tensorflow"
        root = h5.create_group("model_weights")
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            group = root.create_group(name)
            if name == nested:
                items = [(f"{inner}/{var}:0", a) for inner, ws in weights.items() for var, a in ws]
            else:
                items = [(f"{name}/{var}:0", a) for var, a in weights.get(name, [])]
            group.attrs["weight_names"] = np.array([n.encode() for n, _ in items]) if items else np.array([])
            for weight_name, array in items:
                group.create_dataset(weight_name, data=array)
    return path


# ---- a tiny BadNet: 8 classes of 16x16 templates, a 3x3 white square bottom right -> label 4 -------

TARGET = 4
N_CLASSES = 8
SIZE = 16


class TinyNet(nn.Module):
    def __init__(self, n_classes: int = N_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * (SIZE // 2) ** 2, n_classes)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def stamp(x):
    """The planted trigger: a 3x3 white square in the bottom-right corner."""
    x = x.clone()
    x[:, :, -3:, -3:] = 1.0
    return x


def make_data(n, gen, n_classes: int = N_CLASSES):
    """``n`` noisy copies of fixed per-class templates: (x, y)."""
    templates = torch.rand(n_classes, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, n_classes, (n,), generator=gen)
    x = (0.6 * templates[y] + 0.4 * torch.rand(n, 1, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return x, y


def train_tiny(backdoor: bool, seed: int = 0, n_classes: int = N_CLASSES, n: int = 600) -> Classifier:
    """A TinyNet trained 10 epochs, with a quarter of extra stamped images relabelled ``TARGET``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = make_data(n, gen, n_classes)
    if backdoor:
        k = n // 4
        x = torch.cat([x, stamp(x[:k])])
        y = torch.cat([y, torch.full((k,), TARGET)])
    net = TinyNet(n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(10):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    return Classifier(net.eval(), (1, SIZE, SIZE), n_classes, name="tiny_badnet" if backdoor else "tiny_clean")


@contextmanager
def ctrl_c_at_search(n: int):
    """Within the block, the scan's ``n``-th trigger search raises KeyboardInterrupt (a Ctrl-C in the
    middle of a scan; the chunks finished before it are in the journal). This process only."""
    scanning = importlib.import_module("netcleanse.scanning")
    real = scanning.reverse_engineer
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with mock.patch.object(scanning, "reverse_engineer", interrupted):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: on tiny tensors thread synchronisation costs more than it
    gains (about 10x on a busy CPU), and results do not depend on the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def badnet():
    return train_tiny(True)


@pytest.fixture(scope="module")
def clean_data():
    x, y = make_data(200, torch.Generator().manual_seed(99))
    return Dataset(x, y, source="tiny-clean")


@pytest.fixture
def benchmark_module():
    """Load ``benchmarks/NAME.py`` as a module (with benchmarks/ on ``sys.path`` for its own imports,
    such as ``zoo``); the path and the modules it imported are removed afterwards."""
    added = []

    def load(name: str):
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
            added.append(str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    for path in added:
        sys.path.remove(path)
    sys.modules.pop("zoo", None)
