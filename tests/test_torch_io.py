"""PyTorch files: netcleanse checkpoints, plain state_dicts, TorchScript; save_model by suffix."""

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from netcleanse import Classifier, NetcleanseError, build_architecture, load_model, save_model
from netcleanse.keras import KerasGraph, graph_from_config
from netcleanse.torch_io import EXTRA_FILE, checkpoint, load_torch

from conftest import SHARED


def digits_model(num_classes=10, input_scale=1.0, seed=0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_architecture("mnist-cnn", num_classes).eval(), (1, 28, 28), num_classes,
                      input_scale=input_scale, name="digits", arch="mnist-cnn")


def keras_graph_model(seed=0) -> Classifier:
    """A net rebuilt from a Keras config (no registered architecture), with random weights."""
    def node(src):
        return [[[src, 0, 0, {}]]]
    config = {"class_name": "Functional", "config": {
        "name": "tiny", "input_layers": [["in", 0, 0]], "output_layers": [["out", 0, 0]], "layers": [
            {"class_name": "InputLayer", "name": "in", "config": {"name": "in", "batch_input_shape": [None, 8, 8, 3]},
             "inbound_nodes": []},
            {"class_name": "Conv2D", "name": "conv", "inbound_nodes": node("in"),
             "config": {"name": "conv", "filters": 4, "kernel_size": [3, 3], "padding": "same", "activation": "relu"}},
            {"class_name": "BatchNormalization", "name": "bn", "inbound_nodes": node("conv"),
             "config": {"name": "bn", "axis": -1}},
            {"class_name": "GlobalAveragePooling2D", "name": "gap", "inbound_nodes": node("bn"),
             "config": {"name": "gap"}},
            {"class_name": "Dense", "name": "out", "inbound_nodes": node("gap"),
             "config": {"name": "out", "units": 5, "activation": "softmax"}}]}}
    net = graph_from_config(json.dumps(config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in list(net.parameters()) + [net.bn.running_mean]:
            tensor.copy_(torch.randn_like(tensor))
        net.bn.running_var.uniform_(0.5, 2)
    return Classifier(net.eval(), net.input_shape, 5, name="tiny")


def same_outputs(a: Classifier, b: Classifier) -> bool:
    x = torch.rand(4, *a.input_shape, generator=torch.Generator().manual_seed(1))
    return torch.equal(a.logits(x).detach(), b.logits(x).detach())


def test_checkpoint_round_trip_registered_arch(tmp_path):
    model = digits_model(num_classes=7, input_scale=255)
    path = save_model(model, tmp_path / "sub" / "model.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "netcleanse" and ckpt["version"] == 1 and ckpt["kind"] == "classifier"
    assert ckpt["arch"] == "mnist-cnn" and ckpt["num_classes"] == 7 and ckpt["input_shape"] == [1, 28, 28]
    back = load_model(path)
    assert (back.arch, back.num_classes, back.input_scale) == ("mnist-cnn", 7, 255.0)
    assert same_outputs(model, back)
    assert load_model(path, input_scale=2).input_scale == 2.0  # an explicit scale other than 1 wins


def test_checkpoint_round_trip_keras_config(tmp_path):
    model = keras_graph_model()
    path = save_model(model, tmp_path / "tiny.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["arch"] is None and json.loads(ckpt["keras_config"])["class_name"] == "Functional"
    back = load_model(path)
    assert isinstance(back.net, KerasGraph) and back.num_classes == 5 and back.input_shape == (3, 8, 8)
    assert same_outputs(model, back)


def test_keras_whole_model_to_checkpoint_and_back(tmp_path):
    source = SHARED / "csaw" / "reference" / "sunglasses_bd_net_tfkeras.h5"
    if not source.exists():
        pytest.skip(f"{source} not available (the shared CSAW material is absent)")
    model = load_model(source)
    back = load_model(save_model(model, tmp_path / "sunglasses.pt"))
    assert same_outputs(model, back)


def test_plain_state_dicts_need_and_use_arch(tmp_path):
    model = digits_model(num_classes=4)
    for i, state in enumerate([model.net.state_dict(), model.state_dict(),  # "net." prefix
                               {"module." + k: v for k, v in model.net.state_dict().items()},
                               {"epoch": 3, "model_state_dict": model.net.state_dict()}]):
        path = tmp_path / f"state{i}.pt"
        torch.save(state, path)
        back = load_model(path, arch="mnist-cnn")
        assert back.num_classes == 4 and same_outputs(model, back)
    with pytest.raises(NetcleanseError, match="--arch"):
        load_model(tmp_path / "state0.pt")
    with pytest.raises(NetcleanseError, match="csaw-deepid"):
        load_model(tmp_path / "state0.pt", arch="csaw-deepid")


WRAPPED_FILE = """
import torch
from torch import nn

class Inner(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(108, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

class Wrapper(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.net = Inner()

    def forward(self, x):
        return self.net(x)
"""


def test_checkpoint_layouts_of_other_toolkits(tmp_path):
    """Wrapper keys (pytorch-cifar's "net", BackdoorBench's "model" beside NumPy arrays), prefixes
    (torch.compile's "_orig_mod.", Lightning's "model."), the legacy torch.save format and files
    without BatchNorm's num_batches_tracked load; a class whose one child is self.net keeps it."""
    import numpy as np
    source = tmp_path / "nets.py"
    source.write_text(WRAPPED_FILE)
    torch.manual_seed(0)
    namespace = {}
    exec(compile(WRAPPED_FILE, str(source), "exec"), namespace)
    net = namespace["Inner"]().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
    state = net.state_dict()
    x = torch.rand(5, 1, 8, 8)
    expected = net(x)
    no_counter = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    layouts = {"net.pt": {"net": state, "acc": 91.5, "epoch": 200},
               "attack_result.pt": {"model": state, "model_name": "inner", "num_classes": 4,
                                    "bd_test": {"poison_indicator": np.zeros(10, np.int8),
                                                "original_index_array": np.arange(10)}},
               "compiled.pt": {f"_orig_mod.{k}": v for k, v in state.items()},
               "lightning.pt": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
               "old_bn.pt": no_counter}
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    # the legacy format with NumPy arrays beside the weights too (its globals read from its pickle)
    torch.save(layouts["attack_result.pt"], tmp_path / "legacy_numpy.pt", _use_new_zipfile_serialization=False)
    for name in [*layouts, "legacy.pt", "legacy_numpy.pt"]:
        model = load_model(tmp_path / name, arch=f"{source}:Inner")
        assert torch.allclose(model.logits(x), expected, atol=1e-6), name
    wrapper = namespace["Wrapper"]().eval()
    wrapper.net.load_state_dict(state)
    torch.save(wrapper.state_dict(), tmp_path / "wrapper.pt")  # keys net.conv.weight ...: its own
    assert torch.allclose(load_model(tmp_path / "wrapper.pt", arch=f"{source}:Wrapper").logits(x), expected, atol=1e-6)
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "whole_legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(NetcleanseError, match="holds pickled Python objects"):  # not "corrupt"
        load_model(tmp_path / "whole_legacy.pt", arch=f"{source}:Inner")
    with pytest.raises(NetcleanseError, match=r"a dict of epoch, weights: none of them a dict of tensors"):
        torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "odd.pt")
        load_model(tmp_path / "odd.pt", arch=f"{source}:Inner")


def test_numpy_beside_weights_never_opens_the_unpickler(tmp_path):
    """Only NumPy's array, dtype and scalar builders are let through: object arrays (which could
    hold anything) and any other global stay refused, and nothing in the file runs."""
    import os

    import numpy as np

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    for name, extra in (("objects.pt", np.array([{"a": 1}], dtype=object)), ("evil.pt", np.array([Evil()], dtype=object)),
                        ("evil2.pt", Evil())):
        torch.save({"model": digits_model().net.state_dict(), "extra": extra}, tmp_path / name)
        with pytest.raises(NetcleanseError, match="pickled Python objects"):
            load_model(tmp_path / name, arch="mnist-cnn")
    assert not (tmp_path / "ran").exists()


def test_state_dict_with_missing_or_misshapen_weights(tmp_path):
    state = digits_model().net.state_dict()
    del state["fc_1.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(NetcleanseError, match="missing fc_1.bias"):
        load_model(tmp_path / "missing.pt", arch="mnist-cnn")
    state = digits_model().net.state_dict()
    state["conv_2.weight"] = torch.zeros(32, 16, 5, 5)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(NetcleanseError, match="conv_2.weight"):
        load_model(tmp_path / "shape.pt", arch="mnist-cnn")


def test_pickled_modules_are_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(digits_model().net, path)  # a whole pickled nn.Module: loading it would run code
    with pytest.raises(NetcleanseError, match="pickled"):
        load_model(path, arch="mnist-cnn")


def test_truncated_and_odd_torch_files(tmp_path):
    good = save_model(digits_model(), tmp_path / "good.pt")
    data = good.read_bytes()
    for keep in (0.3, 0.95):
        cut = tmp_path / f"cut{keep}.pt"
        cut.write_bytes(data[:int(len(data) * keep)])
        with pytest.raises(NetcleanseError):
            load_model(cut)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(NetcleanseError, match="neither"):
        load_model(tmp_path / "list.pt", arch="mnist-cnn")
    ckpt = checkpoint(digits_model())
    ckpt["version"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(NetcleanseError, match="version 99"):
        load_model(tmp_path / "future.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript; still read
def test_torchscript_with_and_without_recorded_shape(tmp_path):
    model = digits_model(num_classes=6, input_scale=255)
    scripted = Classifier(torch.jit.script(model.net), model.input_shape, 6, input_scale=255, name="digits")
    path = save_model(scripted, tmp_path / "scripted.pt")
    with zipfile.ZipFile(path) as archive:
        assert any(n.endswith(f"extra/{EXTRA_FILE}") for n in archive.namelist())
    back = load_model(path)
    assert (back.num_classes, back.input_shape, back.input_scale) == (6, (1, 28, 28), 255.0)
    assert same_outputs(model, back)
    from netcleanse.pruning import prune_layer_name
    with pytest.raises(NetcleanseError, match="TorchScript program, whose layers netcleanse cannot prune"):
        prune_layer_name(back)
    bare = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.trace(model.net, torch.zeros(1, 1, 28, 28)), str(bare))
    with pytest.raises(NetcleanseError, match="input shape.*--arch"):
        load_model(bare)
    assert load_torch(bare, arch="mnist-cnn").num_classes == 6
    with pytest.raises(NetcleanseError, match="fails"):
        load_model(bare, arch="csaw-deepid")  # wrong input size for this net


def test_save_model_suffixes(tmp_path):
    model = digits_model()
    with pytest.raises(NetcleanseError, match=r"\.pt.*\.h5"):
        save_model(model, tmp_path / "model.onnx")
    back = load_model(save_model(model, tmp_path / "model.h5"), arch="mnist-cnn")
    assert same_outputs(model, back)
    # a traced graph (as converted ONNX models are) has no architecture to rebuild it from
    odd = Classifier(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))),
                     (3, 1, 1), 2)
    with pytest.raises(NetcleanseError, match="rebuilt"):
        save_model(odd, tmp_path / "odd.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5"]  # no odd.pt, no temporary file left
    # a module wrapped from Python is saved as its weights; loading it back needs its architecture
    wrapped = Classifier.wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)), (3, 1, 1))
    with pytest.raises(NetcleanseError, match="records no architecture; name it with --arch"):
        load_model(save_model(wrapped, tmp_path / "wrapped.pt"))


def test_a_pytorch_file_loads_whatever_its_name(tmp_path):
    # formats are read from the content: a checkpoint named .keras too (was "not a readable Keras
    # .keras archive"), while a zip of something else under that name is still that error
    import shutil
    import zipfile
    model = digits_model()
    saved = save_model(model, tmp_path / "model.pt")
    for name in ("model.keras", "model.bin"):
        assert same_outputs(model, load_model(shutil.copy(saved, tmp_path / name)))
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(NetcleanseError, match="not a readable Keras .keras archive"):
        load_model(tmp_path / "other.keras")


def test_guarded_checkpoints_need_only_the_guarded_noun(tmp_path, monkeypatch):
    """torch_io writes and reads a guarded model itself (netcleanse.guarded), without the module that
    builds guards (netcleanse.guard, which sits above it): the two no longer import each other."""
    from netcleanse.guarded import Disagreement, GuardedClassifier
    monkeypatch.setitem(sys.modules, "netcleanse.guard", None)  # importing it would now fail
    base, repaired = digits_model(input_scale=255), digits_model(seed=1)
    guarded = GuardedClassifier(base, Disagreement(repaired), name="guarded")
    back = load_model(save_model(guarded, tmp_path / "guarded.pt"))
    assert isinstance(back, GuardedClassifier) and isinstance(back.detector, Disagreement)
    assert back.poison_label == 10 and back.num_classes == 11 and back.name == "guarded"
    assert back.base.input_scale == 255 and back.detector.repaired.input_scale == 1.0
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.predict(x), guarded.predict(x))
    with pytest.raises(NetcleanseError, match="guarded"):
        save_model(guarded, tmp_path / "guarded.h5")


@pytest.mark.parametrize("stored", [float("nan"), float("inf"), -1.0, 0.0, "255"])
def test_checkpoint_with_a_bad_input_scale_is_refused(tmp_path, stored):
    from netcleanse.architectures import SmallCNN
    from netcleanse.model import Classifier, load_model
    from netcleanse.torch_io import save_model
    path = tmp_path / "m.pt"
    save_model(Classifier(SmallCNN(10).eval(), (1, 28, 28), 10, name="m", arch="mnist-cnn"), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["input_scale"] = stored
    torch.save(ckpt, path)
    if stored == "255":  # a number written as text is still a number
        assert load_model(path).input_scale == 255.0
        return
    with pytest.raises(NetcleanseError, match="input scale must be a positive number"):
        load_model(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_layer(tmp_path, bad):
    from netcleanse.architectures import SmallCNN
    from netcleanse.model import Classifier, load_model
    from netcleanse.torch_io import save_model
    net = SmallCNN(10).eval()
    with torch.no_grad():
        net.fc_1.weight[3, 5] = bad
    for suffix in (".pt", ".h5"):
        path = tmp_path / f"m{suffix}"
        save_model(Classifier(net, (1, 28, 28), 10, name="m", arch="mnist-cnn"), path)
        with pytest.raises(NetcleanseError, match=r"fc_1\.weight holds 1 NaN or infinite"):
            load_model(path, arch="mnist-cnn")


def test_checkpoint_declaring_other_classes_than_its_weights_is_refused(tmp_path):
    from netcleanse.architectures import SmallCNN
    from netcleanse.model import Classifier, load_model
    from netcleanse.torch_io import save_model
    path = tmp_path / "m.pt"
    save_model(Classifier(SmallCNN(10).eval(), (1, 28, 28), 10, name="m", arch="mnist-cnn"), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["num_classes"] = 1_000_000_000
    torch.save(ckpt, path)
    with pytest.raises(NetcleanseError, match="records 1000000000 classes but its weights have 10"):
        load_model(path)


def test_deeply_nested_keras_config_is_one_error(tmp_path):
    from netcleanse.model import load_model
    from netcleanse.torch_io import VERSION
    nested = '{"layers": [' * 200_000 + "]}" * 200_000  # as JSON text, the way Keras stores configs
    ckpt = {"format": "netcleanse", "version": VERSION, "kind": "classifier", "arch": None, "num_classes": 10,
            "input_shape": [1, 28, 28], "input_scale": 1.0, "name": "deep", "source": None,
            "keras_config": nested, "state_dict": {}}
    path = tmp_path / "deep.pt"
    torch.save(ckpt, path)
    with pytest.raises(NetcleanseError, match="nested too deeply|not a Keras"):
        load_model(path)
