"""Guarded (N+1) classifiers: behaviour, checkpoints, and the real CSAW BadNet check."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netcleanse
from netcleanse.errors import NetcleanseError
from netcleanse.guard import (GuardedClassifier, TriggerFilter, disagreement_guard, logits_and_features,
                              synthetic_inputs, trigger_filter)
from netcleanse.model import Classifier
from netcleanse.torch_io import save_model
from netcleanse.trigger import Trigger

from conftest import CSAW, SHARED  # noqa: F401


class Detector(nn.Module):
    """Hand-made net: 2x4x4 input; class 0 fires with the top-left pixel of channel 0, which also
    drives a dedicated penultimate neuron (the 'backdoor neuron', index 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.hidden = nn.Linear(4 * 4 * 4, 8)
        self.output = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            self.conv.weight[0, 0] = 1.0  # channel 0 copies input channel 0
            self.conv.weight[1, 1] = 1.0  # channel 1 copies input channel 1
            self.hidden.weight[3, 0] = 10.0  # backdoor neuron: the corner pixel of channel 0
            for j in range(8):
                if j != 3:
                    self.hidden.weight[j, 16 + j] = 1.0  # ordinary neurons read channel 1
            self.output.weight[0, 3] = 1.0
            self.output.weight[1, :3] = 1.0
            self.output.weight[2, 4:] = 1.0

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.output(torch.relu(self.hidden(h)))


def _model() -> Classifier:
    return Classifier(Detector(), (2, 4, 4), 3, name="toy", arch=None)


def _corner_trigger() -> Trigger:
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1
    pattern = torch.zeros(2, 4, 4)
    pattern[0, 0, 0] = 1
    return Trigger(mask, pattern)


def test_guard_returns_n_plus_1_logits_and_flags_only_detected_inputs():
    base = _model()
    detector = TriggerFilter(3, labels=[0], neurons=[[3]], thresholds=[1.5])
    guarded = GuardedClassifier(base, detector)
    assert guarded.num_classes == 4 and guarded.poison_label == 3
    clean = torch.zeros(3, 2, 4, 4)
    clean[:, 1] = torch.rand(3, 4, 4) / 2 + 0.5
    poisoned = _corner_trigger().apply(clean)
    logits = guarded.logits(torch.cat([clean, poisoned]))
    assert logits.shape == (6, 4)
    assert torch.equal(logits[:, :3], base.logits(torch.cat([clean, poisoned])))
    answers = logits.argmax(1)
    assert answers[:3].tolist() == base.predict(clean).tolist()
    assert base.predict(poisoned).tolist() == [0, 0, 0]
    assert answers[3:].tolist() == [3, 3, 3]
    probs = guarded.predict_proba(poisoned)
    assert probs[:, 3].min() > 0.99


def test_trigger_filter_finds_the_backdoor_neuron_data_free():
    base = _model()
    guarded = trigger_filter(base, {0: _corner_trigger()}, top_fraction=1 / 8, n_synthetic=64, seed=1)
    assert guarded.detector.neurons == [[3]]
    clean = synthetic_inputs((2, 4, 4), 32, seed=7)
    clean[:, 0, 0, 0] = 0  # no trigger
    assert (guarded.predict(clean) != 3).all()
    assert (guarded.predict(_corner_trigger().apply(clean)) == 3).all()


class HeadFirst(Detector):
    """The Detector with its output layer defined before the hidden one, and an auxiliary Linear
    layer (never run) defined last: the order of definition says nothing about which layer computes
    the logits."""

    def __init__(self):
        super().__init__()
        output, hidden = self.output, self.hidden
        del self.output, self.hidden
        self.output, self.hidden = output, hidden
        self.aux = nn.Linear(64, 5)


def test_filter_looks_into_the_layer_that_computes_the_logits():
    base = Classifier(HeadFirst(), (2, 4, 4), 3, name="toy", arch=None)
    assert [name for name, m in base.net.named_modules() if isinstance(m, nn.Linear)] == ["output", "hidden", "aux"]
    x = torch.rand(3, 2, 4, 4)
    logits, features = logits_and_features(base, x)
    assert features.shape == (3, 8) and torch.equal(logits, _model()(x))  # the same net, other definition order
    guarded = trigger_filter(base, {0: _corner_trigger()}, top_fraction=1 / 8, n_synthetic=64, seed=1)
    assert guarded.detector.neurons == [[3]]  # the backdoor neuron of the penultimate layer, as in the Detector


def test_filter_needs_flagged_labels_and_an_open_network():
    with pytest.raises(NetcleanseError, match="flagged no label"):
        trigger_filter(_model(), {})
    scripted = Classifier(torch.jit.script(Detector()), (2, 4, 4), 3)
    with pytest.raises(NetcleanseError, match="TorchScript"):
        logits_and_features(scripted, torch.zeros(1, 2, 4, 4))


def test_disagreement_guard_answers_n_where_models_disagree():
    torch.manual_seed(0)
    base = netcleanse.build_architecture("mnist-cnn")
    original = Classifier(base, (1, 28, 28), 10, arch="mnist-cnn", name="a")
    other = Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10, arch="mnist-cnn", name="b")
    x = torch.rand(64, 1, 28, 28)
    a, b = original.predict(x), other.predict(x)
    guarded = disagreement_guard(original, other)
    expected = torch.where(a == b, a, torch.full_like(a, 10))
    assert torch.equal(guarded.predict(x), expected)
    assert torch.equal(disagreement_guard(original, original).predict(x), a)


@pytest.mark.parametrize("kind", ["filter", "disagree"])
def test_guarded_checkpoint_round_trip_is_weights_only(tmp_path, kind):
    torch.manual_seed(0)
    original = Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10, arch="mnist-cnn",
                          name="orig")
    if kind == "filter":
        trigger = Trigger(torch.zeros(28, 28).index_fill_(0, torch.arange(24, 28), 1.0), torch.ones(1, 28, 28))
        guarded = trigger_filter(original, {7: trigger}, n_synthetic=32)
    else:
        other = Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10, arch="mnist-cnn")
        guarded = disagreement_guard(original, other)
    path = save_model(guarded, tmp_path / "guarded.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "guarded" and raw["guard"] == kind
    with zipfile.ZipFile(path) as archive:  # data only: no TorchScript code inside
        assert not any("/code/" in name for name in archive.namelist())
    loaded = netcleanse.load_model(path)
    assert loaded.poison_label == 10 and loaded.num_classes == 11
    x = torch.rand(40, 1, 28, 28)
    x[:20] = trigger.apply(x[:20]) if kind == "filter" else x[:20]
    assert torch.equal(loaded.predict(x), guarded.predict(x))


def test_a_guard_shows_and_takes_the_preprocessing_its_models_apply(tmp_path):
    # the guard adds none of its own: info shows its base's, and --mean/--std (or an --input-scale)
    # given when it is loaded reach every model inside it (a disagreement guard's repaired one too)
    torch.manual_seed(0)
    build = lambda: Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10,  # noqa: E731
                               input_scale=255, arch="mnist-cnn")
    guarded = disagreement_guard(build(), build())
    assert guarded.preprocessing["input_scale"] == 255 and guarded.describe_preprocessing() == "x * 255"
    path = save_model(guarded, tmp_path / "guarded.pt")
    assert netcleanse.load_model(path).preprocessing == guarded.preprocessing
    loaded = netcleanse.load_model(path, input_scale=2, mean=[0.5], std=[0.25])
    assert [part.preprocessing for part in loaded.parts()] == [{"input_scale": 2, "mean": [0.5], "std": [0.25]}] * 2
    assert loaded.describe_preprocessing().startswith("(x * 2 - mean) / std")


USER_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.out = nn.Linear(6, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))
"""


@pytest.mark.parametrize("kind", ["filter", "disagree"])
def test_a_guard_of_the_users_own_architecture_loads_back_with_it(tmp_path, kind):
    # the base (and a disagreement guard's repaired model) are rebuilt from the --arch the user names
    # again, as an ordinary checkpoint of their code is; without it, one line asking for it
    (tmp_path / "usernet.py").write_text(USER_NET)
    spec = f"{tmp_path / 'usernet.py'}:Net"
    weights = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights[seed] = tmp_path / f"w{seed}.pt"
        torch.save(_user_state(tmp_path), weights[seed])
    base = netcleanse.load_model(weights[0], arch=spec, input_shape="1x8x8")
    if kind == "filter":
        guarded = GuardedClassifier(base, TriggerFilter(5, [3], [[0, 1]], [0.5]))
    else:
        guarded = disagreement_guard(base, netcleanse.load_model(weights[1], arch=spec, input_shape="1x8x8"))
    path = save_model(guarded, tmp_path / "guarded.pt")
    with pytest.raises(NetcleanseError, match=r"guarded.pt \(base model\) holds the weights of .*name it with --arch"):
        netcleanse.load_model(path)
    loaded = netcleanse.load_model(path, arch=spec)
    x = torch.rand(30, 1, 8, 8)
    assert loaded.poison_label == 5 and torch.equal(loaded.logits(x), guarded.logits(x))
    assert loaded.base.source == str(weights[0])


def _user_state(tmp_path):
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("usernet_for_test", tmp_path / "usernet.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.Net().state_dict()


def test_a_guard_holds_its_own_copy_of_the_model():
    # the caller's model stays theirs: training it (or its mode) later does not change the guard
    model = _model().train()
    guarded = trigger_filter(model, {0: _corner_trigger()}, n_synthetic=16)
    other = _model()
    agreeing = disagreement_guard(model, other)
    assert model.training  # its mode untouched
    x = torch.rand(8, 2, 4, 4)
    before, before_agreeing = guarded.logits(x), agreeing.logits(x)
    with torch.no_grad():
        for p in list(model.parameters()) + list(other.parameters()):
            p.add_(1.0)
    assert torch.equal(guarded.logits(x), before) and torch.equal(agreeing.logits(x), before_agreeing)


def test_a_guarded_model_is_not_scanned():
    # its answer N is the guard's, not a label a backdoor could target: scan the model it guards
    guarded = GuardedClassifier(_model(), TriggerFilter(3, labels=[0], neurons=[[3]], thresholds=[1.5]))
    with pytest.raises(NetcleanseError, match="is a guarded model .*scan the model it guards"):
        netcleanse.scan(guarded, data_free=True, progress=False)


def test_corrupt_guarded_checkpoint_is_a_clear_error(tmp_path):
    original = Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10, arch="mnist-cnn")
    guarded = trigger_filter(original, {1: Trigger(torch.ones(28, 28) * 0.1, torch.ones(1, 28, 28))},
                             n_synthetic=16)
    path = save_model(guarded, tmp_path / "g.pt")
    ckpt = torch.load(path, weights_only=True)
    good = dict(ckpt)
    del ckpt["thresholds"]
    torch.save(ckpt, path)
    with pytest.raises(NetcleanseError, match="incomplete or corrupt"):
        netcleanse.load_model(path)
    # indices from the file that do not fit the network: refused at load, not at the first prediction
    for key, value in (("neurons", [[1_000_000_000]]), ("labels", [10]), ("labels", [-1])):
        torch.save(dict(good, **{key: value}), path)
        with pytest.raises(NetcleanseError, match="incomplete or corrupt"):
            netcleanse.load_model(path)


# --------------------------------------------------------------------------------------------
# Real CSAW BadNets: data-free scan -> filter guard -> the real images.
# --------------------------------------------------------------------------------------------

def _csaw_images() -> tuple[list[str], torch.Tensor]:
    from PIL import Image
    files = sorted((CSAW / "images").glob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                     for f in files])
    return [f.name for f in files], x


# A full data-free scan of all 1283 labels (about 4 minutes each on 2 cores): the MAD test, not
# us, decides which labels are flagged, and the filter only sees the flagged labels' reversed
# triggers. With NETCLEANSE_CSAW_SCANS=DIR holding saved full data-free scans (DIR/<net>/scan.json
# + masks.npz, e.g. from `netcleanse scan ... --data-free --out DIR/<net>`), those are used instead.


@pytest.mark.slow
@pytest.mark.parametrize("net,prefix", [("sunglasses", "sun_"), ("anonymous_1", "ano_")])
def test_filter_guard_on_real_csaw_badnet(net, prefix):
    if not CSAW.is_dir():
        pytest.skip(f"{CSAW} is absent: the real CSAW-HackML BadNets are not available here")
    from netcleanse.scanning import ScanResult, scan
    model = netcleanse.load_model(CSAW / "models" / f"{net}_bd_weights.h5", arch="csaw-deepid")
    saved = os.environ.get("NETCLEANSE_CSAW_SCANS")
    if saved:
        result = ScanResult.load(Path(saved) / net)
        assert result.data == "data-free"
    else:
        result = scan(model, data_free=True, seed=0, progress=False)
    top = max(result.labels, key=lambda rec: rec["anomaly_index"])
    assert result.flagged, (f"the data-free scan flagged nothing (largest anomaly index "
                            f"{top['anomaly_index']:.2f} at label {top['label']}, threshold {result.threshold})")
    guarded = trigger_filter(model, {t: result.trigger(t) for t in result.flagged}, seed=0)
    names, x = _csaw_images()
    base = model.predict(x).tolist()
    answers = guarded.predict(x).tolist()
    for name, before, after in zip(names, base, answers):
        if name.startswith("cl_"):
            # The guard must keep the model's answer (the sunglasses net itself gets cl_3 wrong: 129).
            assert after == before, f"{name}: the guard changed the clean answer {before} to {after}"
        elif name.startswith(prefix):
            assert before == 0, f"{name} is not poisoned for {net}?"
            assert after == 1283, f"{name}: poisoned for {net} but the guard answered {after}"
        else:  # poisoned for the other net: the model does not answer the target, so nothing to catch
            assert after == before
