"""A Keras file's config is checked against the weights the same file declares before any layer is
allocated (netcleanse.crosscheck); every file here is written in the test."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import write_model_h5
from netcleanse import NetcleanseError, load_model
from netcleanse import keras as keras_module


def _dense_config(units: list[int], side: int = 4) -> dict:
    layers = [{"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, side, side, 1]}},
              {"class_name": "Flatten", "config": {"name": "flat"}}]
    layers += [{"class_name": "Dense", "config": {"name": f"d{i}", "units": u}} for i, u in enumerate(units)]
    return {"class_name": "Sequential", "config": {"name": "s", "layers": layers}}


def _dense_weights(units: list[int], side: int = 4) -> dict:
    sizes, rng, out = [side * side] + units, np.random.default_rng(0), {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        out[f"d{i}"] = [("kernel", rng.normal(size=(a, b)).astype(np.float32)), ("bias", np.zeros(b, np.float32))]
    return out


@pytest.fixture
def no_dense_allocation(monkeypatch):
    """Fails the test if a Dense layer of more than 10,000 weights is allocated."""
    original = keras_module.KerasDense.__init__

    def guarded(self, in_features, out_features, *args, **kwargs):
        assert in_features * out_features <= 10_000, f"allocated a {in_features} x {out_features} Dense layer"
        original(self, in_features, out_features, *args, **kwargs)
    monkeypatch.setattr(keras_module.KerasDense, "__init__", guarded)


def test_matching_files_load(tmp_path):
    path = write_model_h5(tmp_path / "m.h5", _dense_config([8, 3]), _dense_weights([8, 3]))
    assert load_model(path).num_classes == 3


def test_a_kernel_unlike_the_files_is_refused_before_allocation(tmp_path, no_dense_allocation):
    """units=1,000,000 in the config (16 million weights, within the per-layer limit) where the file
    stores a 16 x 8 kernel: refused before the layer is built."""
    path = write_model_h5(tmp_path / "m.h5", _dense_config([1_000_000, 3]), _dense_weights([8, 3]))
    with pytest.raises(NetcleanseError, match=r"layer 'd0': the config declares a kernel of shape \(16, 1000000\) "
                                              r"but the file stores one of shape \(16, 8\)"):
        load_model(path)


def test_layers_without_weights_in_the_file_cannot_add_up(tmp_path, no_dense_allocation):
    """Layers the file holds no weights for (here named differently) may not declare, together, more
    values than the file's weights hold."""
    config = _dense_config([8, 3])
    for entry in config["config"]["layers"][2:]:
        entry["config"]["name"] = "other_" + entry["config"]["name"]
    config["config"]["layers"][2]["config"]["units"] = 100_000
    path = write_model_h5(tmp_path / "m.h5", config, _dense_weights([8, 3]))
    with pytest.raises(NetcleanseError, match="the config's layers up to 'other_d0' declare 1,600,000 weights but "
                                              "the file holds only 0"):
        load_model(path)


def test_many_small_sparse_weights_are_refused_as_a_whole(tmp_path):
    """Each array may declare up to 64 MiB without backing (compression); a file of many such arrays
    declaring together far more than it stores is refused before anything is built."""
    path = write_model_h5(tmp_path / "m.h5", _dense_config([8, 3]), _dense_weights([8, 3]))
    with h5py.File(path, "a") as h5:
        group = h5["model_weights"]["d0"]
        names = [n.decode() for n in group.attrs["weight_names"]]
        for i in range(40):  # 40 x 32 MiB declared, a few KB stored
            group.create_dataset(f"d0/extra{i}:0", shape=(8 << 20,), dtype=np.float32, chunks=(1024,))
            names.append(f"d0/extra{i}:0")
        group.attrs["weight_names"] = np.array([n.encode() for n in names])
    with pytest.raises(NetcleanseError, match="weights group declares 1,342,[0-9,]* bytes but the file stores only"):
        load_model(path)
