"""netcleanse.screen / ``netcleanse screen``: many models, one folder each, a summary table and page.
Tiny TorchScript nets (the planted BadNet of test_scan and a clean twin), 8 labels, with data."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from netcleanse.cli import app
from netcleanse.data import Dataset, load_data, save_data
from netcleanse.errors import NetcleanseError, NetcleanseWarning
from netcleanse.model import Classifier, load_model
from netcleanse.torch_io import save_model
from netcleanse.scanning import ScanResult, scan
from netcleanse.executor import LocalExecutor
from netcleanse.screening import ScreenEntry, make_entries, read_manifest, screen

from conftest import SIZE, TARGET, make_data, train_tiny  # noqa: E402

# torch 2.13 deprecates TorchScript (still read); the tiny models here are TorchScript files because
# their class lives in a test module, which a model file cannot name
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write_zoo(folder: Path) -> dict:
    """Three model files (BadNet, clean, not a model) and clean data; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, backdoor in (("badnet", True), ("clean", False)):
        model = train_tiny(backdoor)
        traced = torch.jit.trace(model.net, torch.rand(1, 1, SIZE, SIZE))
        paths[name] = save_model(Classifier(traced, model.input_shape, model.num_classes, name=name),
                                 folder / f"{name}.pt")
    paths["broken"] = folder / "broken.pt"
    paths["broken"].write_bytes(b"PK\x03\x04 not a model at all")
    x, y = make_data(200, torch.Generator().manual_seed(99))
    paths["data"] = save_data(Dataset(x, y, source="tiny"), folder / "clean.npz")
    return paths


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.set_num_threads(1)
    return write_zoo(tmp_path_factory.mktemp("zoo"))


def test_entries_are_checked_before_any_scan(tmp_path):
    """A bad label list or a data object that is not a file is refused at once, not per model."""
    with pytest.raises(NetcleanseError, match="bad label list '3-x'"):
        make_entries(["a.pt"], data_free=True, labels="3-x")
    with pytest.raises(NetcleanseError, match="a clean-data file or folder .* got a Dataset"):
        make_entries(["a.pt"], data=Dataset(torch.zeros(2, 1, 4, 4), None, "d"))
    assert make_entries(["a.pt"], data_free=True, labels=[3, 4])[0].labels == "3,4"


def test_manifest_csv_and_json(tmp_path):
    (tmp_path / "m.csv").write_text("model,name,arch,input_scale,data,data_free,labels\n"
                                    "a.pt,first,,255,d.npz,,0-3\n"
                                    "sub/b.pt,,mnist-cnn,,,true,\n")
    a, b = read_manifest(tmp_path / "m.csv", input_scale=2.0)
    assert a == ScreenEntry(str(tmp_path / "a.pt"), "first", None, 255.0, str(tmp_path / "d.npz"), False, "0-3")
    assert b == ScreenEntry(str(tmp_path / "sub" / "b.pt"), None, "mnist-cnn", 2.0, None, True, None)
    (tmp_path / "m.json").write_text(json.dumps({"models": [{"model": "/abs/c.pt", "data_free": True,
                                                             "mean": [0.5, 0.4, 0.3], "num_classes": "10"}]}))
    assert read_manifest(tmp_path / "m.json", std="0.2,0.2,0.2") == [
        ScreenEntry("/abs/c.pt", data_free=True, mean="0.5,0.4,0.3", std="0.2,0.2,0.2", num_classes=10)]
    # a row may inherit the data from the defaults
    (tmp_path / "plain.csv").write_text("model\nc.pt\n")
    assert read_manifest(tmp_path / "plain.csv", data="x.npz")[0].data == "x.npz"
    # data_free=false asks for data: the default's; a JSON label list is a label list
    (tmp_path / "with.csv").write_text("model,data_free\nc.pt,false\n")
    assert read_manifest(tmp_path / "with.csv", data="x.npz")[0].data == "x.npz"
    with pytest.raises(NetcleanseError, match="row 1: give exactly one of data"):
        read_manifest(tmp_path / "with.csv")
    (tmp_path / "list.json").write_text('[{"model": "c.pt", "data_free": true, "labels": [0, 1, 5]}]')
    assert read_manifest(tmp_path / "list.json")[0].labels == "0,1,5"


def test_a_default_input_shape_passes_over_keras_files(tmp_path):
    """Keras files record their input shape (an --input-shape with one is refused): a default
    --input-shape for a zoo of Keras and ONNX models concerns only the ONNX ones."""
    import h5py
    with h5py.File(tmp_path / "k.h5", "w"):
        pass
    (tmp_path / "o.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "m.csv").write_text("model,data_free\nk.h5,1\no.onnx,1\nown.h5,1\n")
    keras, onnx, missing = read_manifest(tmp_path / "m.csv", input_shape="3x8x8")
    assert keras.input_shape is None and onnx.input_shape == "3x8x8" and missing.input_shape == "3x8x8"
    (tmp_path / "k2.csv").write_text("model,data_free,input_shape\nk.h5,1,1x4x4\n")  # a row's own stays (refused at load)
    assert read_manifest(tmp_path / "k2.csv", input_shape="3x8x8")[0].input_shape == "1x4x4"
    entries = make_entries([tmp_path / "k.h5", tmp_path / "o.onnx"], data_free=True, input_shape="3x8x8")
    assert [e.input_shape for e in entries] == [None, "3x8x8"]
    with pytest.raises(NetcleanseError, match="--input-shape concerns none of the models"):
        make_entries([tmp_path / "k.h5"], data_free=True, input_shape="3x8x8")
    # a fully convolutional Keras model (input None x None) takes it
    with h5py.File(tmp_path / "open.h5", "w") as h5:
        h5.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {"layers": [
            {"class_name": "InputLayer", "config": {"batch_input_shape": [None, None, None, 3]}}]}})
    assert make_entries([tmp_path / "open.h5"], data_free=True, input_shape="3x8x8")[0].input_shape == "3x8x8"


@pytest.mark.parametrize("text, message", [
    ("model,colour\na.pt,red\n", "row 1: unknown field 'colour'"),
    ("model,data_free\n,true\n", "row 1: no model file given"),
    ("model,data_free\na.pt,true\nb.pt,\n", "row 2: give exactly one of data"),
    ("model,data,data_free\na.pt,d.npz,true\n", "row 1: give exactly one of data"),
    ("model,data_free\na.pt,perhaps\n", "data_free must be true or false"),
    ("model,input_scale,data_free\na.pt,-1,1\n", "input_scale must be a positive number"),
    ("model,num_classes,data_free\na.pt,ten,1\n", "num_classes must be a positive whole number"),
    ("model\n", "lists no models"),
    ('[{"model": "a.pt"', "not valid JSON"),
    ('{"models": 3}', "a list of objects"),
    ("model,labels,data_free\na.pt,3-x,1\n", r"row 1: bad label list '3-x'"),
])
def test_bad_manifests_are_one_error(tmp_path, text, message):
    path = tmp_path / ("m.json" if text.startswith(("[", "{")) else "m.csv")
    path.write_text(text)
    with pytest.raises(NetcleanseError, match=message):
        read_manifest(path)


def test_screen_scans_each_model_and_a_bad_file_is_an_error_row(zoo, tmp_path):
    entries = make_entries([zoo["badnet"], zoo["clean"], zoo["broken"]], data=zoo["data"])
    result = screen(entries, tmp_path / "s", seed=1, progress=False)
    by_name = {r["name"]: r for r in result.rows}
    assert [r["name"] for r in result.rows] == ["badnet", "clean", "broken"]
    assert by_name["badnet"]["verdict"] == "backdoor-detected" and by_name["badnet"]["flagged"] == [TARGET]
    assert by_name["clean"]["verdict"] in ("none-detected", "inconclusive") and by_name["clean"]["flagged"] == []
    assert by_name["broken"]["verdict"] is None and "broken.pt" in by_name["broken"]["error"]
    assert result.counts["error"] == 1
    # each model's folder is the ordinary scan's, with the same result as scanning it alone
    alone = scan(load_model(zoo["badnet"]), load_data(zoo["data"]), seed=1, progress=False)
    saved = ScanResult.load(tmp_path / "s" / "models" / "badnet")
    assert saved.flagged == alone.flagged
    assert [r["mask_l1"] for r in saved.labels] == [r["mask_l1"] for r in alone.labels]
    assert (tmp_path / "s" / "models" / "badnet" / "report.html").is_file()
    rows = list(csv.DictReader(open(tmp_path / "s" / "screen.csv")))
    assert [r["verdict"] for r in rows] == ["backdoor-detected", by_name["clean"]["verdict"], ""]
    assert rows[0]["flagged"] == str(TARGET) and float(rows[0]["p_value"]) < 0.05 and rows[2]["error"]
    info = json.loads((tmp_path / "s" / "screen.json").read_text())
    assert info["finished"] == 3 and info["rows"][0]["report"] == "models/badnet/report.html"
    page = (tmp_path / "s" / "index.html").read_text()
    assert 'href="models/badnet/report.html"' in page and "backdoor-detected" in page

    # resuming keeps finished models (no rescan) and tries the failed one again
    before = (tmp_path / "s" / "models" / "badnet" / "scan.json").stat().st_mtime_ns
    with pytest.raises(NetcleanseError, match="not empty"):
        screen(entries, tmp_path / "s", seed=1, progress=False)
    again = screen(entries, tmp_path / "s", seed=1, resume=True, progress=False)
    assert (tmp_path / "s" / "models" / "badnet" / "scan.json").stat().st_mtime_ns == before
    assert [r["verdict"] for r in again.rows] == [r["verdict"] for r in result.rows]
    # a model's time is its scan's (elapsed_s, resumed runs added up), whichever run wrote the row
    assert again.rows[0]["time_s"] == result.rows[0]["time_s"] == saved.elapsed_s
    with pytest.raises(NetcleanseError, match=r"different settings \(seed\)"):
        screen(entries, tmp_path / "s", seed=2, resume=True, progress=False)
    with pytest.raises(NetcleanseError, match=r"different settings \(models\)"):
        screen(entries[:2], tmp_path / "s", seed=1, resume=True, progress=False)
    relabelled = [dataclasses.replace(e, labels="0-5") for e in entries]
    with pytest.raises(NetcleanseError, match=r"different settings \(labels\)"):
        screen(relabelled, tmp_path / "s", seed=1, resume=True, progress=False)


def test_summary_page_escapes_what_comes_from_files(zoo, tmp_path):
    evil = tmp_path / "<img src=x onerror=alert(1)>.pt"
    evil.write_bytes(b"not a model")
    screen([ScreenEntry(str(evil), name="<b>x</b>", data_free=True)], tmp_path / "s", progress=False)
    page = (tmp_path / "s" / "index.html").read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;.pt" in page and "<b>" not in page


def test_summary_table_cells_are_never_spreadsheet_formulas(tmp_path, monkeypatch):
    # a model file named like a formula, given by a relative path as a manifest would, stays text in
    # screen.csv (a spreadsheet would otherwise run it when the table is opened)
    monkeypatch.chdir(tmp_path)
    Path("=HYPERLINK(1).pt").write_bytes(b"not a model")
    screen([ScreenEntry("=HYPERLINK(1).pt", name="-1+2", data_free=True)], tmp_path / "s", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "s" / "screen.csv", encoding="utf-8")))
    assert rows[0]["model"] == "'=HYPERLINK(1).pt" and rows[0]["name"].startswith("'-1")
    assert all(not v.startswith(("=", "+", "-", "@")) for v in rows[0].values())
    # screen.json keeps the path exactly
    assert json.loads((tmp_path / "s" / "screen.json").read_text())["rows"][0]["model"] == "=HYPERLINK(1).pt"


def test_cli_screen(zoo, tmp_path):
    runner = CliRunner()
    manifest = tmp_path / "models.json"
    manifest.write_text(json.dumps([{"model": str(zoo["badnet"]), "name": "suspect", "data": str(zoo["data"]),
                                     "labels": "0-7"},
                                    {"model": str(zoo["broken"]), "data_free": True}]))
    res = runner.invoke(app, ["screen", "--manifest", str(manifest), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "2 models screened (1 backdoor-detected, 1 error)" in res.output
    assert f"suspect: backdoor detected, labels {TARGET}" in res.output and "broken: error:" in res.output
    for args, message in [([], "give model files or --manifest"),
                          ([str(zoo["clean"]), "--manifest", str(manifest)], "give model files or --manifest"),
                          ([str(zoo["clean"])], "give one of --data PATH or --data-free"),
                          ([str(zoo["clean"]), "--data-free", "--executor", "spark"], "unknown executor 'spark'"),
                          ([str(zoo["clean"]), "--data-free", "--ray-address", "x:1"], "--ray-address is for")]:
        res = runner.invoke(app, ["screen", *args, "--out", str(tmp_path / "p")])
        assert res.exit_code != 0 and message in str(res.exception) + res.output, (args, res.output)


def test_ray_missing_is_one_error_line(zoo, tmp_path, monkeypatch, capsys):
    from netcleanse.cli import main
    from netcleanse.executor import make_executor
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(NetcleanseError, match=r"needs Ray, which is not installed: pip install 'netcleanse\[ray\]'"):
        make_executor("ray")
    with pytest.raises(SystemExit) as exit_:
        main(["scan", str(zoo["clean"]), "--data", str(zoo["data"]), "--out", str(tmp_path / "o"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: the ray executor needs Ray") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing started


def test_model_folders_stay_inside_the_screen(tmp_path):
    """A manifest's name is the model's folder under models/: never `..`, `.` or a hidden name."""
    from netcleanse.utils import file_stem
    assert [file_stem(n) for n in ("..", ".", "../../evil", ".hidden", "a b/c", "")] == [
        "model", "model", "_.._evil", "hidden", "a_b_c", "model"]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    result = screen([ScreenEntry(str(broken), name=name, data_free=True) for name in ("..", ".", "../x")],
                    tmp_path / "s", progress=False)
    assert [r["name"] for r in result.rows] == ["model", "model_2", "_x"]


def test_paths_are_kept_absolute_so_resume_and_workers_find_the_same_files(tmp_path, monkeypatch):
    """Entries name their model, data and FILE.py architecture relative to the caller's folder; the
    screen keeps them absolute, so a resume from another folder (or a Ray worker started elsewhere,
    which would read another FILE.py) sees the same files."""
    from netcleanse.archspec import absolute_arch
    work = tmp_path / "work"
    work.mkdir()
    (work / "net.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    def __init__(self):\n"
                                 "        super().__init__(4, 2)\n")
    (work / "broken.pt").write_bytes(b"not a model")
    monkeypatch.chdir(work)
    assert absolute_arch("net.py:Net") == f"{work / 'net.py'}:Net"
    assert absolute_arch("mnist-cnn") == "mnist-cnn" and absolute_arch("timm:resnet18") == "timm:resnet18"
    assert absolute_arch("package.module:Net") == "package.module:Net"
    entries = [ScreenEntry("broken.pt", arch="net.py:Net", data_free=True)]
    screen(entries, tmp_path / "s", progress=False)
    saved = json.loads((tmp_path / "s" / "screen_settings.json").read_text())["entries"][0]
    assert saved["model"] == str(work / "broken.pt") and saved["arch"] == f"{work / 'net.py'}:Net"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = screen([ScreenEntry("../work/broken.pt", arch="../work/net.py:Net", data_free=True)],
                   tmp_path / "s", resume=True, progress=False)
    assert "not a" in again.rows[0]["error"] and "no such Python file" not in again.rows[0]["error"]


def test_settings_no_model_could_use_are_refused_once(zoo, tmp_path):
    """Not a row per model (exit 0, and the folder then occupied): one error, nothing written."""
    entries = make_entries([zoo["clean"]], data_free=True)
    for kwargs, message in [(dict(alpha=2.0), "alpha must be a number between 0 and 1"),
                            (dict(threshold=-1.0), "threshold must be a positive number")]:
        with pytest.raises(NetcleanseError, match=message):
            screen(entries, tmp_path / "s", progress=False, **kwargs)
    with pytest.raises(NetcleanseError, match="data not found"):
        screen(make_entries([zoo["clean"]], data=tmp_path / "missing.npz"), tmp_path / "s", progress=False)
    with pytest.raises(NetcleanseError, match="a list of model files, got the single path"):
        make_entries(str(zoo["clean"]), data_free=True)  # would be one entry per character
    with pytest.raises(NetcleanseError, match="takes a list of ScreenEntry"):
        screen([str(zoo["clean"])], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


class OneTaskFails(LocalExecutor):
    """As a Ray worker that dies on one model: the executor reports that item as failed."""

    def map(self, fn, shared, items, on_progress=None, failures=False):
        for i, item in enumerate(items):
            if item[1] == "crasher":
                assert failures  # a screen asks for failures as results, not as the end of everything
                yield i, NetcleanseError("a Ray task failed 4 times (its worker or node died)")
            else:
                yield i, fn(shared, item, lambda amount: None)


def test_a_failed_task_is_a_row_and_an_interrupted_screen_keeps_its_summary(zoo, tmp_path, monkeypatch):
    import netcleanse.screening as screening
    entries = [ScreenEntry(str(zoo["clean"]), name="crasher", data_free=True, labels="0-2"),
               ScreenEntry(str(zoo["badnet"]), name="good", data_free=True, labels="0-2"),
               ScreenEntry(str(zoo["clean"]), name="later", data_free=True, labels="0-2")]
    render = screening._render
    monkeypatch.setattr(screening, "_render", lambda target, out: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the first finished model's report is rendered
        screen(entries, tmp_path / "s", executor=OneTaskFails(), progress=False)
    info = json.loads((tmp_path / "s" / "screen.json").read_text())
    assert [r["name"] for r in info["rows"]] == ["crasher", "good"]  # the summary holds every finished model
    assert "worker or node died" in info["rows"][0]["error"] and info["rows"][1]["verdict"] is not None
    page = (tmp_path / "s" / "index.html").read_text()
    assert "<td>later</td>" in page and "not yet scanned" in page  # a pending row named as its folder will be
    monkeypatch.setattr(screening, "_render", render)
    again = screen(entries, tmp_path / "s", executor=OneTaskFails(), resume=True, progress=False)
    assert [r["error"] is None for r in again.rows] == [False, True, True]
    assert again.rows[1]["report"] == "models/good/report.html" and (tmp_path / "s" / "models/good/report.html").is_file()


def test_an_unreadable_finished_scan_is_scanned_again_and_long_names_are_cut(zoo, tmp_path):
    name = "模" * 150  # 450 bytes of UTF-8: more than a file name may hold
    entries = [ScreenEntry(str(zoo["clean"]), name=name, data_free=True, labels="0-2")]
    first = screen(entries, tmp_path / "s", progress=False)
    folder = tmp_path / "s" / "models" / first.rows[0]["name"]
    assert first.rows[0]["error"] is None and len(folder.name.encode()) <= 100 and folder.is_dir()
    (folder / "scan.json").write_text('{"format": "netcleanse-scan", "trunc')
    with pytest.warns(NetcleanseWarning, match="cannot be read .* kept as .*unreadable-1 and the model is scanned again"):
        again = screen(entries, tmp_path / "s", resume=True, progress=False)
    assert (folder.parent / f"{folder.name}.unreadable-1" / "scan.json").read_text().endswith("trunc")  # nothing lost
    assert again.rows[0]["error"] is None and again.rows[0]["verdict"] == first.rows[0]["verdict"]
    assert ScanResult.load(folder).verdict == first.rows[0]["verdict"]


def test_a_screened_model_with_a_wrong_input_scale_is_warned_about_in_its_scan(tmp_path):
    # the preprocessing check runs inside the scan (it ran only in the `scan` command): a zoo screened
    # at the wrong --input-scale says so for each model, on stderr and in its scan.json
    class Thirds(torch.nn.Module):  # class = which third of [0, 1] the mean pixel falls in
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-(m - c).abs() * 100 for c in (1 / 6, 1 / 2, 5 / 6)], dim=1)

    path = save_model(Classifier(torch.jit.trace(Thirds(), torch.rand(1, 1, 4, 4)), (1, 4, 4), 3, name="thirds"),
                      tmp_path / "thirds.pt")
    x = torch.rand(90, 1, 4, 4, generator=torch.Generator().manual_seed(0)) / 3 + \
        torch.arange(3).repeat(30).view(-1, 1, 1, 1) / 3
    data = save_data(Dataset(x, torch.arange(3).repeat(30), source="thirds"), tmp_path / "thirds.npz")
    entries = make_entries([path], data=data, input_scale=255.0)
    with pytest.warns(NetcleanseWarning, match="with --input-scale 1: check --input-scale"):
        screen(entries, tmp_path / "s", progress=False)
    saved = ScanResult.load(tmp_path / "s" / "models" / "thirds")
    assert any("with --input-scale 1" in note for note in saved.settings["warnings"])
