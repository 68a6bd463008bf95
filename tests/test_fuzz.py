"""Property-based fuzzing of the readers of untrusted files: models (Keras .h5, PyTorch .pt) and data
(.npz, .h5, PNG). The contract: a loaded object or a NetcleanseError, never another exception.

The default suite runs a short budget; a long one runs with the same tests:
``NETCLEANSE_FUZZ_EXAMPLES=2000 pytest -q tests/test_fuzz.py`` (see SECURITY.md). Examples are the
same every run; ``NETCLEANSE_FUZZ_RANDOM=1`` draws new ones. Inputs are random
bytes, real files from ../shared and files written here by h5py, NumPy, PIL and torch, with bytes
flipped, truncated or headers rewritten.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from netcleanse import NetcleanseError  # noqa: E402
from netcleanse.data import load_data  # noqa: E402
from netcleanse.model import load_model  # noqa: E402

EXAMPLES = int(os.environ.get("NETCLEANSE_FUZZ_EXAMPLES", "40"))
# the same examples every run (CI must not turn red by chance); NETCLEANSE_FUZZ_RANDOM=1 explores anew
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("NETCLEANSE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
from conftest import CSAW as SHARED  # the CSAW material (reference files)


@pytest.fixture(autouse=True, scope="module")
def memory_cap():
    """Every fuzz example runs under a 16 GiB address-space cap: a reader that tries to allocate what a
    file merely declares fails with MemoryError, which the contract then rejects (unless the reader
    turned it into a NetcleanseError itself)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = 16 << 30 if hard == resource.RLIM_INFINITY else min(hard, 16 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _contract(load, path: Path) -> None:
    """Either it loads or it says why in a NetcleanseError; anything else fails the test."""
    try:
        load(path)
    except NetcleanseError as exc:
        assert "\n" not in str(exc).strip(), f"not one line: {exc!r}"


def _model_seeds() -> dict[str, bytes]:
    from netcleanse.architectures import SmallCNN
    from netcleanse.model import Classifier
    from netcleanse.torch_io import save_model
    out = {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"netcleanse-fuzz-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    model = Classifier(SmallCNN(10).eval(), (1, 28, 28), 10, name="seed", arch="mnist-cnn")
    for suffix in (".pt", ".h5"):
        out[suffix] = save_model(model, tmp / f"seed{suffix}").read_bytes()
    from safetensors.torch import save as save_safetensors
    out[".safetensors"] = save_safetensors(model.net.state_dict())
    out[".keras"] = _keras3_seed()
    try:  # the legacy exporter runs offline; skip the seed where onnx is absent
        import warnings
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.net, torch.zeros(1, 1, 28, 28), buffer, dynamo=False, opset_version=17)
        out[".onnx"] = buffer.getvalue()
    except Exception:  # noqa: BLE001
        pass
    for name in ("sunglasses_bd_net_tfkeras.h5",):
        if (SHARED / "reference" / name).is_file():
            out[name] = (SHARED / "reference" / name).read_bytes()
    return out


def _keras3_seed() -> bytes:
    """A small Keras 3 .keras archive (layout as in tests/test_keras_formats.py)."""
    import json
    def layer(class_name, **config):
        return {"module": "keras.layers", "class_name": class_name, "config": config}
    layers = [layer("InputLayer", name="in", batch_shape=[None, 6, 6, 1]),
              layer("Normalization", name="norm", axis=[-1], mean=None, variance=None),
              layer("Flatten", name="flat"), layer("Dense", name="d", units=8, activation="relu"),
              layer("BatchNormalization", name="bn"), layer("Dense", name="out", units=3, activation="softmax")]
    config = {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": layers}}
    weights = io.BytesIO()
    rng = np.random.default_rng(0)
    with h5py.File(weights, "w") as h5:
        for where, arrays in {"normalization": [np.zeros(1, np.float32), np.ones(1, np.float32), np.int64(1)],
                              "dense": [rng.normal(size=(36, 8)).astype(np.float32), np.zeros(8, np.float32)],
                              "batch_normalization": [np.ones(8, np.float32), np.zeros(8, np.float32),
                                                      np.zeros(8, np.float32), np.ones(8, np.float32)],
                              "dense_1": [rng.normal(size=(8, 3)).astype(np.float32), np.zeros(3, np.float32)]}.items():
            group = h5.create_group(f"layers/{where}/vars")
            for i, array in enumerate(arrays):
                group[str(i)] = array
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", weights.getvalue())
    return buffer.getvalue()


def _data_seeds() -> dict[str, bytes]:
    out = {}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.random.default_rng(0).integers(0, 255, (6, 1, 8, 8), dtype=np.uint8),
                        y=np.arange(6))
    out[".npz"] = buffer.getvalue()
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f["data"] = np.zeros((4, 3, 8, 8), np.uint8)
        f["label"] = np.arange(4)
    out[".h5"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, format="PNG")
    out[".png"] = buffer.getvalue()
    return out


MODEL_SEEDS = _model_seeds()
DATA_SEEDS = _data_seeds()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        buf[position % len(buf)] = value
    return bytes(buf[:cut % len(buf)] if cut is not None else buf)


edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=12)
cuts = st.one_of(st.none(), st.integers(0, 2**31))


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([".h5", ".pt", ".keras", ".safetensors", ".onnx", ""]))
def test_random_bytes_as_a_model(tmp_path, blob, suffix):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(blob)
    _contract(lambda p: load_model(p, arch="mnist-cnn"), path)


@FUZZ
@given(st.sampled_from(sorted(MODEL_SEEDS)), edits, cuts)
def test_mutated_model_files(tmp_path, seed, changes, cut):
    suffix = ".h5" if seed.endswith(".h5") else seed
    path = tmp_path / f"m{suffix}"
    path.write_bytes(_mutate(MODEL_SEEDS[seed], changes, cut))
    arch = None if "tfkeras" in seed or seed in (".keras", ".onnx") else "mnist-cnn"
    _contract(lambda p: load_model(p, arch=arch), path)


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([".npz", ".h5", ".png", ".jpg"]))
def test_random_bytes_as_data(tmp_path, blob, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(blob)
    _contract(load_data, path)


@FUZZ
@given(st.sampled_from(sorted(DATA_SEEDS)), edits, cuts)
def test_mutated_data_files(tmp_path, seed, changes, cut):
    path = tmp_path / f"d{seed}"
    path.write_bytes(_mutate(DATA_SEEDS[seed], changes, cut))
    _contract(load_data, path)


@FUZZ
@given(st.lists(st.integers(0, 10**12), min_size=0, max_size=5), st.sampled_from(["|u1", "<f4", "<i8", "|b1", "<U3"]))
def test_npz_headers_declaring_any_shape(tmp_path, shape, descr):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    buffer.write(b"\0" * 256)
    with zipfile.ZipFile(tmp_path / "d.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", buffer.getvalue())
        z.writestr("y.npy", _npy(np.zeros(2, np.int64)))
    _contract(load_data, tmp_path / "d.npz")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@FUZZ
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=5))
def test_h5_datasets_declaring_any_shape(tmp_path, shape):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=tuple(shape), dtype=np.uint8, chunks=tuple(1 for _ in shape) if all(shape) else None)
        f["label"] = np.zeros(2, np.int64)
    _contract(load_data, path)


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "version", "kind", "arch", "num_classes", "input_shape",
                                        "input_scale", "state_dict", "keras_config", "labels", "neurons"]),
                       st.one_of(st.none(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=20),
                                 st.lists(st.integers(-5, 10**10), max_size=4))))
def test_checkpoint_dicts_with_any_fields(tmp_path, fields):
    base = torch.load(io.BytesIO(MODEL_SEEDS[".pt"]), weights_only=True)
    base.update(fields)
    path = tmp_path / "m.pt"
    torch.save(base, path)
    _contract(load_model, path)
