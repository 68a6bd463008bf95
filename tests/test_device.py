"""``--device`` / ``device=``: every command that computes with a model takes ``--device cpu|cuda``,
checked the same way (one-line error for cuda without a CUDA device, before any work), and the
Python API's ``device="cpu"`` gives exactly what its default gives.

What runs on a GPU is checked by ``benchmarks/gpu_check.py`` on a machine that has one; here (CI,
CPU only) nothing pretends to be a GPU.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import netcleanse
from netcleanse import scanning
from netcleanse.cli import main
from netcleanse.data import Dataset
from netcleanse.errors import NetcleanseError
from netcleanse.evaluate import evaluate, predict_dataset
from netcleanse.guard import trigger_filter
from netcleanse.model import Classifier
from netcleanse.pruning import fine_prune
from netcleanse.repair import repair
from netcleanse.sanity import check_preprocessing
from netcleanse.torch_io import save_model
from netcleanse.training import train
from netcleanse.trigger import Trigger
from netcleanse.unlearning import unlearn

from conftest import N_CLASSES, SIZE, TARGET, TinyNet, make_data, stamp

NO_CUDA = "--device cuda asked for, but no CUDA device is available"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: cuda is not refused")

# every command that computes with a model (report only renders files; it has no --device)
COMMANDS = ("info", "predict", "eval", "scan", "repair", "screen", "badnet", "demo")


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10, arch="mnist-cnn", name="m")


def _patch() -> Trigger:
    mask = torch.zeros(28, 28)
    mask[23:27, 23:27] = 1
    return Trigger(mask, torch.ones(1, 28, 28))


def _data(model: Classifier, n: int = 48, seed: int = 0) -> Dataset:
    """Images that survive a uint8 file exactly, labelled with the model's own answers."""
    x = (torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255
    return Dataset(x, model.predict(x), "self-labelled")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved mnist-cnn, labelled data for it (.npz) and a scan folder flagging label 3."""
    root = tmp_path_factory.mktemp("device")
    model = _model()
    data = _data(model)
    np.savez(root / "data.npz", x=(data.x.numpy() * 255).round().astype(np.uint8), y=data.y.numpy())
    scan = root / "scan"
    scan.mkdir()
    (scan / "scan.json").write_text(json.dumps({"flagged": [3], "labels": [
        {"label": 3, "mask_l1": float(_patch().mask.sum()), "flagged": True}]}))
    np.savez(scan / "masks.npz", labels=np.array([3]), masks=_patch().mask.numpy()[None],
             patterns=_patch().pattern.numpy()[None])
    return {"model": save_model(model, root / "model.pt"), "data": root / "data.npz", "scan": scan, "root": root}


def _command(name: str, files, out) -> list[str]:
    """A command line that runs ``name`` for real on the tiny files (``out``: a fresh folder)."""
    model, data = str(files["model"]), str(files["data"])
    return {
        "info": ["info", model, "--data", data, "--json"],
        "predict": ["predict", model, data, "--json"],
        "eval": ["eval", model, "--clean", data, "--poisoned", data, "--json"],
        "scan": ["scan", model, "--data", data, "--labels", "2,3", "--out", str(out / "scan")],
        "repair": ["repair", model, "--scan", str(files["scan"]), "--method", "filter", "--data", data,
                   "--out", str(out / "repair"), "--json"],
        "screen": ["screen", model, "--data", data, "--labels", "2,3", "--out", str(out / "screen")],
        "badnet": ["badnet", "--dataset", "digits", "--epochs", "1", "--out", str(out / "badnet"), "--json"],
        "demo": ["demo", "--out", str(out / "demo")],
    }[name]


def _run(capsys, args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return stopped.value.code or 0, captured.out, captured.err


def test_every_computing_command_has_the_one_device_option():
    from netcleanse.cli import app
    import typer.main

    group = typer.main.get_command(app)
    with_device = {name for name, command in group.commands.items()
                   if any("--device" in p.opts for p in command.params)}
    assert with_device == set(COMMANDS)
    helps = {next(p for p in group.commands[name].params if "--device" in p.opts).help for name in COMMANDS}
    assert len(helps) == 1, "one option text for every command"


@needs_no_cuda
@pytest.mark.parametrize("command", COMMANDS)
def test_device_cuda_without_cuda_is_a_one_line_error_before_any_work(command, files, tmp_path, capsys):
    code, out, err = _run(capsys, _command(command, files, tmp_path) + ["--device", "cuda"])
    assert code == 2 and out == ""
    assert err.strip() == f"error: {NO_CUDA}" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_an_unknown_device_is_a_one_line_error(files, tmp_path, capsys):
    code, _, err = _run(capsys, _command("eval", files, tmp_path) + ["--device", "tpu"])
    assert code == 2 and err.strip() == "error: unknown device 'tpu'; use cpu or cuda"


@pytest.fixture
def short_scans(monkeypatch):
    """The fast preset cut down to seconds (a scan's plumbing, not its quality, is tested here)."""
    fast = scanning.PRESETS["fast"]
    monkeypatch.setitem(scanning.PRESETS, "fast", replace(
        fast, n_val=16, few_labels_n_opt=32, margin_steps=3,
        few_labels_refine=replace(fast.few_labels_refine, schedule=replace(
            fast.few_labels_refine.schedule, max_epochs=2))))


@pytest.mark.parametrize("command", ["info", "predict", "eval", "repair"])
def test_device_cpu_works_and_equals_the_default(command, files, tmp_path, capsys, one_thread):
    default = _run(capsys, _command(command, files, tmp_path / "default"))
    cpu = _run(capsys, _command(command, files, tmp_path / "cpu") + ["--device", "cpu"])
    assert default[0] == cpu[0] == 0, (default[2], cpu[2])
    if command == "repair":  # the printed record differs in timings only
        default_json, cpu_json = json.loads(default[1]), json.loads(cpu[1])
        assert default_json["table"] == cpu_json["table"] and default_json["model"] == cpu_json["model"]
        assert cpu_json["settings"]["device"] == "cpu"
    else:
        assert default[1] == cpu[1]


@pytest.mark.parametrize("command", ["scan", "screen"])
def test_scan_and_screen_device_cpu_works(command, files, tmp_path, capsys, short_scans, one_thread):
    """(Their API's default was already "cpu"; the tests of scanning compare scans.)"""
    code, _, err = _run(capsys, _command(command, files, tmp_path) + ["--device", "cpu"])
    assert code == 0, err
    if command == "scan":
        assert json.loads((tmp_path / "scan" / "scan.json").read_text())["settings"]["device"] == "cpu"
    else:
        assert json.loads((tmp_path / "screen" / "screen.json").read_text())["rows"][0]["error"] is None


def test_badnet_device_cpu_works(files, tmp_path, capsys, one_thread):
    code, out, _ = _run(capsys, _command("badnet", files, tmp_path) + ["--device", "cpu"])
    assert code == 0 and json.loads(out)["arch"] == "mnist-cnn"
    assert netcleanse.load_model(tmp_path / "badnet" / "model.pt").num_classes == 10


def test_demo_passes_the_device_to_every_stage(tmp_path, capsys, monkeypatch):
    """The demo command is a shell over run_demo (which takes minutes; the slow test runs it with
    --device cpu); here: the device reaches it, and run_demo hands it to each stage."""
    import netcleanse.demo as demo
    seen = {}

    class Stop(Exception):
        pass

    def make_badnet(*args, **kwargs):
        seen["badnet"] = kwargs["device"]
        raise Stop

    monkeypatch.setattr(demo, "make_badnet", make_badnet)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "demo", progress=False, device="cpu")
    assert seen == {"badnet": "cpu"}

    def run_demo(out, **kwargs):
        seen["cli"] = kwargs["device"]
        raise NetcleanseError("stopped here")

    monkeypatch.setattr(demo, "run_demo", run_demo)
    code, _, err = _run(capsys, ["demo", "--out", tmp_path / "cli", "--device", "cpu"])
    assert code == 2 and seen["cli"] == "cpu" and "stopped here" in err


# ---- the Python API: device="cpu" is the default, exactly --------------------------------------

def _same_weights(a: Classifier, b: Classifier) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_api_device_cpu_equals_the_default_for_evaluation_and_the_sanity_check():
    model = _model()
    data = _data(model)
    poisoned = Dataset(_patch().apply(data.x), torch.full((len(data),), 3), "poisoned")
    labels, confidence = predict_dataset(model, data)
    labels_cpu, confidence_cpu = predict_dataset(model, data, device="cpu")
    assert torch.equal(labels, labels_cpu) and torch.equal(confidence, confidence_cpu)
    assert labels_cpu.device.type == "cpu"
    assert evaluate(model, data, poisoned) == evaluate(model, data, poisoned, device="cpu")
    assert check_preprocessing(model, data) == check_preprocessing(model, data, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_api_device_cpu_equals_the_default_for_training_and_repairs(one_thread):
    torch.manual_seed(0)
    model = Classifier(TinyNet(), (1, SIZE, SIZE), N_CLASSES, name="tiny")  # 8 channels: a short pruning curve
    x, y = make_data(48, torch.Generator().manual_seed(1))
    data = Dataset(x, y, "tiny")
    square = Trigger(stamp(torch.zeros(1, 1, SIZE, SIZE))[0, 0], torch.ones(1, SIZE, SIZE))
    default, cpu = (train(copy.deepcopy(model), data, epochs=1, seed=3, progress=False, **kw)
                    for kw in ({}, {"device": "cpu"}))
    assert _same_weights(default, cpu)

    pruned, pruned_cpu = (fine_prune(model, data, drops=(2,), fine_tune_epochs=1, progress=False, **kw)
                          for kw in ({}, {"device": "cpu"}))
    assert pruned.table == pruned_cpu.table and pruned.curve == pruned_cpu.curve
    assert pruned.saved and all(_same_weights(pruned.saved[d], pruned_cpu.saved[d]) for d in pruned.saved)

    unlearned, unlearned_cpu = (unlearn(model, {TARGET: square}, data, epochs=1, progress=False, **kw)
                                for kw in ({}, {"device": "cpu"}))
    assert _same_weights(unlearned, unlearned_cpu)

    guard, guard_cpu = (trigger_filter(model, {TARGET: square}, data, **kw) for kw in ({}, {"device": "cpu"}))
    assert guard.detector.neurons == guard_cpu.detector.neurons
    assert guard.detector.thresholds == guard_cpu.detector.thresholds

    for method in ("fine-prune", "disagree", "unlearn", "filter"):
        a, b = (repair(model, {TARGET: square}, method, data, drops=(2,), epochs=1, progress=False, **kw)
                for kw in ({}, {"device": "cpu"}))
        assert a.table == b.table and _same_weights(a.model, b.model), method
        assert b.settings["device"] == "cpu" and all(p.device.type == "cpu" for p in b.model.parameters())


@needs_no_cuda
def test_api_refuses_cuda_without_cuda_before_any_work(tmp_path):
    from netcleanse.demo import run_demo
    from netcleanse.lab import make_badnet, make_clean_model
    from netcleanse.screening import make_entries, screen

    model = _model()
    data = _data(model, n=8)
    calls = [lambda d: predict_dataset(model, data, device=d), lambda d: evaluate(model, data, device=d),
             lambda d: check_preprocessing(model, data, device=d),
             lambda d: train("mnist-cnn", data, epochs=50, progress=False, device=d),
             lambda d: fine_prune(model, data, progress=False, device=d),
             lambda d: unlearn(model, {3: _patch()}, data, epochs=50, progress=False, device=d),
             lambda d: trigger_filter(model, {3: _patch()}, data, device=d),
             lambda d: repair(model, {3: _patch()}, "unlearn", data, epochs=50, progress=False, device=d),
             lambda d: make_badnet("digits", epochs=50, out=tmp_path / "b", progress=False, device=d),
             lambda d: make_clean_model("digits", epochs=50, out=tmp_path / "c", progress=False, device=d),
             lambda d: run_demo(tmp_path / "d", epochs=50, progress=False, device=d),
             lambda d: screen(make_entries([tmp_path / "m.pt"], data_free=True), tmp_path / "s", device=d)]
    for call in calls:
        for device, message in (("cuda", NO_CUDA), ("tpu", "unknown device 'tpu'")):
            with pytest.raises(NetcleanseError, match=message):
                call(device)
    assert list(tmp_path.iterdir()) == []


# ---- benchmarks/gpu_check.py: the check that needs a GPU ------------------------------------------

@needs_no_cuda
def test_gpu_check_skips_cleanly_without_cuda(benchmark_module, capsys):
    assert benchmark_module("gpu_check").main([]) == 0
    out = capsys.readouterr().out
    assert out.strip() == ("gpu_check: skipped, no CUDA device here (torch.cuda.is_available() is False); "
                           "nothing to check")


@pytest.mark.slow
def test_gpu_check_dry_run_cpu_against_cpu(benchmark_module, tmp_path):
    """The script's own plumbing, with the CPU standing in for the device under test (minutes; the
    scans, the screen and the demo are left out: they take minutes each on a CPU)."""
    assert benchmark_module("gpu_check").main(["--device", "cpu", "--epochs", "1", "--work", str(tmp_path),
                                               "--commands", "info,predict,eval,repair"]) == 0
