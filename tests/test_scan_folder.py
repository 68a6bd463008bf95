"""netcleanse.scan_folder: the one reader/writer of scan.json + masks.npz, and atomic JSON writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from netcleanse import scan_folder
from netcleanse.errors import NetcleanseError
from netcleanse.repair import scan_triggers
from netcleanse.report import find_sources
from netcleanse.scanning import ScanResult
from netcleanse.utils import write_json_atomic


def _result(labels=(0, 3, 7), flagged=(3,)) -> ScanResult:
    rng = np.random.default_rng(0)
    records = [{"label": label, "flagged": label in flagged, "mask_l1": float(i + 1), "anomaly_index": 0.5 * i}
               for i, label in enumerate(labels)]
    return ScanResult(labels=records, flagged=list(flagged), threshold=2.0, preset="fast", data="test",
                      elapsed_s=1.5, model={"name": "net/v1", "num_classes": 8}, settings={"detection": {}},
                      masks=rng.random((len(labels), 6, 5), dtype=np.float32),
                      patterns=rng.random((len(labels), 3, 6, 5), dtype=np.float32),
                      index_ceiling=4.0, rule="calibrated", alpha=0.05, test={"p_value": 0.01},
                      mad_flagged=list(flagged))


def test_save_then_load_gives_the_same_records_masks_and_patterns(tmp_path):
    saved = _result()
    saved.save(tmp_path / "s")
    loaded = ScanResult.load(tmp_path / "s")
    assert loaded.to_dict() == saved.to_dict()
    assert np.array_equal(loaded.masks, saved.masks) and np.array_equal(loaded.patterns, saved.patterns)
    assert torch.equal(loaded.trigger(3).mask, torch.from_numpy(saved.masks[1]))
    files = {p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*")}
    assert {"scan.json", "masks.npz", "net_v1_visualize_mask_label_3.png", "triggers/label_3_fusion.png"} <= files
    assert not any("label_0" in f for f in files)  # PNGs of flagged labels only
    assert not any(".partial" in f for f in files)


def test_report_and_repair_read_the_saved_folder(tmp_path):
    saved = _result()
    saved.save(tmp_path)
    sources = find_sources(tmp_path)
    assert sources.scan == json.loads((tmp_path / "scan.json").read_text())
    assert np.array_equal(sources.triggers.get(7)[1], saved.patterns[2])
    triggers = scan_triggers(tmp_path)
    assert list(triggers) == [3] and torch.equal(triggers[3].pattern, torch.from_numpy(saved.patterns[1]))


def _pickled(path: Path) -> None:
    np.savez(path, labels=np.array([0, 3, 7]), masks=np.array([None, None, None], dtype=object),
             patterns=np.zeros((3, 3, 6, 5)))


def _bad_shapes(path: Path) -> None:
    np.savez(path, labels=np.arange(3), masks=np.zeros((3, 6, 5)), patterns=np.zeros((3, 6, 5)))


@pytest.mark.parametrize("corrupt", [
    lambda p: p.write_bytes(b"PK\x03\x04 not a zip"),
    lambda p: p.write_bytes(p.read_bytes()[:-40]),  # cut short
    lambda p: np.savez(p, labels=np.arange(3)),  # arrays missing
    _pickled,  # refused: allow_pickle=False
    _bad_shapes,
], ids=["garbage", "truncated", "missing-arrays", "pickle", "shapes"])
def test_a_corrupted_masks_file_gives_one_error_from_scan_report_and_repair(tmp_path, corrupt):
    _result().save(tmp_path)
    corrupt(tmp_path / "masks.npz")
    messages = []
    for read in (ScanResult.load, find_sources, scan_triggers):
        with pytest.raises(NetcleanseError) as info:
            read(tmp_path)
        messages.append(str(info.value))
    assert messages[0] == messages[1] == messages[2]
    assert "masks.npz" in messages[0] and "\n" not in messages[0]


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read"), ("[1, 2]", "does not hold a JSON object"),
    ('{"labels": 3}', "'labels' must be a non-empty list"), ("{}", "'labels' must be a non-empty list"),
    # a lab's truth.json saved as scan.json: not a scan's record (it showed a green "no backdoor")
    ('{"backdoored": true, "targets": [7], "triggers": [], "flagged": []}', "'labels' must be a non-empty list"),
    ('{"labels": [{"label": 0}], "flagged": []}', "label 0 has no finite mask_l1"),
    ('{"labels": [{"label": 0, "mask_l1": NaN}], "flagged": []}', "label 0 has no finite mask_l1"),
    ('{"labels": [{"label": 0, "mask_l1": 3.0}, {"label": 0, "mask_l1": 4.0}], "flagged": []}', "listed twice"),
    ('{"labels": [{"label": 0, "mask_l1": 3.0}], "flagged": [42]}', "flagged label 42 was not scanned"),
    ('{"labels": [{"label": 0, "mask_l1": 3.0}], "flagged": "0"}', "'flagged' must be a list"),
    ('{"labels": [{"label": 0, "mask_l1": 3.0}], "flagged": [], "test": []}', "'test' must be an object"),
    ('{"labels": [0, 1, 2], "flagged": []}', "labels\\[0\\] has no integer 'label'")])
def test_a_corrupted_scan_json_gives_one_error_from_scan_report_and_repair(tmp_path, text, message):
    _result().save(tmp_path)
    (tmp_path / "scan.json").write_text(text)
    messages = []
    for read in (ScanResult.load, find_sources, scan_triggers):
        with pytest.raises(NetcleanseError, match=message) as info:
            read(tmp_path)
        messages.append(str(info.value))
    assert len(set(messages)) == 1 and "\n" not in messages[0]


def test_an_unfinished_scan_folder_says_to_resume(tmp_path):
    (tmp_path / "scan_settings.json").write_text("{}")
    (tmp_path / "progress.jsonl").write_text("")
    for read in (ScanResult.load, find_sources, scan_triggers):
        with pytest.raises(NetcleanseError, match="holds a scan that did not finish; rerun the same scan command with --resume"):
            read(tmp_path)


def test_a_folder_without_masks_is_not_a_scan_folder(tmp_path):
    _result().save(tmp_path)
    (tmp_path / "masks.npz").unlink()
    for read in (ScanResult.load, scan_triggers):
        with pytest.raises(NetcleanseError, match="not a scan output folder"):
            read(tmp_path)
    assert find_sources(tmp_path).triggers is None  # the report shows a scan without its images


def test_an_interrupted_json_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "scan.json"
    write_json_atomic(path, {"old": True}, indent=1)
    before = path.read_bytes()
    real = Path.write_text

    def cut(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)  # half the file, then the interruption
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"new": list(range(100))}, indent=1)
    monkeypatch.setattr(Path, "write_text", real)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scan.json"]
    with pytest.raises(TypeError):  # not serialisable: nothing is written
        write_json_atomic(path, {"new": object()})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scan.json"]


def test_an_interrupted_save_keeps_the_previous_scan_json(tmp_path, monkeypatch):
    first = _result()
    first.save(tmp_path)
    before = (tmp_path / "scan.json").read_bytes()

    def interrupted(path, obj, indent=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_folder, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _result(flagged=(0, 3)).save(tmp_path, force=True)
    assert (tmp_path / "scan.json").read_bytes() == before


def test_saving_over_a_scan_needs_force_and_leaves_none_of_its_files(tmp_path):
    _result(flagged=(0, 3)).save(tmp_path)
    (tmp_path / "scan_settings.json").write_text("{}")  # the earlier run's resume key
    with pytest.raises(NetcleanseError, match="already holds a scan"):
        _result(flagged=(3,)).save(tmp_path)
    again = _result(flagged=(0, 3))
    again.save(tmp_path, force=True)  # the same scan saved again keeps its run's files
    assert (tmp_path / "scan_settings.json").exists()
    _result(flagged=(7,)).save(tmp_path, force=True)
    triggers = sorted(p.name for p in (tmp_path / "triggers").iterdir())
    assert triggers and all(name.startswith("label_7_") for name in triggers)
    assert not any("label_0" in p.name or "label_3" in p.name for p in tmp_path.glob("*.png"))
    assert not (tmp_path / "scan_settings.json").exists() and ScanResult.load(tmp_path).flagged == [7]
