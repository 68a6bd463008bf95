"""Scans and screens through a local Ray instance (``ray.init(num_cpus=2)``), compared with the local
executor; one worker is killed on purpose. Skipped when Ray is not installed (``make setup``
installs it: the ``ray`` extra)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'netcleanse[ray]'); "
                                          "the --executor ray tests need it")

from netcleanse.data import Dataset, save_data  # noqa: E402
from netcleanse.executor import LocalExecutor, RayExecutor, make_executor  # noqa: E402
from netcleanse.errors import NetcleanseError  # noqa: E402
from netcleanse.presets import PRESETS  # noqa: E402
from netcleanse.scanning import scan  # noqa: E402

from conftest import N_CLASSES, TARGET, ctrl_c_at_search, make_data, train_tiny  # noqa: E402

scan_module = importlib.import_module("netcleanse.scanning")


@pytest.fixture(scope="module")
def ray_instance():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every Ray task runs (one CPU, one thread): same arithmetic
    # a fresh local instance, never a cluster another program started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the killing wrapper below lives in this test module, which workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["conftest"])  # TinyNet's module
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture
def small_chunks(monkeypatch):
    """3 labels per chunk (3 coarse + 3 refinement chunks of the 8-label model), so that chunks
    really are spread over the two workers. The driver's plan travels with every task."""
    fast = PRESETS["fast"]
    small = scan_module.replace(fast, coarse=scan_module.replace(fast.coarse, label_chunk=3),
                                refine=scan_module.replace(fast.refine, label_chunk=3),
                                few_labels_refine=scan_module.replace(fast.few_labels_refine, label_chunk=3))
    monkeypatch.setitem(PRESETS, "fast", small)


class _KillFirst:
    """Wraps a task function: the first task to run (anywhere) kills its own worker process
    (``os._exit``, as a crash or an OOM kill would), leaving a marker so that Ray's retry runs."""

    def __init__(self, fn, marker: str):
        self.fn, self.marker = fn, marker

    def __call__(self, shared, item, progress):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.fn(shared, item, progress)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


class KillOneWorker(RayExecutor):
    def __init__(self, marker, **options):
        super().__init__(**options)
        self.marker = str(marker)

    def map(self, fn, shared, items, on_progress=None, failures=False):
        return super().map(_KillFirst(fn, self.marker), shared, items, on_progress, failures)


def _strip(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_scan_on_ray_equals_local_even_after_a_worker_dies(ray_instance, badnet, clean_data, small_chunks, tmp_path):
    local = scan(badnet, clean_data, seed=5, out=tmp_path / "local", progress=False)
    on_ray = scan(badnet, clean_data, seed=5, out=tmp_path / "ray", progress=False, executor=RayExecutor())
    assert local.flagged == on_ray.flagged == [TARGET]
    # same chunks, same seeds, one torch thread on both sides: the same arithmetic, bit for bit
    assert _strip(on_ray.labels) == _strip(local.labels)
    assert np.array_equal(on_ray.masks, local.masks) and np.array_equal(on_ray.patterns, local.patterns)
    saved = json.loads((tmp_path / "ray" / "scan.json").read_text())
    assert saved["settings"]["executor"] == "ray" and saved["settings"]["ray_cpus"] == 2
    # every chunk journalled: 3 coarse, 3 refinement, 1 of margins (8 labels: one margin chunk) and
    # the transferability (few labels: measured with data too, in this process)
    stages = [json.loads(line)["stage"] for line in (tmp_path / "ray" / "progress.jsonl").read_text().splitlines()]
    assert len(stages) == 8 and stages.count("transfer") == 1

    marker = tmp_path / "killed"
    killed = scan(badnet, clean_data, seed=5, progress=False, executor=KillOneWorker(marker, max_retries=2))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert killed.flagged == [TARGET]
    assert _strip(killed.labels) == _strip(local.labels) and np.array_equal(killed.masks, local.masks)


def _die(shared, item, progress):
    os._exit(1)


class AlwaysDie(RayExecutor):
    def map(self, fn, shared, items, on_progress=None, failures=False):
        return super().map(_die, shared, items, on_progress, failures)


def _die_on_crasher(shared, job, progress):
    from netcleanse.screening import _screen_one
    if job[1] == "crasher":
        os._exit(1)  # as a worker killed for its memory, every time
    return _screen_one(shared, job, progress)


class CrasherDies(RayExecutor):
    def map(self, fn, shared, items, on_progress=None, failures=False):
        return super().map(_die_on_crasher, shared, items, on_progress, failures)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript files
def test_a_screen_model_whose_worker_always_dies_is_an_error_row(ray_instance, zoo, tmp_path):
    from netcleanse.screening import ScreenEntry, screen
    entries = [ScreenEntry(str(zoo["clean"]), name="crasher", data_free=True, labels="0-2"),
               ScreenEntry(str(zoo["badnet"]), name="good", data_free=True, labels="0-2")]
    result = screen(entries, tmp_path / "s", progress=False, report=False, executor=CrasherDies(max_retries=1))
    assert "failed 2 times (its worker or node died)" in result.rows[0]["error"]
    assert result.rows[1]["error"] is None and result.rows[1]["verdict"] is not None


def _warn(shared, item, progress):
    import warnings
    from netcleanse.errors import NetcleanseWarning
    warnings.warn(f"item {item} looks odd", NetcleanseWarning)
    return item


def test_task_warnings_reach_the_caller_and_a_closed_executor_is_refused(ray_instance):
    from netcleanse.errors import NetcleanseWarning
    executor = RayExecutor()
    with pytest.warns(NetcleanseWarning, match="item 7 looks odd"):  # not the worker's log, as a local run
        assert dict(executor.map(_warn, None, [7])) == {0: 7}
    executor.close()
    with pytest.raises(NetcleanseError, match="this Ray executor is closed"):
        list(executor.map(_double, 1, [1]))


def test_an_address_where_nothing_answers_is_one_error_not_a_hang(monkeypatch):
    import socket
    with socket.socket() as probe:  # a free port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init would retry for minutes"))
    with pytest.raises(NetcleanseError, match=f"cannot connect to the Ray cluster at 127.0.0.1:{port}: nothing answers"):
        RayExecutor(f"127.0.0.1:{port}")


def test_worker_dying_every_time_is_one_error(ray_instance, badnet, clean_data):
    with pytest.raises(NetcleanseError, match="failed 2 times"):
        scan(badnet, clean_data, labels=[0, 1], progress=False, executor=AlwaysDie(max_retries=1))


def test_interrupted_local_scan_resumes_on_ray(ray_instance, badnet, clean_data, small_chunks, tmp_path):
    whole = scan(badnet, clean_data, seed=2, progress=False)
    with ctrl_c_at_search(3), pytest.raises(KeyboardInterrupt):  # in this process only
        scan(badnet, clean_data, seed=2, out=tmp_path / "cut", progress=False)
    assert len((tmp_path / "cut" / "progress.jsonl").read_text().splitlines()) == 2
    resumed = scan(badnet, clean_data, seed=2, out=tmp_path / "cut", resume=True, progress=False,
                   executor=RayExecutor())
    assert resumed.flagged == whole.flagged and _strip(resumed.labels) == _strip(whole.labels)
    assert np.array_equal(resumed.masks, whole.masks)


def test_task_errors_reach_the_caller_as_themselves(ray_instance):
    with pytest.raises(NetcleanseError, match="^no labels"):
        list(RayExecutor().map(_raise, None, [1]))
    assert dict(LocalExecutor().map(_double, 10, [1, 2])) == {0: 12, 1: 14}
    assert dict(RayExecutor().map(_double, 10, [1, 2, 3])) == {0: 12, 1: 14, 2: 16}


def _raise(shared, item, progress):
    raise NetcleanseError("no labels to scan")


def _double(shared, item, progress):
    return shared + 2 * item


def test_executor_names():
    with pytest.raises(NetcleanseError, match="unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(NetcleanseError, match="--ray-address is for --executor ray"):
        make_executor("local", "127.0.0.1:6379")


def test_without_an_address_the_instance_is_private(monkeypatch):
    """The default (no --ray-address) is a private local instance, as the docs say, even on a machine
    where a Ray cluster already runs: ray.init() alone would join that cluster (and refuse num_cpus)."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    RayExecutor(num_cpus=1)
    RayExecutor("auto")
    assert [c["address"] for c in calls] == ["local", "auto"] and calls[0]["num_cpus"] == 1
    assert "num_cpus" not in calls[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from test_screen import write_zoo
    return write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript files
def test_screen_on_ray_equals_local_with_a_killed_worker_and_a_bad_file(ray_instance, zoo, tmp_path):
    from netcleanse.model import load_model
    from netcleanse.screening import make_entries, screen
    entries = make_entries([zoo["badnet"], zoo["clean"], zoo["broken"]], data=zoo["data"], labels="0-5")
    local = screen(entries, tmp_path / "local", seed=3, progress=False, report=False)
    marker = tmp_path / "killed"
    on_ray = screen(entries, tmp_path / "ray", seed=3, progress=False, report=False,
                    executor=KillOneWorker(marker, max_retries=2))
    assert marker.exists()  # one model's task lost its worker and was rerun
    keep = ("name", "verdict", "flagged", "p_value", "labels")
    assert [{k: r[k] for k in keep} for r in on_ray.rows] == [{k: r[k] for k in keep} for r in local.rows]
    assert on_ray.rows[0]["flagged"] == [TARGET] and on_ray.rows[2]["error"] == local.rows[2]["error"]
    for name in ("badnet", "clean"):  # the folders the driver wrote from the workers' results
        a = scan_module.ScanResult.load(tmp_path / "local" / "models" / name)
        b = scan_module.ScanResult.load(tmp_path / "ray" / "models" / name)
        assert _strip(a.labels) == _strip(b.labels) and np.array_equal(a.masks, b.masks)
    # resumable on Ray too: nothing left to do, the same rows
    again = screen(entries, tmp_path / "ray", seed=3, progress=False, report=False, resume=True, executor=RayExecutor())
    assert [r["verdict"] for r in again.rows] == [r["verdict"] for r in on_ray.rows]

    # a TorchScript model's scan ships through the object store (as jit bytes) and gives the same result
    model, data = load_model(zoo["badnet"]), Dataset(*make_data(200, torch.Generator().manual_seed(99)))
    assert _strip(scan(model, data, labels=[0, 4, 5], progress=False, executor=RayExecutor()).labels) == \
        _strip(scan(model, data, labels=[0, 4, 5], progress=False).labels)
    # data-free: the input synthesis's parts are tasks too, and give the same inputs
    assert _strip(scan(model, data_free=True, labels=[0, 4, 5], progress=False, executor=RayExecutor()).labels) == \
        _strip(scan(model, data_free=True, labels=[0, 4, 5], progress=False).labels)


@pytest.mark.slow  # trains 2 models and scans them twice (~2 min on 2 cores)
def test_zoo_benchmarks_run_through_ray(benchmark_module, ray_instance, tmp_path):
    dq = benchmark_module("detection_quality")
    zoo = benchmark_module("zoo")
    assert zoo.main(["--n", "1", "--out", str(tmp_path / "zoo"), "--datasets", "digits", "--epochs", "2",
                     "--executor", "ray"]) == 0
    assert sorted(e["folder"] for e in zoo.read_zoo(tmp_path / "zoo")) == ["digits-badnet_000", "digits-clean_000"]
    rows = {}
    for executor in ("ray", "local"):
        assert dq.main([str(tmp_path / "zoo"), "--out", str(tmp_path / executor), "--modes", "data-free",
                        "--executor", executor]) == 0
        rows[executor] = [json.loads(p.read_text()) for p in sorted((tmp_path / executor / "rows").glob("*.json"))]
    assert len(rows["ray"]) == 2
    for a, b in zip(rows["ray"], rows["local"]):
        assert a["scan"]["flagged"] == b["scan"]["flagged"]
        assert [r["mask_l1"] for r in a["scan"]["labels"]] == [r["mask_l1"] for r in b["scan"]["labels"]]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript files
def test_cli_scan_on_ray(ray_instance, zoo, tmp_path):
    from typer.testing import CliRunner
    from netcleanse.cli import app
    res = CliRunner().invoke(app, ["scan", str(zoo["badnet"]), "--data", str(zoo["data"]), "--labels", "0-5",
                                   "--out", str(tmp_path / "o"), "--executor", "ray"])
    assert res.exit_code == 0, res.output
    assert "BACKDOOR DETECTED" in res.output and (tmp_path / "o" / "report.html").is_file()
    assert json.loads((tmp_path / "o" / "scan.json").read_text())["settings"]["executor"] == "ray"


class _CountsLoads:
    """A shared value that notes (in a folder) every time a process deserialises it."""

    def __init__(self, folder: str):
        self.folder = folder

    def __setstate__(self, state):
        self.__dict__.update(state)
        Path(self.folder, f"load_{os.getpid()}_{os.urandom(4).hex()}").touch()


def _pid(shared, item, progress):
    return os.getpid()


def test_shared_value_is_loaded_once_per_worker_not_per_task(ray_instance, tmp_path):
    pids = dict(RayExecutor().map(_pid, _CountsLoads(str(tmp_path)), range(12)))
    loads = [p.name.split("_")[1] for p in tmp_path.glob("load_*")]
    assert len(pids) == 12 and set(loads) <= set(map(str, pids.values()))
    # every worker process that ran a task loaded the value once, not once per task
    assert len(loads) == len(set(loads)) == len(set(pids.values())) < 12


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's ONNX exporter
def test_models_of_user_code_and_onnx_scan_on_ray(ray_instance, tmp_path, monkeypatch):
    """A FILE.py architecture (imported under a name no worker can import) and an ONNX model (made of
    onnx2torch's modules, which need the torchvision stand-in where torchvision does not import)
    travel to the workers; the scans equal the local ones."""
    from typer.testing import CliRunner
    from netcleanse.cli import app
    (tmp_path / "tinynet.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)\n"
        "        self.fc = torch.nn.Linear(4 * 8 * 8, 4)\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.relu(self.conv(x)).flatten(1))\n")
    import runpy
    monkeypatch.chdir(tmp_path)  # the FILE.py is named relative to the caller's folder
    torch.manual_seed(0)
    net = runpy.run_path(str(tmp_path / "tinynet.py"))["Net"]().eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), str(tmp_path / "net.onnx"), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    for model in (["net.pt", "--arch", "tinynet.py:Net", "--input-shape", "1x8x8"], ["net.onnx"]):
        masks = {}
        for executor in ("ray", "local"):
            out = tmp_path / f"{model[0]}_{executor}"
            res = CliRunner().invoke(app, ["scan", str(tmp_path / model[0]), *model[1:], "--data-free",
                                           "--labels", "0-1", "--out", str(out), "--executor", executor])
            assert res.exit_code == 0, res.output
            masks[executor] = [r["mask_l1"] for r in json.loads((out / "scan.json").read_text())["labels"]]
        assert masks["ray"] == masks["local"]
