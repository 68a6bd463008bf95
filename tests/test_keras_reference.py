"""Keras files written by Keras itself, and Keras's own outputs for them.

Keras 3 (with its JAX backend, the ``keras-reference`` extra that ``make setup`` installs) builds
and saves, in a child process, the two kinds of model the format issue reported as failing, with
random weights and non-trivial normalisation statistics:

- a CIFAR-10-style net whose first layer is a ``Normalization`` (mean/variance per channel), with
  ``BatchNormalization`` after a convolution (functional model);
- a GTSRB-style net taking 0..255 pixels through ``Rescaling(1/255)``, with ``BatchNormalization``
  after a ``Dense`` layer (Sequential model);
- the building blocks of Keras's MobileNet/Xception/EfficientNet families: ``SeparableConv2D``,
  ``DepthwiseConv2D``, hard-swish written as arithmetic on tensors (Keras 3 operations with a
  constant operand), ``LayerNormalization``;
- a transfer-learning model: a base model with ``BatchNormalization`` (its name holding a dot, as
  Keras's applications' do) nested in a Sequential;
- a Sequential and a functional model nested in a functional graph (Keras 3 numbers their calls
  differently from Keras 2), with ``LayerNormalization`` and gelu;
- ``keras.applications``' ``preprocess_input`` inside the model in its caffe, torch and tf modes
  (Keras 3 operations: ``GetItem``, ``Stack``, arithmetic with numbers and per-channel constant
  tensors), with strided and reversed slices;

each as a Keras 3 ``.keras`` archive and as a legacy ``.h5`` whole-model file, plus Keras's
``predict`` on random inputs. netcleanse must load every file (its own PyTorch rebuild, no Keras
needed) and give the same probabilities. A model with a ``Lambda`` layer, saved by Keras, must be
refused: loading it would run code from the file. The tests skip where Keras or JAX is missing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from netcleanse import NetcleanseError, load_model
from netcleanse.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None or importlib.util.find_spec("jax") is None,
                                reason="Keras 3 and JAX are not installed (pip install -e '.[keras-reference]')")

WRITER = r'''
import sys
import numpy as np
import keras
from keras import layers

out = sys.argv[1]
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)


def randomise_batchnorm(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomise_batchnorm(layer)
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])


inp = keras.Input((32, 32, 3))
x = layers.Normalization(mean=[0.49, 0.48, 0.45], variance=[0.06, 0.055, 0.07])(inp)
x = layers.Conv2D(8, 3, padding="same")(x)
x = layers.BatchNormalization()(x)
x = layers.Activation("relu")(x)
x = layers.MaxPooling2D()(x)
x = layers.Flatten()(x)
x = layers.Dense(32, activation="relu")(x)
x = layers.Dropout(0.5)(x)
cifar = keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="cifar_normalization")

gtsrb = keras.Sequential([
    keras.Input((32, 32, 3)),
    layers.Rescaling(1 / 255.0),
    layers.Conv2D(8, 3, activation="relu"),
    layers.MaxPooling2D(),
    layers.Flatten(),
    layers.Dense(24),
    layers.BatchNormalization(),
    layers.Activation("relu"),
    layers.Dense(43, activation="softmax"),
], name="gtsrb_batchnorm_after_dense")

# the building blocks of Keras's MobileNet, Xception and EfficientNet families: separable and
# depthwise convolutions, hard-swish written as arithmetic on tensors (Keras 3 stores ``x + 3.0``
# and ``x * (1 / 6)`` as Add/Multiply operations with a constant operand), LayerNormalization
inp = keras.Input((32, 32, 3))
x = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2)(inp)
x = layers.BatchNormalization()(x)
x = x * layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
x = layers.DepthwiseConv2D(3, strides=2, padding="same")(x)
x = layers.LayerNormalization(epsilon=1e-6)(x)
x = x / 6.0 - 0.5
x = layers.GlobalAveragePooling2D()(x)
mobile = keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="mobile_blocks")

# transfer learning's usual shape: a base model with BatchNormalization, nested in a Sequential,
# its name holding a dot as Keras's own applications' names do ("mobilenetv2_1.00_224")
base_in = keras.Input((32, 32, 3))
b = layers.Conv2D(8, 3, strides=2, padding="same")(base_in)
b = layers.BatchNormalization()(b)
b = layers.ReLU(6.0)(b)
b = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(b)
b = layers.BatchNormalization()(b)
base = keras.Model(base_in, layers.ReLU(6.0)(b), name="base_1.00_32")
nested = keras.Sequential([keras.Input((32, 32, 3)), layers.Rescaling(1 / 127.5, offset=-1), base,
                           layers.GlobalAveragePooling2D(), layers.Dense(5, activation="softmax")],
                          name="nested_base")

# nested models called inside a functional graph (Keras 3 numbers their calls from 0), as Keras's
# ConvNeXt does with its stem; with LayerNormalization over the channels and gelu
f_in = keras.Input((32, 32, 3))
stem = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(8, 4, strides=4), layers.LayerNormalization()],
                        name="stem")
y = stem(f_in)
y = layers.Add()([y, layers.Dense(8, activation="gelu")(y)])
head_in = keras.Input((8, 8, 8))
head = keras.Model(head_in, layers.GlobalAveragePooling2D()(head_in), name="head")
functional_nested = keras.Model(f_in, layers.Dense(4, activation="softmax")(head(y)), name="functional_nested")

# keras.applications' preprocess_input inside the model, on 0..255 pixels: caffe mode (x[..., ::-1]
# as GetItem + Stack, minus a per-channel mean tensor), torch mode (/ 255, - mean, / std tensors),
# tf mode (/ 127.5 - 1); with a strided slice and a reversed channel slice after a convolution
p_in = keras.Input((32, 32, 3))
caffe = layers.Conv2D(4, 3, strides=2)(keras.applications.vgg16.preprocess_input(p_in))
caffe = layers.Rescaling(1 / 100.0)(caffe)
torch_mode = layers.Conv2D(4, 3, strides=2)(keras.applications.densenet.preprocess_input(p_in))
tf_mode = layers.Conv2D(4, 3, strides=2)(keras.applications.mobilenet_v2.preprocess_input(p_in))[:, 1:, ::2, :]
pooled = [layers.GlobalAveragePooling2D()(t) for t in (caffe, torch_mode, tf_mode[..., ::-1])]
preprocess_inside = keras.Model(p_in, layers.Dense(6, activation="softmax")(layers.Concatenate()(pooled)),
                                name="preprocess_inside")

# the commonest hand-written normalisation: NumPy arrays in the model's code (Keras 3 records them as
# "__numpy__" operands, not "__tensor__")
n_in = keras.Input((32, 32, 3))
n = (n_in / 255.0 - np.array([0.5, 0.4, 0.3], "float32")) / np.array([0.2, 0.25, 0.3], "float32")
numpy_constants = keras.Model(n_in, layers.Dense(3, activation="softmax")(layers.Flatten()(layers.Conv2D(4, 3)(n))),
                              name="numpy_constants")

# a softmax that is not the last layer: only inference no-ops (Dropout, noise) follow it
d_in = keras.Input((32, 32, 3))
d = layers.Dense(4, activation="softmax")(layers.Flatten()(layers.Conv2D(4, 3, strides=4)(d_in)))
softmax_then_dropout = keras.Model(d_in, layers.GaussianNoise(0.1)(layers.Dropout(0.5)(d)), name="softmax_then_dropout")

for model, scale in ((cifar, 1.0), (gtsrb, 255.0), (mobile, 1.0), (nested, 255.0), (functional_nested, 1.0),
                     (preprocess_inside, 255.0), (numpy_constants, 255.0), (softmax_then_dropout, 1.0)):
    randomise_batchnorm(model)
    x = rng.random((6, 32, 32, 3)).astype("float32")  # pixels in [0, 1]
    np.save(f"{out}/{model.name}_x.npy", x)
    np.save(f"{out}/{model.name}_y.npy", model.predict(x * scale, verbose=0))
    model.save(f"{out}/{model.name}.keras")
    model.save(f"{out}/{model.name}.h5")

# a tutorial-style model: augmentation layers (no-ops at inference), Resizing (bilinear, then
# nearest), CenterCrop and PReLU (shared over the image axes, and one alpha per position)
a_in = keras.Input((40, 36, 3))
a = a_in
for augment in (layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomZoom(0.1),
                layers.RandomTranslation(0.1, 0.1), layers.RandomContrast(0.2), layers.RandomBrightness(0.1)):
    a = augment(a)
a = layers.CenterCrop(28, 28)(layers.Resizing(32, 30)(a))
a = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(6, 3)(a))
a = layers.PReLU()(layers.Conv2D(6, 3, strides=2)(a))
a = layers.Resizing(7, 9, interpolation="nearest")(a)
augmented = keras.Model(a_in, layers.Dense(5, activation="softmax")(layers.Flatten()(a)), name="augment_resize")
for layer in augmented.layers:
    if isinstance(layer, layers.PReLU):
        layer.set_weights([rng.uniform(0.05, 0.5, w.shape) for w in layer.get_weights()])
x = rng.random((6, 40, 36, 3)).astype("float32")
np.save(f"{out}/augment_resize_x.npy", x)
np.save(f"{out}/augment_resize_y.npy", augmented.predict(x, verbose=0))
augmented.save(f"{out}/augment_resize.keras")  # (Keras 3.15's legacy .h5 writer fails on augmentation layers)

# layouts of tutorials and transfer learning: a nested head ending in softmax + Dropout; a softmax
# followed by a linear Activation and a Flatten; a head model on feature vectors; the tutorials'
# nested data_augmentation block before a Rescaling(1/255); grey H x W inputs without a channel axis
h_in = keras.Input((32, 32, 3))
soft_head = keras.Sequential([keras.Input((8, 8, 4)), layers.Flatten(), layers.Dense(5), layers.Softmax(),
                              layers.Dropout(0.1)], name="soft_head")
nested_softmax_head = keras.Model(h_in, soft_head(layers.Conv2D(4, 3, strides=4, padding="same")(h_in)),
                                  name="nested_softmax_head")
s_in = keras.Input((32, 32, 3))
s = layers.Dense(4, activation="softmax")(layers.Flatten()(layers.Conv2D(4, 3, strides=4)(s_in)))
softmax_then_noops = keras.Model(s_in, layers.Flatten()(layers.Activation("linear")(s)), name="softmax_then_noops")
v_in = keras.Input((32, 32, 3))
vector_base = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(8, 3, strides=4)], name="vector_base")
vector_head = keras.Sequential([keras.Input((8,)), layers.Dense(6, activation="softmax")], name="vector_head")
head_on_vectors = keras.Model(v_in, vector_head(layers.GlobalAveragePooling2D()(vector_base(v_in))),
                              name="head_on_vectors")
augmenting = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomGrayscale(),
                               layers.RandomHue(0.2, value_range=(0, 255)), layers.Identity()],
                              name="data_augmentation")
tutorial = keras.Sequential([keras.Input((32, 32, 3)), augmenting, layers.Rescaling(1 / 255.0),
                             layers.Conv2D(4, 3, strides=2, activation="relu"), layers.Flatten(), layers.Dense(5)],
                            name="tutorial_augmentation")
grey_hw = keras.Sequential([keras.Input((28, 28)), layers.Reshape((28, 28, 1)), layers.Conv2D(4, 3, strides=2),
                            layers.Flatten(), layers.Dense(10, activation="softmax")], name="grey_hw")
softmax_axis1 = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(4, 3, strides=4), layers.Flatten(),
                                  layers.Dense(5), layers.Softmax(axis=1)], name="softmax_axis1")
flat_mlp = keras.Sequential([keras.Input((32 * 32 * 3,)), layers.Dense(16, activation="relu"),
                             layers.Dense(7, activation="softmax")], name="flat_mlp")
for model, scale, shape in ((nested_softmax_head, 1.0, (32, 32, 3)), (softmax_then_noops, 1.0, (32, 32, 3)),
                            (head_on_vectors, 1.0, (32, 32, 3)), (tutorial, 255.0, (32, 32, 3)),
                            (grey_hw, 1.0, (28, 28)), (flat_mlp, 1.0, (32, 32, 3)),
                            (softmax_axis1, 1.0, (32, 32, 3))):
    x = rng.random((6,) + shape).astype("float32")
    np.save(f"{out}/{model.name}_x.npy", x)
    fed = x.reshape(len(x), -1) if model is flat_mlp else x  # as Keras users flatten their N x H x W x C images
    np.save(f"{out}/{model.name}_y.npy", model.predict(fed * scale, verbose=0))
    model.save(f"{out}/{model.name}.keras")
flat_mlp.save(f"{out}/flat_mlp.h5")

# bfloat16 weights (which Keras writes to HDF5 as 2-byte opaque values); expected: the float32 net
# with the same (exactly widened) weights
half = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, dtype="bfloat16"),
                         layers.Flatten(dtype="bfloat16"), layers.Dense(4, activation="softmax")], name="bfloat16")
full = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3), layers.Flatten(),
                         layers.Dense(4, activation="softmax")])
full.set_weights([np.asarray(w, dtype="float32") for w in half.get_weights()])
x = rng.random((6, 8, 8, 3)).astype("float32")
np.save(f"{out}/bfloat16_x.npy", x)
np.save(f"{out}/bfloat16_y.npy", full.predict(x, verbose=0))
half.save(f"{out}/bfloat16.keras")
half.save(f"{out}/bfloat16.h5")

quantized = keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(), layers.Dense(4)], name="quantized")
quantized.quantize("int8")
quantized.save(f"{out}/quantized.keras")
quantized.save(f"{out}/quantized.h5")

lam = keras.Sequential([keras.Input((4, 4, 1)), layers.Lambda(lambda t: t * 2.0), layers.Flatten(), layers.Dense(3)],
                       name="with_lambda")
lam.save(f"{out}/with_lambda.keras")
lam.save(f"{out}/with_lambda.h5")
'''

NETS = {"cifar_normalization": 1.0, "gtsrb_batchnorm_after_dense": 255.0, "mobile_blocks": 1.0, "nested_base": 255.0,
        "functional_nested": 1.0, "preprocess_inside": 255.0, "numpy_constants": 255.0, "softmax_then_dropout": 1.0}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras-written")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", WRITER, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_keras_written_models_give_keras_outputs(written, net, suffix):
    x = np.load(written / f"{net}_x.npy")
    expected = np.load(written / f"{net}_y.npy")
    model = load_model(written / f"{net}{suffix}", input_scale=NETS[net])
    assert model.num_classes == expected.shape[1] and tuple(model.input_shape) == (3, 32, 32)
    got = model.predict_proba(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() < 1e-5
    assert (got.argmax(1) == expected.argmax(1)).all()
    if net == "softmax_then_dropout":  # the softmax is found behind the no-ops and left out of the logits
        assert model.net.final_activation == "softmax"


MORE_NETS = {"nested_softmax_head": (1.0, "softmax"), "softmax_then_noops": (1.0, "softmax"),
             "head_on_vectors": (1.0, "softmax"), "tutorial_augmentation": (255.0, "linear"),
             "grey_hw": (1.0, "softmax"), "softmax_axis1": (1.0, "softmax")}  # Softmax(axis=1) on N x K scores


@pytest.mark.parametrize("net", sorted(MORE_NETS))
def test_tutorial_and_transfer_learning_layouts_give_keras_outputs(written, net):
    """A softmax behind no-ops or inside a nested head is left out of the logits (so probabilities
    are Keras's, not a softmax of them); a nested head on feature vectors, a nested block of
    augmentation layers and grey H x W inputs (fed as 1 x H x W) load."""
    scale, final = MORE_NETS[net]
    x, expected = np.load(written / f"{net}_x.npy"), np.load(written / f"{net}_y.npy")
    model = load_model(written / f"{net}.keras", input_scale=scale)
    images = torch.from_numpy(x)[:, None] if x.ndim == 3 else torch.from_numpy(x).permute(0, 3, 1, 2)
    assert tuple(model.input_shape) == tuple(images.shape[1:]) and model.net.final_activation == final
    with torch.no_grad():
        got = (model.predict_proba(images) if final == "softmax" else model(images)).numpy()
    assert np.abs(got - expected).max() < 1e-5


def test_augmentation_resizing_center_crop_and_prelu_give_keras_outputs(written):
    x = np.load(written / "augment_resize_x.npy")
    expected = np.load(written / "augment_resize_y.npy")
    model = load_model(written / "augment_resize.keras")
    assert tuple(model.input_shape) == (3, 40, 36)
    got = model.predict_proba(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() < 1e-5 and (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_keras_written_lambda_layer_is_refused(written, suffix, capsys):
    with pytest.raises(NetcleanseError, match="Lambda"):
        load_model(written / f"with_lambda{suffix}")
    with pytest.raises(SystemExit) as stopped:
        main(["info", str(written / f"with_lambda{suffix}")])
    assert stopped.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "Lambda" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("net", ["gtsrb_batchnorm_after_dense", "nested_base", "tutorial_augmentation"])
def test_a_first_rescaling_by_1_over_255_asks_for_input_scale_255(written, net):
    """Rescaling(1/255) (or 1/127.5 - 1) first: the network was fed 0..255 pixels; loaded at scale 1
    it would see x/255, so the loader says to give --input-scale 255."""
    from netcleanse.errors import NetcleanseWarning
    with pytest.warns(NetcleanseWarning, match="give --input-scale 255"):
        load_model(written / f"{net}.keras")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", NetcleanseWarning)
        load_model(written / f"{net}.keras", input_scale=255)
        load_model(written / "cifar_normalization.keras")  # Normalization first: [0, 1] pixels, nothing to say


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_an_mlp_on_flattened_images_takes_the_image_size(written, suffix, tmp_path):
    """A Keras MLP on vectors (``Input((3072,))``) is given the image size its vectors were
    flattened from (H x W x C order, as NumPy flattens an N x H x W x C array); refused without it
    or with a size of another number of values; a repaired copy saved by netcleanse loads back."""
    from netcleanse import save_model
    x, expected = np.load(written / "flat_mlp_x.npy"), np.load(written / "flat_mlp_y.npy")
    path = written / f"flat_mlp{suffix}"
    with pytest.raises(NetcleanseError, match="vectors of 3072 values .*--input-shape CxHxW"):
        load_model(path)
    with pytest.raises(NetcleanseError, match="3072 values, which --input-shape 1x32x32"):
        load_model(path, input_shape="1x32x32")
    model = load_model(path, input_shape="3x32x32")
    assert model.input_shape == (3, 32, 32) and model.net.final_activation == "softmax"
    images = torch.from_numpy(x).permute(0, 3, 1, 2)
    got = model.predict_proba(images).numpy()
    assert np.abs(got - expected).max() < 1e-5
    back = load_model(save_model(model, tmp_path / "m.pt"))
    assert back.input_shape == (3, 32, 32) and torch.equal(back.logits(images), model.logits(images))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_bfloat16_weights_load_as_float32(written, suffix):
    # Keras writes them as 2-byte opaque HDF5 values (they were "truncated or corrupt")
    model = load_model(written / f"bfloat16{suffix}")
    x = np.load(written / "bfloat16_x.npy")
    got = model.predict_proba(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - np.load(written / "bfloat16_y.npy")).max() < 1e-5


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_quantized_model_is_refused_as_quantized(written, suffix):
    # model.quantize("int8"): integer kernels and scales (was "has 3 weights ... the layer takes 2")
    with pytest.raises(NetcleanseError, match=r"layer 'dense\w*' \(Dense\) is quantized \(int8"):
        load_model(written / f"quantized{suffix}")
