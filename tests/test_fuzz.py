"""Property-based fuzzing of the readers of untrusted files: models (Keras .h5/.keras, PyTorch .pt,
safetensors, ONNX) and data (.npz, .h5, PNG). The contract: a loaded object or a one-line
NetcleanseError, never another exception, within a memory cap, and no file opened but the one under
test (ReadGuard: a Python audit hook plus inotify on the file's folder and on canary files).

The default suite runs a short budget; a long one runs with the same tests:
``NETCLEANSE_FUZZ_EXAMPLES=2000 pytest -q tests/test_fuzz.py`` (see SECURITY.md). Examples are the
same every run; ``NETCLEANSE_FUZZ_RANDOM=1`` draws new ones. Inputs are random
bytes, real files from ../shared and files written here by h5py, NumPy, PIL and torch, with bytes
flipped, truncated or headers rewritten.
"""

from __future__ import annotations

import io
import json
import os
import sys
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
from netcleanse.keras.builders import TF_OPS  # noqa: E402

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


# ---- "never a read outside the file" ------------------------------------------------------------------
#
# Two witnesses, because readers open files from Python (torch, numpy, onnx, PIL, zipfile) and from C
# (the HDF5 library, safetensors' Rust):
# - a Python audit hook records every path opened, listed or scanned while a reader runs; anything but
#   the file under test and the interpreter's own files (imports) fails the example;
# - inotify watches the file's folder and a folder of canary files beside it: any open of another
#   file there, from any code, fails the example; so does a canary left open or mapped afterwards.
# The loaders are run once on every seed before fuzzing, so that imports happen outside the guard.

_AUDITED = ("open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile", "os.symlink", "os.link")
_IN_ACCESS, _IN_OPEN, _IN_ISDIR = 0x1, 0x20, 0x40000000


def _system_roots() -> tuple[str, ...]:
    """Folders imports legitimately read: the interpreter, site-packages, netcleanse's source, the
    tests; and the kernel's pseudo-files."""
    import site
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
             str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parent),
             str(Path(np.__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parents[1]),
             "/proc", "/sys", "/dev"}
    return tuple(sorted({os.path.realpath(r) for r in roots} - {"/"}))


class ReadGuard:
    """While active, records what the process opens (module comment above); :meth:`check` fails the
    test when anything but ``allowed`` (and the system roots) was opened."""

    active: "ReadGuard | None" = None
    roots: tuple[str, ...] = ()

    def __init__(self, allowed, watch=()):
        self.allowed = {os.path.realpath(p) for p in allowed}
        self.watch = [os.path.realpath(p) for p in watch]
        self.seen: list[tuple[str, str]] = []
        self._inotify, self._wds = -1, {}

    def __enter__(self):
        self.cwd = os.getcwd()
        if _LIBC is not None and self.watch:
            self._inotify = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            for where in self.watch:
                wd = _LIBC.inotify_add_watch(self._inotify, os.fsencode(where), _IN_OPEN | _IN_ACCESS)
                if wd >= 0:
                    self._wds[wd] = where
        ReadGuard.active = self
        return self

    def __exit__(self, *exc):
        ReadGuard.active = None
        if self._inotify >= 0:
            self._drain()
            os.close(self._inotify)
        self._open_now()
        return False

    def _drain(self) -> None:
        import struct
        while True:
            try:
                data = os.read(self._inotify, 65536)
            except BlockingIOError:
                return
            at = 0
            while at + 16 <= len(data):
                wd, mask, _cookie, size = struct.unpack_from("iIII", data, at)
                name = data[at + 16:at + 16 + size].rstrip(b"\0").decode(errors="replace")
                at += 16 + size
                where = self._wds.get(wd, "?")
                path = os.path.join(where, name) if name else where
                if not (mask & _IN_ISDIR and not name):  # the watched folder itself: seen by the audit hook
                    self.seen.append(("inotify", path))

    def _open_now(self) -> None:
        """Files of the watched folders still open or mapped after the reader returned."""
        watched = tuple(w + os.sep for w in self.watch)
        if not watched or not os.path.isdir("/proc/self/fd"):
            return
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(watched):
                self.seen.append(("open fd", target))
        with open("/proc/self/maps") as maps:
            for line in maps:
                target = line.rstrip("\n").split(maxsplit=5)[-1]
                if target.startswith(watched):
                    self.seen.append(("mapped", target))

    def outside(self) -> list[tuple[str, str]]:
        bad = []
        for event, path in self.seen:
            real = os.path.realpath(os.path.join(self.cwd, path))
            if real in self.allowed or real.startswith(tuple(r + os.sep for r in ReadGuard.roots)) \
                    or real in ReadGuard.roots:
                continue
            bad.append((event, path))
        return bad

    def check(self) -> None:
        bad = self.outside()
        assert not bad, f"the reader touched files other than its own: {bad[:5]}"


def _audit(event, args):
    guard = ReadGuard.active
    if guard is None or event not in _AUDITED or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        guard.seen.append((event, os.fsdecode(path)))


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
ReadGuard.roots = _system_roots()
sys.addaudithook(_audit)


def _contract(load, path: Path, also=(), watch=None):
    """Either it loads or it says why in a NetcleanseError; anything else fails the test. The reader
    may open ``path`` (and ``also``) and nothing else (see ReadGuard). Returns what was loaded."""
    watch = [Path(path).parent] if watch is None else watch
    loaded = None
    with ReadGuard([path, *also], watch) as guard:
        try:
            loaded = load(path)
        except NetcleanseError as exc:
            assert "\n" not in str(exc).strip(), f"not one line: {exc!r}"
    guard.check()
    return loaded


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


@pytest.fixture(autouse=True, scope="module")
def warm_readers(tmp_path_factory):
    """Every reader once on its seed before the fuzzing, so that its imports happen outside the
    ReadGuard (which allows the interpreter's own files anyway) and outside the memory cap."""
    folder = tmp_path_factory.mktemp("warm")
    for seed, blob in {**MODEL_SEEDS, **{f"data{k}": v for k, v in DATA_SEEDS.items()}}.items():
        suffix = ".h5" if seed.endswith(".h5") else Path(seed).suffix or seed
        path = folder / f"w{suffix}"
        path.write_bytes(blob)
        try:
            if seed.startswith("data"):
                load_data(path)
            else:
                load_model(path, arch=None if "tfkeras" in seed or seed in (".keras", ".onnx") else "mnist-cnn")
        except Exception:  # noqa: BLE001 - only the imports matter here
            pass


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


# ---- files that try to make a reader read another file ------------------------------------------------
#
# Each example writes canary files in a folder "outside" beside the model's folder (also the working
# directory, so that names relative to it reach them) and a file that points at one of them: an HDF5
# external link, external storage or virtual dataset (in an .h5 model, an .h5 data file, the weights
# inside a .keras archive), an ONNX external-data tensor (in an .onnx file or in the ONNX bytes of a
# netcleanse checkpoint), paths in safetensors metadata and checkpoint fields, .keras members named
# out of the archive. Whatever the reader does, it opens no canary (ReadGuard), the canaries' bytes
# do not reach what it loaded, and nothing is written outside.

PATTERN = np.array([7.25, -3.5, 1234.5, 0.001], np.float32).tobytes()  # 16 bytes, unlike any seed's


def _canary_bytes(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:max(n, 64)]


def _holds_canary(blob: bytes) -> bool:
    doubled = PATTERN * 2
    return any(doubled[i:i + len(PATTERN)] in blob for i in range(len(PATTERN)))


def _loaded_bytes(loaded) -> bytes:
    """The bytes of what a reader returned: a model's tensors (and stored ONNX graph), a data set's
    images (as the uint8 values they were read from) and labels."""
    if loaded is None:
        return b""
    if hasattr(loaded, "net"):
        parts = [t.detach().contiguous().numpy().tobytes() for t in loaded.net.state_dict().values()
                 if isinstance(t, torch.Tensor)]
        parts += [getattr(m, "onnx_bytes", b"") for m in loaded.net.modules()]
        return b"".join(parts)
    parts = [(loaded.x * 255).round().clamp(0, 255).to(torch.uint8).numpy().tobytes()]
    if loaded.y is not None:
        parts.append(loaded.y.numpy().tobytes())
    return b"".join(parts)


TARGETS = ("absolute", "relative to the file", "relative to the working folder", "link in the file's folder")


def _target(case: Path, name: str, how: str) -> str:
    """How a file names the canary ``outside/name``."""
    canary = case / "outside" / name
    if how == "absolute":
        return str(canary)
    if how == "relative to the file":
        return f"../outside/{name}"
    if how == "relative to the working folder":
        return name
    link = case / "model" / f"link-{name}"
    if not link.is_symlink():
        link.symlink_to(canary)
    return link.name


def _h5_point(h5: h5py.File, key: str, kind: str, case: Path, how: str) -> None:
    """Replace dataset ``key`` of an open HDF5 file by one whose data lives in a canary file."""
    shape, dtype = h5[key].shape, h5[key].dtype
    del h5[key]
    if kind == "external storage":
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        (case / "outside" / "canary.bin").write_bytes(_canary_bytes(nbytes))
        h5.create_dataset(key, shape=shape, dtype=dtype, external=[(_target(case, "canary.bin", how), 0, nbytes)])
        return
    values = np.frombuffer(_canary_bytes(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize), dtype)
    with h5py.File(case / "outside" / "canary.h5", "w") as canary:
        canary["w"] = values[:int(np.prod(shape, dtype=np.int64))].reshape(shape)
    target = _target(case, "canary.h5", how)
    if kind == "external link":
        h5[key] = h5py.ExternalLink(target, "/w")
    else:  # virtual dataset
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(target, "w", shape=shape)
        h5.create_virtual_dataset(key, layout)


def _h5_keys(blob: bytes) -> list[str]:
    keys = []
    with h5py.File(io.BytesIO(blob), "r") as h5:
        h5.visititems(lambda name, item: keys.append(name) if isinstance(item, h5py.Dataset) else None)
    return sorted(keys)


def _keras_members(weights: bytes, extra: list[str], case: Path) -> bytes:
    """The .keras seed with ``weights`` as its model.weights.h5, plus members named out of the archive
    and a member stored as a symbolic link to the canary."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(MODEL_SEEDS[".keras"])) as seed, \
            zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for info in seed.infolist():
            out.writestr(info.filename, weights if info.filename == "model.weights.h5" else seed.read(info))
        for name in extra:
            if name == "symlink":
                link = zipfile.ZipInfo("model.weights.link")
                link.external_attr = (0o120777 << 16)
                out.writestr(link, str(case / "outside" / "canary.h5"))
            else:
                out.writestr(name, PATTERN * 8)
    return buffer.getvalue()


def _onnx_point(blob: bytes, index: int, case: Path, how: str, bounds: tuple[int, int] | None) -> bytes:
    import onnx
    model = onnx.load_model_from_string(blob)
    tensor = model.graph.initializer[index % len(model.graph.initializer)]
    nbytes = max(int(np.prod(tensor.dims, dtype=np.int64)), 1) * 4
    (case / "outside" / "canary.bin").write_bytes(_canary_bytes(nbytes))
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=_target(case, "canary.bin", how))
    if bounds is not None:
        tensor.external_data.add(key="offset", value=str(bounds[0]))
        tensor.external_data.add(key="length", value=str(bounds[1]))
    return model.SerializeToString()


_ONNX_CHECKPOINT: list[bytes] = []


def _onnx_checkpoint() -> bytes:
    """A netcleanse checkpoint of the ONNX seed (its ONNX bytes are then replaced), made once."""
    if not _ONNX_CHECKPOINT:
        import tempfile
        from netcleanse.torch_io import save_model
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "m.onnx").write_bytes(MODEL_SEEDS[".onnx"])
            _ONNX_CHECKPOINT.append(save_model(load_model(Path(folder) / "m.onnx"), Path(folder) / "m.pt").read_bytes())
    return _ONNX_CHECKPOINT[0]


POINTING = ["h5 model", "h5 data", "keras weights", "keras members", "safetensors metadata", "checkpoint fields"]
if ".onnx" in MODEL_SEEDS:
    POINTING += ["onnx", "onnx in a checkpoint"]


@FUZZ
@given(kind=st.sampled_from(POINTING), h5_kind=st.sampled_from(["external link", "external storage", "virtual"]),
       how=st.sampled_from(TARGETS), index=st.integers(0, 1000),
       bounds=st.one_of(st.none(), st.tuples(st.integers(0, 4096), st.integers(0, 1 << 20))),
       extra=st.lists(st.sampled_from(["../outside/canary.h5", "/tmp/netcleanse-canary.h5", "symlink",
                                       "model.weights.h5/../../outside/x"]), max_size=3, unique=True))
def test_files_pointing_at_other_files(tmp_path, kind, h5_kind, how, index, bounds, extra):
    import contextlib
    import uuid
    case = tmp_path / uuid.uuid4().hex
    (case / "model").mkdir(parents=True)
    (case / "outside").mkdir()
    (case / "outside" / "canary.h5").write_bytes(b"")  # replaced by the cases that need it
    arch = "mnist-cnn"
    if kind in ("h5 model", "h5 data"):
        seed = MODEL_SEEDS[".h5"] if kind == "h5 model" else DATA_SEEDS[".h5"]
        path = case / "model" / ("m.h5" if kind == "h5 model" else "d.h5")
        path.write_bytes(seed)
        keys = _h5_keys(seed)
        with h5py.File(path, "r+") as h5:
            _h5_point(h5, keys[index % len(keys)], h5_kind, case, how)
    elif kind in ("keras weights", "keras members"):
        arch = None
        with zipfile.ZipFile(io.BytesIO(MODEL_SEEDS[".keras"])) as seed:
            weights = seed.read("model.weights.h5")
        if kind == "keras weights":
            keys = [k for k in _h5_keys(weights) if k.startswith("layers/")]
            buffer = io.BytesIO(weights)
            with h5py.File(buffer, "r+") as h5:
                _h5_point(h5, keys[index % len(keys)], h5_kind, case, how)
            weights = buffer.getvalue()
        path = case / "model" / "m.keras"
        path.write_bytes(_keras_members(weights, extra if kind == "keras members" else [], case))
    elif kind == "safetensors metadata":
        from safetensors.torch import save as save_safetensors
        from netcleanse.architectures import SmallCNN
        (case / "outside" / "canary.bin").write_bytes(_canary_bytes(4096))
        target = _target(case, "canary.bin", how)
        metadata = {"format": "pt", "location": target, "external_data": target, "__file__": target}
        path = case / "model" / "m.safetensors"
        path.write_bytes(save_safetensors(SmallCNN(10).state_dict(), metadata=metadata))
    elif kind == "checkpoint fields":
        (case / "outside" / "canary.py").write_text(
            f"open({str(case / 'outside' / 'ran')!r}, 'w').close()\nimport torch\nNet = torch.nn.Linear\n")
        target = _target(case, "canary.py", how)
        ckpt = torch.load(io.BytesIO(MODEL_SEEDS[".pt"]), weights_only=True)
        ckpt.update([("arch", f"{target}:Net"), ("source", target), ("keras_config", target)][:1 + index % 3])
        path = case / "model" / "m.pt"
        torch.save(ckpt, path)
        arch = None
    elif kind == "onnx":
        arch = None
        path = case / "model" / "m.onnx"
        path.write_bytes(_onnx_point(MODEL_SEEDS[".onnx"], index, case, how, bounds))
    else:  # ONNX bytes inside a netcleanse checkpoint
        arch = None
        ckpt = torch.load(io.BytesIO(_onnx_checkpoint()), weights_only=True)
        pointing = _onnx_point(MODEL_SEEDS[".onnx"], index, case, how, bounds)
        ckpt["onnx_model"] = torch.frombuffer(bytearray(pointing), dtype=torch.uint8).clone()
        path = case / "model" / "m.pt"
        torch.save(ckpt, path)
    before = {p: p.read_bytes() for p in (case / "outside").iterdir()}
    load = load_data if kind == "h5 data" else (lambda p: load_model(p, arch=arch))
    with contextlib.chdir(case / "outside"):
        loaded = _contract(load, path, watch=[case / "model", case / "outside"])
    assert not _holds_canary(_loaded_bytes(loaded)), "a canary's bytes reached the loaded object"
    assert {p: p.read_bytes() for p in (case / "outside").iterdir()} == before, "something was written outside"
    assert sorted(p.name for p in (case / "model").iterdir() if not p.name.startswith("link-")) == [path.name]
    assert not Path("/tmp/netcleanse-canary.h5").exists()


def test_read_guard_sees_python_and_c_reads(tmp_path):
    """The witness itself: a Python open and an HDF5 read of external storage (from C) of a file other
    than the one under test are both caught."""
    other = tmp_path / "other.bin"
    other.write_bytes(PATTERN * 4)
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("w", shape=(16,), dtype=np.float32, external=[(str(other), 0, 64)])
    with ReadGuard([path], [tmp_path]) as guard:
        other.read_bytes()
    assert ("open", str(other)) in guard.outside(), guard.seen
    if _LIBC is None:
        pytest.skip("no inotify here: only the Python witness is checked")
    with ReadGuard([path], [tmp_path]) as guard:
        with h5py.File(path, "r") as h5:
            assert _holds_canary(h5["w"][()].tobytes())
    assert ("inotify", str(other)) in [(e, os.path.realpath(p)) for e, p in guard.outside()], guard.seen


# ---- random Keras configs ------------------------------------------------------------------------------
#
# Sequential and Functional model configs with known and unknown layer classes, any sizes (small ones
# mostly, so that some models build; zero, negative and huge ones too), nested models, missing and
# mistyped fields; written into a whole-model .h5 or a .keras archive with weights laid out for the
# config (as netcleanse's own exporter lays them out, then perturbed) or at random.

def _weighted(*choices):
    """One of the strategies, drawn with the given weights: ``_weighted((8, a), (1, b))``
    (``st.one_of`` draws each branch alike); examples shrink towards the first."""
    total = sum(weight for weight, _ in choices)

    def pick(roll):
        for weight, strategy in choices:
            if roll < weight:
                return strategy
            roll -= weight
    return st.integers(0, total - 1).flatmap(pick)


def _sizes(small: int = 8):
    """Mostly small, sometimes larger, now and then zero, negative or huge."""
    return _weighted((16, st.integers(1, small)), (2, st.integers(small + 1, 64)),
                     (1, st.sampled_from([0, -1, 100_000, 2**31, 10**12])))


_JUNK = st.one_of(st.none(), st.text(max_size=4), st.floats(), st.booleans(), st.lists(st.integers(-2, 5), max_size=3),
                  st.dictionaries(st.sampled_from(["class_name", "config", "value"]), st.integers(), max_size=2))


def _mostly(good):
    """``good`` values, one time in twelve something of another type."""
    return _weighted((11, good), (1, _JUNK))


_PAIR = _mostly(st.one_of(_sizes(4), st.lists(_sizes(4), min_size=2, max_size=2)))
_ACTIVATION = _mostly(st.sampled_from(["relu", "softmax", "linear", "sigmoid", "tanh", "elu", "selu", "swish",
                                       "hard_sigmoid", "softplus", "relu6", "not_an_activation", None]))
_PADDING = _mostly(st.sampled_from(["valid", "same", "causal"]))
_FLOAT = _mostly(st.floats(-4, 4))
_AXIS = _mostly(st.one_of(st.integers(-4, 4), st.lists(st.integers(-4, 4), max_size=2)))
_PADS = _mostly(st.one_of(_sizes(3), st.lists(_sizes(3), min_size=2, max_size=2),
                          st.lists(st.lists(_sizes(3), min_size=2, max_size=2), min_size=2, max_size=2)))
_ARRAY = _mostly(st.one_of(st.none(), st.floats(-2, 2), st.lists(st.floats(-2, 2), min_size=1, max_size=4),
                           st.lists(st.lists(st.floats(), max_size=2), max_size=2)))
_FORMAT = _weighted((19, st.just("channels_last")), (1, st.just("channels_first")))

LAYER_FIELDS = {
    "Conv2D": {"filters": _sizes(), "kernel_size": _PAIR, "strides": _PAIR, "padding": _PADDING,
               "activation": _ACTIVATION, "use_bias": st.booleans(), "dilation_rate": _PAIR,
               "groups": _mostly(st.integers(1, 3)), "data_format": _FORMAT},
    "DepthwiseConv2D": {"kernel_size": _PAIR, "depth_multiplier": _sizes(3), "strides": _PAIR, "padding": _PADDING,
                        "activation": _ACTIVATION, "use_bias": st.booleans()},
    "SeparableConv2D": {"filters": _sizes(), "kernel_size": _PAIR, "depth_multiplier": _sizes(3), "strides": _PAIR,
                        "padding": _PADDING, "activation": _ACTIVATION, "use_bias": st.booleans(),
                        "dilation_rate": _PAIR},
    "Dense": {"units": _sizes(16), "activation": _ACTIVATION, "use_bias": st.booleans()},
    "MaxPooling2D": {"pool_size": _PAIR, "strides": st.one_of(st.none(), _PAIR), "padding": _PADDING},
    "AveragePooling2D": {"pool_size": _PAIR, "strides": st.one_of(st.none(), _PAIR), "padding": _PADDING},
    "GlobalAveragePooling2D": {"keepdims": st.booleans()},
    "GlobalMaxPooling2D": {"keepdims": st.booleans()},
    "Flatten": {},
    "Dropout": {"rate": _FLOAT},
    "Reshape": {"target_shape": _mostly(st.lists(_sizes(), max_size=4))},
    "Permute": {"dims": _mostly(st.one_of(st.permutations([1, 2, 3]), st.lists(st.integers(-1, 4), max_size=4)))},
    "Activation": {"activation": _ACTIVATION},
    "ReLU": {"max_value": st.one_of(st.none(), _FLOAT), "negative_slope": _FLOAT, "threshold": _FLOAT},
    "LeakyReLU": {"alpha": _FLOAT, "negative_slope": _FLOAT},
    "ELU": {"alpha": _FLOAT},
    "Softmax": {"axis": _AXIS},
    "BatchNormalization": {"axis": _AXIS, "epsilon": _FLOAT, "momentum": _FLOAT, "center": st.booleans(),
                           "scale": st.booleans()},
    "LayerNormalization": {"axis": st.one_of(_AXIS, st.lists(_AXIS, max_size=3)), "epsilon": _FLOAT,
                           "center": st.booleans(), "scale": st.booleans(), "rms_scaling": _mostly(st.just(False))},
    "ZeroPadding2D": {"padding": _PADS},
    "Cropping2D": {"cropping": _PADS},
    "UpSampling2D": {"size": _PAIR, "interpolation": _mostly(st.sampled_from(["nearest", "bilinear"]))},
    "Rescaling": {"scale": _ARRAY, "offset": _ARRAY},
    "Normalization": {"axis": st.one_of(st.none(), _AXIS), "mean": _ARRAY, "variance": _ARRAY,
                      "invert": st.booleans()},
    "Add": {}, "Concatenate": {"axis": _AXIS}, "Multiply": {}, "Average": {}, "Maximum": {}, "Subtract": {},
}
# classes netcleanse does not rebuild (or refuses: code)
UNKNOWN_LAYERS = {"Lambda": {"function": st.text(max_size=8)},
                  "TFOpLambda": {"function": st.text(max_size=8).filter(lambda f: f not in TF_OPS)},
                  "LSTM": {"units": _sizes()}, "Conv3D": {"filters": _sizes()}, "MyCustomLayer": {"units": _sizes()}}
# the fields a layer cannot do without (left out one time in twenty)
REQUIRED = {"Conv2D": ("filters", "kernel_size"), "DepthwiseConv2D": ("kernel_size",),
            "SeparableConv2D": ("filters", "kernel_size"), "Dense": ("units",),
            "Reshape": ("target_shape",), "Permute": ("dims",)}
_MERGE = {"Add", "Concatenate", "Multiply", "Average", "Maximum", "Subtract"}
# the layers of a plain convolutional classifier, drawn more often so that many models build
_COMMON = ["Conv2D", "Conv2D", "Dense", "Dense", "MaxPooling2D", "Flatten", "Flatten", "Activation",
           "BatchNormalization", "GlobalAveragePooling2D", "Dropout"]


def _input_entry(draw, name: str) -> dict:
    dims = _weighted((30, st.integers(1, 12)), (3, st.integers(13, 40)), (1, st.none()),
                     (1, st.sampled_from([0, -2, 100_000, 10**9])))
    shape = [None] + draw(_weighted((12, st.lists(dims, min_size=3, max_size=3)), (1, st.lists(dims, max_size=5))))
    key = draw(_weighted((12, st.just("batch_input_shape")), (4, st.just("batch_shape")), (3, st.just("input_shape")),
                         (1, st.just("none"))))
    config = {"name": name, "dtype": "float32"}
    if key == "input_shape":
        config["input_shape"] = shape[1:]
    elif key != "none":
        config[key] = shape
    return {"class_name": "InputLayer", "config": config, "name": name}


@st.composite
def keras_configs(draw, depth: int = 0, prefix: str = ""):
    """A Keras model config (a dict), Sequential or Functional, maybe with nested models."""
    functional = draw(st.booleans())
    count = draw(st.integers(1, 6))
    entries, names = [], []
    input_name = f"{prefix}input"
    if functional or draw(st.integers(0, 29)):
        entries.append(_input_entry(draw, input_name))
        names.append(input_name)
    for i in range(count):
        name = f"{prefix}l{i}"
        if depth < 2 and draw(st.integers(0, 19)) == 0:
            entry = draw(keras_configs(depth + 1, prefix=f"{name}_"))
            entry["config"]["name"] = entry["name"] = name
        else:
            roll = draw(st.integers(0, 99))
            pool = sorted(UNKNOWN_LAYERS) if roll < 2 else _COMMON if roll < 60 else sorted(LAYER_FIELDS)
            class_name = pool[draw(st.integers(0, len(pool) - 1))]
            fields = LAYER_FIELDS[class_name] if class_name in LAYER_FIELDS else UNKNOWN_LAYERS[class_name]
            required = REQUIRED.get(class_name, ()) if draw(st.integers(0, 19)) else ()
            config = draw(st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                                optional={k: v for k, v in fields.items() if k not in required}))
            config["name"] = name
            entry = {"class_name": class_name, "config": config, "name": name}
            if draw(st.integers(0, 39)) == 0:
                entry["module"] = draw(st.sampled_from(["keras.layers", "my_package.layers", "tf_keras.layers"]))
                entry["registered_name"] = draw(st.sampled_from([class_name, "Custom>Layer", None]))
        if functional and names:
            sources = [names[draw(st.integers(0, len(names) - 1))]]
            if entry["class_name"] in _MERGE:
                sources.append(names[draw(st.integers(0, len(names) - 1))])
            dangling = draw(st.integers(0, 99)) == 57
            entry["inbound_nodes"] = [[[("nowhere" if dangling else s), 0, 0, {}] for s in sources]]
        entries.append(entry)
        names.append(name)
    if draw(st.booleans()):  # a classifier's tail: Flatten, Dense(softmax)
        for name, class_name, config in ((f"{prefix}flat", "Flatten", {}),
                                         (f"{prefix}out", "Dense", {"units": draw(st.integers(1, 12)),
                                                                    "activation": "softmax"})):
            entry = {"class_name": class_name, "config": {"name": name, **config}, "name": name}
            if functional:
                entry["inbound_nodes"] = [[[names[-1], 0, 0, {}]]]
            entries.append(entry)
            names.append(name)
    if functional:
        last = names[-1] if draw(st.integers(0, 49)) else "nowhere"
        config = {"name": prefix or "model", "layers": entries, "input_layers": [[input_name, 0, 0]],
                  "output_layers": [[last, 0, 0]]}
        return {"class_name": draw(st.sampled_from(["Functional", "Model"])), "config": config,
                "name": prefix or "model"}
    return {"class_name": "Sequential", "config": {"name": prefix or "model", "layers": entries},
            "name": prefix or "model"}


def _matching_weights(config: dict) -> list[tuple[str, list[tuple[str, np.ndarray]]]] | None:
    """The weights netcleanse's own exporter writes for ``config`` (None when it does not build, or
    builds a model of more than a million weights per layer: the fuzzer writes small files)."""
    from netcleanse.keras import graph_from_config, keras_layer_weights
    saved = os.environ.get("NETCLEANSE_MAX_LAYER_WEIGHTS")
    os.environ["NETCLEANSE_MAX_LAYER_WEIGHTS"] = "1000000"
    try:
        return keras_layer_weights(graph_from_config(json.loads(json.dumps(config))))
    except (NetcleanseError, MemoryError, RecursionError):
        return None
    finally:
        if saved is None:
            del os.environ["NETCLEANSE_MAX_LAYER_WEIGHTS"]
        else:
            os.environ["NETCLEANSE_MAX_LAYER_WEIGHTS"] = saved


_WEIGHT_NAMES = ["kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance", "depthwise_kernel", "mean",
                 "variance", "count", "junk"]


def _random_array(draw) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.int64, np.uint8, np.float16]))
    return np.full(shape, draw(st.floats(-2, 2, width=16)), dtype)


def _perturbed(draw, layers):
    """Weights for the layers: random ones, or the matching ones with a few changed."""
    out = []
    for name, weights in layers:
        weights = list(weights)
        if weights and draw(st.integers(0, 9)) == 0:
            del weights[draw(st.integers(0, len(weights) - 1))]
        elif weights and draw(st.integers(0, 9)) == 0:
            i = draw(st.integers(0, len(weights) - 1))
            weights[i] = (weights[i][0], _random_array(draw))
        elif draw(st.integers(0, 14)) == 0:
            weights.append((f"{name}/{draw(st.sampled_from(_WEIGHT_NAMES))}:0", _random_array(draw)))
        if draw(st.integers(0, 29)):
            out.append((name, weights))
    return out


def _write_whole_model_h5(path: Path, config: dict, layers, version: str) -> None:
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(config).encode()
        h5.attrs["keras_version"] = version.encode()
        root = h5.create_group("model_weights")
        root.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        for name, weights in layers:
            group = root.create_group(name)
            group.attrs["weight_names"] = np.array([w.encode() for w, _ in weights])
            for weight_name, array in weights:
                if weight_name not in group:
                    group.create_dataset(weight_name, data=array)


def _write_keras_archive(path: Path, config: dict, layers, version: str) -> None:
    from netcleanse.keras import _snake_case
    classes = {e.get("name") or e["config"].get("name"): e.get("class_name")
               for e in (config["config"]["layers"] if isinstance(config.get("config"), dict) else [])}
    weights, seen = io.BytesIO(), {}
    with h5py.File(weights, "w") as h5:
        for name, arrays in layers:
            key = _snake_case(str(classes.get(name, "layer")))
            count = seen.get(key)
            seen[key] = 0 if count is None else count + 1
            key = key if count is None else f"{key}_{count + 1}"
            group = h5.require_group(f"layers/{key}/vars")
            for i, (_, array) in enumerate(arrays):
                group[str(i)] = array
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", json.dumps({"keras_version": version}))
        archive.writestr("model.weights.h5", weights.getvalue())
    path.write_bytes(buffer.getvalue())


@FUZZ
@given(st.data(), keras_configs(), st.sampled_from([".h5", ".h5", ".keras"]),
       st.sampled_from(["2.3.1", "2.15.0", "3.3.3"]))
def test_random_keras_configs(tmp_path, data, config, suffix, version):
    layers = _matching_weights(config) if data.draw(st.integers(0, 3)) else None
    if layers is None:
        names = [e.get("name") for e in config["config"]["layers"]]
        layers = [(n, [(f"{n}/{data.draw(st.sampled_from(_WEIGHT_NAMES))}:0", _random_array(data.draw))
                       for _ in range(data.draw(st.integers(0, 2)))]) for n in names if isinstance(n, str)]
    layers = _perturbed(data.draw, layers) if data.draw(st.booleans()) else layers
    path = tmp_path / f"m{suffix}"
    (_write_keras_archive if suffix == ".keras" else _write_whole_model_h5)(path, config, layers, version)
    loaded = _contract(load_model, path)
    if loaded is not None:  # a model that loads answers
        x = torch.rand((2,) + tuple(loaded.input_shape))
        assert loaded.logits(x).shape == (2, loaded.num_classes)
        assert ((loaded.predict(x) >= 0) & (loaded.predict(x) < loaded.num_classes)).all()
