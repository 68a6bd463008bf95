"""End-to-end tests of netcleanse.scan on a tiny BadNet planted in the test (seconds on a CPU)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcleanse import scan_folder
from netcleanse.data import Dataset
from netcleanse.errors import NetcleanseError
from netcleanse.journal import lock_folder, weights_digest
from netcleanse.model import Classifier
from netcleanse.presets import PRESETS
from netcleanse.scanning import ScanResult, parse_labels, scan

from conftest import N_CLASSES, SIZE, TARGET, TinyNet, ctrl_c_at_search, make_data, stamp, train_tiny

scan_module = importlib.import_module("netcleanse.scanning")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_planted_backdoor_works(badnet, clean_data):
    keep = clean_data.y != TARGET
    assert (badnet.predict(clean_data.x) == clean_data.y).float().mean() > 0.9
    assert (badnet.predict(stamp(clean_data.x[keep])) == TARGET).float().mean() > 0.9


def test_scan_flags_planted_target_with_data(badnet, clean_data, tmp_path):
    result = scan(badnet, clean_data, out=tmp_path / "s", progress=False)
    assert result.flagged == [TARGET]
    rec = result.record(TARGET)
    assert rec["flagged"] and rec["anomaly_index"] > 2
    assert rec["attack_success"] > 0.7
    # the reversed trigger sits where the planted one is (bottom-right corner)
    mask = result.trigger(TARGET).mask
    row, col = divmod(int(mask.argmax()), SIZE)
    assert row >= SIZE - 4 and col >= SIZE - 4
    files = {p.name for p in (tmp_path / "s").iterdir()}
    assert {"scan.json", "masks.npz", f"tiny_badnet_visualize_mask_label_{TARGET}.png",
            f"tiny_badnet_visualize_pattern_label_{TARGET}.png",
            f"tiny_badnet_visualize_fusion_label_{TARGET}.png", "triggers"} <= files
    info = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert info["flagged"] == [TARGET] and info["data"] == "tiny-clean" and len(info["labels"]) == N_CLASSES
    assert set(info["labels"][0]) >= {"label", "mask_l1", "attack_success", "anomaly_index", "flagged", "steps"}
    assert info["verdict"] == "backdoor-detected"
    # few labels: each label's transferability on the clean images, the planted target's the largest
    transfer = {r["label"]: r["transferability"] for r in info["labels"]}
    assert info["settings"]["detection"]["transfer_threshold"] == PRESETS["fast"].few_labels_data_transfer
    assert max(transfer, key=transfer.get) == TARGET and info["settings"]["passes"]["transfer"] > 0
    # mask_l1_vs_median: the same median the index is measured from
    assert rec["mask_l1_vs_median"] == pytest.approx(rec["mask_l1"] / info["settings"]["detection"]["median"])
    assert rec["mask_l1_vs_median"] < 1
    # the ceiling is the index an empty mask would get: above every label's, and from the same median/MAD
    det = info["settings"]["detection"]
    assert info["index_ceiling"] == pytest.approx(det["median"] / det["mad"])
    assert info["index_ceiling"] > max(r["anomaly_index"] for r in info["labels"])
    loaded = ScanResult.load(tmp_path / "s")
    assert loaded.flagged == [TARGET] and loaded.index_ceiling == info["index_ceiling"]
    assert torch.equal(loaded.trigger(TARGET).mask, result.trigger(TARGET).mask)


def test_scan_data_free_finds_planted_target(badnet):
    # Data-free, this 8-class toy's trigger needs a clearly smaller mask than any other label, but its
    # target reaches no unusual logit margin from noise starts (every label reaches a similar one), so
    # the calibrated test, which weighs both signals, ranks it first without reaching alpha (p ~ 0.1);
    # the paper's per-label rule flags it. How often the calibrated verdict detects backdoors is
    # measured on the benchmark zoo (benchmarks/RESULTS.md), not on this toy.
    result = scan(badnet, data_free=True, progress=False)
    tested = [r for r in result.labels if r["test_index"] is not None]
    assert max(tested, key=lambda r: r["test_index"])["label"] == TARGET
    assert max(tested, key=lambda r: r["log_index"])["label"] == TARGET
    assert result.mad_flagged == [TARGET]
    assert all(r["max_margin"] > 0 for r in result.labels)


@pytest.mark.slow
def test_clean_mnist_model_not_flagged():
    # with 8 synthetic classes the MAD is too noisy to say anything about false positives, so this
    # uses a real clean MNIST model (the detection benchmark measures the rate on a model zoo)
    from netcleanse.architectures import SmallCNN
    from netcleanse.datasets import load_builtin
    torch.manual_seed(0)
    train, val = load_builtin("mnist", "train"), load_builtin("mnist", "val")
    net = SmallCNN(10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(net(train.x[b]), train.y[b]).backward()
            opt.step()
    model = Classifier(net.eval(), (1, 28, 28), 10, name="clean_mnist", arch="mnist-cnn")
    assert (model.predict(val.x) == val.y).float().mean() > 0.9
    assert scan(model, val, progress=False).flagged == []
    assert scan(model, data_free=True, progress=False).flagged == []


def test_many_labels_use_random_controls_and_find_the_target():
    # > 64 labels: coarse pass over all, refinement of candidates + random controls, calibrated index
    n_classes = 100
    model = train_tiny(True, n_classes=n_classes, n=3000)
    x, y = make_data(400, torch.Generator().manual_seed(99), n_classes)
    result = scan(model, Dataset(x, y, source="tiny-100"), progress=False)
    det = result.settings["detection"]
    assert det["scheme"] == "random controls" and len(result.labels) == n_classes
    refined = set(det["candidates"]) | set(det["controls"])
    assert TARGET in det["candidates"] and len(refined) < n_classes
    top = max(result.labels, key=lambda r: r["anomaly_index"])
    assert top["label"] == TARGET and TARGET in result.flagged and result.verdict == "backdoor-detected"
    # every label's index and size ratio are measured against the sample it was scored with; the
    # ceiling is that of the refined labels, the only ones that can be flagged here
    for rec in result.labels:
        median = det["median"] if rec["label"] in refined else det["coarse_median"]
        assert rec["mask_l1_vs_median"] == pytest.approx(rec["mask_l1"] / median)
        if rec["label"] in refined:
            assert rec["anomaly_index"] <= result.index_ceiling
    assert result.index_ceiling == pytest.approx(det["median"] / det["mad"])
    assert top["mask_l1_vs_median"] < 0.5


def test_the_few_labels_plan_costs_no_more_than_the_largest_many_labels_refinement():
    fast = PRESETS["fast"]
    cap = (fast.max_candidates + fast.controls) * fast.refine.schedule.max_passes()
    few = [n for n in range(1, 200) if fast.few_labels(n)]
    assert few == list(range(1, len(few) + 1)) and 10 in few  # a 10-label MNIST net takes it
    assert len(few) * fast.few_labels_refine.schedule.max_passes() <= cap
    assert (len(few) + 1) * fast.few_labels_refine.schedule.max_passes() > cap  # 43 labels: not


def test_mid_size_label_counts_refine_every_label_on_the_many_labels_schedule():
    # 30 labels: beyond the few-labels plan, no more than candidates + controls: every label is
    # refined on the many-labels schedule and scored against all labels
    n_classes = 30
    model = train_tiny(True, n_classes=n_classes, n=1500)
    x, y = make_data(300, torch.Generator().manual_seed(98), n_classes)
    result = scan(model, Dataset(x, y, source="tiny-30"), progress=False)
    assert result.settings["detection"]["scheme"] == "all labels"
    assert result.settings["plan"]["refine"] == PRESETS["fast"].refine.to_dict()
    assert result.settings["plan"]["n_opt"] == PRESETS["fast"].n_opt
    assert {rec["stage"] for rec in result.labels} == {"refine"}
    assert max(result.labels, key=lambda r: r["anomaly_index"])["label"] == TARGET
    assert TARGET in result.flagged


def test_same_seed_same_result(badnet, clean_data):
    a = scan(badnet, clean_data, labels=[0, 4, 5], seed=3, progress=False)
    b = scan(badnet, clean_data, labels=[0, 4, 5], seed=3, progress=False)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(a.labels) == strip(b.labels)
    assert np.array_equal(a.masks, b.masks)
    c = scan(badnet, clean_data, labels=[0, 4, 5], seed=4, progress=False)
    assert not np.array_equal(a.masks, c.masks)


def test_one_label_alone_is_inconclusive(badnet, clean_data):
    # one label has no spread to be an outlier of (MAD 0): the scan cannot say anything
    result = scan(badnet, clean_data, labels=[TARGET], progress=False)
    assert result.flagged == [] and result.index_ceiling == 0 and result.verdict == "inconclusive"


def test_refuses_non_empty_out(badnet, clean_data, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NetcleanseError, match="not empty"):
        scan(badnet, clean_data, labels=[0], out=tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_resume_after_interruption_gives_same_result(badnet, clean_data, tmp_path, monkeypatch):
    # small chunks so the interruption falls between chunks
    fast = PRESETS["fast"]
    small = scan_module.replace(fast, coarse=scan_module.replace(fast.coarse, label_chunk=3),
                                refine=scan_module.replace(fast.refine, label_chunk=3))
    monkeypatch.setitem(PRESETS, "fast", small)
    whole = scan(badnet, clean_data, seed=5, out=tmp_path / "whole", progress=False)

    with ctrl_c_at_search(3), pytest.raises(KeyboardInterrupt):
        scan(badnet, clean_data, seed=5, out=tmp_path / "cut", progress=False)
    progress_lines = (tmp_path / "cut" / "progress.jsonl").read_text().splitlines()
    assert len(progress_lines) == 2  # two chunks finished and persisted
    with pytest.raises(NetcleanseError, match="not empty"):
        scan(badnet, clean_data, seed=5, out=tmp_path / "cut", progress=False)
    resumed = scan(badnet, clean_data, seed=5, out=tmp_path / "cut", resume=True, progress=False)
    assert [r["label"] for r in resumed.labels] == list(range(N_CLASSES))
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(resumed.labels) == strip(whole.labels)
    assert np.array_equal(resumed.masks, whole.masks)
    # resuming with other settings is refused
    with pytest.raises(NetcleanseError, match="different settings"):
        scan(badnet, clean_data, seed=6, out=tmp_path / "cut", resume=True, progress=False)
    # ... and so is resuming with another net of the same name and shape, or other images
    other = scan_module.copy.deepcopy(badnet)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(NetcleanseError, match="the model's weights"):
        scan(other, clean_data, seed=5, out=tmp_path / "cut", resume=True, progress=False)
    rescaled = scan_module.copy.deepcopy(badnet)
    rescaled.input_scale = 255.0  # the weights' digest covers the preprocessing: it is named for what it is
    with pytest.raises(NetcleanseError, match=r"the model's preprocessing: input_scale\)"):
        scan(rescaled, clean_data, seed=5, out=tmp_path / "cut", resume=True, progress=False)
    shifted = Dataset(clean_data.x.flip(0), clean_data.y.flip(0), source=clean_data.source)
    with pytest.raises(NetcleanseError, match="the data's content"):
        scan(badnet, shifted, seed=5, out=tmp_path / "cut", resume=True, progress=False)
    # the same images named by another path (resumed from another folder): their digest decides
    with ctrl_c_at_search(3), pytest.raises(KeyboardInterrupt):
        scan(badnet, clean_data, seed=5, out=tmp_path / "cut2", progress=False)
    import gc
    gc.collect()  # the interrupted scan's journal is gone: its time, chunks in flight too, is on record
    record = json.loads((tmp_path / "cut2" / "elapsed.json").read_text())
    chunks = [json.loads(line) for line in (tmp_path / "cut2" / "progress.jsonl").read_text().splitlines()]
    assert record["elapsed_s"] > 0 and len(chunks) == 2
    moved = Dataset(clean_data.x, clean_data.y, source="../elsewhere/" + str(clean_data.source))
    again = scan(badnet, moved, seed=5, out=tmp_path / "cut2", resume=True, progress=False)
    assert np.array_equal(again.masks, whole.masks)


def test_parse_labels():
    assert parse_labels("0,5,7-9", 10) == [0, 5, 7, 8, 9]
    assert parse_labels(" 3 , 1,1 ", 10) == [1, 3]
    assert parse_labels(None, 10) is None
    for bad in ("a", "3-1", "1,,x", "5-"):
        with pytest.raises(NetcleanseError, match="bad label list"):
            parse_labels(bad, 10)
    with pytest.raises(NetcleanseError, match="out of range"):
        parse_labels("0,10", 10)
    # an empty list is a mistake, not "all labels"; a huge range is refused before it is expanded
    for empty in ("", "  "):
        with pytest.raises(NetcleanseError, match="empty"):
            parse_labels(empty, 10)
    with pytest.raises(NetcleanseError, match="label 1000000000000 is out of range"):
        parse_labels("0-1000000000000", 10)


def test_two_scans_never_write_one_folder(badnet, clean_data, tmp_path):
    # a scan holding the folder (as a second process would) makes another --resume refuse in one line
    first = lock_folder(tmp_path)
    (tmp_path / "scan_settings.json").write_text("{}")
    try:
        with pytest.raises(NetcleanseError, match="another netcleanse process is writing"):
            lock_folder(tmp_path)
    finally:
        first.close()
    lock_folder(tmp_path).close()  # free again once the first is done


def test_interrupted_while_saving_resumes(badnet, clean_data, tmp_path, monkeypatch):
    # scan.json is written last: a scan cut off after masks.npz has no scan.json and resumes
    whole = scan(badnet, clean_data, labels=[0, 4, 5], seed=2, out=tmp_path / "a", progress=False)
    real = scan_folder.write_json_atomic

    def crash(path, obj, indent=None):
        if path.name == "scan.json":
            raise KeyboardInterrupt
        return real(path, obj, indent=indent)

    monkeypatch.setattr(scan_folder, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        scan(badnet, clean_data, labels=[0, 4, 5], seed=2, out=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "masks.npz").exists() and not (tmp_path / "b" / "scan.json").exists()
    monkeypatch.setattr(scan_folder, "write_json_atomic", real)
    resumed = scan(badnet, clean_data, labels=[0, 4, 5], seed=2, out=tmp_path / "b", resume=True, progress=False)
    assert np.array_equal(resumed.masks, whole.masks) and (tmp_path / "b" / "scan.json").exists()


def test_resume_key_covers_every_kind_of_weight():
    # a network with a 0-d buffer (BatchNorm's counter) and integer buffers still gets a digest,
    # and any change of a weight changes it
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, N_CLASSES))
    model = Classifier(net.eval(), (1, SIZE, SIZE), N_CLASSES)
    before = weights_digest(model)
    with torch.no_grad():
        net[1].running_mean[0] += 1
    assert len(before) == 64 and weights_digest(model) != before


def test_dangling_link_as_out_is_one_error(badnet, clean_data, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NetcleanseError, match="link to nothing"):
        scan(badnet, clean_data, labels=[0, 4], out=tmp_path / "out", progress=False)


def test_bad_arguments(badnet, clean_data):
    with pytest.raises(NetcleanseError, match="exactly one"):
        scan(badnet, clean_data, data_free=True, progress=False)
    with pytest.raises(NetcleanseError, match="exactly one"):
        scan(badnet, progress=False)
    with pytest.raises(NetcleanseError, match="unknown preset"):
        scan(badnet, clean_data, preset="slow", progress=False)
    wrong = Dataset(torch.rand(4, 3, SIZE, SIZE))
    with pytest.raises(NetcleanseError, match="expects"):
        scan(badnet, wrong, progress=False)


def test_cli_scan(tmp_path):
    from typer.testing import CliRunner
    from netcleanse.architectures import SmallCNN
    from netcleanse.cli import app
    from netcleanse.torch_io import save_model
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    save_model(Classifier(SmallCNN(10).eval(), (1, 28, 28), 10, name="small", arch="mnist-cnn"), path)
    runner = CliRunner()
    res = runner.invoke(app, ["scan", str(path), "--data-free", "--out", str(tmp_path / "o"), "--labels", "0-2",
                              "--save-all-images"])
    assert res.exit_code == 0, res.output
    assert "3 labels scanned" in res.output or "flagged" in res.output
    info = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert [r["label"] for r in info["labels"]] == [0, 1, 2] and info["data"] == "data-free"
    assert (tmp_path / "o" / "small_visualize_fusion_label_2.png").exists()
    # a second run into the same folder refuses, and --resume returns the finished scan
    res = runner.invoke(app, ["scan", str(path), "--data-free", "--out", str(tmp_path / "o"), "--labels", "0-2"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["scan", str(path), "--data-free", "--out", str(tmp_path / "o"), "--labels", "0-2",
                              "--resume"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["scan", str(path), "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0


def test_cli_verdict_lists_flags_most_anomalous_first():
    from netcleanse.cli.scan import verdict
    records = [{"label": t, "mask_l1": l1, "anomaly_index": a, "flagged": a > 2}
               for t, l1, a in [(0, 90.0, 2.1), (1, 10.0, 3.4), (2, 300.0, -0.5), (3, 60.0, 2.6)]]
    result = ScanResult(labels=records, flagged=[0, 1, 3], threshold=2.0, preset="fast", data="data-free",
                        elapsed_s=1.0, model={}, settings={}, masks=np.zeros((4, 2, 2)), patterns=np.zeros((4, 1, 2, 2)))
    line = verdict(result)
    assert line.startswith("BACKDOOR SUSPECTED: 3 of 4 labels flagged")
    assert line.index("1 (index 3.40") < line.index("3 (index 2.60") < line.index("0 (index 2.10")
    assert "2 (index" not in line
    assert result.verdict == "backdoor-detected"
    result.flagged, result.labels = [], [dict(r, flagged=False) for r in records]
    assert verdict(result) == "no label flagged among 4 scanned (threshold 2)"
    assert result.verdict == "none-detected"  # no ceiling known (older scan.json): not inconclusive
    result.index_ceiling = 4.5
    assert result.verdict == "none-detected" and verdict(result).startswith("no label flagged")
    # nothing could have been flagged: say so, and name the most anomalous label
    result.index_ceiling = 1.8
    result.labels = [dict(r, anomaly_index=r["anomaly_index"] / 2, mask_l1_vs_median=r["mask_l1"] / 80)
                     for r in result.labels]
    assert result.verdict == "inconclusive"
    line = verdict(result)
    assert line.startswith("INCONCLUSIVE: no label flagged among 4 scanned")
    assert "1.80" in line and "most anomalous label 1 (index 1.70, mask L1 10.0, 12 % of the median)" in line


class _AlwaysLabel(nn.Module):
    """Answers ``label`` for every input: any trigger "succeeds", so the cost only ever rises."""

    def __init__(self, label: int, n_classes: int = 3):
        super().__init__()
        self.register_buffer("logits", F.one_hot(torch.tensor(label), n_classes).float() * 10)

    def forward(self, x):
        return self.logits + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_continued_search_early_stops_only_after_the_cost_moved_both_ways():
    from netcleanse.neural_cleanse import Schedule, reverse_engineer
    model = _AlwaysLabel(1)
    x = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    schedule = Schedule(batch_size=4, steps_per_epoch=1, max_epochs=200, patience=2, early_stop_patience=5)
    fresh = reverse_engineer(model, x, [1], schedule, generator=torch.Generator().manual_seed(0))[0]
    continued = reverse_engineer(model, x, [1], schedule, generator=torch.Generator().manual_seed(0),
                                 init=(torch.full((1, 6, 6), 0.5), torch.rand(1, 1, 6, 6)),
                                 init_cost=torch.tensor([1e-3]))[0]
    # every epoch succeeds, so the cost never goes down and neither search may stop early, even
    # once the mask has shrunk as far as float32 allows and stopped improving
    assert fresh.succeeded and continued.succeeded
    assert fresh.epochs == continued.epochs == schedule.max_epochs
    assert continued.mask_l1 < 0.01


@pytest.mark.parametrize("option, value", [("--threshold", "nan"), ("--threshold", "inf"), ("--alpha", "nan"),
                                           ("--alpha", "1.5"), ("--input-scale", "inf"), ("--input-scale", "nan"),
                                           ("--rule", "vote")])
def test_cli_scan_refuses_numbers_that_cannot_give_a_verdict(tmp_path, option, value):
    import subprocess
    import sys
    from netcleanse.architectures import SmallCNN
    from netcleanse.torch_io import save_model
    path = tmp_path / "small.pt"
    save_model(Classifier(SmallCNN(10).eval(), (1, 28, 28), 10, name="small", arch="mnist-cnn"), path)
    res = subprocess.run([sys.executable, "-c", "import sys; from netcleanse.cli import main; sys.exit(main())",
                          "scan", str(path), "--data-free", "--out", str(tmp_path / "o"), option, value],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr and not (tmp_path / "o" / "scan.json").exists()


def _count_images(model):
    """Forward pre-hook on ``model``'s network: images seen with and without autograd (the counts
    survive the scan's private deep copy: the hook's closure is shared, not copied)."""
    seen = {"backward": 0, "forward": 0}

    def hook(module, inputs):
        seen["backward" if torch.is_grad_enabled() else "forward"] += len(inputs[0])

    model.net.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("n_classes, data_free", [(N_CLASSES, True), (80, False)])
def test_recorded_image_passes_are_the_images_the_network_saw(n_classes, data_free):
    # scan.json's cost record (settings["passes"]) equals what actually went through the network,
    # in the few-labels path (data-free: with the input synthesis) and the coarse + refinement path
    model = train_tiny(True, n_classes=n_classes, n=100 * n_classes // 8)
    seen = _count_images(model)
    data = None if data_free else Dataset(*make_data(300, torch.Generator().manual_seed(5), n_classes), source="t")
    result = scan(model, data, data_free=data_free, progress=False)
    passes = result.settings["passes"]
    assert passes["backward_total"] == seen["backward"]
    assert passes["forward_only"] == seen["forward"]
    assert passes["backward_total"] == sum(v for k, v in passes.items() if k not in ("backward_total", "forward_only"))
    assert (passes["synthesis"] > 0) == data_free and passes["margin"] > 0 and passes["refine"] > 0


def test_a_stage_measures_attack_success_on_its_share_of_the_held_back_inputs(badnet, clean_data):
    # the fast preset's coarse pass: 32 held-back inputs; the same chunk with all of them differs only there
    from netcleanse.neural_cleanse import Schedule, attack_success
    x_opt, x_val = clean_data.x[:16], clean_data.x[16:48]
    shared = scan_module._ScanShared(badnet, x_opt, x_val, False)
    job = scan_module._ChunkJob("coarse", Schedule(batch_size=4, steps_per_epoch=1, max_epochs=3), [0, TARGET], 7)
    entry, arrays = scan_module._search_chunk(shared, job, lambda n: None)
    part, part_arrays = scan_module._search_chunk(shared, scan_module.replace(job, held_back=5), lambda n: None)
    for key in arrays:
        assert np.array_equal(arrays[key], part_arrays[key])  # the search itself is the same
    masks, patterns = torch.from_numpy(arrays["masks"]), torch.from_numpy(arrays["patterns"])
    assert [r["attack_success"] for r in entry["records"]] == attack_success(badnet, x_val, masks, patterns, [0, TARGET])
    assert [r["attack_success"] for r in part["records"]] == attack_success(badnet, x_val[:5], masks, patterns,
                                                                            [0, TARGET])
    assert [r["attack_success"] for r in part["records"]] != [r["attack_success"] for r in entry["records"]]
    assert PRESETS["fast"].coarse.held_back == 32 and PRESETS["fast"].refine.held_back is None


def test_an_interrupted_runs_time_is_recorded_in_flight_chunks_included(tmp_path, monkeypatch):
    import gc

    import netcleanse.journal as journal_module
    clock = [1000.0]
    monkeypatch.setattr(journal_module.time, "perf_counter", lambda: clock[0])
    (tmp_path / "elapsed.json").write_text('{"elapsed_s": 40.0}')  # an earlier run's
    journal = journal_module.Journal(tmp_path)
    clock[0] += 25.0  # work on a chunk that never finished
    del journal
    gc.collect()
    assert json.loads((tmp_path / "elapsed.json").read_text())["elapsed_s"] == 65.0
    finished = journal_module.Journal(tmp_path)
    finished.close()  # a finished scan records its time in its result, not here
    clock[0] += 5.0
    del finished
    gc.collect()
    assert json.loads((tmp_path / "elapsed.json").read_text())["elapsed_s"] == 65.0


def test_an_interrupted_data_free_scan_keeps_its_inverted_inputs(badnet, tmp_path, monkeypatch, capsys):
    # the inversion goes in parts, each journalled: a resumed scan inverts only the parts not yet
    # finished, and ends with the bits of an uninterrupted scan; the progress shows the inversion
    fast = PRESETS["fast"]
    plan = scan_module.replace(fast, n_opt=24, n_val=8, few_labels_n_opt=24, margin_restarts=1, margin_steps=5,
                               few_labels_refine=scan_module.replace(
                                   fast.few_labels_refine, schedule=scan_module.replace(
                                       fast.few_labels_refine.schedule, max_epochs=3)))
    monkeypatch.setattr(scan_module, "INVERT_IMAGES", 8)  # 32 inputs: four parts
    whole = scan(badnet, data_free=True, labels=[0, 1, TARGET], preset=plan, seed=2, out=tmp_path / "whole",
                 progress=False)
    real, calls = scan_module.invert, []

    def counted(*args, **kwargs):
        if len(calls) == limit[0]:
            raise KeyboardInterrupt
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    limit = [2]
    monkeypatch.setattr(scan_module, "invert", counted)
    with pytest.raises(KeyboardInterrupt):
        scan(badnet, data_free=True, labels=[0, 1, TARGET], preset=plan, seed=2, out=tmp_path / "cut", progress=False)
    entries = [json.loads(line) for line in (tmp_path / "cut" / "progress.jsonl").read_text().splitlines()]
    assert [(e["lo"], e["hi"]) for e in entries] == [(0, 8), (8, 16)]
    calls.clear()
    limit[0] = None
    monkeypatch.setenv("NETCLEANSE_PROGRESS_EVERY", "1000")
    monkeypatch.delenv("NETCLEANSE_NO_PROGRESS", raising=False)
    resumed = scan(badnet, data_free=True, labels=[0, 1, TARGET], preset=plan, seed=2, out=tmp_path / "cut",
                   resume=True, progress=True)
    assert calls == [8, 8]  # only the two parts left
    assert "inputs: inverting 32: 120/120 (100 %)" in capsys.readouterr().err  # 4 parts x 30 steps, 2 done
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(resumed.labels) == strip(whole.labels)
    assert np.array_equal(resumed.masks, whole.masks)


def test_a_label_flagged_with_an_empty_trigger_is_warned_about():
    # a model that answers one class for everything: that label needs no trigger, which is no backdoor
    from netcleanse.errors import NetcleanseWarning
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    with torch.no_grad():
        net[1].bias[2] += 50.0
    model = Classifier.wrap(net, "1x8x8")
    data = Dataset(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)), None, source="noise")
    with pytest.warns(NetcleanseWarning, match="label 2 was flagged with an empty trigger"):
        result = scan(model, data, seed=0, progress=False)
    assert 2 in result.flagged and result.record(2)["mask_l1"] < 1
    notes = result.settings["warnings"]
    assert "answers 2 for 100%" in notes[0] and "empty trigger" in notes[1]  # (its data: one class to it)
    # no input makes the other labels its answer: the margins are left out of the test, and said so
    assert "left out the maximum margins" in notes[2]
    assert result.test["reference"]["statistic"] == "log mask L1"


def test_clean_images_of_mostly_one_class_are_warned_about(badnet, clean_data):
    # inputs that are a label already need no trigger: a scan on one class's images says so
    from netcleanse.errors import NetcleanseWarning
    answers = badnet.predict(clean_data.x)
    top = int(answers.mode().values)
    one = Dataset(clean_data.x[answers == top][:40], answers[answers == top][:40], source="one class")
    with pytest.warns(NetcleanseWarning, match=f"the model answers {top} for 100% of the"):
        result = scan(badnet, one, labels=[0, 1, top], progress=False)
    assert any("images of many classes" in note for note in result.settings["warnings"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", NetcleanseWarning)  # mixed classes: no such warning
        scan(badnet, clean_data, labels=[0, 1], progress=False)
