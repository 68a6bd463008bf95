"""Keras preprocessing layers (Normalization, Rescaling), BatchNormalization after Dense, and Keras 3
``.keras`` archives, against an independent NumPy implementation of Keras's semantics.

Provenance of the files: TensorFlow is not installed here (and none of the third-party files in
../shared/csaw uses these layers), so every file is written in the test with h5py and zipfile
following the layouts Keras writes (Keras 3 itself, on JAX, writes files for
tests/test_keras_reference.py):

- ``.h5`` whole-model files as tf.keras 2.x ``model.save`` (root ``model_config``,
  ``model_weights/<layer>/<layer>/<var>:0``; Normalization's weights ``mean``, ``variance``,
  ``count`` as its ``build()`` adds them);
- ``.keras`` archives as Keras 3 ``saving_lib`` (``config.json``, ``metadata.json`` and
  ``model.weights.h5`` whose ``H5IOStore`` puts a layer's variables at
  ``layers/<snake_case class name>[_<n>]/vars/<i>``, trainable variables first, ``_<n>`` counting
  earlier layers of the same class in the container).

The layouts were read from Keras's source (keras/src/saving/saving_lib.py,
keras/src/layers/preprocessing/normalization.py), not produced by Keras itself.
"""

import io
import json
import zipfile

import h5py
import numpy as np
import pytest
import torch

from netcleanse import NetcleanseError, load_model
from netcleanse.cli import main
from netcleanse.keras import _snake_case

from conftest import write_model_h5


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def entry(class_name, name, inbound=None, **config):
    out = {"class_name": class_name, "name": name, "config": {"name": name, **config}}
    if inbound is not None:
        out["inbound_nodes"] = [[[src, 0, 0, {}] for src in inbound]]
    return out


def write_h5(path, config, weights, keras_version="2.9.0"):
    """tf.keras 2.x whole-model .h5 (see the module doc)."""
    return write_model_h5(path, config, weights, keras_version=keras_version)


def rng_weights(seed):
    rng = np.random.default_rng(seed)
    return rng, (lambda *shape: rng.normal(size=shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The GTSRB failure: BatchNormalization after Dense (rank 2), with Rescaling(1/255) in front


def gtsrb_config():
    return {"class_name": "Sequential", "config": {"name": "gtsrb", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, 8, 8, 3]}},
        {"class_name": "Rescaling", "config": {"name": "rescale", "scale": 1 / 255, "offset": 0.0}},
        {"class_name": "Conv2D", "config": {"name": "conv", "filters": 4, "kernel_size": [3, 3], "strides": [1, 1],
                                            "padding": "same", "activation": "relu", "use_bias": True}},
        {"class_name": "MaxPooling2D", "config": {"name": "pool", "pool_size": [2, 2], "padding": "valid"}},
        {"class_name": "Flatten", "config": {"name": "flat"}},
        {"class_name": "Dense", "config": {"name": "fc", "units": 128, "activation": "relu"}},
        {"class_name": "BatchNormalization", "config": {"name": "bn", "axis": -1, "epsilon": 0.001,
                                                        "center": True, "scale": True}},
        {"class_name": "Dropout", "config": {"name": "drop", "rate": 0.5}},
        {"class_name": "Dense", "config": {"name": "out", "units": 43, "activation": "softmax"}}]}}


def gtsrb_weights(seed=0):
    rng, r = rng_weights(seed)
    return {"conv": [("kernel", r(3, 3, 3, 4)), ("bias", r(4))],
            "fc": [("kernel", r(64, 128) / 4), ("bias", r(128))],
            "bn": [("gamma", r(128)), ("beta", r(128)), ("moving_mean", r(128)),
                   ("moving_variance", rng.uniform(0.5, 2, 128).astype(np.float32))],
            "out": [("kernel", r(128, 43)), ("bias", r(43))]}


def gtsrb_reference(x255, w):
    """Keras's output for NHWC input in 0..255."""
    W = {k: dict(v) for k, v in w.items()}
    z = x255 / 255
    pad = np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = W["conv"]["kernel"]
    conv = np.zeros(z.shape[:3] + (4,))
    for i in range(8):
        for j in range(8):
            conv[:, i, j] = np.einsum("nhwc,hwco->no", pad[:, i:i + 3, j:j + 3], k)
    z = np.maximum(conv + W["conv"]["bias"], 0)
    z = z.reshape(len(z), 4, 2, 4, 2, 4).max(axis=(2, 4))
    z = np.maximum(z.reshape(len(z), -1) @ W["fc"]["kernel"] + W["fc"]["bias"], 0)
    bn = W["bn"]
    z = bn["gamma"] * (z - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) + bn["beta"]
    return np_softmax(z @ W["out"]["kernel"] + W["out"]["bias"])


def test_batchnorm_after_dense_builds_and_matches(tmp_path):
    weights = gtsrb_weights()
    model = load_model(write_h5(tmp_path / "gtsrb.h5", gtsrb_config(), weights), input_scale=255)
    assert model.num_classes == 43 and model.input_shape == (3, 8, 8)
    x = np.random.default_rng(5).uniform(size=(6, 8, 8, 3))
    got = model.predict_proba(torch.from_numpy(x).float().permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - gtsrb_reference(x * 255, weights)).max() < 1e-5
    # one image at a time too (the original failure was a batch of one in training mode)
    one = model.predict_proba(torch.from_numpy(x[:1]).float().permute(0, 3, 1, 2)).numpy()
    assert np.abs(one - got[:1]).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# The CIFAR failure: a Normalization layer (adapted: its mean/variance are weights)


def cifar_config(per_channel_rescale=False, normalization=None):
    norm = normalization or {"axis": -1, "mean": None, "variance": None, "invert": False}
    layers = [
        entry("InputLayer", "img", None, batch_input_shape=[None, 6, 6, 3]),
        entry("Normalization", "norm", ["img"], **norm),
        entry("Rescaling", "scale", ["norm"], scale=[1.0, 0.5, 2.0] if per_channel_rescale else 1.0,
              offset=[0.0, 0.1, -0.1] if per_channel_rescale else 0.0),
        entry("Conv2D", "conv", ["scale"], filters=3, kernel_size=[1, 1], strides=[1, 1], padding="valid",
              activation="linear", use_bias=True),
        entry("GlobalAveragePooling2D", "gap", ["conv"]),
        entry("Dense", "out", ["gap"], units=10, activation="softmax"),
    ]
    return {"class_name": "Functional", "config": {"name": "cifar", "layers": layers,
                                                   "input_layers": [["img", 0, 0]],
                                                   "output_layers": [["out", 0, 0]]}}


def cifar_weights(seed=1, adapted=True):
    rng, r = rng_weights(seed)
    w = {"conv": [("kernel", r(1, 1, 3, 3)), ("bias", r(3))], "out": [("kernel", r(3, 10)), ("bias", r(10))]}
    if adapted:
        w["norm"] = [("mean", np.array([0.49, 0.48, 0.45], np.float32)),
                     ("variance", np.array([0.06, 0.059, 0.068], np.float32)), ("count", np.int64(50000))]
    return w


def cifar_reference(x, w, mean, variance, scale=1.0, offset=0.0, invert=False):
    W = {k: dict(v) for k, v in w.items()}
    std = np.maximum(np.sqrt(variance), 1e-7)
    z = mean + x * std if invert else (x - mean) / std
    z = z * np.asarray(scale) + np.asarray(offset)
    z = np.einsum("nhwc,co->nhwo", z, W["conv"]["kernel"][0, 0]) + W["conv"]["bias"]
    return np_softmax(z.mean(axis=(1, 2)) @ W["out"]["kernel"] + W["out"]["bias"])


@pytest.mark.parametrize("per_channel", [False, True])
def test_adapted_normalization_and_rescaling_match(tmp_path, per_channel):
    weights = cifar_weights()
    model = load_model(write_h5(tmp_path / "cifar.h5", cifar_config(per_channel), weights))
    x = np.random.default_rng(2).uniform(size=(5, 6, 6, 3))
    got = model.predict_proba(torch.from_numpy(x).float().permute(0, 3, 1, 2)).numpy()
    norm = dict(weights["norm"])
    expected = cifar_reference(x, weights, norm["mean"], norm["variance"],
                               [1.0, 0.5, 2.0] if per_channel else 1.0, [0.0, 0.1, -0.1] if per_channel else 0.0)
    assert np.abs(got - expected).max() < 1e-5
    assert int(model.net.norm.count) == 50000
    # exported back to Keras weights, the layer keeps its three weights (count stays an integer)
    from netcleanse.keras import save_keras_weights
    with h5py.File(save_keras_weights(model, tmp_path / "back.h5"), "r") as h5:
        group = h5["model_weights/norm"]
        names = [n.decode() for n in group.attrs["weight_names"]]
        assert names == ["norm/mean:0", "norm/variance:0", "norm/count:0"]
        assert group["norm/count:0"].dtype == np.int64


@pytest.mark.parametrize("normalization, mean, variance, invert", [
    ({"axis": -1, "mean": [0.5, 0.4, 0.3], "variance": [0.04, 0.09, 0.16], "invert": False},
     np.array([0.5, 0.4, 0.3]), np.array([0.04, 0.09, 0.16]), False),
    ({"axis": None, "mean": 0.5, "variance": 0.25, "invert": True}, 0.5, 0.25, True),  # one value for all
    ({"axis": [-1], "mean": {"class_name": "__numpy__", "config": {"value": [0.1, 0.2, 0.3], "dtype": "float32"}},
      "variance": {"class_name": "__numpy__", "config": {"value": [1.0, 4.0, 0.0], "dtype": "float32"}},
      "invert": False}, np.array([0.1, 0.2, 0.3]), np.array([1.0, 4.0, 0.0]), False),  # Keras 3's arrays
])
def test_normalization_with_values_in_the_config(tmp_path, normalization, mean, variance, invert):
    weights = cifar_weights(adapted=False)
    model = load_model(write_h5(tmp_path / "n.h5", cifar_config(normalization=normalization), weights))
    x = np.random.default_rng(3).uniform(size=(4, 6, 6, 3))
    got = model.predict_proba(torch.from_numpy(x).float().permute(0, 3, 1, 2)).numpy()
    expected = cifar_reference(x, weights, mean, np.asarray(variance, np.float32), invert=invert)
    assert np.abs(got - expected).max() < 1e-4


def test_normalization_over_height_and_width(tmp_path):
    """Normalization(axis=(1, 2)): one mean per pixel position, shared by the channels."""
    rng = np.random.default_rng(4)
    mean, variance = rng.uniform(size=(6, 6)).astype(np.float32), rng.uniform(0.5, 2, (6, 6)).astype(np.float32)
    weights = dict(cifar_weights(adapted=False), norm=[("mean", mean), ("variance", variance),
                                                       ("count", np.int64(7))])
    norm = {"axis": [1, 2], "mean": None, "variance": None, "invert": False}
    model = load_model(write_h5(tmp_path / "hw.h5", cifar_config(normalization=norm), weights))
    x = rng.uniform(size=(3, 6, 6, 3))
    got = model.predict_proba(torch.from_numpy(x).float().permute(0, 3, 1, 2)).numpy()
    expected = cifar_reference(x, weights, mean[None, :, :, None], variance[None, :, :, None])
    assert np.abs(got - expected).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Keras 3 .keras archives


def keras3_sequential():
    def layer(class_name, **config):
        return {"module": "keras.layers", "class_name": class_name, "config": config, "registered_name": None}
    return {"module": "keras", "class_name": "Sequential", "registered_name": None, "config": {
        "name": "sequential", "trainable": True, "layers": [
            layer("InputLayer", name="input_layer", batch_shape=[None, 8, 8, 3], dtype="float32"),
            layer("Normalization", name="normalization", axis=[-1], mean=None, variance=None, invert=False),
            layer("Conv2D", name="conv2d", filters=4, kernel_size=[3, 3], strides=[1, 1], padding="same",
                  activation="relu", use_bias=True, data_format="channels_last"),
            layer("MaxPooling2D", name="max_pooling2d", pool_size=[2, 2], strides=[2, 2], padding="valid"),
            layer("Flatten", name="flatten"),
            layer("Dense", name="dense", units=128, activation="relu", use_bias=True),
            layer("BatchNormalization", name="batch_normalization", axis=-1, epsilon=0.001, center=True,
                  scale=True),
            layer("Dense", name="dense_1", units=43, activation="softmax", use_bias=True)]}}


def write_keras(path, config, variables, extra=None, keras_version="3.5.0"):
    """A Keras 3 .keras archive (see the module doc); ``variables``: h5 path -> list of arrays."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_group("vars")
        for where, arrays in variables.items():
            group = h5.create_group(f"{where}/vars")
            for i, array in enumerate(arrays):
                group.create_dataset(str(i), data=array)
        if extra:
            extra(h5)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": keras_version, "date_saved": "2026-01-01"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", buffer.getvalue())
    return path


def gtsrb_keras3_variables(seed=0):
    w = {k: [a for _, a in v] for k, v in gtsrb_weights(seed).items()}
    norm = [np.array([120.0, 110.0, 100.0], np.float32), np.array([3600.0, 3000.0, 4000.0], np.float32),
            np.int64(1000)]
    return {"layers/normalization": norm, "layers/conv2d": w["conv"], "layers/dense": w["fc"],
            "layers/batch_normalization": w["bn"], "layers/dense_1": w["out"]}


def test_keras3_archive_matches_numpy(tmp_path, capsys):
    variables = gtsrb_keras3_variables()
    path = write_keras(tmp_path / "gtsrb.keras", keras3_sequential(), variables)
    model = load_model(path, input_scale=255)
    assert model.num_classes == 43 and model.input_shape == (3, 8, 8)
    x = np.random.default_rng(6).uniform(size=(4, 8, 8, 3))
    mean, var = variables["layers/normalization"][:2]
    normalised = (x * 255 - mean) / np.sqrt(var)
    # the reference divides by 255 first; undo that so it sees the normalised input
    expected = gtsrb_reference(normalised * 255, {"conv": list(zip(["kernel", "bias"], variables["layers/conv2d"])),
                                                   "fc": list(zip(["kernel", "bias"], variables["layers/dense"])),
                                                   "bn": list(zip(["gamma", "beta", "moving_mean", "moving_variance"],
                                                                  variables["layers/batch_normalization"])),
                                                   "out": list(zip(["kernel", "bias"], variables["layers/dense_1"]))})
    got = model.predict_proba(torch.from_numpy(x).float().permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() < 1e-5
    with pytest.raises(SystemExit):
        main(["info", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "Keras 3 .keras archive" and info["num_classes"] == 43
    # and its netcleanse checkpoint rebuilds from the stored config
    from netcleanse import save_model
    back = load_model(save_model(model, tmp_path / "m.pt"))
    xt = torch.from_numpy(x).float().permute(0, 3, 1, 2)
    assert torch.allclose(back.logits(xt), model.logits(xt), atol=1e-6)


def test_snake_case_names_follow_keras():
    assert [_snake_case(n) for n in ("Conv2D", "BatchNormalization", "MaxPooling2D", "DepthwiseConv2D", "Dense",
                                     "GlobalAveragePooling2D", "InputLayer")] == [
        "conv2d", "batch_normalization", "max_pooling2d", "depthwise_conv2d", "dense",
        "global_average_pooling2d", "input_layer"]


def one_line(capsys, path, *fragments):
    with pytest.raises(SystemExit) as stopped:
        main(["info", str(path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_keras3_archive_refusals(tmp_path, capsys):
    variables = gtsrb_keras3_variables()
    # a Lambda layer: serialized code, refused before anything is built
    config = keras3_sequential()
    config["config"]["layers"].insert(2, {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
                                          "config": {"name": "lam", "function": {"class_name": "__lambda__",
                                                                                 "config": {"code": "4wEAAA=="}}}})
    one_line(capsys, write_keras(tmp_path / "lambda.keras", config, variables), "Lambda", "refuses to run code")
    # weights that do not fit: a missing layer, a wrong shape, extra weights
    missing = dict(variables)
    del missing["layers/batch_normalization"]
    one_line(capsys, write_keras(tmp_path / "missing.keras", keras3_sequential(), missing),
             "batch_normalization", "has 0 weights")
    wrong = dict(variables, **{"layers/dense": [np.zeros((63, 128), np.float32), np.zeros(128, np.float32)]})
    one_line(capsys, write_keras(tmp_path / "wrong.keras", keras3_sequential(), wrong), "has shape")
    extra = dict(variables, **{"layers/dense_2": [np.zeros(3, np.float32)]})
    one_line(capsys, write_keras(tmp_path / "extra.keras", keras3_sequential(), extra), "does not belong")
    # an HDF5 file inside the archive that points at another file on this machine
    linked = write_keras(tmp_path / "linked.keras", keras3_sequential(), variables,
                         extra=lambda h5: h5.__setitem__("layers/evil", h5py.ExternalLink("/etc/passwd", "/")))
    one_line(capsys, linked, "links to another file")
    # a subclassed model (Python code) and broken JSON
    sub = {"module": "my_project", "class_name": "MyModel", "config": {}, "registered_name": "MyModel"}
    one_line(capsys, write_keras(tmp_path / "sub.keras", sub, {}), "subclassed model")
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("config.json", "{not json")
        archive.writestr("model.weights.h5", b"")
    one_line(capsys, bad, "config.json is not valid JSON")


def test_keras3_archive_zip_bomb_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps(keras3_sequential()))
        with archive.open("model.weights.h5", "w", force_zip64=True) as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(80):  # 80 MiB of zeros, a few hundred KiB stored
                member.write(chunk)
    one_line(capsys, path, "model.weights.h5", "refused")


def test_keras_archive_with_arch_is_refused(tmp_path):
    path = write_keras(tmp_path / "m.keras", keras3_sequential(), gtsrb_keras3_variables())
    with pytest.raises(NetcleanseError, match="records its own architecture"):
        load_model(path, arch="mnist-cnn")


# ---- tf.keras TFOpLambda layers: TensorFlow operations recorded by name -------------------------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _fixture_outputs(name: str, logits: bool = False):
    """A committed tf-keras fixture loaded by netcleanse, its outputs on the fixture's inputs (NHWC
    there), and tf-keras's own; probabilities, or the net's raw outputs with ``logits``."""
    model = load_model(FIXTURES / f"{name}.h5")
    ref = np.load(FIXTURES / f"{name}_reference.npz")
    x = torch.from_numpy(ref["x"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        got = (model(x) if logits else model.predict_proba(x)).numpy()
    return model, got, ref["y"]


def test_tf_keras_operations_are_rebuilt_and_match_tf_keras():
    # a real tf-keras 2.21 file (tests/fixtures/README.md): x * 0.5 + 1.0, tf.nn.relu, a sum of two
    # tensors, / 2.0, - 0.25 and tf.math.sigmoid, each a TFOpLambda layer
    model, got, expected = _fixture_outputs("tfop_lambda_tfkeras221")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    ops = sorted(type(m).__name__ for name, m in model.net.named_children() if name.startswith("tf_"))
    assert ops == ["KerasActivation"] * 2 + ["KerasMerge"] * 5


def test_tf_keras_slicing_and_bias_add_are_rebuilt_and_match_tf_keras():
    # a real tf-keras 2.21 file (tests/fixtures/README.md): keras.applications.vgg16.preprocess_input
    # (caffe mode: x[..., ::-1] then tf.nn.bias_add) and densenet's (torch mode: / 255, bias_add, / std
    # per channel), strided slices of rows, columns and channels, a bias_add and one channel taken (a
    # rank-3 tensor), each a SlicingOpLambda or TFOpLambda layer
    model, got, expected = _fixture_outputs("tf_slicing_tfkeras221", logits=True)  # (the net has no softmax)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    ops = sorted(type(m).__name__ for name, m in model.net.named_children() if name.startswith("tf_"))
    # x * 255 twice and / 255 (numbers); three bias_adds and / std (one number per channel); four slices
    assert ops == ["KerasMerge"] * 3 + ["KerasRescaling"] * 4 + ["KerasSlice"] * 4


def test_tf_keras_augmentation_resizing_center_crop_and_prelu_match_tf_keras():
    # a real tf-keras 2.21 file (tests/fixtures/README.md); Keras 3's are in test_keras_reference.py
    model, got, expected = _fixture_outputs("tf_augment_resize_tfkeras221")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    kinds = [type(m).__name__ for m in model.net.children()]
    assert kinds.count("Identity") == 6 and kinds.count("KerasResizing") == 2 and kinds.count("KerasPReLU") == 2


def _edit_tf_op(tmp_path, function, edit):
    """The slicing fixture with the first call of tf.``function`` edited by ``edit(kwargs)``."""
    path = tmp_path / "model.h5"
    path.write_bytes((FIXTURES / "tf_slicing_tfkeras221.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        op = next(layer for layer in config["config"]["layers"] if layer["config"].get("function") == function)
        edit(op["inbound_nodes"][0][3])
        f.attrs["model_config"] = json.dumps(config)
    return path


@pytest.mark.parametrize("function, edit, message", [
    ("__operators__.getitem", lambda k: k.update(slice_spec=[{"start": 1, "stop": None, "step": None}]),
     "slices the batch axis"),
    ("__operators__.getitem", lambda k: k.update(slice_spec=[{"class_name": "__newaxis__"}]), "is not a slice"),
    ("__operators__.getitem", lambda k: k.update(slice_spec=[{"start": "a", "stop": None, "step": None}]),
     "is not a slice"),
    ("__operators__.getitem", lambda k: k.update(slice_spec=[{"class_name": "__ellipsis__"}] * 2), "indexes 2 axes"),
    ("__operators__.getitem", lambda k: k.update(slice_spec=[{"class_name": "__ellipsis__"}, 7]), "takes position 7"),
    ("__operators__.getitem", lambda k: k.update(slice_spec=[{"class_name": "__ellipsis__"},
                                                             {"start": 5, "stop": 2, "step": None}]), "keeps nothing"),
    ("nn.bias_add", lambda k: k.update(data_format="NCHW"), "channels-first"),
    ("nn.bias_add", lambda k: k.update(bias=[1.0, 2.0]), "adds 2 values to 3 channels"),
    ("nn.bias_add", lambda k: k.update(bias=["input_1", 0, 0]), "list of numbers"),
    ("nn.bias_add", lambda k: k.update(other=1), "argument netcleanse does not rebuild: 'other'"),
    ("math.truediv", lambda k: k.update(y=[1.0, 2.0]), "has 2 values for 3 channels"),
    ("math.truediv", lambda k: k.update(y=[1.0, 0.0, 2.0]), "divides by 0"),
])
def test_tf_keras_slicing_and_bias_add_that_netcleanse_cannot_rebuild_are_refused(tmp_path, function, edit, message):
    with pytest.raises(NetcleanseError, match=message):
        load_model(_edit_tf_op(tmp_path, function, edit))


@pytest.mark.parametrize("function", ["image.resize", "reshape", "__operators__.getitem", "math.reduce_mean",
                                      "nn.conv2d"])
def test_other_tf_keras_operations_are_refused_naming_the_layer(tmp_path, function):
    path = tmp_path / "model.h5"
    path.write_bytes((FIXTURES / "tfop_lambda_tfkeras221.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        op = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "TFOpLambda")
        op["config"]["function"] = function
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(NetcleanseError, match=rf"layer '{op['name']}' is a tf.keras TFOpLambda layer .*"
                                              "does not rebuild"):
        load_model(path)


def test_a_tf_keras_operation_on_something_else_than_a_tensor_or_a_number_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes((FIXTURES / "tfop_lambda_tfkeras221.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        op = next(layer for layer in config["config"]["layers"] if layer["config"].get("function") == "math.multiply")
        op["inbound_nodes"][0][3]["y"] = "half"
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(NetcleanseError, match="neither a tensor, a number nor a list of numbers"):
        load_model(path)


def _keras3_node(*args):
    return {"args": list(args), "kwargs": {}}


def test_keras3_operation_arguments_are_read_as_data_and_odd_ones_refused():
    from netcleanse.keras.config import _node_constants, _node_options
    tensor = {"class_name": "__keras_tensor__", "config": {"keras_history": ["input_layer", 0, 0]}}
    mean = {"class_name": "__tensor__", "config": {"value": [[[[1.0, 2.0, 3.0]]]], "dtype": "float32"}}
    assert _node_options(_keras3_node(tensor, mean), "Subtract") == {"y": [1.0, 2.0, 3.0]}
    assert _node_options(_keras3_node(mean, tensor), "Add") == {"y": [1.0, 2.0, 3.0]}  # commutative
    one = {"class_name": "__tensor__", "config": {"value": [2.5]}}
    assert _node_options(_keras3_node(tensor, one), "Multiply") == {} and _node_constants(_keras3_node(tensor, one)) == {1: 2.5}
    spec = [{"class_name": "__ellipsis__", "config": {}}, {"class_name": "__slice__", "config": {"start": None, "stop": None, "step": -1}}, 2]
    assert _node_options(_keras3_node(tensor, spec), "GetItem") == {
        "slice_spec": [{"class_name": "__ellipsis__"}, {"start": None, "stop": None, "step": -1}, 2]}
    with pytest.raises(NetcleanseError, match="constant tensor first"):
        _node_options(_keras3_node(mean, tensor), "Subtract")
    grid = {"class_name": "__tensor__", "config": {"value": [[1.0, 2.0], [3.0, 4.0]]}}
    with pytest.raises(NetcleanseError, match=r"shape \[2, 2\]; netcleanse rebuilds numbers and one number per channel"):
        _node_options(_keras3_node(tensor, grid), "Add")
    with pytest.raises(NetcleanseError, match="not a box of numbers"):
        _node_options(_keras3_node(tensor, {"class_name": "__tensor__", "config": {"value": [[1.0], "x"]}}), "Add")
    with pytest.raises(NetcleanseError, match="a tensor and an index"):
        _node_options(_keras3_node(tensor), "GetItem")
