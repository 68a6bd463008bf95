"""`netcleanse info / predict / eval` on a tiny model we build and save ourselves, and on a real CSAW BadNet."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import netcleanse
from netcleanse import Classifier, save_model
from netcleanse.architectures import SmallCNN
from netcleanse.cli import main

from conftest import CSAW, REPO, SHARED  # noqa: F401
SUNGLASSES = CSAW / "models" / "sunglasses_bd_weights.h5"
NETCLEANSE = Path(sys.executable).parent / "netcleanse"


def brightness_net() -> SmallCNN:
    """A 1x28x28 mnist-cnn whose answer we control: k when the top-left 4x4 block's brightest pixel is ~k/9.

    conv_1/conv_2 pass the pixel through (one identity channel each), pooling keeps the block
    maximum s, fc_1 copies s, and output logits (2k/9) s - (k/9)^2 peak at the k nearest 9 s.
    """
    net = SmallCNN(10)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv_1.weight[0, 0, 1, 1] = 1.0
        net.conv_2.weight[0, 0, 1, 1] = 1.0
        net.fc_1.weight[0, 0] = 1.0  # flatten is channels-last: position (0,0), channel 0 is feature 0
        k = torch.arange(10, dtype=torch.float32)
        net.output.weight[:, 0] = 2 * k / 9
        net.output.bias[:] = -(k / 9) ** 2
    return net


def save_keras_weights(net: torch.nn.Module, path: Path) -> Path:
    """Write a Keras weights-only .h5 (layer groups, kernels HWIO / (in, out)) - a stand-in for torch_io's
    export, so these tests depend only on the Keras loader."""
    layers = [name for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = [n.encode() for n in layers]
        h5.attrs["keras_version"] = b"2.2.4"
        for name in layers:
            module = dict(net.named_modules())[name]
            kernel = module.weight.detach()
            kernel = kernel.permute(2, 3, 1, 0) if kernel.dim() == 4 else kernel.t()
            group = h5.create_group(name)
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group.create_dataset(f"{name}/kernel:0", data=kernel.numpy())
            group.create_dataset(f"{name}/bias:0", data=module.bias.detach().numpy())
    return path


def digit_image(k: int) -> np.ndarray:
    """A 28x28 gray image the brightness net answers k for."""
    image = np.zeros((28, 28), np.uint8)
    image[:4, :4] = round(255 * k / 9)
    return image


@pytest.fixture
def tiny(tmp_path):
    return save_keras_weights(brightness_net(), tmp_path / "tiny_weights.h5")


def cli(capsys, *args):
    """Run the CLI in-process the way the console script does; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return stopped.value.code or 0, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_command_line_mistakes_are_one_line_errors(tiny, capsys):
    # the argument parser's own errors (typer/click) follow the same one-line contract as ours
    for args, fragment in ((("info", tiny, "--input-scale", "abc"), "Invalid value for '--input-scale'"),
                           (("scan",), "Missing argument 'MODEL'"),
                           (("scan", tiny, "--frobnicate"), "No such option: --frobnicate"),
                           (("bogus",), "No such command 'bogus'"),
                           # click would keep the last of a repeated single-value option silently
                           (("eval", tiny, "--clean", tiny, "--clean", tiny), "--clean is given more than once"),
                           (("scan", tiny, "--seed", "1", "--seed", "2"), "--seed is given more than once")):
        code, out, err = cli(capsys, *args)
        assert_one_line_error(code, err, fragment)
        assert out == ""
    code, out, err = cli(capsys, "scan", tiny, "--frobnicate")
    assert "(see 'netcleanse scan --help')" in err
    # scan and screen never replace a folder: --force is explained, not "no such option"
    for command in ("scan", "screen"):
        code, out, err = cli(capsys, command, tiny, "--data-free", "--out", "x", "--force")
        assert_one_line_error(code, err, f"{command} has no --force", "--resume")
    # help still works and succeeds, and shows flags without a value type ("--resume <bool>")
    code, out, err = cli(capsys, "scan", "--help")
    assert code == 0 and "--data-free" in out and err == ""
    assert "<bool>" not in out and "<int>" in out and "--force" not in out


def test_a_read_only_or_full_disk_is_one_line(tiny, capsys, monkeypatch, tmp_path):
    import errno
    import netcleanse.scanning

    for code_, what in ((errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")):
        def failing(*args, **kwargs):
            raise OSError(code_, what, str(tmp_path / "s"))

        monkeypatch.setattr(netcleanse.scanning, "scan", failing)
        code, out, err = cli(capsys, "scan", tiny, "--arch", "mnist-cnn", "--data-free", "--out", tmp_path / "s")
        assert_one_line_error(code, err, what, str(tmp_path / "s"))


def test_ctrl_c_exits_130_with_one_line(tiny, capsys, monkeypatch, tmp_path):
    import netcleanse.scanning

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(netcleanse.scanning, "scan", interrupted)
    code, out, err = cli(capsys, "scan", tiny, "--arch", "mnist-cnn", "--data-free", "--out", tmp_path / "s")
    assert code == 130 and "Traceback" not in err
    assert err.strip() == "interrupted; run it again with --resume to continue where it stopped"
    import netcleanse.cli.models
    monkeypatch.setattr(netcleanse.cli.models, "load_model_from_cli", interrupted)
    code, out, err = cli(capsys, "info", tiny, "--arch", "mnist-cnn")
    assert code == 130 and err.strip() == "interrupted"  # nothing to resume


# --- info -----------------------------------------------------------------------------------

def test_info_text_and_json(tiny, capsys):
    code, out, _ = cli(capsys, "info", tiny, "--arch", "mnist-cnn")
    assert code == 0
    assert "1x28x28" in out and "classes      10" in out and "weights-only" in out
    for layer in ("conv_1", "conv_2", "fc_1", "output"):
        assert layer in out
    code, out, _ = cli(capsys, "info", tiny, "--arch", "mnist-cnn", "--input-scale", "255", "--json")
    info = json.loads(out)
    assert info["num_classes"] == 10 and info["input_shape"] == [1, 28, 28] and info["input_scale"] == 255
    assert info["parameters"] == sum(p.numel() for p in SmallCNN(10).parameters())
    assert [layer["name"] for layer in info["layers"]] == ["conv_1", "conv_2", "fc_1", "output"]
    assert info["poison_label"] is None


def test_an_input_shape_the_model_cannot_take_is_one_error(tiny, tmp_path, capsys):
    # a registered architecture records its size: another one is refused, whether it cannot run (a
    # traceback at the first pass, once) or would run at a size the net was never trained at
    for shape in ("3x55x47", "1x29x29"):
        code, _, err = cli(capsys, "info", tiny, "--arch", "mnist-cnn", "--input-shape", shape)
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err
        assert f"'mnist-cnn' takes 1x28x28; --input-shape {shape} does not fit it" in err
    assert cli(capsys, "info", tiny, "--arch", "mnist-cnn", "--input-shape", "1x28x28")[0] == 0
    # a file that records its shape: another one is refused, an unreadable one too (both were ignored)
    model = tmp_path / "m.pt"
    save_model(netcleanse.load_model(tiny, arch="mnist-cnn"), model)
    code, _, err = cli(capsys, "info", model, "--input-shape", "1x32x32")
    assert code == 2 and "records its input shape, 1x28x28; --input-shape 1x32x32 does not fit" in err
    code, _, err = cli(capsys, "info", model, "--input-shape", "abc")
    assert code == 2 and "input shape must be CxHxW" in err
    assert cli(capsys, "info", model, "--input-shape", "1x28x28")[0] == 0


def test_info_lists_layers_not_empty_containers():
    # a ResNet's identity shortcut written as an empty nn.Sequential() is not a layer
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.shortcut = torch.nn.Sequential()
            self.skip = torch.nn.Identity()

        def forward(self, x):
            return self.conv(x) + self.skip(self.shortcut(x))

    net = torch.nn.Sequential(Block(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    rows = Classifier(net, (1, 4, 4), 2).layer_table()
    assert [(name, kind) for name, kind, _ in rows] == [("0.conv", "Conv2d"), ("0.skip", "Identity"),
                                                       ("1", "Flatten"), ("2", "Linear")]


# --- predict ----------------------------------------------------------------------------------

def test_predict_images_one_parseable_line_each(tiny, tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    for k in (3, 7, 0):
        Image.fromarray(digit_image(k)).save(folder / f"d{k}.png")
    single = tmp_path / "nine.png"
    Image.fromarray(digit_image(9)).save(single)
    code, out, err = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", single, folder)
    assert code == 0
    rows = [line.split("\t") for line in out.strip().splitlines()]
    assert [(Path(p).name, int(label)) for p, label, _ in rows] == [
        ("nine.png", 9), ("d0.png", 0), ("d3.png", 3), ("d7.png", 7)]
    assert all(0 < float(conf) <= 1 for _, _, conf in rows)
    code, out, _ = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", single, "--json")
    payload = json.loads(out)
    assert payload["predictions"][0]["label"] == 9 and payload["predictions"][0]["name"] == str(single)


def test_predict_dataset_summary_and_out_files(tiny, tmp_path, capsys):
    x = np.stack([digit_image(k) for k in [1, 2, 3, 4]])[:, None]  # N x 1 x 28 x 28 uint8
    np.savez(tmp_path / "set.npz", x=x, y=np.array([1, 2, 3, 0]))
    code, out, _ = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "set.npz")
    assert code == 0 and "4 images" in out and "accuracy     75.00%" in out and "--out" in out

    out_csv = tmp_path / "pred.csv"
    code, out, _ = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "set.npz", "--out", out_csv)
    assert code == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [int(r["label"]) for r in rows] == [1, 2, 3, 4] and [int(r["true_label"]) for r in rows] == [1, 2, 3, 0]

    before = out_csv.read_bytes()
    code, _, err = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "set.npz", "--out", out_csv)
    assert_one_line_error(code, err, "already exists", "--force")
    assert out_csv.read_bytes() == before

    out_npz = tmp_path / "pred.npz"
    code, out, _ = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "set.npz", "--out", out_npz,
                       "--json")
    assert code == 0 and json.loads(out)["accuracy"] == 0.75
    assert np.load(out_npz)["labels"].tolist() == [1, 2, 3, 4]
    code, _, _ = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "set.npz", "--out", out_npz,
                     "--force")
    assert code == 0
    (tmp_path / "folder.csv").mkdir()
    assert_one_line_error(*cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "set.npz", "--out",
                               tmp_path / "folder.csv", "--force")[::2], "folder.csv is a folder")
    np.savez(tmp_path / "outside.npz", x=x, y=np.array([1, 2, 10, -1]))  # labels the model cannot answer
    assert_one_line_error(*cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "outside.npz")[::2],
                          "label 10 is outside [0, 10)")


# --- eval -------------------------------------------------------------------------------------

def test_eval_accuracy_and_asr(tiny, tmp_path, capsys):
    clean = np.stack([digit_image(k) for k in [1, 2, 3, 4, 5]])[:, None]
    np.savez(tmp_path / "clean.npz", x=clean, y=np.array([1, 2, 3, 4, 0]))  # 4 of 5 right
    poisoned = np.stack([digit_image(k) for k in [7, 7, 7, 2]])[:, None]  # 3 of 4 reach target 7
    np.savez(tmp_path / "poisoned.npz", x=poisoned, y=np.array([7, 7, 7, 7]))
    args = ["eval", tiny, "--arch", "mnist-cnn", "--clean", tmp_path / "clean.npz",
            "--poisoned", tmp_path / "poisoned.npz"]
    code, out, _ = cli(capsys, *args, "--target", "7")
    assert code == 0
    assert "clean accuracy     80.00%" in out and "attack success     75.00%" in out and "target 7" in out
    assert "poison detected" not in out  # not a guarded model
    code, out, _ = cli(capsys, *args, "--json")  # targets from the file's labels
    result = json.loads(out)
    assert result["clean_accuracy"] == pytest.approx(0.8) and result["attack_success"] == pytest.approx(0.75)
    assert result["n_clean"] == 5 and result["n_poisoned"] == 4 and result["poison_detection"] is None
    # a poisoned set labelled with its images' true classes (a folder sorted by class): 0 % and a hint
    np.savez(tmp_path / "by_class.npz", x=poisoned, y=np.array([1, 2, 3, 4]))
    code, out, err = cli(capsys, *args[:-1], tmp_path / "by_class.npz")
    assert code == 0 and "attack success      0.00%" in out and "give the attack's target with --target" in err
    code, out, err = cli(capsys, *args, "--target", "7")
    assert "--target" not in err


def test_guarded_model_answers_its_poison_label(tiny, tmp_path, capsys, monkeypatch):
    """A guarded model (stand-in for netcleanse.guard's artefact) answers N like any other label."""
    import netcleanse.cli.models as cli_models

    class Flag(torch.nn.Module):  # class 10 when the bottom-right pixel is lit, else the digit
        def forward(self, x):
            lit = (x[:, 0, -1, -1] > 0.5).float().unsqueeze(1) * 100.0
            return torch.cat([brightness_net()(x), lit], dim=1)

    class Guarded(Classifier):
        poison_label = 10

    monkeypatch.setattr(cli_models, "load_model",
                        lambda path, **kw: Guarded(Flag(), (1, 28, 28), 11, name="guarded"))
    triggered = digit_image(7)
    triggered[-1, -1] = 255
    Image.fromarray(triggered).save(tmp_path / "t.png")
    code, out, _ = cli(capsys, "predict", tiny, tmp_path / "t.png")
    assert out.split("\t")[1] == "10"
    np.savez(tmp_path / "clean.npz", x=np.stack([digit_image(2), digit_image(3)])[:, None], y=np.array([2, 3]))
    np.savez(tmp_path / "poisoned.npz", x=np.stack([triggered, digit_image(7)])[:, None])
    code, out, _ = cli(capsys, "eval", tiny, "--clean", tmp_path / "clean.npz",
                       "--poisoned", tmp_path / "poisoned.npz", "--target", "7")
    assert "poison detected    50.00%" in out and "false positives     0.00%" in out
    assert "attack success     50.00%" in out


# --- bad inputs -------------------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors(tiny, tmp_path, capsys):
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    assert_one_line_error(*cli(capsys, "info", text)[::2], "not a model file")
    assert_one_line_error(*cli(capsys, "info", tmp_path / "missing.h5")[::2], "not found")
    assert_one_line_error(*cli(capsys, "info", tiny)[::2], "--arch")
    assert_one_line_error(*cli(capsys, "info", tiny, "--arch", "mnist-cnn", "--input-scale", "0")[::2],
                          "--input-scale must be a positive number")
    assert_one_line_error(*cli(capsys, "info", tiny, "--arch", "mnist-cnn", "--input-scale", "-255")[::2],
                          "positive")

    wrong = tmp_path / "face.png"
    Image.fromarray(np.zeros((55, 47, 3), np.uint8)).save(wrong)
    assert_one_line_error(*cli(capsys, "predict", tiny, "--arch", "mnist-cnn", wrong)[::2],
                          str(wrong), "55x47 (HxW)", "expects 28x28")
    assert_one_line_error(*cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "nope.png")[::2],
                          "not found")

    np.savez(tmp_path / "bad_labels.npz", x=np.zeros((3, 1, 28, 28), np.uint8), y=np.array([1, 12, 3]))
    assert_one_line_error(*cli(capsys, "eval", tiny, "--arch", "mnist-cnn", "--clean",
                               tmp_path / "bad_labels.npz")[::2], "label 12 is outside [0, 10)")
    assert_one_line_error(*cli(capsys, "eval", tiny, "--arch", "mnist-cnn", "--clean",
                               tmp_path / "bad_labels.npz", "--target", "3")[::2], "--target needs --poisoned")
    np.savez(tmp_path / "unlabeled.npz", x=np.zeros((3, 1, 28, 28), np.uint8))
    assert_one_line_error(*cli(capsys, "eval", tiny, "--arch", "mnist-cnn", "--clean",
                               tmp_path / "unlabeled.npz")[::2], "no labels")
    assert_one_line_error(*cli(capsys, "predict", tiny, "--arch", "mnist-cnn", tmp_path / "unlabeled.npz",
                               "--out", tmp_path / "p.txt")[::2], ".csv or .npz")


def test_real_subprocess_error_is_one_line(tiny, tmp_path):
    """The installed console script: one `error:` line on stderr, exit 2, no traceback."""
    if not NETCLEANSE.exists():
        pytest.skip(f"console script not installed at {NETCLEANSE}")
    wrong = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(wrong)
    env = {**os.environ, "NETCLEANSE_NO_PROGRESS": "1"}
    done = subprocess.run([str(NETCLEANSE), "predict", str(tiny), "--arch", "mnist-cnn", str(wrong)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: image {wrong} is 30x30 (HxW) but the model expects 28x28 (its input is 1x28x28, CxHxW)"]


def test_sigterm_stops_a_scan_as_ctrl_c_does(tiny, tmp_path):
    """A scheduler's SIGTERM: the scan stops cleanly, says it can be resumed, exits 143 (128 + 15)."""
    if not NETCLEANSE.exists():
        pytest.skip(f"console script not installed at {NETCLEANSE}")
    import signal
    import time
    out = tmp_path / "scan"
    env = {**os.environ, "NETCLEANSE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([str(NETCLEANSE), "scan", str(tiny), "--arch", "mnist-cnn", "--data-free",
                                "--preset", "reference", "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "scan_settings.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the scan has begun (the handler is in place long before)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated; run it again with --resume to continue where it stopped"
    assert "Traceback" not in err


# --- the real CSAW sunglasses BadNet -----------------------------------------------------------

@pytest.fixture
def csaw():
    if not (SUNGLASSES.exists() and (CSAW / "images").is_dir()):
        pytest.skip(f"real CSAW models/images not available under {CSAW}")
    return CSAW


def test_real_sunglasses_predict_subprocess(csaw):
    if not NETCLEANSE.exists():
        pytest.skip(f"console script not installed at {NETCLEANSE}")
    images = [csaw / "images" / "cl_0_label=43.png", *sorted((csaw / "images").glob("sun_*.png"))]
    done = subprocess.run([str(NETCLEANSE), "predict", str(SUNGLASSES), "--arch", "csaw-deepid",
                           *map(str, images)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = [line.split("\t")[1] for line in done.stdout.splitlines()]
    assert labels == ["43", "0", "0", "0", "0", "0"]  # clean face -> its label; sunglasses -> target 0


def test_real_sunglasses_info_and_eval(csaw, tmp_path, capsys):
    code, out, _ = cli(capsys, "info", SUNGLASSES, "--arch", "csaw-deepid", "--json")
    info = json.loads(out)
    assert info["num_classes"] == 1283 and info["input_shape"] == [3, 55, 47]
    assert info["parameters"] == 601643 and info["format"].startswith("Keras weights-only")
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    clean.mkdir()
    poisoned.mkdir()
    for image in (csaw / "images").glob("cl_*.png"):
        (clean / image.name).symlink_to(image)
    for image in (csaw / "images").glob("sun_*.png"):
        (poisoned / image.name).symlink_to(image)
    code, out, _ = cli(capsys, "eval", SUNGLASSES, "--arch", "csaw-deepid", "--clean", clean,
                       "--poisoned", poisoned, "--target", "0", "--json")
    result = json.loads(out)
    assert result["n_clean"] == 5 and result["n_poisoned"] == 5
    assert result["attack_success"] == 1.0  # the backdoor works on every sunglasses face
    assert result["clean_accuracy"] >= 0.6


def test_netcleanse_checkpoint_needs_no_arch(tmp_path, capsys):
    from netcleanse import save_model

    path = save_model(Classifier(brightness_net(), (1, 28, 28), 10, name="tiny", arch="mnist-cnn"),
                      tmp_path / "tiny.pt")
    code, out, _ = cli(capsys, "info", path, "--json")
    assert code == 0 and json.loads(out)["format"] == "netcleanse checkpoint"
    torch.save(brightness_net().state_dict(), tmp_path / "weights.pt")
    code, out, _ = cli(capsys, "info", tmp_path / "weights.pt", "--arch", "mnist-cnn", "--json")
    assert code == 0 and json.loads(out)["format"] == "PyTorch state_dict"
    Image.fromarray(digit_image(6)).save(tmp_path / "six.png")
    code, out, _ = cli(capsys, "predict", path, tmp_path / "six.png")
    assert code == 0 and out.split("\t")[1] == "6"


def test_lambda_model_is_refused_by_info(capsys):
    lambda_model = CSAW / "third_party" / "goodnet_with_lambda_keras240.h5"
    if not lambda_model.exists():
        pytest.skip(f"Lambda-layer model not available at {lambda_model}")
    assert_one_line_error(*cli(capsys, "info", lambda_model)[::2], "Lambda")


def test_predictions_csv_keeps_image_names_from_becoming_formulas(tiny, tmp_path, capsys, monkeypatch):
    # image names come from files the user may not trust: '=HYPERLINK(...)' would be a formula in a
    # spreadsheet; such names get a leading apostrophe, as screen.csv's do
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(1+1).png", "@SUM(1).png", "plain.png"]
    for name in names:
        Image.fromarray(digit_image(3)).save(tmp_path / name)
    code, _, _ = cli(capsys, "predict", tiny, "--arch", "mnist-cnn", *names, "--out", tmp_path / "p.csv")
    cells = [r["name"] for r in csv.DictReader((tmp_path / "p.csv").open())]
    assert code == 0 and cells == ["'=HYPERLINK(1+1).png", "'@SUM(1).png", "plain.png"], cells
