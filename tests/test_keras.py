"""Keras .h5 into PyTorch and back: match Keras's own outputs, refuse what cannot be run safely.

Real files come from ../shared/csaw (skipped with a reason when absent); layer types those files
do not use are checked on small synthetic models written here with h5py against an independent
NumPy implementation of Keras's (NHWC, TensorFlow-padding) semantics.
"""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from netcleanse import NetcleanseError, build_architecture, load_model
from netcleanse.keras import KerasGraph, load_keras, save_keras_weights
from netcleanse.model import Classifier

from conftest import CSAW, SHARED, need, write_model_h5  # noqa: F401

CSAW_NETS = ["sunglasses", "anonymous_1", "anonymous_2", "multi_trigger_multi_target"]
TOLERANCE = 1e-4  # max abs difference on probabilities, as the issue asks


@pytest.fixture(scope="module")
def csaw_reference():
    data = np.load(need(CSAW / "reference" / "keras_reference_outputs.npz"))
    return torch.from_numpy(data["inputs_nchw_uint8"]).float() / 255, data


@pytest.fixture(scope="module")
def third_party_reference():
    return np.load(need(CSAW / "third_party" / "keras_reference_outputs.npz"))


# ---------------------------------------------------------------- real files vs Keras's outputs

@pytest.mark.parametrize("net", CSAW_NETS)
def test_weights_files_match_keras(net, csaw_reference):
    x, reference = csaw_reference
    model = load_model(need(CSAW / "models" / f"{net}_bd_weights.h5"), arch="csaw-deepid")
    assert (model.num_classes, model.input_shape, model.arch) == (1283, (3, 55, 47), "csaw-deepid")
    diff = np.abs(model.predict_proba(x).numpy() - reference[f"{net}_softmax"]).max()
    assert diff <= TOLERANCE


@pytest.mark.parametrize("net", ["sunglasses", "multi_trigger_multi_target"])
def test_whole_model_tfkeras_files_match_keras(net, csaw_reference):
    x, reference = csaw_reference
    model = load_model(need(CSAW / "reference" / f"{net}_bd_net_tfkeras.h5"))
    assert isinstance(model.net, KerasGraph) and model.arch is None
    assert (model.num_classes, model.input_shape) == (1283, (3, 55, 47))
    assert model.net.final_activation == "softmax"  # stripped: the module returns logits
    logits = model.logits(x).detach()
    assert not torch.allclose(logits.sum(1), torch.ones(len(x)))
    diff = np.abs(torch.softmax(logits, 1).numpy() - reference[f"{net}_softmax"]).max()
    assert diff <= TOLERANCE
    # Layers are submodules named as in Keras; fine-pruning's layer is the one all paths cross.
    assert {"conv_1", "pool_3", "flatten_1", "fc_2", "add_1", "output"} <= set(dict(model.net.named_children()))
    assert model.net.prune_layer == "conv_3"


@pytest.mark.parametrize("name, shape", [("prerelease_C_sequential_keras231", (1, 28, 28)),
                                         ("prerelease_F_model_keras231", (1, 28, 28)),
                                         ("sunglasses_pruned_keras270", (3, 55, 47))])
def test_third_party_files_match_keras(name, shape, third_party_reference):
    model = load_model(need(CSAW / "third_party" / f"{name}.h5"))
    assert model.input_shape == shape
    x = torch.from_numpy(third_party_reference[f"{name}__inputs_nhwc"]).permute(0, 3, 1, 2)
    expected = third_party_reference[f"{name}__outputs"]
    assert model.num_classes == expected.shape[1]
    assert np.abs(model.predict_proba(x).numpy() - expected).max() <= TOLERANCE


def test_raw_pixel_net_with_input_scale_255(third_party_reference):
    """lab3_pruned4 was trained on raw 0..255 pixels. Its reference npz fed Keras the stored
    inputs as they are (values in [0, 1], hence its flat ~0.1 outputs); with input_scale=255
    netcleanse images in [0, 1] become what Keras saw when divided by 255 first."""
    name = "lab3_pruned4_keras240"
    model = load_model(need(CSAW / "third_party" / f"{name}.h5"), input_scale=255)
    fed_to_keras = torch.from_numpy(third_party_reference[f"{name}__inputs_nhwc"]).permute(0, 3, 1, 2)
    expected = third_party_reference[f"{name}__outputs"]
    assert np.abs(model.predict_proba(fed_to_keras / 255).numpy() - expected).max() <= TOLERANCE
    # The real contract on real faces: with input_scale=255 it names the true labels.
    paths = sorted(need(CSAW / "images").glob("cl_*_label=*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                          for p in paths]).float() / 255
    truth = [int(p.stem.split("label=")[1]) for p in paths]
    assert model.predict(images).tolist() == truth
    assert load_model(CSAW / "third_party" / f"{name}.h5").predict(images).tolist() != truth


def test_lambda_model_is_refused_naming_the_layer():
    path = need(CSAW / "third_party" / "goodnet_with_lambda_keras240.h5")
    with pytest.raises(NetcleanseError, match=r"'y_reclasify'.*Lambda") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_whole_model_file_with_arch_uses_weights_only(csaw_reference):
    x, reference = csaw_reference
    model = load_model(need(CSAW / "reference" / "sunglasses_bd_net_tfkeras.h5"), arch="csaw-deepid")
    assert model.arch == "csaw-deepid" and not isinstance(model.net, KerasGraph)
    assert np.abs(model.predict_proba(x).numpy() - reference["sunglasses_softmax"]).max() <= TOLERANCE
    # A nested model's weights (here inside the Lambda wrapper) load into the architecture too.
    wrapped = load_model(need(CSAW / "third_party" / "goodnet_with_lambda_keras240.h5"), arch="csaw-deepid")
    assert wrapped.num_classes == 1283


# ---------------------------------------------------------------- bad files

def test_weights_only_file_needs_arch():
    # the hint names the registered architectures (it named csaw-deepid for any file, an mnist-cnn
    # repair's export too)
    with pytest.raises(NetcleanseError, match="--arch \\(registered: csaw-deepid, gtsrb-cnn, mnist-cnn; or your own"):
        load_model(need(CSAW / "models" / "sunglasses_bd_weights.h5"))


def test_text_and_empty_files_are_refused(tmp_path):
    text = tmp_path / "model.h5"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(NetcleanseError):
            load_model(path)
    with pytest.raises(NetcleanseError, match="HDF5"):
        load_keras(text)


@pytest.mark.parametrize("source", ["models/sunglasses_bd_weights.h5", "reference/sunglasses_bd_net_tfkeras.h5"])
@pytest.mark.parametrize("keep", [0.001, 0.3, 0.9])
def test_truncated_h5_is_refused(tmp_path, source, keep):
    data = need(CSAW / source).read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[:max(16, int(len(data) * keep))])
    with pytest.raises(NetcleanseError) as info:
        load_model(cut, arch="csaw-deepid" if "weights" in source else None)
    assert "\n" not in str(info.value)


def test_hdf5_that_is_not_a_keras_file(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", data=np.zeros((2, 3)))
    # neither a config nor Keras's layer_names: a data file, named as one, with or without --arch
    with pytest.raises(NetcleanseError, match=r"arrays \(data\), a data file perhaps .* not a Keras model"):
        load_model(path, arch="csaw-deepid")
    with pytest.raises(NetcleanseError, match="not a Keras model"):
        load_model(path)
    with h5py.File(path, "w") as h5:
        h5.create_group("layers").create_group("dense")
    with pytest.raises(NetcleanseError, match="Keras 3's weights alone"):
        load_model(path)


def _edited_copy(tmp_path, edit) -> Path:
    path = tmp_path / "edited.h5"
    shutil.copy(need(CSAW / "models" / "sunglasses_bd_weights.h5"), path)
    path.chmod(0o644)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def test_weights_with_missing_layer(tmp_path):
    def drop_conv_4(h5):
        del h5["conv_4"]
        h5.attrs["layer_names"] = np.array([n for n in h5.attrs["layer_names"] if n != b"conv_4"])
    with pytest.raises(NetcleanseError, match="'conv_4'.*no weights"):
        load_model(_edited_copy(tmp_path, drop_conv_4), arch="csaw-deepid")


def test_weights_with_wrong_shape(tmp_path):
    def shrink(h5):
        del h5["conv_2/conv_2/kernel:0"]
        h5["conv_2"].create_dataset("conv_2/kernel:0", data=np.zeros((3, 3, 20, 39), np.float32))
    with pytest.raises(NetcleanseError, match=r"'conv_2'.*shape"):
        load_model(_edited_copy(tmp_path, shrink), arch="csaw-deepid")


def test_weights_for_the_wrong_architecture():
    with pytest.raises(NetcleanseError, match="mnist-cnn"):
        load_model(need(CSAW / "models" / "sunglasses_bd_weights.h5"), arch="mnist-cnn")
    with pytest.raises(NetcleanseError, match="unknown architecture"):
        load_model(CSAW / "models" / "sunglasses_bd_weights.h5", arch="resnet-9000")


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("net", CSAW_NETS)
def test_export_reproduces_csaw_weights_bit_for_bit(tmp_path, net):
    original = need(CSAW / "models" / f"{net}_bd_weights.h5")
    model = load_model(original, arch="csaw-deepid")
    out = save_keras_weights(model, tmp_path / "exported.h5")

    def datasets(path):
        found = {}
        with h5py.File(path, "r") as h5:
            h5.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                          else None)
            weighted = [n.decode() for n in h5.attrs["layer_names"] if len(h5[n.decode()].attrs["weight_names"])]
            names = {n: [w.decode() for w in h5[n].attrs["weight_names"]] for n in weighted}
        return found, weighted, names

    mine, theirs = datasets(out), datasets(original)
    assert mine[0].keys() == theirs[0].keys()
    for key, value in theirs[0].items():
        assert mine[0][key].dtype == value.dtype and mine[0][key].tobytes() == value.tobytes(), key
    assert mine[1:] == theirs[1:]  # weighted layers, their order and their weight_names
    with h5py.File(out, "r") as h5:
        assert h5.attrs["backend"] == "tensorflow" and h5.attrs["keras_version"].startswith("2.")


def test_export_round_trip_registered_arch(tmp_path):
    torch.manual_seed(0)
    net = build_architecture("mnist-cnn", 7)
    model = Classifier(net.eval(), (1, 28, 28), 7, arch="mnist-cnn")
    path = save_keras_weights(model, tmp_path / "digits.h5")
    back = load_model(path, arch="mnist-cnn")
    x = torch.rand(5, 1, 28, 28)
    assert back.num_classes == 7
    assert torch.equal(back.logits(x).detach(), model.logits(x).detach())


def test_export_refuses_guarded_models(tmp_path):
    model = Classifier(build_architecture("mnist-cnn"), (1, 28, 28), 11, arch="mnist-cnn")
    model.poison_label = 10
    with pytest.raises(NetcleanseError, match="guarded"):
        save_keras_weights(model, tmp_path / "g.h5")
    assert not (tmp_path / "g.h5").exists()


# ---------------------------------------------------------------- synthetic models vs NumPy

def tf_same(size, kernel, stride, dilation=1):
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def np_conv(x, kernel, bias, stride=1, same=False, dilation=1):
    """Keras Conv2D on NHWC with an HWIO kernel, written from its definition."""
    kh, kw = kernel.shape[:2]
    if dilation > 1:  # spread the kernel taps apart
        spread = np.zeros(((kh - 1) * dilation + 1, (kw - 1) * dilation + 1) + kernel.shape[2:], kernel.dtype)
        spread[::dilation, ::dilation] = kernel
        kernel, kh, kw = spread, spread.shape[0], spread.shape[1]
    if same:
        (t, b), (l, r) = tf_same(x.shape[1], kh, stride), tf_same(x.shape[2], kw, stride)
        x = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out + (0 if bias is None else bias)


def np_pool(x, size, stride, same, reduce):
    """Pooling over the window clipped to the image: TF 'same' pads never count."""
    h, w = x.shape[1:3]
    (top, _), (left, _) = (tf_same(h, size, stride), tf_same(w, size, stride)) if same else ((0, 0), (0, 0))
    oh, ow = (-(-h // stride), -(-w // stride)) if same else ((h - size) // stride + 1, (w - size) // stride + 1)
    out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * stride - top, j * stride - left
            window = x[:, max(r0, 0):min(r0 + size, h), max(c0, 0):min(c0 + size, w), :]
            out[:, i, j] = reduce(window, axis=(1, 2))
    return out


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def layer(class_name, name, inbound, **config):
    nodes = [] if inbound is None else [[[src, 0, 0, {}] for src in inbound]]
    return {"class_name": class_name, "name": name, "config": {"name": name, **config}, "inbound_nodes": nodes}


def functional_config():
    """A branchy little net using the layer types the real files lack."""
    layers = [
        layer("InputLayer", "img", None, batch_input_shape=[None, 9, 8, 3], dtype="float32"),
        layer("ZeroPadding2D", "zp", ["img"], padding=[[1, 0], [2, 1]]),
        layer("Conv2D", "c1", ["zp"], filters=4, kernel_size=[3, 3], strides=[2, 2], padding="same",
              activation="relu", use_bias=True, data_format="channels_last"),
        layer("BatchNormalization", "bn", ["c1"], axis=-1, epsilon=1e-3, center=True, scale=True),
        layer("AveragePooling2D", "ap", ["bn"], pool_size=[2, 2], strides=[2, 2], padding="same"),
        layer("MaxPooling2D", "mp", ["bn"], pool_size=[3, 3], strides=[2, 2], padding="same"),
        layer("Concatenate", "cat", ["ap", "mp"], axis=-1),
        layer("BatchNormalization", "bn2", ["cat"], axis=[3], epsilon=0.01, center=False, scale=True),
        layer("Conv2D", "c2", ["bn2"], filters=5, kernel_size=[2, 2], strides=[1, 1], padding="valid",
              activation="linear", use_bias=False),
        layer("ReLU", "clip", ["c2"], max_value=0.5, negative_slope=0.1, threshold=0.0),
        layer("GlobalAveragePooling2D", "gap", ["clip"]),
        layer("Flatten", "flat", ["clip"]),
        layer("Dense", "d1", ["flat"], units=3, activation="linear", use_bias=True),
        layer("Dense", "d2", ["gap"], units=3, activation="tanh", use_bias=True),
        layer("Add", "sum", ["d1", "d2"]),
        layer("Activation", "probs", ["sum"], activation="softmax"),
    ]
    return {"class_name": "Model", "config": {"name": "synthetic", "layers": layers,
                                              "input_layers": [["img", 0, 0]], "output_layers": [["probs", 0, 0]]}}


def functional_weights(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return {"c1": [("kernel", r(3, 3, 3, 4)), ("bias", r(4))],
            "bn": [("gamma", r(4)), ("beta", r(4)), ("moving_mean", r(4)),
                   ("moving_variance", rng.uniform(0.5, 2, 4).astype(np.float32))],
            "bn2": [("gamma", r(8)), ("moving_mean", r(8)),
                    ("moving_variance", rng.uniform(0.5, 2, 8).astype(np.float32))],
            "c2": [("kernel", r(2, 2, 8, 5))],
            "d1": [("kernel", r(20, 3)), ("bias", r(3))],
            "d2": [("kernel", r(5, 3)), ("bias", r(3))]}


def functional_reference(x, w):
    """Keras's output of functional_config() for NHWC input x, in NumPy."""
    W = {k: dict(v) for k, v in w.items()}
    z = np.pad(x, ((0, 0), (1, 0), (2, 1), (0, 0)))
    z = np.maximum(np_conv(z, W["c1"]["kernel"], W["c1"]["bias"], stride=2, same=True), 0)
    bn = W["bn"]
    z = bn["gamma"] * (z - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) + bn["beta"]
    z = np.concatenate([np_pool(z, 2, 2, True, np.mean), np_pool(z, 3, 2, True, np.max)], axis=-1)
    bn2 = W["bn2"]
    z = bn2["gamma"] * (z - bn2["moving_mean"]) / np.sqrt(bn2["moving_variance"] + 0.01)
    z = np_conv(z, W["c2"]["kernel"], None)
    z = np.where(z > 0, np.minimum(z, 0.5), 0.1 * z)
    d1 = z.reshape(len(z), -1) @ W["d1"]["kernel"] + W["d1"]["bias"]  # NHWC flatten order
    d2 = np.tanh(z.mean(axis=(1, 2)) @ W["d2"]["kernel"] + W["d2"]["bias"])
    return np_softmax(d1 + d2)


def to_keras3(config):
    """The same config in Keras 3's dialect: dict inbound nodes, batch_shape, module names."""
    config = json.loads(json.dumps(config))
    config["class_name"] = "Functional"
    for entry in config["config"]["layers"]:
        entry["module"], entry["registered_name"] = "keras.layers", None
        cfg = entry["config"]
        if "batch_input_shape" in cfg:
            cfg["batch_shape"] = cfg.pop("batch_input_shape")
        nodes = []
        for node in entry["inbound_nodes"]:
            tensors = [{"class_name": "__keras_tensor__",
                        "config": {"shape": None, "dtype": "float32", "keras_history": [s, i, t]}}
                       for s, i, t, _ in node]
            nodes.append({"args": [tensors] if len(tensors) > 1 else tensors, "kwargs": {}})
        entry["inbound_nodes"] = nodes
    return config


@pytest.fixture
def synthetic_input():
    return np.random.default_rng(1).uniform(size=(6, 9, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("dialect", ["keras2", "keras3"])
def test_synthetic_functional_model_matches_numpy(tmp_path, synthetic_input, dialect):
    weights = functional_weights()
    config = functional_config() if dialect == "keras2" else to_keras3(functional_config())
    path = write_model_h5(tmp_path / "m.h5", config, weights, "2.3.1" if dialect == "keras2" else "3.3.3")
    model = load_model(path)
    assert model.input_shape == (3, 9, 8) and model.num_classes == 3
    assert model.net.final_activation == "softmax" and model.net.prune_layer == "c2"
    x = torch.from_numpy(synthetic_input).permute(0, 3, 1, 2)
    expected = functional_reference(synthetic_input.astype(np.float64), weights)
    assert np.abs(model.predict_proba(x).numpy() - expected).max() < 1e-5
    # Exported, the config keeps its dialect and version and loads back to the same net.
    again = save_keras_weights(model, tmp_path / "again.h5")
    with h5py.File(again, "r") as h5:
        assert h5.attrs["keras_version"] == ("2.3.1" if dialect == "keras2" else "3.3.3")
    assert torch.equal(load_model(again).logits(x).detach(), model.logits(x).detach())


def test_synthetic_nested_model(tmp_path, synthetic_input):
    """A Functional model used as a layer of an outer model (Keras numbers its call node 1)."""
    inner = functional_config()
    inner["name"] = "inner"
    inner["config"]["name"] = "inner"
    inner["inbound_nodes"] = [[["outer_in", 0, 0, {}]]]
    outer = {"class_name": "Functional", "config": {
        "name": "outer", "input_layers": [["outer_in", 0, 0]], "output_layers": [["inner", 1, 0]],
        "layers": [layer("InputLayer", "outer_in", None, batch_input_shape=[None, 9, 8, 3]), inner]}}
    weights = functional_weights(seed=3)
    model = load_model(write_model_h5(tmp_path / "nested.h5", outer, weights, nested="inner"))
    x = torch.from_numpy(synthetic_input).permute(0, 3, 1, 2)
    expected = functional_reference(synthetic_input.astype(np.float64), weights)
    assert model.net.final_activation == "softmax"
    assert np.abs(model.predict_proba(x).numpy() - expected).max() < 1e-5
    # Export keeps the nesting and the config, so the file loads back as it was.
    back = load_model(save_keras_weights(model, tmp_path / "again.h5"))
    assert torch.equal(back.logits(x).detach(), model.logits(x).detach())


def sequential_config():
    """Keras 2.2-style Sequential: no InputLayer, the first layer carries batch_input_shape."""
    return {"class_name": "Sequential", "config": {"name": "seq", "layers": [
        {"class_name": "Conv2D", "config": {"name": "conv", "batch_input_shape": [None, 7, 6, 2], "filters": 3,
                                            "kernel_size": [3, 3], "strides": [1, 1], "dilation_rate": [2, 2],
                                            "padding": "valid", "activation": "elu", "use_bias": True}},
        {"class_name": "Flatten", "config": {"name": "flat"}},
        {"class_name": "Dropout", "config": {"name": "drop", "rate": 0.5}},
        {"class_name": "Dense", "config": {"name": "out", "units": 4, "activation": "softmax"}}]}}


def test_synthetic_sequential_matches_numpy(tmp_path):
    rng = np.random.default_rng(2)
    weights = {"conv": [("kernel", rng.normal(size=(3, 3, 2, 3)).astype(np.float32)),
                        ("bias", rng.normal(size=3).astype(np.float32))],
               "out": [("kernel", rng.normal(size=(18, 4)).astype(np.float32)),
                       ("bias", rng.normal(size=4).astype(np.float32))]}
    model = load_model(write_model_h5(tmp_path / "seq.h5", sequential_config(), weights))
    x = rng.uniform(size=(5, 7, 6, 2))
    W = {k: dict(v) for k, v in weights.items()}
    z = np_conv(x, W["conv"]["kernel"], W["conv"]["bias"], dilation=2)
    z = np.where(z > 0, z, np.expm1(z))
    expected = np_softmax(z.reshape(5, -1) @ W["out"]["kernel"] + W["out"]["bias"])
    got = model.predict_proba(torch.from_numpy(x).float().permute(0, 3, 1, 2)).numpy()
    assert model.net.final_activation == "softmax"
    assert np.abs(got - expected).max() < 1e-5


def test_synthetic_export_round_trip_keeps_config(tmp_path, synthetic_input):
    model = load_model(write_model_h5(tmp_path / "m.h5", functional_config(), functional_weights()))
    out = save_keras_weights(model, tmp_path / "exported.h5")
    with h5py.File(out, "r") as h5:
        assert "model_config" in h5.attrs
        weights = h5["model_weights"]
        assert [n.decode() for n in weights.attrs["layer_names"]][:3] == ["img", "zp", "c1"]
        assert [n.decode() for n in weights["bn2"].attrs["weight_names"]] == \
            ["bn2/gamma:0", "bn2/moving_mean:0", "bn2/moving_variance:0"]
        assert weights["c1/c1/kernel:0"].shape == (3, 3, 3, 4)
    back = load_model(out)
    x = torch.from_numpy(synthetic_input).permute(0, 3, 1, 2)
    assert torch.equal(back.logits(x).detach(), model.logits(x).detach())


def _with_layer(config, entry, after="c2"):
    config = json.loads(json.dumps(config))
    layers = config["config"]["layers"]
    index = next(i for i, e in enumerate(layers) if e["name"] == after)
    layers.insert(index + 1, entry)
    return config


@pytest.mark.parametrize("entry, pattern", [
    (layer("Lambda", "sneaky", ["c2"], function=["4wEAAAAAAAAA"], function_type="lambda"), r"'sneaky'.*Lambda"),
    (layer("MyFancyLayer", "fancy", ["c2"]), r"'fancy'.*MyFancyLayer"),
    ({**layer("Dense", "custom_dense", ["c2"], units=2), "module": "mypackage.layers",
      "registered_name": "Custom>Dense"}, r"'custom_dense'.*custom"),
    (layer("Conv2D", "cf", ["c2"], filters=2, kernel_size=[1, 1], data_format="channels_first"), "channels_first"),
    (layer("Activation", "act", ["c2"], activation={"class_name": "MyAct", "config": {}, "module": "mine"}),
     r"'act'.*custom activation"),
])
def test_unsupported_or_unsafe_layers_are_refused(tmp_path, entry, pattern):
    path = write_model_h5(tmp_path / "bad.h5", _with_layer(functional_config(), entry), functional_weights())
    with pytest.raises(NetcleanseError, match=pattern) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_config_and_weights_that_disagree(tmp_path):
    weights = functional_weights()
    weights["d2"] = [("kernel", np.zeros((6, 3), np.float32)), ("bias", np.zeros(3, np.float32))]
    with pytest.raises(NetcleanseError, match=r"'d2'.*shape"):
        load_model(write_model_h5(tmp_path / "a.h5", functional_config(), weights))
    weights = functional_weights()
    del weights["c2"]
    with pytest.raises(NetcleanseError, match="'c2'"):
        load_model(write_model_h5(tmp_path / "b.h5", functional_config(), weights))


def test_model_with_an_open_input_size_takes_input_shape(tmp_path, synthetic_input):
    """A fully convolutional model (input None x None x 3) needs the size to work at: refused
    without one, the same net as the fixed-size file with one (also nested, and from a checkpoint)."""
    from netcleanse import save_model
    from netcleanse.keras.load import input_size_open
    fixed = write_model_h5(tmp_path / "fixed.h5", functional_config(), functional_weights())
    config = functional_config()
    config["config"]["layers"][0]["config"]["batch_input_shape"] = [None, None, None, 3]
    path = write_model_h5(tmp_path / "v.h5", config, functional_weights())
    assert input_size_open(path) is True and input_size_open(fixed) is False
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04 not keras")
    assert input_size_open(tmp_path / "w.pt") is None and input_size_open(tmp_path / "missing.h5") is None
    with pytest.raises(NetcleanseError, match="not a fixed image size; give the size to work at with --input-shape"):
        load_model(path)
    x = torch.from_numpy(synthetic_input).permute(0, 3, 1, 2)
    model = load_model(path, input_shape="3x9x8")
    assert model.input_shape == (3, 9, 8) and torch.equal(model.logits(x), load_model(fixed).logits(x))
    back = load_model(save_model(model, tmp_path / "v.pt"))
    assert back.input_shape == (3, 9, 8) and torch.equal(back.logits(x), model.logits(x))
    with pytest.raises(NetcleanseError, match="records its input shape"):  # a size the file records: its own
        load_model(fixed, input_shape="3x9x8")
    with pytest.raises(NetcleanseError, match="does not fit --input-shape 1x9x8"):
        load_model(path, input_shape="1x9x8")
    # nested: the inner model's open input is what the outer one feeds it
    inner = functional_config()
    inner["name"] = inner["config"]["name"] = "inner"
    inner["config"]["layers"][0]["config"]["batch_input_shape"] = [None, None, None, 3]
    inner["inbound_nodes"] = [[["outer_in", 0, 0, {}]]]
    outer = {"class_name": "Functional", "config": {
        "name": "outer", "input_layers": [["outer_in", 0, 0]], "output_layers": [["inner", 1, 0]],
        "layers": [layer("InputLayer", "outer_in", None, batch_input_shape=[None, None, None, 3]), inner]}}
    nested = load_model(write_model_h5(tmp_path / "nested.h5", outer, functional_weights(), nested="inner"),
                        input_shape="3x9x8")
    assert torch.equal(nested.logits(x), model.logits(x))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_a_final_sigmoid_or_tanh_is_left_out_of_the_logits(tmp_path, synthetic_input, activation):
    """One squashed score per class: the logits are the scores before it (same labels; a scan on
    scores bounded to [0, 1] finds less), as for a final softmax."""
    config = functional_config()
    config["config"]["layers"][-1]["config"]["activation"] = activation
    model = load_model(write_model_h5(tmp_path / "s.h5", config, functional_weights()))
    assert model.net.final_activation == activation
    x = torch.from_numpy(synthetic_input).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits, keras_out = model.net(x), model.net.run(x, strip_final_softmax=False)
    squash = torch.sigmoid if activation == "sigmoid" else torch.tanh
    assert torch.allclose(squash(logits), keras_out, atol=1e-6)
    assert logits.abs().max() > 1 and torch.equal(logits.argmax(1), keras_out.argmax(1))


def test_other_outputs_are_returned_as_is(tmp_path, synthetic_input):
    config = functional_config()
    config["config"]["layers"][-1]["config"]["activation"] = "relu"
    model = load_model(write_model_h5(tmp_path / "s.h5", config, functional_weights()))
    assert model.net.final_activation == "relu"
    out = model.logits(torch.from_numpy(synthetic_input).permute(0, 3, 1, 2)).detach()
    assert out.min() >= 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about zero-size layers some mutations make
@pytest.mark.parametrize("make", [functional_config, sequential_config, lambda: to_keras3(functional_config())])
def test_malformed_configs_give_clean_errors(make):
    """Random single-value corruptions of a valid config: a model or a NetcleanseError, nothing else."""
    from netcleanse.keras import graph_from_config
    base = make()

    def paths(obj, prefix=()):
        yield prefix
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for key, value in items:
            yield from paths(value, prefix + (key,))

    rng = np.random.default_rng(0)
    spots = list(paths(base))[1:]
    for _ in range(60):
        config = json.loads(json.dumps(base))
        spot = spots[rng.integers(len(spots))]
        parent = config
        for key in spot[:-1]:
            parent = parent[key]
        parent[spot[-1]] = [None, "x", -3, 0, [], {}, [1], 2.5, [[None]], True][rng.integers(10)]
        try:
            graph_from_config(config)
        except NetcleanseError as exc:
            assert "\n" not in str(exc)


def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path):
    # an input layer of 20000 x 20000 x 3 values per image: refused from the config alone
    config = functional_config()
    config["config"]["layers"][0]["config"]["batch_input_shape"] = [None, 20000, 20000, 3]
    path = write_model_h5(tmp_path / "huge_input.h5", config, functional_weights())
    with pytest.raises(NetcleanseError, match="declares 1,200,000,000 values per image"):
        load_model(path)
    # a Dense layer of 300 million units: refused before its weights are allocated
    config = functional_config()
    next(e for e in config["config"]["layers"] if e["name"] == "d1")["config"]["units"] = 300_000_000
    path = write_model_h5(tmp_path / "huge_dense.h5", config, functional_weights())
    with pytest.raises(NetcleanseError, match="layer 'd1' declares .* weights"):
        load_model(path)
    # a kernel declared 160 x 1e9 in a file of a few KB (a sparse, chunked dataset)
    path = write_model_h5(tmp_path / "sparse_kernel.h5", functional_config(), functional_weights())
    with h5py.File(path, "a") as h5:
        group = h5["model_weights"]["d1"]
        del group["d1/kernel:0"]
        group.create_dataset("d1/kernel:0", shape=(160, 1_000_000_000), dtype=np.float32, chunks=(160, 8192))
    with pytest.raises(NetcleanseError, match="declares .* but the file stores only"):
        load_model(path)


def test_a_model_with_no_classes_is_refused(tmp_path):
    """A Keras file whose output Dense has units=0 built a model of 0 classes, on which every prediction
    failed with an IndexError traceback (found by tests/test_fuzz.py's random Keras configs)."""
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, 4, 4, 1]}},
        {"class_name": "Flatten", "config": {"name": "f"}},
        {"class_name": "Dense", "config": {"name": "d", "units": 0, "activation": "softmax"}}]}}
    path = write_model_h5(tmp_path / "m.h5", config, {"d": [("kernel", np.zeros((16, 0), np.float32)),
                                                            ("bias", np.zeros(0, np.float32))]})
    with pytest.raises(NetcleanseError, match="answers 0 classes"):
        load_model(path)
