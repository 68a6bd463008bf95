"""The size limits are settings (netcleanse.limits): each read from its environment variable where it
is checked, with its default otherwise; every file here is written in the test."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import write_model_h5
from netcleanse import NetcleanseError, limits
from netcleanse.data import load_data, read_image
from netcleanse.model import load_model


def _dense_model(path, units=4, side=4):
    def layer(class_name, **config):
        return {"class_name": class_name, "config": config}
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        layer("InputLayer", name="in", batch_input_shape=[None, side, side, 1]),
        layer("Flatten", name="flat"),
        layer("Dense", name="out", units=units, activation="softmax")]}}
    rng = np.random.default_rng(0)
    weights = {"out": [("kernel", rng.normal(size=(side * side, units)).astype(np.float32)),
                       ("bias", np.zeros(units, np.float32))]}
    return write_model_h5(path, config, weights)


def test_every_limit_has_its_variable_and_default(monkeypatch):
    assert len({limit.env for limit in limits.ALL}) == len(limits.ALL)
    for limit in limits.ALL:
        assert limit.env.startswith("NETCLEANSE_")
        monkeypatch.delenv(limit.env, raising=False)
        assert limit() == limit.default
        monkeypatch.setenv(limit.env, "123")
        assert limit() == 123
    assert limits.LAYER_WEIGHTS.default == 1 << 28 and limits.INPUT_VALUES.default == 48_000_000
    assert limits.IMAGE_PIXELS.default == 16_000_000


@pytest.mark.parametrize("value", ["many", "1.5", "0", "-3"])
def test_a_bad_setting_is_one_error_line(monkeypatch, value):
    monkeypatch.setenv("NETCLEANSE_MAX_LAYER_WEIGHTS", value)
    with pytest.raises(NetcleanseError, match="NETCLEANSE_MAX_LAYER_WEIGHTS must be"):
        limits.LAYER_WEIGHTS()


def test_layer_weights_limit_is_read_where_it_is_checked(tmp_path, monkeypatch):
    path = _dense_model(tmp_path / "m.h5", units=4, side=4)  # 64 weights in the Dense layer
    assert load_model(path).num_classes == 4
    monkeypatch.setenv("NETCLEANSE_MAX_LAYER_WEIGHTS", "63")
    with pytest.raises(NetcleanseError, match="layer 'out' declares 64 weights.*NETCLEANSE_MAX_LAYER_WEIGHTS"):
        load_model(path)
    monkeypatch.setenv("NETCLEANSE_MAX_LAYER_WEIGHTS", "64")
    assert load_model(path).num_classes == 4


def test_input_values_limit(tmp_path, monkeypatch):
    path = _dense_model(tmp_path / "m.h5", side=6)  # 36 values per image
    monkeypatch.setenv("NETCLEANSE_MAX_INPUT_VALUES", "35")
    with pytest.raises(NetcleanseError, match="declares 36 values per image.*NETCLEANSE_MAX_INPUT_VALUES"):
        load_model(path)
    monkeypatch.setenv("NETCLEANSE_MAX_INPUT_VALUES", "36")
    assert load_model(path).input_shape == (1, 6, 6)


def test_expansion_limits(tmp_path, monkeypatch):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.zeros((64, 1, 32, 32), np.uint8), y=np.zeros(64, np.int64))
    assert len(load_data(path)) == 64
    monkeypatch.setenv("NETCLEANSE_SMALL_ARRAY_BYTES", "1024")  # 64 KiB of zeros compress > 200 times
    with pytest.raises(NetcleanseError, match="declares.*NETCLEANSE_MAX_EXPANSION"):
        load_data(path)
    monkeypatch.setenv("NETCLEANSE_MAX_EXPANSION", "100000")
    assert len(load_data(path)) == 64


def test_image_pixels_limit(tmp_path, monkeypatch):
    path = tmp_path / "i.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    monkeypatch.setenv("NETCLEANSE_MAX_IMAGE_PIXELS", "99")
    with pytest.raises(NetcleanseError, match="NETCLEANSE_MAX_IMAGE_PIXELS"):
        read_image(path)
    monkeypatch.setenv("NETCLEANSE_MAX_IMAGE_PIXELS", "100")
    assert read_image(path).shape == (1, 10, 10)


def test_keras_archive_limits(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}))
        archive.writestr("model.weights.h5", b"\0" * 100)
    path = tmp_path / "m.keras"
    path.write_bytes(buffer.getvalue())
    for env, value, message in (("NETCLEANSE_MAX_CONFIG_BYTES", "10", "config.json declares"),
                                ("NETCLEANSE_MAX_WEIGHTS_BYTES", "99", "model.weights.h5 declares"),
                                ("NETCLEANSE_MAX_ARCHIVE_MEMBERS", "1", "the archive has 2 members")):
        with monkeypatch.context() as patch:
            patch.setenv(env, value)
            with pytest.raises(NetcleanseError, match=message):
                load_model(path)
    with pytest.raises(NetcleanseError) as caught:  # within the limits: refused for what it is
        load_model(path)
    assert "declares" not in str(caught.value) and "members" not in str(caught.value)


def test_depthwise_conv_is_bounded_too(tmp_path, monkeypatch):
    """DepthwiseConv2D declares in_channels x depth_multiplier x kernel weights: a huge
    depth_multiplier is refused before the layer is allocated."""
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, 4, 4, 3]}},
        {"class_name": "DepthwiseConv2D", "config": {"name": "dw", "kernel_size": [3, 3],
                                                      "depth_multiplier": 10**9}}]}}
    path = write_model_h5(tmp_path / "m.h5", config, {})
    with pytest.raises(NetcleanseError, match="layer 'dw' declares 27,000,000,000 weights"):
        load_model(path)


def test_hdf5_datasets_of_too_many_chunks_are_refused(tmp_path, monkeypatch):
    """A 2 KB file declaring a 1000 x 1000 dataset in one-byte chunks took seconds to read (64 MiB in
    one-byte chunks: minutes): refused before anything is read, data and model files alike."""
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", shape=(1000, 1, 40, 40), dtype=np.uint8, chunks=(1, 1, 1, 1))
        h5["label"] = np.zeros(1000, np.int64)
    with pytest.raises(NetcleanseError, match=r"dataset /data is split into 1,600,000 chunks \(more than 1,048,576"):
        load_data(path)
    monkeypatch.setenv("NETCLEANSE_MAX_CHUNKS", "2000000")
    assert len(load_data(path)) == 1000
    model = _dense_model(tmp_path / "m.h5")
    with h5py.File(model, "a") as h5:
        group = h5["model_weights"]["out"]
        del group["out/kernel:0"]
        group.create_dataset("out/kernel:0", data=np.zeros((16, 4), np.float32), chunks=(1, 1))
    monkeypatch.setenv("NETCLEANSE_MAX_CHUNKS", "63")
    with pytest.raises(NetcleanseError, match="is split into 64 chunks"):
        load_model(model)
