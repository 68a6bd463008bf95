"""Repair: fine-pruning, unlearning, the repair() dispatcher, RepairResult files and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import netcleanse
from netcleanse.cli import app
from netcleanse.data import Dataset
from netcleanse.errors import NetcleanseError
from netcleanse.model import Classifier
from netcleanse.pruning import (fine_prune, mean_channel_activation, prune_channels, prune_layer_name,
                                pruned_channels)
from netcleanse.repair import (METHODS, MethodOutput, RepairOptions, RepairResult, register_method, repair,
                               scan_triggers)
from netcleanse.torch_io import save_model
from netcleanse.trigger import Trigger
from netcleanse.unlearning import unlearning_set


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(netcleanse.build_architecture("mnist-cnn"), (1, 28, 28), 10, arch="mnist-cnn", name="m")


def _self_labelled(model: Classifier, n: int = 200, seed: int = 0) -> Dataset:
    """Inputs labelled with the model's own answers: its accuracy starts at exactly 100%."""
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return Dataset(x, model.predict(x), "self-labelled")


def _patch() -> Trigger:
    mask = torch.zeros(28, 28)
    mask[23:27, 23:27] = 1
    return Trigger(mask, torch.ones(1, 28, 28))


def test_prune_layer_defaults_to_the_architectures_choice_and_checks_names():
    model = _model()
    assert prune_layer_name(model) == "conv_2"
    assert prune_layer_name(model, "conv_1") == "conv_1"
    with pytest.raises(NetcleanseError, match="not a convolutional layer.*conv_1, conv_2"):
        prune_layer_name(model, "fc_1")


def test_a_1x1_class_head_as_last_convolution_is_warned_about():
    from netcleanse.errors import NetcleanseWarning
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.warns(NetcleanseWarning, match="one 1x1 channel per class.*--layer \\(e.g. 0\\)"):
        assert prune_layer_name(Classifier.wrap(net, "1x8x8")) == "2"


def test_zeroing_a_channel_equals_masking_its_output(tmp_path):
    model = _model()
    x = torch.rand(16, 1, 28, 28)
    channels = [0, 5, 9]
    keep = torch.ones(32)
    keep[channels] = 0
    conv = model.net.conv_2
    handle = conv.register_forward_hook(lambda m, i, out: out * keep[None, :, None, None])
    masked = model.logits(x)
    handle.remove()
    pruned = copy.deepcopy(model)
    prune_channels(pruned, "conv_2", channels)
    assert torch.allclose(pruned.logits(x), masked, atol=1e-5)
    assert pruned_channels(pruned, "conv_2") == channels
    # and the pruning survives the Keras export
    reloaded = netcleanse.load_model(save_model(pruned, tmp_path / "p.h5"), arch="mnist-cnn")
    assert torch.allclose(reloaded.logits(x), masked, atol=1e-4)
    assert pruned_channels(reloaded, "conv_2") == channels


class _ConvBnNet(torch.nn.Module):
    """Conv -> BatchNorm -> ReLU -> pooled -> Linear, the usual PyTorch block (its layers named out of order)."""

    def __init__(self, norm=None):
        super().__init__()
        self.norm = norm if norm is not None else torch.nn.BatchNorm2d(6)
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)
        self.relu_first = False

    def forward(self, x):
        if self.relu_first:  # Conv -> ReLU -> BatchNorm (Keras's Conv2D(activation="relu") then a norm)
            return self.fc(self.norm(torch.relu(self.conv(x))).mean(dim=(2, 3)))
        return self.fc(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("norm", ["torch", "torch-no-affine", "keras-no-scale", "torch-relu-first"])
def test_pruning_a_channel_before_a_batch_norm_silences_it_after_the_norm(norm):
    # a zero convolution output would leave beta - gamma * mean / sd after the norm: the norm's own
    # parameters of the channel are zeroed too, so the pruned channel is 0 where the next layer reads
    # it, and the channels are ranked by that activation
    from netcleanse.keras import KerasBatchNorm
    from netcleanse.pruning import following_batchnorm
    layer = {"torch": torch.nn.BatchNorm2d(6), "torch-no-affine": torch.nn.BatchNorm2d(6, affine=False),
             "keras-no-scale": KerasBatchNorm(6, 1e-3, 0.99, center=True, scale=False),
             "torch-relu-first": torch.nn.BatchNorm2d(6)}[norm]
    torch.manual_seed(0)
    net = _ConvBnNet(layer)
    net.relu_first = norm == "torch-relu-first"
    with torch.no_grad():
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
        if net.norm.affine:
            net.norm.bias.uniform_(0.2, 1)
    model = Classifier.wrap(net, "1x8x8")
    assert following_batchnorm(model, "conv") is net.norm
    x = torch.rand(20, 1, 8, 8)
    seen = {}
    net.norm.register_forward_hook(lambda module, inputs, out: seen.__setitem__("after", torch.relu(out)))
    with torch.no_grad():
        model(x)
    data = Dataset(x, torch.zeros(20, dtype=torch.long), source="t")
    assert torch.allclose(mean_channel_activation(model, "conv", data), seen["after"].mean(dim=(0, 2, 3)), atol=1e-6)
    prune_channels(model, "conv", [1, 4])
    with torch.no_grad():
        model(x)
    assert seen["after"][:, [1, 4]].abs().max() == 0 and seen["after"][:, [0, 2]].abs().max() > 0
    assert pruned_channels(model, "conv") == [1, 4]


def test_fine_prune_follows_the_activation_order_and_saves_at_first_drops():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = _self_labelled(model, 80)
    result = fine_prune(model, val, drops=(2, 10, 30), progress=False)
    activation = mean_channel_activation(model, "conv_2", val)
    assert result.layer == "conv_2" and len(result.curve) == 32
    assert torch.all(activation[result.order][1:] >= activation[result.order][:-1])
    assert result.curve[-1]["fraction_pruned"] == 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    accuracies = [1.0] + [row["clean_val_accuracy"] for row in result.curve]
    for entry in result.table:
        k = entry["channels_pruned"]
        drop_needed = entry["drop_threshold"] / 100
        assert 1.0 - accuracies[k] >= drop_needed - 1e-9
        assert all(1.0 - a < drop_needed - 1e-9 for a in accuracies[:k])  # the FIRST time
        saved = result.saved[entry["drop_threshold"]]
        assert sorted(pruned_channels(saved, "conv_2")) == sorted(result.order[:k])
        assert entry["clean_val_accuracy"] == pytest.approx(netcleanse.evaluate.accuracy(saved, val))


def test_fine_prune_measures_test_sets_and_fine_tuning_keeps_channels_pruned():
    model = _model()
    val = _self_labelled(model, 40)
    test = _self_labelled(model, 30, seed=1)
    poisoned = Dataset(_patch().apply(test.x), torch.full((30,), 3), "poisoned")
    result = fine_prune(model, val, layer="conv_1", drops=(4,), test_clean=test, test_poisoned=poisoned,
                        fine_tune_epochs=1, progress=False)
    assert {"clean_accuracy", "attack_success"} <= set(result.curve[0])
    (entry,) = result.table
    assert "clean_val_accuracy_after_fine_tuning" in entry and "attack_success_after_fine_tuning" in entry
    assert sorted(pruned_channels(result.saved[4.0], "conv_1")) == sorted(result.order[:entry["channels_pruned"]])


def test_fine_prune_refuses_bad_input():
    model = _model()
    with pytest.raises(NetcleanseError, match="labelled clean validation data"):
        fine_prune(model, Dataset(torch.rand(4, 1, 28, 28)), progress=False)
    with pytest.raises(NetcleanseError, match="positive"):
        fine_prune(model, _self_labelled(model, 8), drops=(0,), progress=False)


def test_fine_prune_that_reaches_no_threshold_says_so():
    model = _model()
    with pytest.raises(NetcleanseError, match=r"pruning all \d+ channels of conv_1 lowered the validation accuracy by "
                                              r"at most [\d.]+ points, less than the smallest threshold \(101\)"):
        fine_prune(model, _self_labelled(model, 20), layer="conv_1", drops=(101,), progress=False)


def test_select_drop_records_the_request_and_the_choice():
    model = _model()
    val = _self_labelled(model, 40)
    chosen = repair(model, {}, "fine-prune", val, drops=[2, 30], select_drop=30, layer="conv_1", progress=False)
    assert chosen.settings["select_drop"] == 30 and chosen.settings["chosen_drop"] == 30 and "warnings" not in chosen.settings
    below = repair(model, {}, "fine-prune", val, drops=[2, 30], select_drop=1, layer="conv_1", progress=False)
    assert below.settings["select_drop"] == 1 and below.settings["chosen_drop"] == 2
    assert "no saved model lost at most 1 points" in below.settings["warnings"][0]


def test_after_fine_tuning_the_result_is_measured_after_fine_tuning():
    """repair.json's "after" (the report's before -> after line) measures the model returned: the
    fine-tuned one when --fine-tune-epochs is given."""
    model = _model()
    val, test = _self_labelled(model, 40), _self_labelled(model, 30, seed=1)
    result = repair(model, {}, "fine-prune", val, drops=[30], select_drop=30, layer="conv_1", fine_tune_epochs=1,
                    test_clean=test, progress=False)
    row = next(r for r in result.table if r.get("model") == "pruned_drop30")
    assert row["clean_accuracy"] != row["clean_accuracy_after_fine_tuning"]  # the two can be told apart here
    from netcleanse.evaluate import evaluate
    measured = evaluate(result.model, test)
    assert result.to_dict()["after"]["clean_accuracy"] == row["clean_accuracy_after_fine_tuning"] == \
        pytest.approx(measured.clean_accuracy)


def test_unlearning_set_stamps_the_fraction_and_keeps_labels():
    clean = Dataset(torch.rand(100, 1, 28, 28) * 0.5, torch.arange(100) % 10, "c")
    data = unlearning_set(clean, {3: _patch()}, fraction=0.2, seed=0)
    changed = (data.x != clean.x).flatten(1).any(1)
    assert int(changed.sum()) == 20
    assert torch.equal(data.y, clean.y)
    assert torch.allclose(data.x[changed], _patch().apply(clean.x[changed]))
    with pytest.raises(NetcleanseError, match="flagged no label"):
        unlearning_set(clean, {})


def _scan_dir(tmp_path, flagged=(3,), labels=(1, 3)):
    """A stand-in scan output folder in the agreed layout (scan.json + masks.npz)."""
    folder = tmp_path / "scan"
    folder.mkdir()
    masks = np.stack([np.full((28, 28), 0.01, np.float32), _patch().mask.numpy()])
    records = [{"label": int(t), "mask_l1": float(m.sum()), "flagged": int(t) in flagged} for t, m in zip(labels, masks)]
    (folder / "scan.json").write_text(json.dumps({"flagged": list(flagged), "labels": records}))
    patterns = np.stack([np.zeros((1, 28, 28), np.float32), _patch().pattern.numpy()])
    np.savez(folder / "masks.npz", labels=np.array(labels), masks=masks, patterns=patterns)
    return folder


def test_scan_triggers_reads_a_scan_folder(tmp_path):
    triggers = scan_triggers(_scan_dir(tmp_path))
    assert list(triggers) == [3]
    assert torch.equal(triggers[3].mask, _patch().mask)
    with pytest.raises(NetcleanseError, match="not a scan output folder"):
        scan_triggers(tmp_path / "nowhere")


def test_repair_filter_result_saves_one_guarded_artefact(tmp_path):
    model = _model()
    result = repair(model, {3: _patch()}, "filter", None, progress=False)
    assert isinstance(result, RepairResult) and result.model.poison_label == 10
    result.save(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "repair.json").read_text())
    assert record["method"] == "filter" and record["flagged"] == [3]
    assert record["files"] == {"guarded": ["guarded.pt"]}
    assert netcleanse.load_model(tmp_path / "out" / "guarded.pt").poison_label == 10
    with pytest.raises(NetcleanseError, match="already holds a repair"):
        result.save(tmp_path / "out")
    # a model file already there (the input model, say) is not replaced either, and nothing is written
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "guarded.pt").write_bytes(b"the user's model")
    with pytest.raises(NetcleanseError, match="guarded.pt exists"):
        result.save(tmp_path / "other")
    assert (tmp_path / "other" / "guarded.pt").read_bytes() == b"the user's model"
    assert not (tmp_path / "other" / "repair.json").exists()
    result.save(tmp_path / "other", force=True)
    assert netcleanse.load_model(tmp_path / "other" / "guarded.pt").poison_label == 10


def test_training_repairs_record_their_passes_and_obey_the_memory_bound(tmp_path, monkeypatch):
    """Unlearning (and fine-pruning's fine-tuning) takes 64-image mini-batches, in parts where the
    activations would exceed NETCLEANSE_PASS_MIB (netcleanse.passes); repair.json records the parts."""
    model, val, scanned = _model(), _self_labelled(_model(), 64), _scan_dir(tmp_path)
    whole = repair(model, scanned, "unlearn", val, epochs=1, progress=False)
    assert whole.settings["images_per_pass"] == 64
    monkeypatch.setenv("NETCLEANSE_PASS_MIB", "1")  # mnist-cnn keeps ~0.1 MiB per training image
    parts = repair(model, scanned, "unlearn", val, epochs=1, progress=False)
    assert 1 <= parts.settings["images_per_pass"] < 64
    for a, b in zip(whole.model.state_dict().values(), parts.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # the same steps, up to rounding
    pruned = repair(model, scanned, "fine-prune", val, layer="conv_1", drops=(4,), fine_tune_epochs=1, progress=False)
    assert pruned.settings["images_per_pass"] == parts.settings["images_per_pass"]


def test_repair_needs_clean_data_for_weight_methods():
    for method in ("fine-prune", "unlearn", "disagree"):
        with pytest.raises(NetcleanseError, match="needs labelled clean data"):
            repair(_model(), {3: _patch()}, method, None, progress=False)
    with pytest.raises(NetcleanseError, match="unknown repair method"):
        repair(_model(), {}, "prune", None)


def test_repair_options_object_and_keywords_are_one_setting(monkeypatch):
    """Keyword settings override the options object; a registered method is dispatched to with both."""
    from netcleanse.repair import base
    seen = []

    def fake(job):
        seen.append(job.options)
        return MethodOutput(job.model, [job.original])

    monkeypatch.setitem(base.REGISTRY, "fake", fake)
    model = _model()
    result = repair(model, {}, "fake", options=RepairOptions(epochs=3, seed=5), seed=7, progress=False)
    assert seen == [RepairOptions(epochs=3, seed=7, progress=False)]
    assert result.settings["seed"] == 7 and result.table == [{"model": "original"}] and result.model is model
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        repair(model, {}, "fake", epoch=3)
    with pytest.raises(AttributeError):  # frozen: one repair's settings cannot leak into another's
        RepairOptions().epochs = 1
    assert METHODS == ("fine-prune", "unlearn", "filter", "disagree") and callable(register_method)


def _npz(path, data: Dataset):
    np.savez(path, x=(data.x.numpy() * 255).round().astype(np.uint8), y=data.y.numpy())
    return path


def test_cli_fine_prune_writes_table_and_exports(tmp_path):
    model = _model()
    model_path = save_model(model, tmp_path / "model.pt")
    x = (torch.rand(60, 1, 28, 28) * 255).round() / 255  # survives the uint8 file exactly
    val = Dataset(x, model.predict(x), "v")
    data = _npz(tmp_path / "val.npz", val)
    runner = CliRunner()
    out = tmp_path / "rep"
    args = ["repair", str(model_path), "--scan", str(_scan_dir(tmp_path)), "--method", "fine-prune",
            "--data", str(data), "--drops", "2,4", "--layer", "conv_1", "--out", str(out), "--test-clean", str(data)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "repair.json").read_text())
    assert [row["drop_threshold"] for row in record["table"]] == [0.0, 2.0, 4.0]
    # before -> after: the original's row and the returned (4-point) model's, for the report's verdict box
    assert record["before"] == {"clean_accuracy": record["table"][0]["clean_accuracy"]} == {"clean_accuracy": 1.0}
    assert record["after"] == {"clean_accuracy": record["table"][2]["clean_accuracy"]}
    assert "clean accuracy 100.0 % &rarr;" in (out / "report.html").read_text()
    assert len(record["curve"]) == 17 and record["settings"]["layer"] == "conv_1"
    assert (out / "repaired.pt").exists() and (out / "repaired.h5").exists()  # the 4-point model
    assert (out / "pruned_drop2.pt").exists() and (out / "pruned_drop2.h5").exists()
    exported = netcleanse.load_model(out / "repaired.h5", arch="mnist-cnn")
    assert len(pruned_channels(exported, "conv_1")) == record["table"][2]["channels_pruned"]
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "already holds a repair" in str(again.exception or again.output)
    # --json writes the same folder, report included
    as_json = runner.invoke(app, [*args[:-3], str(tmp_path / "rep_json"), "--test-clean", str(data), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["method"] == "fine-prune" and (tmp_path / "rep_json" / "report.html").is_file()


def test_cli_refuses_missing_inputs(tmp_path):
    model_path = save_model(_model(), tmp_path / "model.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["repair", str(model_path), "--method", "filter", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "needs the scan" in str(result.exception)
    result = runner.invoke(app, ["repair", str(model_path), "--method", "unlearn", "--scan",
                                 str(_scan_dir(tmp_path)), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "needs labelled clean data" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_repair_options_refuse_settings_no_method_can_use():
    """Each bad setting is named; none is quietly replaced by a default (lr 0 once became 3e-3)."""
    for setting, name in ((dict(lr=0.0), "lr must be > 0"), (dict(select_drop=-1.0), "select_drop must be >= 0"),
                          (dict(quantile=1.5), "quantile must be in"), (dict(top_fraction=0.0), "top_fraction"),
                          (dict(fraction=1.0), "fraction must be in"), (dict(drops=(2, -4)), "drops must be"),
                          (dict(epochs=0), "epochs must be >= 1")):
        with pytest.raises(NetcleanseError, match=name):
            RepairOptions(**setting)
    assert RepairOptions(lr=1e-4).lr_or(3e-3) == 1e-4 and RepairOptions().lr_or(3e-3) == 3e-3


def test_training_on_clean_data_of_few_classes_is_warned_about(tmp_path):
    """Unlearning on images of 3 of 10 classes can erase the other 7: repair.json says so."""
    model, scanned = _model(), _scan_dir(tmp_path)
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    few = repair(model, scanned, "unlearn", Dataset(x, torch.arange(40) % 3, "three"), epochs=1, progress=False)
    assert few.settings["clean_classes"] == 3 and "3 of the model's 10 classes" in few.settings["warnings"][0]
    every = repair(model, scanned, "unlearn", Dataset(x, torch.arange(40) % 10, "ten"), epochs=1, progress=False)
    assert every.settings["clean_classes"] == 10 and "warnings" not in every.settings


def test_repair_refuses_a_scan_of_another_model(tmp_path):
    """The reversed triggers of another model's scan must not repair this one: classes, input shape and,
    where the scan folder recorded it, the weights' SHA-256 are compared."""
    from netcleanse.journal import weights_digest
    from netcleanse.repair.inputs import check_scan_model
    model, other = _model(0), _model(1)
    folder = _scan_dir(tmp_path)
    record = json.loads((folder / "scan.json").read_text())
    record["model"] = {"num_classes": 10, "input_shape": [1, 28, 28]}
    (folder / "scan.json").write_text(json.dumps(record))
    check_scan_model(folder, model)  # nothing recorded beyond classes and shape: they match
    (folder / "scan_settings.json").write_text(json.dumps({"settings": {}, "model": {"weights_sha256": weights_digest(model)}}))
    check_scan_model(folder, model)
    with pytest.raises(NetcleanseError, match="other weights"):
        repair(other, folder, "filter", None, progress=False)
    record["model"]["num_classes"] = 43
    (folder / "scan.json").write_text(json.dumps(record))
    with pytest.raises(NetcleanseError, match="num classes 43, not this model's 10"):
        repair(model, folder, "filter", None, progress=False)


def test_cli_repair_keeps_other_files_and_scans_out_of_its_folder(tmp_path):
    """--out must be empty (or --force), and never another scan's folder: its report would show that scan
    beside this repair."""
    model_path = save_model(_model(), tmp_path / "model.pt")
    scan = _scan_dir(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    runner = CliRunner()
    args = ["repair", str(model_path), "--scan", str(scan), "--method", "filter"]
    result = runner.invoke(app, args + ["--out", str(busy)])
    assert result.exit_code != 0 and "is not empty" in str(result.exception)
    other_scan = tmp_path / "other"
    other_scan.mkdir()
    (other_scan / "scan.json").write_text("{}")
    result = runner.invoke(app, args + ["--out", str(other_scan), "--force"])
    assert result.exit_code != 0 and "holds another scan" in str(result.exception)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"] and not (other_scan / "guarded.pt").exists()


def test_cli_repair_of_a_scan_that_flagged_nothing_is_refused_before_the_data_is_read(tmp_path):
    model_path = save_model(_model(), tmp_path / "model.pt")
    nothing = _scan_dir(tmp_path, flagged=())
    for method in ("unlearn", "filter"):
        result = CliRunner().invoke(app, ["repair", str(model_path), "--scan", str(nothing), "--method", method,
                                          "--data", str(tmp_path / "not_read.npz"), "--out", str(tmp_path / method)])
        assert result.exit_code != 0 and "the scan flagged no label" in str(result.exception), result.output


def test_cli_repair_force_removes_the_replaced_repairs_models_and_options_of_other_methods_are_refused(tmp_path):
    model = _model()
    model_path = save_model(model, tmp_path / "model.pt")
    x = (torch.rand(40, 1, 28, 28) * 255).round() / 255
    data = _npz(tmp_path / "val.npz", Dataset(x, model.predict(x), "v"))
    scan, out, runner = _scan_dir(tmp_path), tmp_path / "rep", CliRunner()
    base = ["repair", str(model_path), "--scan", str(scan), "--out", str(out)]
    first = runner.invoke(app, base + ["--method", "fine-prune", "--data", str(data), "--drops", "2,30",
                                       "--select-drop", "30", "--layer", "conv_1"])
    assert first.exit_code == 0, first.output
    assert {"repaired.pt", "pruned_drop2.pt", "pruned_drop2.h5"} <= {p.name for p in out.iterdir()}
    second = runner.invoke(app, base + ["--method", "filter", "--force"])
    assert second.exit_code == 0, second.output
    left = {p.name for p in out.iterdir()}
    assert "guarded.pt" in left and not left & {"repaired.pt", "repaired.h5", "pruned_drop2.pt", "pruned_drop2.h5"}
    for extra, message in ((["--method", "fine-prune", "--epochs", "3"], "--epochs is an option of unlearn, not of "
                                                                         "--method fine-prune (fine-tuning after pruning"),
                           (["--method", "filter", "--drops", "2"], "--drops is an option of fine-prune and disagree"),
                           (["--method", "unlearn", "--quantile", "0.9"], "--quantile is an option of filter"),
                           (["--method", "fine-prune", "--lr", "0.01"], "give --fine-tune-epochs N with it")):
        refused = runner.invoke(app, base + ["--data", str(data), "--force"] + extra)
        assert refused.exit_code != 0 and message in str(refused.exception), (extra, refused.output)
    assert "guarded.pt" in {p.name for p in out.iterdir()}


# --------------------------------------------------------------------------------------------
# Ground truth: the lab's patch BadNet, scanned, then repaired from the scan's findings only.
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_repairs_remove_a_lab_patch_backdoor():
    from netcleanse.evaluate import evaluate
    from netcleanse.lab import make_badnet
    from netcleanse.scanning import scan
    badnet = make_badnet("mnist", "patch", target=7, progress=False)
    model, poisoned, clean_test = badnet.model, badnet.poisoned_tests[0], badnet.clean_test
    before = evaluate(model, clean_test, poisoned)
    assert before.attack_success > 0.9
    with_data = scan(model, badnet.val, seed=0, progress=False)
    assert with_data.flagged == [7]
    unlearned = repair(model, with_data, "unlearn", badnet.val, progress=False).model
    after = evaluate(unlearned, clean_test, poisoned)
    assert after.attack_success <= 0.01 and after.clean_accuracy >= before.clean_accuracy - 0.02
    data_free = scan(model, data_free=True, seed=0, progress=False)
    assert data_free.flagged == [7]
    guarded = repair(model, data_free, "filter", None, progress=False).model
    guard_eval = evaluate(guarded, clean_test, poisoned)
    assert guard_eval.attack_success < 0.02 and guard_eval.poison_detection > 0.95
    # Data-free, genuine 7s cannot be told from triggered ones, but nothing else is refused:
    others = clean_test.subset(clean_test.y != 7)
    assert evaluate(guarded, others).false_positive < 0.01


def test_a_model_frozen_for_inference_is_repaired_on_a_trainable_copy():
    # requires_grad_(False) everywhere (a model loaded for inference): the repairs that train work on
    # their own copy, made trainable; the user's model stays as it was; training it directly says why not
    from netcleanse.training import train
    model = _model()
    model.requires_grad_(False)
    data = _self_labelled(model, 64)
    mask = torch.zeros(28, 28)
    mask[-4:, -4:] = 1
    fixed = repair(model, {3: Trigger(mask, torch.ones(1, 28, 28))}, "unlearn", data, epochs=1, progress=False)
    assert any(p.requires_grad for p in fixed.model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert not torch.equal(fixed.model.net.output.weight, model.net.output.weight)  # it was trained
    pruned = fine_prune(model, data, drops=(0.5,), fine_tune_epochs=1, progress=False)
    assert pruned.table[0].get("clean_val_accuracy_after_fine_tuning") is not None
    with pytest.raises(NetcleanseError, match="every weight of 'm' is frozen"):
        train(model, data, epochs=1, progress=False)


def test_the_api_refuses_a_scan_result_of_other_weights(tmp_path):
    # a ScanResult (loaded or in memory) records its model's SHA-256 in scan.json, as the CLI's folder check reads it
    from netcleanse.scanning import ScanResult, scan
    model, other = _model(0), _model(1)
    data = _self_labelled(model, 40)
    result = scan(model, data, labels=[0, 1, 2], progress=False, out=tmp_path / "s")
    assert result.model["weights_sha256"]
    for given in (result, ScanResult.load(tmp_path / "s")):
        with pytest.raises(NetcleanseError, match="scan of other weights or preprocessing"):
            repair(other, given, "filter")


def test_several_poisoned_test_sets_get_one_attack_success_each():
    # one set per target: the table's ASR over all of them, and per set (a target left working shows)
    model = _model()
    x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    answers = model.predict(x)
    hit = Dataset(x[:10], answers[:10], "hit")  # every image "poisoned" to what the model answers: ASR 1
    miss = Dataset(x[10:30], (answers[10:30] + 1) % 10, "miss")  # never: ASR 0
    result = repair(model, {3: _patch()}, "filter", test_poisoned=[hit, miss], progress=False)
    original = result.table[0]
    assert original["attack_success_by_set"] == [1.0, 0.0]
    assert original["attack_success"] == pytest.approx(10 / 30)
    # fine-pruning: every saved model's row (and its figures after fine-tuning) per set too, and
    # the merged figure is the sets' counts added up
    val = _self_labelled(model, 40)
    pruned = repair(model, {}, "fine-prune", val, drops=[30], select_drop=30, layer="conv_1", fine_tune_epochs=1,
                    test_poisoned=[hit, miss], progress=False)
    row = next(r for r in pruned.table if r.get("model") == "pruned_drop30")
    from netcleanse.evaluate import evaluate
    for suffix in ("", "_after_fine_tuning"):
        by_set = row["attack_success_by_set" + suffix]
        assert len(by_set) == 2 and row["attack_success" + suffix] == pytest.approx((10 * by_set[0] + 20 * by_set[1]) / 30)
    assert row["attack_success_by_set_after_fine_tuning"] == [evaluate(pruned.model, poisoned=part).attack_success
                                                              for part in (hit, miss)]
    single = repair(model, {3: _patch()}, "filter", test_poisoned=[hit], progress=False)
    assert "attack_success_by_set" not in single.table[0]
    with pytest.raises(NetcleanseError, match="a target was given without poisoned test data"):
        repair(model, {3: _patch()}, "filter", target=3, progress=False)
